"""The development-data npz layout: manifest task types, including annotated ones."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import level_images, save_npz_dataset
from torchcross.data.task import TaskTarget

from l2l_peft.data.datasets import derived_split, load_npz_dir


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


def test_derived_split_keeps_groups_together_and_ignores_row_order():
    """Files without a split get one: frames of one clip share a part, and every label has test rows."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 40)
    groups = np.array([f"clip{label}_{i // 4}" for i, label in zip(range(120), labels)])  # 4 frames per clip
    split = derived_split(labels, groups).numpy()
    for g in set(groups):
        assert len(set(split[groups == g])) == 1, g
    for label in range(3):
        test_groups = {g for g in groups[(labels == label) & (split == 2)]}
        assert len(test_groups) == 2  # round(0.2 * 10 clips)
    order = rng.permutation(120)
    assert (derived_split(labels[order], groups[order]).numpy() == split[order]).all()
    lone = derived_split(np.array([0, 0, 1]), np.array(["a", "b", "c"])).tolist()
    assert sorted(lone[:2]) == [0, 2] and lone[2] == 0  # a label with one group keeps it for training


def test_npz_without_split_is_split_by_names(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.arange(40) % 2
    names = np.array([f"video{i // 5}" for i in range(40)])
    save_npz_dataset(tmp_path, "clips", level_images(labels, (8, 8), 60, rng), labels, "binary")
    with np.load(tmp_path / "clips.npz") as data:
        arrays = dict(data)
    np.savez(tmp_path / "clips.npz", **arrays, names=names)
    split = load_npz_dir(tmp_path)["clips"].split
    assert split is not None and set(split.tolist()) >= {0, 2}
    for video in set(names):
        assert len(set(split[torch.from_numpy(names == video)].tolist())) == 1
