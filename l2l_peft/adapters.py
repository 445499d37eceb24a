"""Adapter methods: target modules resolved from the loaded model, one place that builds each method.

Projection names differ across transformers versions and families (`q_proj` in transformers 5,
`query` before; fused `qkv` in some ports), so targets are found by inspecting the model's
Linear layers, never hard-coded per architecture.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable

from torch import nn

from .config import AdaptConfig, LoraTargets, Method

_LEAF_ROLES = {
    "q_proj": "q", "query": "q",
    "k_proj": "k", "key": "k",
    "v_proj": "v", "value": "v",
    "qkv": "qkv",
    "o_proj": "o", "out_proj": "o",
    "fc1": "mlp", "fc2": "mlp",
}  # fmt: skip
_PRESETS = {
    LoraTargets.QV: {"q", "v", "qkv"},
    LoraTargets.QKV: {"q", "k", "v", "qkv"},
    LoraTargets.ATTN: {"q", "k", "v", "qkv", "o"},
    LoraTargets.ALL: {"q", "k", "v", "qkv", "o", "mlp"},
}
BLOCK = re.compile(r"^(.*\.\d+)\.")  # a name inside a numbered block; group 1 is the block ("encoder.layer.3")
_PEFT_METHODS = {Method.LORA, Method.DORA, Method.LOHA, Method.LOKR, Method.IA3, Method.VERA}
VERA_RANK = 256  # VeRA shares frozen random projections, so it needs a far higher rank than LoRA (paper default)


def blocks(model: nn.Module) -> list[str]:
    """Names of the transformer blocks in execution order (innermost numbered modules holding Linear layers)."""
    found = [
        m.group(1) for name, mod in model.named_modules() if isinstance(mod, nn.Linear) and (m := BLOCK.match(name))
    ]
    names = list(dict.fromkeys(found))
    return [n for n in names if not any(other.startswith(n + ".") for other in names)]  # Swin: blocks, not stages


def _role(name: str) -> str | None:
    leaf = name.rsplit(".", 1)[-1]
    if leaf in _LEAF_ROLES:
        return _LEAF_ROLES[leaf]
    if name.endswith(("attention.output.dense", "attn.proj")):
        return "o"
    if name.endswith(("intermediate.dense", "output.dense")):
        return "mlp"
    return None


def find_target_modules(
    model: nn.Module, preset: LoraTargets | str = LoraTargets.QV, last_blocks: int | None = None
) -> list[str]:
    """Full names of the Linear layers a preset covers, optionally only in the last k blocks."""
    preset = LoraTargets(preset)
    wanted = _PRESETS[preset]
    linear = [(name, _role(name)) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen = [name for name, role in linear if role in wanted and BLOCK.match(name)]
    if not chosen:
        raise ValueError(
            f"no {preset.value} projections found among the model's Linear layers "
            f"({', '.join(n for n, _ in linear[:6])}, ...); this architecture is not supported for adapters"
        )
    if last_blocks is not None:
        keep = set(blocks(model)[-last_blocks:])
        chosen = [n for n in chosen if BLOCK.match(n).group(1) in keep]
    return chosen


def _peft_config(config: AdaptConfig, targets: list[str]):
    import peft

    common = dict(target_modules=targets)
    (method,) = config.methods
    match method:
        case Method.LORA | Method.DORA:
            return peft.LoraConfig(
                r=config.lora_rank,
                lora_alpha=config.lora_alpha,
                lora_dropout=config.lora_dropout,
                use_dora=method is Method.DORA,
                **common,
            )
        case Method.LOHA:
            return peft.LoHaConfig(r=config.lora_rank, alpha=config.lora_alpha, module_dropout=0.0, **common)
        case Method.LOKR:
            return peft.LoKrConfig(r=config.lora_rank, alpha=config.lora_alpha, module_dropout=0.0, **common)
        case Method.IA3:
            return peft.IA3Config(feedforward_modules=[t for t in targets if _role(t) == "mlp"], **common)
        case Method.VERA:
            return peft.VeraConfig(r=VERA_RANK, vera_dropout=config.lora_dropout, **common)
        case other:
            raise ValueError(f"{other} is not a peft method")


def apply_method(backbone_model: nn.Module, config: AdaptConfig) -> nn.Module:
    """Make only the method's own parameters trainable; returns the (possibly wrapped) model."""
    backbone_model.requires_grad_(False)
    if len(config.methods) != 1:
        raise ValueError(f"apply_method builds one method, got {config.method!r} (train ensemble members one by one)")
    (method,) = config.methods
    if method in _PEFT_METHODS:
        import peft

        if method is Method.IA3:  # IA3 rescales keys, values and the MLP output, as in its paper
            found = find_target_modules(backbone_model, LoraTargets.ALL, config.lora_last_blocks)
            targets = [t for t in found if _role(t) in ("k", "v", "qkv") or t.endswith(("fc2", "mlp.output.dense"))]
        else:
            targets = find_target_modules(backbone_model, config.lora_targets, config.lora_last_blocks)
        with warnings.catch_warnings():  # peft probes a property that transformers 5 deprecates: noise in every log
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            return peft.get_peft_model(backbone_model, _peft_config(config, targets))
    match method:
        case Method.BITFIT:
            for name, param in backbone_model.named_parameters():
                if name.endswith("bias") or _is_norm_param(backbone_model, name):
                    param.requires_grad_(True)
        case Method.FULL:
            if config.full_last_blocks is None:
                backbone_model.requires_grad_(True)
            else:  # only the last k blocks: nothing before them trains, so prefix caching applies
                for block in blocks(backbone_model)[-config.full_last_blocks :]:
                    backbone_model.get_submodule(block).requires_grad_(True)
        case Method.HEAD | Method.PROTOTYPES | Method.LINEAR_PROBE:
            pass  # only the head is fitted
        case other:
            raise ValueError(f"method {other.value} is built by the VPT module, not here")
    return backbone_model


def _is_norm_param(model: nn.Module, name: str) -> bool:
    module = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)) or "norm" in type(module).__name__.lower()


def trainable_parameters(modules: Iterable[nn.Module]) -> int:
    return sum(p.numel() for m in modules for p in m.parameters() if p.requires_grad)
