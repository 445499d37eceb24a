"""Which attention kernels training runs: flash called directly, and never cuDNN's.

SDPA chooses its kernel on every call. On the H100 (torch 2.11) it chose flash attention for
eager steps but the math kernel (float32 bmm + softmax) while the training step was being
captured, so every replayed step ran attention in float32 (benchmarks/probes/trace_ops.py). Calling
the flash kernel directly keeps it in the graph; inputs it does not take (CPU, float32, masks,
head sizes it lacks) go through transformers' own SDPA path, which training_kernels() keeps off
cuDNN's attention.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from functools import cache
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

logger = logging.getLogger(__name__)

NAME = "l2l_sdpa"  # a name with "flash" in it makes transformers look for the flash-attn package
_FLASH_DTYPES = (torch.float16, torch.bfloat16)
# SDPA's own first choice on the H100/H200 with torch 2.11 is cuDNN's kernel, whose backward
# reuses the plan built for the first call of a shape even when a later call's output gradient
# has other strides, and then returns wrong gradients (relative error 1.4 against 0.005 for flash;
# results/benchmarks/run8_attention_stale.log). So training offers flash and memory-efficient
# attention, with math as the fallback.
TRAINING_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def training_kernels() -> AbstractContextManager:
    """Enter around a training forward: the SDPA kernels its backward may use."""
    return sdpa_kernel(TRAINING_BACKENDS)


def _flash_takes(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None) -> bool:
    return (
        mask is None
        and query.is_cuda
        and query.dtype in _FLASH_DTYPES
        and key.dtype == query.dtype
        and query.shape[-1] % 8 == 0
        and query.shape[-1] <= 256
        and _has_flash(query.device.index)
    )


@cache
def _has_flash(device_index: int | None) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (8, 0)  # flash kernels need Ampere or newer


def flash_or_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                  **kwargs: Any) -> tuple[torch.Tensor, None]:  # fmt: skip
    """transformers' attention-function signature: [B, H, S, D] in, [B, S, H, D] out."""
    if not _flash_takes(query, key, attention_mask):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    out = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout, False, False, scale=scaling)[0]
    return out.transpose(1, 2).contiguous(), None


def use_flash_attention(model: nn.Module) -> bool:
    """Route a model that runs SDPA through flash_or_sdpa; other implementations stay as they are."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    try:
        from transformers import AttentionInterface

        AttentionInterface.register(NAME, flash_or_sdpa)
        model.set_attn_implementation(NAME)
    except (ImportError, ValueError, AttributeError) as err:  # transformers < 4.5x, or a family outside the registry
        logger.debug("keeping SDPA dispatch for %s: %s", type(model).__name__, err)
        return False
    return True
