"""Strong batched augmentation for pretraining: uint8 at native size -> challenge form on the device.

One affine grid per batch does random resized crop, flips, rotation and the resize to the model
size at once (bilinear, as `to_challenge` resizes); colour jitter and gray <-> RGB follow. The
output is what adapt() feeds the backbone: 3 x size x size in [-1, 1]. MultiCrop draws several
such views per image (global and small local crops) for self-distillation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import PretrainConfig

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 weights, as PIL's convert("L")
Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]  # uint8 batch -> views


@dataclass(frozen=True)
class StrongAugment:
    size: int = 224
    crop_scale: tuple[float, float] = (0.35, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    max_rotation: float = 30.0  # degrees
    vflip: float = 0.5
    jitter: float = 0.4
    grayscale: float = 0.2

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """uint8 [N, C, H, W] (C = 1 or 3) -> float [N, 3, size, size] in [-1, 1]."""
        n, device = images.shape[0], images.device

        def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
            return low + (high - low) * torch.rand(*shape or (n,), generator=generator, device=device)

        x = images.float() / 255
        grid = F.affine_grid(self._geometry(uniform), [n, x.shape[1], self.size, self.size], align_corners=False)
        # zero padding in [0, 1] fills rotated-in corners with black, like scanner backgrounds
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return self._colour(x.expand(-1, 3, -1, -1), uniform) * 2 - 1

    def _geometry(self, uniform) -> torch.Tensor:
        """Affine maps from output to input coordinates: crop box, flips, rotation ([N, 2, 3])."""
        area = uniform(*self.crop_scale)
        log_ratio = uniform(math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1]))
        w = (area * log_ratio.exp()).sqrt().clamp(max=1)
        h = (area / log_ratio.exp()).sqrt().clamp(max=1)
        cx, cy = uniform(-1, 1) * (1 - w), uniform(-1, 1) * (1 - h)
        fx = torch.where(uniform(0, 1) < 0.5, -1.0, 1.0)
        fy = torch.where(uniform(0, 1) < self.vflip, -1.0, 1.0)
        angle = uniform(-1, 1) * math.radians(self.max_rotation)
        cos, sin = angle.cos(), angle.sin()
        row0 = torch.stack([cos * w * fx, -sin * h * fy, cx], -1)
        row1 = torch.stack([sin * w * fx, cos * h * fy, cy], -1)
        return torch.stack([row0, row1], 1)

    def _colour(self, x: torch.Tensor, uniform) -> torch.Tensor:
        """Gamma, contrast, brightness, saturation and random grayscale on [0, 1] pixels."""
        n, j = x.shape[0], self.jitter
        luma = torch.tensor(_LUMA, device=x.device).view(1, 3, 1, 1)
        x = x.clamp(0, 1) ** uniform(1 - j / 2, 1 + j, n, 1, 1, 1)
        gray = (x * luma).sum(1, keepdim=True)
        mean = gray.mean((2, 3), keepdim=True)
        x = (x - mean) * uniform(1 - j, 1 + j, n, 1, 1, 1) + mean + uniform(-j / 2, j / 2, n, 1, 1, 1)
        gray = (x * luma).sum(1, keepdim=True)
        saturation = torch.where(uniform(0, 1, n, 1, 1, 1) < self.grayscale, 0.0, uniform(1 - j, 1 + j, n, 1, 1, 1))
        return (gray + (x - gray) * saturation).clamp(0, 1)


@dataclass(frozen=True)
class MultiCrop:
    """Views of one batch drawn per dataset: `n_global` at the model size, `n_local` small crops (DINO's multi-crop).

    Views are view-major (all images of view 0, then view 1, ...), so `.chunk(n)` splits them by
    view. Supervised pretraining is one global view and no local ones.
    """

    global_view: StrongAugment
    local_view: StrongAugment | None = None
    n_global: int = 1
    n_local: int = 0

    def __call__(self, batches: list[torch.Tensor], generator: torch.Generator) -> tuple[torch.Tensor, Tensor | None]:
        """uint8 images of each dataset -> (global views [n_global * N, 3, size, size], local views or None)."""
        views = _views(self.global_view, batches, self.n_global, generator)
        if not self.n_local:
            return views, None
        return views, _views(self.local_view, batches, self.n_local, generator)

    @classmethod
    def for_config(cls, config: PretrainConfig, size: int | None = None) -> MultiCrop:
        """Supervised: one view at crop_scale. ssl/both: two global views + `local_crops` small ones.

        `size`: the global views' side (default image_size); local crops keep their ratio to it.
        """
        strong = partial(StrongAugment, max_rotation=config.max_rotation, vflip=config.vflip, jitter=config.jitter,
                         grayscale=config.grayscale)  # fmt: skip
        size = size or config.image_size
        if not config.objective.ssl:
            return cls(strong(size, config.crop_scale))
        patch = config.patch_size
        local_size = max(patch, round(config.local_crop_size * size / config.image_size / patch) * patch)
        local = strong(local_size, config.local_crop_scale)
        return cls(strong(size, config.global_crop_scale), local, n_global=2, n_local=config.local_crops)


def _views(augment: Augment, batches: list[torch.Tensor], n: int, generator: torch.Generator) -> torch.Tensor:
    """`n` views of every image, view-major and in dataset order within a view.

    Datasets of one image shape are augmented together, all their views in one call: a pretraining
    step is small kernels more than arithmetic (a tiny-ViT DINO step ran at 1,182 images/s on an H200,
    and at 112 px, with 0.27 of the model's FLOPs, only 1.17x faster), and one call per dataset and
    view launched each kernel 72 times for 12 datasets and 6 views.
    """
    groups: dict[torch.Size, list[int]] = {}
    for i, x in enumerate(batches):
        groups.setdefault(x.shape[1:], []).append(i)
    parts: list[list[torch.Tensor]] = [[] for _ in batches]  # per dataset, its n views
    for members in groups.values():
        sizes = [batches[i].shape[0] for i in members]
        out = augment(torch.cat([batches[i] for i in members]).repeat(n, 1, 1, 1), generator)
        for k, chunk in enumerate(out.split(sizes * n)):
            parts[members[k % len(members)]].append(chunk)
    return torch.cat([parts[i][view] for view in range(n) for i in range(len(batches))])
