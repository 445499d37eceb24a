"""Frozen-feature baselines: output format per target, the probe fits its support, prototypes refuse regression."""

from __future__ import annotations

import pytest
import torch
from torchcross.data.task import TaskTarget

from conftest import make_task
from l2l_peft.config import AdaptConfig
from l2l_peft.frozen import Frozen, ProbeConfig, probe_config, run_frozen
from l2l_peft.task import TaskError, load_task

CLASSIFICATION = [
    TaskTarget.MULTICLASS_CLASSIFICATION,
    TaskTarget.BINARY_CLASSIFICATION,
    TaskTarget.MULTILABEL_CLASSIFICATION,
    TaskTarget.ORDINAL_REGRESSION,
]


def _check_format(probs: torch.Tensor, target: TaskTarget, n_query: int, n_classes: int) -> None:
    assert probs.dtype == torch.float32 and probs.device.type == "cpu"
    assert torch.isfinite(probs).all()
    match target:
        case TaskTarget.MULTICLASS_CLASSIFICATION | TaskTarget.ORDINAL_REGRESSION:
            assert probs.shape == (n_query, n_classes)
            torch.testing.assert_close(probs.sum(1), torch.ones(n_query))
        case TaskTarget.BINARY_CLASSIFICATION | TaskTarget.REGRESSION:
            assert probs.shape == (n_query, 1)
        case _:
            assert probs.shape == (n_query, n_classes)
    if target is not TaskTarget.REGRESSION:
        assert probs.min() >= 0 and probs.max() <= 1


@pytest.mark.parametrize("target", CLASSIFICATION + [TaskTarget.REGRESSION])
@pytest.mark.parametrize("kind", list(Frozen))
def test_output_format(vit_dir, target, kind):
    task, _ = make_task(target, n_support=12, n_query=7)
    data = load_task(task)
    config = AdaptConfig(model=str(vit_dir))
    if kind is Frozen.PROTOTYPES and target is TaskTarget.REGRESSION:
        with pytest.raises(TaskError, match="regression"):
            run_frozen(data, config, kind)
        return
    result = run_frozen(data, config, kind)
    _check_format(result.probabilities, target, 7, len(data.classes))
    assert set(result.timings) == {"load", "adapt", "predict", "total"}
    assert result.trainable_parameters > 0


def test_linear_probe_fits_its_support(vit_dir):
    """Weakly regularised, a softmax probe on 64-d features separates 12 support images."""
    task, _ = make_task(TaskTarget.MULTICLASS_CLASSIFICATION, n_support=12, n_query=0)
    data = load_task(task)
    data.query_images = data.support_images
    probs = run_frozen(data, AdaptConfig(model=str(vit_dir)), Frozen.LINEAR_PROBE, ProbeConfig(l2=1e-6)).probabilities
    assert (probs.argmax(1) == data.support_labels).all()


def test_probe_is_deterministic(vit_dir):
    data = load_task(make_task(TaskTarget.BINARY_CLASSIFICATION)[0])
    config = AdaptConfig(model=str(vit_dir))
    first = run_frozen(data, config, Frozen.LINEAR_PROBE).probabilities
    torch.testing.assert_close(run_frozen(data, config, Frozen.LINEAR_PROBE).probabilities, first)


def test_probe_config_split_and_validation():
    probe, rest = probe_config({"l2": 0.5, "max_steps": 3})
    assert probe == ProbeConfig(l2=0.5) and rest == {"max_steps": 3}
    with pytest.raises(ValueError, match="l2"):
        ProbeConfig(l2=-1)
