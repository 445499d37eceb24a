"""Labelled datasets to sample tasks from, one `Target` per dataset x prediction target.

Each `suite.sources` entry names a loader by `kind`; its other keys are the loader's arguments:
  npz       path, include, exclude, targets   (the development-data layout, data/datasets.py)
  folder    csv, task, name, classes, targets (images + `path,label` CSV)
  medimeta  path, datasets, tasks             (MedIMeta via the optional `medimeta` package)
  procedural  generator, images, size, seed   (images made by formula, data/procedural.py: pretraining)
A dataset's targets are `native` (its own labels) and `binary:CLASS` (CLASS vs the rest), so one
dataset can give several task families; MedIMeta datasets bring their own named tasks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchcross.data.task import TaskTarget

from .datasets import LabelledDataset, load_image_folder, load_npz_dir
from .procedural import dead_leaves

logger = logging.getLogger(__name__)

NATIVE = "native"
SPLITS = {"train": 0, "val": 1, "test": 2}


@dataclass
class Target:
    dataset: str
    name: str  # native, CLASS-vs-rest or a MedIMeta task name
    data: LabelledDataset  # .images may be lazy (MedIMeta): index it with a LongTensor of the sampled rows

    def pool(self, split: str | None) -> torch.Tensor:
        """Indices the suite may sample from (all, or one split where the source has splits)."""
        if split is None or self.data.split is None:
            return torch.arange(len(self.data))
        return (self.data.split == SPLITS[split]).nonzero()[:, 0]


def one_vs_rest(dataset: LabelledDataset, class_name: str) -> LabelledDataset:
    """A binary view: class `class_name` (multiclass/ordinal class or multilabel label) vs the rest."""
    by_name = {v: k for k, v in dataset.classes.items()}
    if class_name not in by_name:
        raise ValueError(f"{dataset.name}: no class {class_name!r} for binary:{class_name}; classes: {sorted(by_name)}")
    key = by_name[class_name]
    if dataset.target is TaskTarget.MULTILABEL_CLASSIFICATION:
        labels = dataset.labels[:, list(dataset.classes).index(key)]
    else:
        labels = (dataset.labels == key).long()
    return replace(
        dataset, labels=labels, target=TaskTarget.BINARY_CLASSIFICATION, classes={0: f"not {class_name}", 1: class_name}
    )


def views(dataset: LabelledDataset, names: list[str] | None) -> list[Target]:
    out = []
    for name in names or [NATIVE]:
        if name == NATIVE:
            out.append(Target(dataset.name, NATIVE, dataset))
        elif name.startswith("binary:"):
            class_name = name.removeprefix("binary:")
            out.append(Target(dataset.name, f"{class_name}-vs-rest", one_vs_rest(dataset, class_name)))
        else:
            raise ValueError(f"{dataset.name}: target {name!r} is neither {NATIVE!r} nor 'binary:CLASS'")
    return out


def npz_source(
    path: str,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    targets: dict[str, list[str]] | None = None,
) -> list[Target]:
    datasets = load_npz_dir(path, include, exclude)
    return [t for name, ds in datasets.items() for t in views(ds, (targets or {}).get(name))]


def folder_source(
    csv: str,
    task: str,
    name: str | None = None,
    classes: dict[int, str] | None = None,
    targets: list[str] | None = None,
) -> list[Target]:
    dataset = load_image_folder(
        csv, task=task, classes={int(k): v for k, v in classes.items()} if classes else None, name=name
    )
    return views(dataset, targets)


class _LazyImages:
    """MedIMeta images read on demand: only the sampled rows are decoded (datasets reach 100k images)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        arrays = [np.asarray(self.dataset[int(i)][0]) for i in index]
        tensor = torch.from_numpy(np.stack(arrays))
        return tensor[:, None] if tensor.dim() == 3 else tensor.permute(0, 3, 1, 2).contiguous()


def medimeta_source(
    path: str, datasets: list[str] | None = None, tasks: dict[str, list[str]] | None = None, split: str | None = None
) -> list[Target]:
    """MedIMeta tasks; an empty list (with a warning) when the package or the data is missing."""
    try:
        import medimeta
    except ImportError:
        logger.warning("medimeta source skipped: the optional package is not installed (pip install medimeta)")
        return []
    if not Path(path).is_dir():
        logger.warning("medimeta source skipped: no MedIMeta data at %s", path)
        return []
    available = medimeta.MedIMeta.get_available_tasks(path)
    out = []
    for dataset_id in datasets or sorted(available):
        for task_name in (tasks or {}).get(dataset_id) or available[dataset_id]:
            source = medimeta.MedIMeta(path, dataset_id, task_name, split=split, transform=np.asarray)
            labels = torch.from_numpy(np.asarray(source.labels)).long()
            if source.task_target is TaskTarget.BINARY_CLASSIFICATION:
                labels = labels.reshape(len(labels))
            classes = source.classes if isinstance(source.classes, dict) else dict(enumerate(source.classes))
            data = LabelledDataset(
                dataset_id, _LazyImages(source), labels, source.task_target, classes, None, source.domain_identifier
            )
            out.append(Target(dataset_id, task_name, data))
    return out


GENERATORS = {"dead_leaves": dead_leaves}


def procedural_source(
    generator: str = "dead_leaves", images: int = 10000, size: int = 64, seed: int = 0
) -> list[Target]:
    """Generated images labelled by their generating style, for pre-pretraining without real data."""
    if generator not in GENERATORS:
        raise ValueError(f"procedural generator must be one of {sorted(GENERATORS)}, got {generator!r}")
    return views(GENERATORS[generator](images, size=size, seed=seed), None)


LOADERS = {"npz": npz_source, "folder": folder_source, "medimeta": medimeta_source, "procedural": procedural_source}


def load_targets(entry: dict[str, Any], split: str | None) -> list[Target]:
    args = dict(entry)
    kind = args.pop("kind", None)
    if kind not in LOADERS:
        raise ValueError(f"source kind must be one of {sorted(LOADERS) + ['pickles']}, got {kind!r}")
    if kind == "medimeta":
        args["split"] = split  # MedIMeta filters splits itself
    try:
        return LOADERS[kind](**args)
    except TypeError as err:
        raise ValueError(f"{kind} source: {err}") from err
