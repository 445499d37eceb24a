"""Precision casting: frozen weights stored in the autocast dtype, so bf16 steps skip per-step copies."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def cast_frozen(module: nn.Module, dtype: torch.dtype, *, stream: bool = True) -> int:
    """Store frozen tensors in the autocast dtype; returns how many were cast.

    Frozen Linear/Conv weights: autocast re-casts them on every forward anyway (it caches only
    trainable leaves), so storing them cast gives the same numbers without the per-step copies.
    With `stream`, frozen norms and embeddings follow and the norms run in that dtype, so the
    residual stream stays bf16: autocast alone returns every LayerNorm in float32, and the float32
    stream's adds, norms and casts took more GPU time than the matmuls at batch 128 (run2_profile.log).
    Trainable tensors (adapters, head, prompts) keep float32 for the optimizer; a trainable norm
    (BitFit) keeps its float32 output.
    """
    cast = 0
    for layer in module.modules():
        params = list(layer.parameters(recurse=False))
        frozen = [p for p in params if not p.requires_grad and p.is_floating_point()]
        if isinstance(layer, nn.LayerNorm) and len(frozen) < len(params):
            continue  # a trained norm keeps float32 weights, so autocast's float32 output is right
        if not (stream or isinstance(layer, (nn.Linear, nn.Conv2d))):
            continue
        for param in frozen:
            if param.dtype != dtype:
                param.data = param.data.to(dtype)
                cast += 1
        if stream and type(layer) is nn.LayerNorm and layer.weight is not None:
            layer.__class__ = _OwnDtypeLayerNorm
        if stream and hasattr(
            layer, "_cast_input_dtype"
        ):  # a peft layer would cast bf16 inputs up to its float32 adapters
            layer.cast_input_dtype_enabled = False
    return cast


class _OwnDtypeLayerNorm(nn.LayerNorm):
    """LayerNorm returning its weights' dtype under autocast (statistics still accumulate in float32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x.to(self.weight.dtype), self.normalized_shape, self.weight, self.bias, self.eps)
