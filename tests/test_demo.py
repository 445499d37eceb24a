"""The README's demo builds valid challenge tasks."""

from __future__ import annotations

import pickle

import pytest

from l2l_peft import load_task
from l2l_peft.demo import DEV_DATA, sample_dev_task, synthetic_task


def test_synthetic_demo_task_is_valid():
    task, labels = synthetic_task(shots=2, seed=0)
    blob = pickle.dumps(task)
    data = load_task(blob)
    assert data.support_images.shape == (6, 1, 224, 224) and len(labels) == len(data.query_images) == 30
    assert len(blob) < 1.1 * 36 * 224 * 224 * 4  # each image pickled once, not its whole batch per image


@pytest.mark.skipif(not (DEV_DATA / "manifest.json").is_file(), reason="development data not present")
def test_dev_demo_task_is_valid():
    task, labels = sample_dev_task(DEV_DATA, "brain_tumor_mri", shots=5, seed=0)
    blob = pickle.dumps(task)
    data = load_task(blob)
    assert len(blob) < 1.1 * 60 * 224 * 224 * 4  # was 722 MB when images were views of one batch
    assert data.support_images.shape == (20, 1, 224, 224)
    assert data.support_labels.bincount().tolist() == [5, 5, 5, 5]
    assert len(labels) == len(data.query_images) == 40
    assert -1 <= float(data.support_images.min()) and float(data.support_images.max()) <= 1
