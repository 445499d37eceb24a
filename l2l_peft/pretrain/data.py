"""Pretraining data: every source decoded once into uint8 tensors on the device, sampled in balance.

Sources are the experiments' (l2l_peft.data.sources: npz folder, CSV image folder,
MedIMeta, generated images), so one YAML vocabulary names data for both. Test rows (split == 2; MedIMeta: the
train split only) are dropped here, so a dataset's evaluation split never reaches pretraining.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..data.datasets import LabelledDataset
from ..data.sources import NATIVE, load_targets
from ..targets import Objective, build_objective
from .config import PretrainConfig

logger = logging.getLogger(__name__)

TEST_SPLIT = 2


def load_sources(config: PretrainConfig) -> list[LabelledDataset]:
    """One dataset per source target that passes include/exclude (by dataset name), test rows removed."""
    found: dict[str, LabelledDataset] = {}
    for entry in config.sources:
        for target in load_targets(entry, split="train"):
            if (config.include is None or target.dataset in config.include) and target.dataset not in config.exclude:
                name = target.dataset if target.name == NATIVE else f"{target.dataset}/{target.name}"
                found[name] = train_rows(target.data, name)
    if not found:
        raise ValueError(
            f"no pretraining data left in {config.sources} after include={config.include} exclude={config.exclude}"
        )
    return [found[name] for name in sorted(found)]


def train_rows(ds: LabelledDataset, name: str) -> LabelledDataset:
    """The dataset without its test split, images decoded (MedIMeta's are read lazily)."""
    keep = torch.arange(len(ds)) if ds.split is None else (ds.split != TEST_SPLIT).nonzero()[:, 0]
    split = None if ds.split is None else ds.split[keep]
    return LabelledDataset(name, ds.images[keep], ds.labels[keep], ds.target, ds.classes, split, ds.domain)


@dataclass
class Source:
    """One dataset on the device with its objective (loss for its target type; None where labels are not used)."""

    name: str
    images: torch.Tensor  # uint8 [N, C, H, W] on the device
    labels: torch.Tensor  # on the device
    objective: Objective | None


class BalancedSampler:
    """Every step draws the same number of images from each dataset (with replacement).

    The generator is re-seeded from (seed, process, step), so a resumed run draws exactly the
    batches the uninterrupted run would have, and processes draw different batches.
    """

    def __init__(
        self, datasets: list[LabelledDataset], *, batch_size: int, device: torch.device, seed: int, rank: int,
        labelled: bool = True,
    ) -> None:  # fmt: skip
        """`labelled=False` (self-supervised only): labels are drawn but never read, so no objective is built."""
        self.sources = [
            Source(
                ds.name,
                ds.images.to(device),
                ds.labels.to(device),
                build_objective(ds.target, ds.classes, ds.labels) if labelled else None,
            )
            for ds in datasets
        ]
        self.per_source = max(1, batch_size // len(self.sources))
        self.generator = torch.Generator(device)
        self.seed, self.rank = seed, rank

    @property
    def batch_size(self) -> int:
        return self.per_source * len(self.sources)

    def draw(self, step: int) -> tuple[torch.Generator, list[tuple[torch.Tensor, torch.Tensor]]]:
        """(generator for this step's augmentation, [(uint8 images, labels)] one pair per source)."""
        self.generator.manual_seed(((self.seed * 1_000_003 + self.rank) * 1_000_003 + step) % (2**63))
        batches = []
        for source in self.sources:
            n, device = len(source.images), source.images.device
            idx = torch.randint(n, (self.per_source,), generator=self.generator, device=device)
            batches.append((source.images[idx], source.labels[idx]))
        return self.generator, batches
