"""Every adaptation method: trains only its own parameters + the head, on several families."""

from __future__ import annotations

import pytest
import torch
from conftest import make_task
from torchcross.data.task import TaskTarget

from l2l_peft import Method, api, run
from l2l_peft.adapters import find_target_modules
from l2l_peft.backbone import load_backbone

FAST = dict(cpu=True, max_steps=4, min_steps=1, lr_adapter=0.05)


def _frozen_state(model_dir, method):
    """Run one adaptation and return (pristine backbone state, adapted extractor state, result)."""
    captured = {}
    original = api.predict

    def spy(model, *args, **kwargs):
        captured["state"] = {k: v.detach().clone() for k, v in model.extractor.named_parameters()}
        captured["trainable"] = {k for k, v in model.extractor.named_parameters() if v.requires_grad}
        return original(model, *args, **kwargs)

    api.predict = spy
    try:
        result = run(make_task(TaskTarget.MULTICLASS_CLASSIFICATION)[0], model=str(model_dir), method=method, **FAST)
    finally:
        api.predict = original
    pristine = {f"model.{k}": v for k, v in load_backbone(str(model_dir)).model.named_parameters()}
    return pristine, captured, result


def _base_name(name: str) -> str:
    return name.replace("base_model.model.", "").replace(".base_layer", "")


@pytest.mark.parametrize("family", ["vit", "dinov2", "clip"])
@pytest.mark.parametrize("method", [m.value for m in Method if m not in (Method.FULL, Method.HEAD)])
def test_method_trains_only_its_parameters(model_dirs, family, method):
    pristine, captured, result = _frozen_state(model_dirs[family], method)
    assert result.probabilities.shape == (9, 3)
    assert torch.isfinite(result.probabilities).all()
    adapted = {_base_name(k): v for k, v in captured["state"].items()}
    trainable_base = {_base_name(k) for k in captured["trainable"]} & set(pristine)
    for name, tensor in pristine.items():
        if name in trainable_base:  # bitfit trains the backbone's own biases and norms
            assert method == "bitfit" and (name.endswith("bias") or "norm" in name), name
        else:
            assert torch.equal(adapted[name], tensor), f"{method} changed frozen {name}"
    assert result.trainable_parameters > 0
    n_backbone = sum(v.numel() for v in pristine.values())
    assert result.trainable_parameters < n_backbone


def test_head_only_and_full_parameter_counts(vit_dir):
    n_backbone = sum(p.numel() for p in load_backbone(str(vit_dir)).parameters())
    head = run(make_task()[0], model=str(vit_dir), method="head", **FAST)
    full = run(make_task()[0], model=str(vit_dir), method="full", **FAST)
    n_head = 64 * 3 + 3
    assert head.trainable_parameters == n_head
    assert full.trainable_parameters == n_backbone + n_head


@pytest.mark.parametrize("method", ["vpt-shallow", "vpt-deep"])
def test_vpt_changes_features_and_keeps_sequence(vit_dir, method):
    from l2l_peft.vpt import add_visual_prompts

    extractor = load_backbone(str(vit_dir))
    plain = extractor(torch.zeros(2, 3, 32, 32))
    add_visual_prompts(extractor, deep=method == "vpt-deep", n_tokens=3)
    extractor.prompts.prompts.data.normal_(0, 1)
    prompted = extractor(torch.zeros(2, 3, 32, 32))
    assert prompted.shape == plain.shape
    assert not torch.allclose(prompted, plain)
    expected = (2 if method == "vpt-deep" else 1, 3, 32)
    assert tuple(extractor.prompts.prompts.shape) == expected


def test_vpt_refuses_swin_clearly(model_dirs):
    with pytest.raises(ValueError, match="plain ViT"):
        run(make_task()[0], model=str(model_dirs["swin"]), method="vpt-deep", **FAST)


@pytest.mark.parametrize(
    "preset,last,expected",
    [("qv", None, 4), ("qkv", None, 6), ("attn", None, 8), ("all", None, 12), ("qv", 1, 2)],
)
def test_lora_targets_resolved_from_model(model_dirs, preset, last, expected):
    for family in ("vit", "dinov2", "clip", "siglip", "swin"):
        model = load_backbone(str(model_dirs[family])).model
        assert len(find_target_modules(model, preset, last)) == expected, family


def test_legacy_projection_names_are_found():
    """transformers < 5 calls the projections query/key/value and attention.output.dense."""

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.query, self.key, self.value = (torch.nn.Linear(4, 4) for _ in range(3))

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = Attention()

    model = torch.nn.Module()
    model.layer = torch.nn.ModuleList([Block(), Block()])
    assert find_target_modules(model, "qv") == [
        "layer.0.attention.query", "layer.0.attention.value", "layer.1.attention.query", "layer.1.attention.value"
    ]  # fmt: skip
