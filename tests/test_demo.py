"""The README's demo: a real 5-shot task from the sample shipped in l2l_peft/data/, end to end."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest

from l2l_peft import load_task
from l2l_peft.cache import REPO_CACHE
from l2l_peft.demo import DEV_DATA, SAMPLE_DATA, pretraining_datasets, sample_demo_task


def test_shipped_sample_gives_a_valid_task():
    assert (SAMPLE_DATA / "pbc_blood_cells.npz").stat().st_size < 1_000_000  # package data stays small
    task, labels = sample_demo_task(SAMPLE_DATA, "pbc_blood_cells", shots=5, seed=0)
    blob = pickle.dumps(task)
    data = load_task(blob)
    assert data.support_images.shape == (20, 3, 224, 224)
    assert data.support_labels.bincount().tolist() == [5, 5, 5, 5]
    assert len(labels) == len(data.query_images) == 40
    assert len(blob) < 1.1 * 60 * 3 * 224 * 224 * 4  # each image pickled once, not its whole batch per image


@pytest.mark.skipif(not (DEV_DATA / "manifest.json").is_file(), reason="development data not present")
def test_dev_demo_task_is_valid():
    task, labels = sample_demo_task(DEV_DATA, "brain_tumor_mri", shots=5, seed=0)
    blob = pickle.dumps(task)
    data = load_task(blob)
    assert len(blob) < 1.1 * 60 * 224 * 224 * 4  # was 722 MB when images were views of one batch
    assert data.support_images.shape == (20, 1, 224, 224)
    assert data.support_labels.bincount().tolist() == [5, 5, 5, 5]
    assert len(labels) == len(data.query_images) == 40
    assert -1 <= float(data.support_images.min()) and float(data.support_images.max()) <= 1


def test_pretraining_datasets_come_from_the_model_card(tmp_path):
    seen = pretraining_datasets(REPO_CACHE / "l2l-vit-tiny-med")
    assert seen == [
        "bccd_multilabel",
        "brain_tumor_mri",
        "lc25000_lung_histo",
        "pneumoniamnist",
        "retinamnist",
        "wbc_type_bccd",
    ]
    assert pretraining_datasets(tmp_path) is None  # no card


def run_demo(vit_dir, tmp_path, *args: str) -> subprocess.CompletedProcess:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "L2L_PEFT_MODEL": str(vit_dir), "TMPDIR": str(tmp)}
    return subprocess.run(
        [sys.executable, "-m", "l2l_peft.demo", "--time-budget", "60", *args],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )


def test_demo_runs_end_to_end_and_says_what_the_score_means(vit_dir, tmp_path):
    proc = run_demo(vit_dir, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "pbc_blood_cells: query accuracy" in proc.stderr and "AUROC" in proc.stderr
    assert "its model card does not list its pretraining data" in proc.stderr
    assert list((tmp_path / "tmp").iterdir()) == []  # its 36 MB task pickle does not outlive the run
    assert "Loading weights" not in proc.stderr  # offline settings come before the demo imports transformers


def test_demo_out_dir_keeps_the_task_and_its_result(vit_dir, tmp_path):
    proc = run_demo(vit_dir, tmp_path, "--out-dir", str(tmp_path / "kept"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    task = load_task((tmp_path / "kept" / "task.pkl").read_bytes())
    probs = pickle.loads((tmp_path / "kept" / "result.pkl").read_bytes())
    assert probs.shape == (len(task.query_images), 4)
    assert "removed now" not in proc.stderr
