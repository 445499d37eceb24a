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
    """Support images in batches of `batch` (train.plan: full batches only), augmented when asked.

    With `unlabelled` images (the query, for the transductive term) each input is the support batch
    followed by a batch of them: one forward pass, static shapes (CUDA graphs), the labels cover the
    first part only.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        batch: int,
        generator: torch.Generator,
        augment: bool,
        unlabelled: torch.Tensor | None = None,
    ) -> None:
        self.images, self.labels, self.batch = images, labels, batch
        self.generator, self.augment = generator, augment
        self.unlabelled = unlabelled if unlabelled is not None and len(unlabelled) else None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        support = _shuffled(len(self.labels), self.batch, self.labels.device, self.generator)
        if self.unlabelled is None:
            yield from ((self.inputs(index), self.labels[index]) for index in support)
            return
        n = len(self.unlabelled)
        for index, extra in zip(support, _shuffled(n, min(self.batch, n), self.labels.device, self.generator)):
            yield torch.cat([self.inputs(index), self._augmented(self.unlabelled[extra])]), self.labels[index]

    def inputs(self, index: torch.Tensor) -> torch.Tensor:
        return self._augmented(self.images[index])

    def _augmented(self, images: torch.Tensor) -> torch.Tensor:
        return augment(images, self.generator) if self.augment else images

    def logits(self, model: Classifier, inputs: torch.Tensor) -> torch.Tensor:
        return model(inputs)

    def active(self) -> AbstractContextManager:
        """Context that training on these inputs needs (none for images)."""
        return nullcontext()


def _shuffled(n: int, batch: int, device: torch.device, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Index batches of range(n) forever: full batches only, a fresh order every epoch."""
    per_epoch = n // batch
    for i in itertools.count():
        if i % per_epoch == 0:
            order = torch.randperm(n, device=device, generator=generator)
        yield order[(i % per_epoch) * batch : (i % per_epoch + 1) * batch]
