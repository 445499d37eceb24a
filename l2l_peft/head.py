"""The task head and the backbone + head classifier."""

from __future__ import annotations

import torch
from torch import nn

from .backbone import FeatureExtractor

_PROTOTYPE_MARGIN = 2.0  # logit at a class mean after prototype init
_MAX_INIT_LOGIT_STD = 3.0  # keeps init logits from saturating when classes barely separate


class Head(nn.Module):
    """Parameter-free LayerNorm + Linear: normalised features make one learning rate fit every backbone."""

    def __init__(self, dim: int, n_logits: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.linear = nn.Linear(dim, n_logits)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(features))

    @torch.no_grad()
    def init_from_prototypes(
        self, features: torch.Tensor, positives: torch.Tensor, weights: torch.Tensor | None = None
    ) -> None:
        """Each logit starts as the nearest-mean rule between its positive and negative support samples.

        Logit j = w_j . z + b_j with w_j along (mean_pos - mean_neg), zero at the midpoint and
        +-_PROTOTYPE_MARGIN at the means: training starts from the prototype classifier, not from chance.
        `positives` may be soft (probabilities) and samples weighted, for transductive refinement.
        """
        z = self.norm(features.float())
        w = torch.ones(len(z), 1, device=z.device) if weights is None else weights.float().reshape(-1, 1)
        pos = positives.float() * w
        neg = (1 - positives.float()) * w
        n_pos, n_neg = pos.sum(0), neg.sum(0)
        valid = (n_pos > 0) & (n_neg > 0)
        mean_pos = pos.T @ z / n_pos.clamp(min=1)[:, None]
        mean_neg = neg.T @ z / n_neg.clamp(min=1)[:, None]
        direction = mean_pos - mean_neg
        scale = 2 * _PROTOTYPE_MARGIN / (direction * direction).sum(1).clamp(min=1e-6)
        weight = direction * scale[:, None]
        bias = -(weight * (mean_pos + mean_neg) / 2).sum(1)
        spread = (z @ weight.T + bias).std(0) if len(z) > 1 else torch.ones_like(bias)
        shrink = (_MAX_INIT_LOGIT_STD / spread.clamp(min=1e-6)).clamp(max=1.0)
        self.linear.weight.copy_(torch.where(valid[:, None], weight * shrink[:, None], 0.0))
        self.linear.bias.copy_(torch.where(valid, bias * shrink, 0.0))


class Classifier(nn.Module):
    def __init__(self, extractor: FeatureExtractor, head: Head) -> None:
        super().__init__()
        self.extractor = extractor
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.extractor(images))
