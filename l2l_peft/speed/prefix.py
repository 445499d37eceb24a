"""Frozen-prefix caching: when only the last k blocks are adapted, run the blocks before them once.

No trainable parameter acts before the first adapted block, so the output of the last frozen
block depends on the input image alone. PrefixCache runs the backbone up to there once per
support image and view, keeps that output, and during training swaps the frozen blocks for
stand-ins: the last replays the cached activations, the others pass their input through. The
embeddings still run on a constant dummy image (one patch projection, cheap), so whatever each
family does between embeddings and blocks, and after the blocks, stays its own code: nothing is
specific to one architecture.

Trade-off: augmentation must happen before the cache, so training sees `views` fixed augmented
draws per image instead of a fresh draw every step (without augmentation one view is exact).
PrefixBatches hands the cache to train() as a batch source (batches.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import torch
from torch import nn

from ..adapters import blocks
from ..augment import augment
from ..backbone import FeatureExtractor
from ..batches import SupportBatches
from ..config import AdaptConfig
from ..head import Classifier


class _Stop(Exception):
    """Raised after the last frozen block: the caching pass needs nothing beyond it."""


class _StandIn(nn.Module):
    """Takes a frozen block's place: returns its input, or the cached output (`replay`), in the block's output form.

    `extras` is None for blocks that return a tensor, else how many None entries (unrequested
    attention weights) follow the hidden states in the block's output tuple.
    """

    def __init__(self, extras: int | None) -> None:
        super().__init__()
        self.extras = extras
        self.replay: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        out = self.replay if self.replay is not None else hidden_states
        return out if self.extras is None else (out,) + (None,) * self.extras


def frozen_prefix(extractor: FeatureExtractor) -> list[str]:
    """The blocks before the first one with a trainable parameter; empty when caching would be wrong."""
    names = blocks(extractor.model)
    trainable = [n for n, p in extractor.model.named_parameters() if p.requires_grad]

    def inside(name: str, block_names: list[str]) -> bool:
        return any(name.startswith(b + ".") for b in block_names)

    first = next((i for i, b in enumerate(names) if any(inside(t, [b]) for t in trainable)), None)
    if not first:  # nothing trains in the blocks, or the very first block trains
        return []
    if not all(inside(t, names[first:]) for t in trainable):
        return []  # trainable parameters outside the adapted blocks (prompts, BitFit norms, ...)
    return names[:first]


class PrefixCache:
    """Output of the frozen prefix for `views` augmented copies of every support image."""

    def __init__(
        self,
        extractor: FeatureExtractor,
        frozen: list[str],
        images: torch.Tensor,
        *,
        views: int,
        generator: torch.Generator | None,
        autocast: Callable[[], AbstractContextManager],
        batch_size: int,
    ) -> None:
        self.extractor, self.frozen = extractor, frozen
        outputs: list[torch.Tensor] = []
        form: dict[str, int | None] = {}

        def keep(module: nn.Module, args, output) -> None:
            form["extras"] = len(output) - 1 if isinstance(output, tuple) else None
            outputs.append((output[0] if isinstance(output, tuple) else output).detach())
            raise _Stop

        was_training = extractor.training
        extractor.eval()
        handle = extractor.model.get_submodule(frozen[-1]).register_forward_hook(keep)
        try:
            with torch.no_grad(), autocast():
                for _ in range(views):
                    for chunk in images.split(batch_size):
                        try:
                            extractor(augment(chunk, generator) if generator is not None else chunk)
                        except _Stop:
                            pass
        finally:
            handle.remove()
            extractor.train(was_training)
        self.activations = torch.cat(outputs).view(views, len(images), *outputs[0].shape[1:])
        self.extras = form["extras"]
        self.dummy = torch.zeros(batch_size, 3, extractor.input_size, extractor.input_size, device=images.device)
        self._replay: _StandIn | None = None

    def sample(self, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Cached activations of support images `index`, each from a random view."""
        views = self.activations.shape[0]
        if views == 1:
            return self.activations[0, index]
        view = torch.randint(views, index.shape, device=index.device, generator=generator)
        return self.activations[view, index]

    def features(self, activations: torch.Tensor) -> torch.Tensor:
        """Features from cached activations: only the adapted blocks and the pooling run (inside swapped())."""
        assert self._replay is not None, "PrefixCache.features() runs inside swapped()"
        self._replay.replay = activations
        return self.extractor.pool(*self.extractor.tokens(self.dummy[: len(activations)]))

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """Frozen blocks replaced by stand-ins for the duration; the real blocks come back afterwards."""
        model = self.extractor.model
        originals = {name: model.get_submodule(name) for name in self.frozen}
        stand_ins = {name: _StandIn(self.extras) for name in self.frozen}
        self._replay = stand_ins[self.frozen[-1]]
        _put(model, stand_ins)
        try:
            yield
        finally:
            _put(model, originals)
            self._replay = None


class PrefixBatches(SupportBatches):
    """The support's cached frozen-prefix outputs instead of its images: per step only the adapted blocks run."""

    def __init__(self, cache: PrefixCache, labels: torch.Tensor, *, batch: int, generator: torch.Generator) -> None:
        super().__init__(cache.activations, labels, batch=batch, generator=generator, augment=False)
        self.cache = cache

    def inputs(self, index: torch.Tensor) -> torch.Tensor:
        return self.cache.sample(index, self.generator)

    def logits(self, model: Classifier, inputs: torch.Tensor) -> torch.Tensor:
        return model.head(self.cache.features(inputs))

    def active(self) -> AbstractContextManager:
        return self.cache.swapped()


def prefix_batches(
    model: Classifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch: int,
    config: AdaptConfig,
    autocast: Callable[[], AbstractContextManager],
    generator: torch.Generator,
) -> PrefixBatches | None:
    """A cache of the frozen blocks' output when only the last blocks are adapted (lora_last_blocks, full_last_blocks:
    frozen_prefix reads it from what trains); None where caching does not apply."""
    frozen = frozen_prefix(model.extractor) if config.prefix_views else []
    if not frozen:
        return None
    cache = PrefixCache(
        model.extractor, frozen, images,
        views=config.prefix_views if config.augment else 1,
        generator=generator if config.augment else None,
        autocast=autocast,
        batch_size=config.predict_batch_size,
    )  # fmt: skip
    return PrefixBatches(cache, labels, batch=batch, generator=generator)


def _put(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    for name, module in modules.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module)
