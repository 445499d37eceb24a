"""Labelled image datasets for task sampling (experiments) and pretraining.

Sources: the npz layout of the development data (`images` uint8 N x H x W [x 3], `labels`,
optional `split` and `names`; task type and class names in the folder's manifest.json) and an image folder
with a CSV of `path,label` rows. Images stay uint8 until `to_challenge` turns a batch into the
challenge's float C x 224 x 224 in [-1, 1].
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchcross.data.task import TaskTarget

CHALLENGE_SIZE = 224
TASK_TYPES = {
    "multiclass": TaskTarget.MULTICLASS_CLASSIFICATION,
    "binary": TaskTarget.BINARY_CLASSIFICATION,
    "multilabel": TaskTarget.MULTILABEL_CLASSIFICATION,
    "ordinal": TaskTarget.ORDINAL_REGRESSION,
    "regression": TaskTarget.REGRESSION,
}
DERIVED_SPLIT = (0.2, 0.1)  # test and val fractions of the groups of each label, for npz files without a split


@dataclass
class LabelledDataset:
    name: str
    images: torch.Tensor  # uint8 [N, C, H, W], C = 1 or 3
    labels: torch.Tensor  # long [N] (class index / grade / 0-1) or [N, K] multi-hot
    target: TaskTarget
    classes: dict[int, str]
    split: torch.Tensor | None = None  # int8 [N]: 0 train, 1 val, 2 test, -1 unlisted
    domain: str = ""

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels):
            raise ValueError(f"{self.name}: {len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)


def _channels_first(images: np.ndarray) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(images))
    if tensor.dim() == 3:  # N x H x W grayscale
        return tensor[:, None]
    return tensor.permute(0, 3, 1, 2).contiguous()


def task_type(described: str) -> str:
    """The manifest's task type; an annotated one such as 'multiclass (ordinal severity)' counts as ordinal."""
    base, _, note = described.partition("(")
    return "ordinal" if "ordinal" in note else base.strip()


def derived_split(labels: np.ndarray, groups: np.ndarray) -> torch.Tensor:
    """A fixed train/val/test split where the source has none, so a test part exists to hold out.

    Rows of one group (`names`: e.g. the frames of one ultrasound clip) share their part. Within
    each label, groups are ranked by a hash of their name, so the split depends neither on row
    order nor on the machine, and every label with 2+ groups has test rows.
    """
    test_frac, val_frac = DERIVED_SPLIT
    stratum = labels if labels.ndim == 1 else np.zeros(len(labels), dtype=np.int64)
    split = np.zeros(len(labels), dtype=np.int8)
    for value in np.unique(stratum):
        rows = np.flatnonzero(stratum == value)
        names = sorted({str(g) for g in groups[rows]}, key=lambda g: hashlib.sha256(g.encode()).digest())
        n_test = max(1, round(test_frac * len(names))) if len(names) > 1 else 0
        n_val = round(val_frac * len(names))
        part = {g: 2 if i < n_test else 1 if i < n_test + n_val else 0 for i, g in enumerate(names)}
        split[rows] = [part[str(g)] for g in groups[rows]]
    return torch.from_numpy(split)


def load_npz(path: str | Path, info: dict) -> LabelledDataset:
    """One dataset of the development-data layout, described by its manifest entry.

    Without a `split` array the split is derived (`derived_split`), grouped by `names` where the
    file has them (else one group per row).
    """
    path = Path(path)
    with np.load(path) as data:
        images, labels = data["images"], data["labels"]
        if "split" in data.files:
            split = torch.from_numpy(data["split"])
        else:
            groups = (
                data["names"] if "names" in data.files else np.array([f"{path.stem}/{i}" for i in range(len(labels))])
            )
            split = derived_split(labels, groups)
    task = task_type(info["task"])
    if task not in TASK_TYPES:
        raise ValueError(f"{path.name}: unknown task type {task!r}; expected one of {sorted(TASK_TYPES)}")
    classes = {int(k): v for k, v in info["class_names"].items()}
    return LabelledDataset(
        path.stem, _channels_first(images), torch.from_numpy(labels).long(), TASK_TYPES[task], classes, split,
        info.get("domain", ""),
    )  # fmt: skip


def load_npz_dir(
    directory: str | Path, include: list[str] | None = None, exclude: list[str] | None = None
) -> dict[str, LabelledDataset]:
    """All datasets named in `directory/manifest.json`, filtered by include/exclude lists."""
    directory = Path(directory)
    manifest = json.loads((directory / "manifest.json").read_text())
    names = [n for n in manifest if (include is None or n in include) and n not in (exclude or [])]
    missing = sorted(set(include or []) - set(manifest))
    if missing:
        raise ValueError(f"datasets {missing} are not in {directory}/manifest.json ({sorted(manifest)})")
    return {name: load_npz(directory / f"{name}.npz", manifest[name]) for name in names}


def load_image_folder(
    csv_path: str | Path, *, task: str, classes: dict[int, str] | None = None, name: str | None = None
) -> LabelledDataset:
    """Images listed in a CSV (`path,label`; multilabel: `path,l0,l1,...`), paths relative to the CSV."""
    from PIL import Image

    csv_path = Path(csv_path)
    with csv_path.open(newline="") as f:
        rows = [r for r in csv.reader(f) if r and not r[0].startswith("#")]
    if rows and rows[0][0].strip().lower() in ("path", "file", "image"):
        rows = rows[1:]
    if not rows:
        raise ValueError(f"{csv_path} lists no images")
    arrays, labels = [], []
    for row in rows:
        image = Image.open(csv_path.parent / row[0])
        arrays.append(np.asarray(image.convert("L" if image.mode in ("L", "I", "I;16") else "RGB")))
        labels.append([int(v) for v in row[1:]])
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"{csv_path}: images differ in size {sorted(shapes)[:3]}; resize them to one size first")
    label_tensor = torch.tensor(labels)
    label_tensor = label_tensor[:, 0] if label_tensor.shape[1] == 1 else label_tensor
    if classes is None:
        n = label_tensor.shape[1] if label_tensor.dim() == 2 else int(label_tensor.max()) + 1
        classes = {i: str(i) for i in range(max(n, 2))}
    return LabelledDataset(
        name or csv_path.stem, _channels_first(np.stack(arrays)), label_tensor.long(), TASK_TYPES[task], classes
    )


def to_challenge(images: torch.Tensor, size: int = CHALLENGE_SIZE) -> torch.Tensor:
    """uint8 [N, C, H, W] -> float [N, C, size, size] in [-1, 1] (resize, /255, mean 0.5 / std 0.5)."""
    x = images.float() / 255
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x.clamp(0, 1) - 0.5) / 0.5
