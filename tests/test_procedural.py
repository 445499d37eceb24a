"""Dead-leaves images made by formula, a pretraining source (issue #16 item 3; two stages: test_pretrain)."""

from __future__ import annotations

import pytest
import torch

from l2l_peft.data.procedural import STYLES, dead_leaves
from l2l_peft.data.sources import load_targets


def test_dead_leaves_are_deterministic_labelled_images():
    data = dead_leaves(60, size=24, seed=3)
    assert data.images.shape == (60, 3, 24, 24) and data.images.dtype == torch.uint8
    assert torch.equal(data.images, dead_leaves(60, size=24, seed=3).images)
    assert not torch.equal(data.images, dead_leaves(60, size=24, seed=4).images)
    assert set(data.labels.tolist()) == set(range(len(STYLES))) and len(data.classes) == len(STYLES)


def test_the_style_is_visible_fine_leaves_make_more_regions():
    """The label is learnable: fine-leaved images have more distinct colours than coarse ones."""
    data = dead_leaves(240, size=48, seed=0)
    colours = torch.tensor([len(torch.unique(img.flatten(1), dim=1).T) for img in data.images]).float()
    fine = torch.tensor(["fine" in data.classes[int(label)] for label in data.labels])
    assert colours[fine].mean() > 1.5 * colours[~fine].mean()


def test_dead_leaves_refuse_empty_or_tiny_requests():
    for args in ({"n": 0}, {"n": 4, "size": 2}, {"n": 4, "leaves": 0}):
        with pytest.raises(ValueError, match="dead_leaves needs n >= 1, size >= 4 and leaves >= 1"):
            dead_leaves(**args)


def test_procedural_source_validates_its_generator():
    (target,) = load_targets({"kind": "procedural", "images": 12, "size": 16}, split="train")
    assert target.dataset == "dead_leaves" and len(target.data) == 12
    with pytest.raises(ValueError, match="generator must be one of"):
        load_targets({"kind": "procedural", "generator": "fractals"}, split="train")
