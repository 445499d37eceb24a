"""Batched, on-device augmentation for few-shot medical images (no per-sample Python work).

Mild on purpose: small rotations/scales/shifts, horizontal flips and contrast/brightness jitter
preserve the fine structures (cells, lesions, grades) that medical labels depend on.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MAX_ROTATION_DEG = 10.0
SCALE_RANGE = (0.9, 1.1)
MAX_SHIFT = 0.05  # fraction of the image side
JITTER = 0.1  # relative contrast and absolute brightness change, in [-1, 1] pixel units


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random affine jitter + horizontal flip + contrast/brightness, for images in [-1, 1]."""
    n = images.shape[0]

    def uniform(*shape: int, low: float = -1.0, high: float = 1.0) -> torch.Tensor:
        r = torch.rand(*shape, generator=generator, device=images.device)
        return low + (high - low) * r

    angle = uniform(n) * math.radians(MAX_ROTATION_DEG)
    scale = uniform(n, low=SCALE_RANGE[0], high=SCALE_RANGE[1])
    flip = torch.where(uniform(n) < 0, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [
            torch.stack([cos * flip, -sin, uniform(n) * MAX_SHIFT * 2], -1),
            torch.stack([sin * flip, cos, uniform(n) * MAX_SHIFT * 2], -1),
        ],
        1,
    )
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    contrast = 1 + uniform(n, 1, 1, 1) * JITTER
    brightness = uniform(n, 1, 1, 1) * JITTER
    return (out * contrast + brightness).clamp(-1, 1)
