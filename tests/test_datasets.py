"""The development-data npz layout: manifest task types, including annotated ones."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import level_images, save_npz_dataset
from torchcross.data.task import TaskTarget

from l2l_peft.data.datasets import load_npz_dir


def test_annotated_task_types_load(tmp_path):
    """The shared data's manifest says 'multiclass (ordinal severity)' for dementia stages: that is ordinal."""
    rng = np.random.default_rng(0)
    labels = np.arange(12) % 3
    save_npz_dataset(tmp_path, "stages", level_images(labels, (8, 8), 60, rng), labels, "multiclass")
    save_npz_dataset(tmp_path, "plain", level_images(labels, (8, 8), 60, rng), labels, "multiclass")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["stages"]["task"] = "multiclass (ordinal severity)"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    datasets = load_npz_dir(tmp_path)
    assert datasets["stages"].target is TaskTarget.ORDINAL_REGRESSION
    assert datasets["plain"].target is TaskTarget.MULTICLASS_CLASSIFICATION
    manifest["stages"]["task"] = "segmentation"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="unknown task type 'segmentation'"):
        load_npz_dir(tmp_path)
