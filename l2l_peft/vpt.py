"""Visual prompt tuning (Jia et al. 2022) for any plain ViT-family HF backbone.

Learnable tokens are inserted after the CLS/register tokens with forward pre-hooks on the
transformer blocks (public PyTorch API, no patching of transformers code): shallow VPT inserts
them once before the first block, deep VPT replaces them with fresh ones before every block.
A hook on the last block removes them again, so pooling and features see the usual sequence.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .backbone import FeatureExtractor
from .config import Method

VPT_METHODS = (Method.VPT_SHALLOW, Method.VPT_DEEP)
PROMPT_INIT_STD = 0.02  # same scale as ViT position embeddings


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The longest ModuleList of transformer blocks; hierarchical models (Swin) have no single one."""
    if getattr(model.config, "model_type", "") in ("swin", "swinv2", "donut-swin"):
        raise ValueError("visual prompt tuning needs a plain ViT (one token sequence); Swin's windows have none")
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError(f"no transformer blocks found in {type(model).__name__}")
    return max(lists, key=len)


class VisualPrompts(nn.Module):
    def __init__(self, blocks: nn.ModuleList, dim: int, n_tokens: int, n_prefix: int, deep: bool) -> None:
        super().__init__()
        self.n_tokens, self.n_prefix = n_tokens, n_prefix
        self.prompts = nn.Parameter(torch.randn(len(blocks) if deep else 1, n_tokens, dim) * PROMPT_INIT_STD)
        for i in range(len(self.prompts)):
            blocks[i].register_forward_pre_hook(self._inserter(i), with_kwargs=True)
        blocks[-1].register_forward_hook(self._strip)

    def _inserter(self, layer: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            prompts = self.prompts[layer].to(hidden.dtype).expand(hidden.shape[0], -1, -1)
            keep_from = self.n_prefix + (self.n_tokens if layer > 0 else 0)  # deep: drop the previous layer's
            hidden = torch.cat([hidden[:, : self.n_prefix], prompts, hidden[:, keep_from:]], dim=1)
            if "hidden_states" in kwargs:
                return args, {**kwargs, "hidden_states": hidden}
            return (hidden, *args[1:]), kwargs

        return hook

    def _strip(self, module: nn.Module, args: tuple, output: Any) -> Any:
        def strip(hidden: torch.Tensor) -> torch.Tensor:
            return torch.cat([hidden[:, : self.n_prefix], hidden[:, self.n_prefix + self.n_tokens :]], dim=1)

        if isinstance(output, torch.Tensor):
            return strip(output)
        return (strip(output[0]), *output[1:])


def add_visual_prompts(extractor: FeatureExtractor, *, deep: bool, n_tokens: int) -> None:
    """Freeze the backbone and attach trainable prompt tokens to it."""
    extractor.model.requires_grad_(False)
    blocks = find_blocks(extractor.model)
    extractor.prompts = VisualPrompts(blocks, extractor.hidden_size, n_tokens, extractor.num_prefix_tokens, deep)
