"""Images made by formula for pre-pretraining (issue #16 item 3): the dead-leaves model.

Dead leaves (Matheron; used for pretraining by Baradad et al. 2021) stacks opaque shapes of random
colour, position, orientation and log-uniform size, later ones on top: occlusion, edges at every
scale and flat regions, without a single real image. Each image draws its leaves from one of six
styles (disc, square or ellipse, each fine or coarse), and the style is its label, so a supervised
objective has something visual to learn beside self-distillation. Generated once, at a size like
the development data's native ones (28-96 px; default 64); pretraining augments and resizes them
like real images.
"""

from __future__ import annotations

import math

import torch
from torchcross.data.task import TaskTarget

from .datasets import LabelledDataset

# leaf outline as a superellipse |u / r|^p + |v / (r * aspect)|^p < 1: (exponent p, aspect range)
SHAPES = {"disc": (2.0, (1.0, 1.0)), "square": (16.0, (1.0, 1.0)), "ellipse": (2.0, (0.3, 1.0))}
SCALES = {"fine": (0.04, 0.15), "coarse": (0.08, 0.4)}  # leaf radius range, in image widths
STYLES = [(shape, scale) for scale in SCALES for shape in SHAPES]  # label = index


def log_uniform(low: torch.Tensor, high: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Radii with density ~ 1/r on [low, high]: as many leaves per octave of size, a scale-free mix."""
    return low * (high / low) ** uniform


def dead_leaves(n: int, size: int = 64, leaves: int = 96, seed: int = 0, chunk: int = 256) -> LabelledDataset:
    """`n` RGB dead-leaves images (uint8 [n, 3, size, size]) labelled by style; deterministic in `seed`."""
    if n < 1 or size < 4 or leaves < 1:
        raise ValueError(f"dead_leaves needs n >= 1, size >= 4 and leaves >= 1, got {n}, {size}, {leaves}")
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(len(STYLES), (n,), generator=generator)
    axis = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    y, x = axis[:, None], axis[None, :]
    images = []
    for part in labels.split(chunk):
        m = len(part)
        styles = [STYLES[int(s)] for s in part]
        low, high = (torch.tensor([SCALES[scale][i] for _, scale in styles])[:, None] for i in (0, 1))
        exponent = torch.tensor([SHAPES[shape][0] for shape, _ in styles])[:, None, None]
        thin, wide = (torch.tensor([SHAPES[shape][1][i] for shape, _ in styles])[:, None] for i in (0, 1))
        radius = log_uniform(low, high, torch.rand(m, leaves, generator=generator))
        aspect = thin + (wide - thin) * torch.rand(m, leaves, generator=generator)
        centre = torch.rand(m, leaves, 2, generator=generator) * 1.2 - 0.1  # leaves may hang over the border
        angle = torch.rand(m, leaves, generator=generator) * math.pi
        colour = torch.rand(m, leaves, 3, generator=generator)
        canvas = torch.rand(m, 3, 1, 1, generator=generator).expand(m, 3, size, size).clone()
        for k in range(leaves):  # back to front: a later leaf covers the earlier ones
            dx, dy = x - centre[:, k, 0, None, None], y - centre[:, k, 1, None, None]
            cos, sin = angle[:, k, None, None].cos(), angle[:, k, None, None].sin()
            r = radius[:, k, None, None]
            along = ((dx * cos + dy * sin) / r).abs()
            across = ((dy * cos - dx * sin) / (r * aspect[:, k, None, None])).abs()
            inside = along.pow(exponent) + across.pow(exponent) < 1
            canvas = torch.where(inside[:, None], colour[:, k, :, None, None], canvas)
        images.append((canvas * 255).round().to(torch.uint8))
    classes = {i: f"{shape} {scale}" for i, (shape, scale) in enumerate(STYLES)}
    return LabelledDataset(
        "dead_leaves", torch.cat(images), labels, TaskTarget.MULTICLASS_CLASSIFICATION, classes, None, "procedural"
    )
