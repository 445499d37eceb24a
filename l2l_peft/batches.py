"""The training inputs of each step: shuffled full batches of the support, a fresh order every epoch.

train() asks its batch source for the next (input, labels), for the logits of such an input, and
for what must hold while it trains (`active()`). SupportBatches gives (augmented) images and runs
the whole model; prefix.PrefixBatches, the speed path, gives cached frozen-block outputs instead.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext

import torch

from .augment import augment
from .head import Classifier


class SupportBatches:
    """Support images in batches of `batch` (train.plan: full batches only), augmented when asked."""

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, *, batch: int, generator: torch.Generator, augment: bool
    ) -> None:
        self.images, self.labels, self.batch = images, labels, batch
        self.generator, self.augment = generator, augment

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        per_epoch = n // self.batch
        for i in itertools.count():
            if i % per_epoch == 0:
                order = torch.randperm(n, device=self.labels.device, generator=self.generator)
            index = order[(i % per_epoch) * self.batch : (i % per_epoch + 1) * self.batch]
            yield self.inputs(index), self.labels[index]

    def inputs(self, index: torch.Tensor) -> torch.Tensor:
        images = self.images[index]
        return augment(images, self.generator) if self.augment else images

    def logits(self, model: Classifier, inputs: torch.Tensor) -> torch.Tensor:
        return model(inputs)

    def active(self) -> AbstractContextManager:
        """Context that training on these inputs needs (none for images)."""
        return nullcontext()
