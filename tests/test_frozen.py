"""Frozen-feature methods: output format per target, the probe fits its support, prototypes refuse regression,
and they go through api.run like every method (settings from the experiments' YAML, ensembles)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_task
from torchcross.data.task import TaskTarget

from l2l_peft import run
from l2l_peft.config import AdaptConfig, Method
from l2l_peft.experiments.methods import Kind, Variant
from l2l_peft.frozen import FEATURE_METHODS
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
@pytest.mark.parametrize("kind", FEATURE_METHODS)
def test_output_format(vit_dir, target, kind):
    task, _ = make_task(target, n_support=12, n_query=7)
    data = load_task(task)
    config = AdaptConfig(model=str(vit_dir), method=kind)
    if kind is Method.PROTOTYPES and target is TaskTarget.REGRESSION:
        with pytest.raises(TaskError, match="regression"):
            run(data, config)
        return
    result = run(data, config)
    _check_format(result.probabilities, target, 7, len(data.classes))
    assert set(result.timings) == {"load", "adapt", "predict", "total"}
    assert result.trainable_parameters > 0


def test_linear_probe_fits_its_support(vit_dir):
    """Weakly regularised, a softmax probe on 64-d features separates 12 support images."""
    task, _ = make_task(TaskTarget.MULTICLASS_CLASSIFICATION, n_support=12, n_query=0)
    data = load_task(task)
    data.query_images = data.support_images
    probs = run(data, AdaptConfig(model=str(vit_dir), method="linear-probe", probe_l2=1e-6)).probabilities
    assert (probs.argmax(1) == data.support_labels).all()


def test_probe_is_deterministic(vit_dir):
    data = load_task(make_task(TaskTarget.BINARY_CLASSIFICATION)[0])
    config = AdaptConfig(model=str(vit_dir), method="linear-probe")
    first = run(data, config).probabilities
    torch.testing.assert_close(run(data, config).probabilities, first)


def test_probe_config_split_and_validation():
    """The YAML's linear_probe params l2 and max_iter set probe_l2 and probe_max_iter; the rest are AdaptConfig's."""
    config = Variant("probe", "probe", Kind.LINEAR_PROBE, {"l2": 0.5, "max_steps": 3}).config(AdaptConfig(), seed=0)
    assert (config.methods, config.probe_l2, config.probe_max_iter, config.max_steps) == (
        (Method.LINEAR_PROBE,),
        0.5,
        200,
        3,
    )
    with pytest.raises(ValueError, match="probe_l2"):
        AdaptConfig(probe_l2=-1)


def test_a_frozen_feature_method_joins_an_ensemble(vit_dir):
    """One door: prototypes average with a trained member like any method."""
    data = load_task(make_task(TaskTarget.MULTICLASS_CLASSIFICATION)[0])
    common = dict(model=str(vit_dir), cpu=True, max_steps=3, min_steps=1)
    both = run(data, method="head+prototypes", **common)
    head, prototypes = (run(data, method=m, **common).probabilities for m in ("head", "prototypes"))
    assert both.methods == "head+prototypes" and not torch.allclose(head, prototypes)
    torch.testing.assert_close(both.probabilities, (head + prototypes) / 2)


def test_probe_solves_apart_and_writes_back_in_place():
    """The probe solves on a float32 CPU copy (GPU syncs made it slow) and writes the optimum into the head it was
    given: same parameter objects and dtype, gradient of the regularised loss ~0 at the written weights."""
    from l2l_peft.frozen import fit_linear_probe
    from l2l_peft.head import Head
    from l2l_peft.targets import Softmax

    torch.manual_seed(0)
    with torch.inference_mode():  # support features come from inference mode
        support = torch.randn(24, 16)
    labels = torch.arange(24) % 3
    head = Head(16, 3).double()
    weight = head.linear.weight
    fit_linear_probe(head, Softmax(3), support, labels, l2=1e-2, max_iter=200)
    assert head.linear.weight is weight and weight.dtype == torch.float64 and weight.abs().sum() > 0
    loss = Softmax(3).loss(head(support.double()), labels) + 1e-2 * head.linear.weight.square().sum()
    gradient = torch.autograd.grad(loss, [head.linear.weight, head.linear.bias])
    assert max(g.abs().max().item() for g in gradient) < 1e-3
