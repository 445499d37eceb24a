"""Task input: challenge pickles (read through `unpickle`), both torchcross layouts, validation."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchcross.data.task import Task, TaskDescription, TaskTarget

from .unpickle import PickleRefused, safe_loads

logger = logging.getLogger(__name__)


class TaskError(ValueError):
    """The task cannot be read or is inconsistent; the message names the problem."""


SUPPORTED_TARGETS = (
    TaskTarget.MULTICLASS_CLASSIFICATION,
    TaskTarget.BINARY_CLASSIFICATION,
    TaskTarget.MULTILABEL_CLASSIFICATION,
    TaskTarget.ORDINAL_REGRESSION,
    TaskTarget.REGRESSION,
)


def unpickle_task(data: bytes) -> Any:
    """Unpickle untrusted bytes, executing nothing outside the allowlist."""
    try:
        return safe_loads(data)
    except PickleRefused as err:
        raise TaskError(str(err)) from err
    except Exception as err:  # truncated, garbled or otherwise not a pickle
        raise TaskError(f"cannot unpickle task: {type(err).__name__}: {err}") from err


@dataclass
class TaskData:
    """A validated task, collated into tensors; the form the rest of the package consumes."""

    support_images: torch.Tensor  # float32 [N, C, H, W]
    support_labels: torch.Tensor  # long [N] | long [N, K] (multilabel) | float [N] (regression)
    query_images: torch.Tensor  # float32 [M, C, H, W]
    target: TaskTarget
    classes: dict[Any, str]
    task_identifier: str | None = None

    def to_task(self) -> Task:
        """The torchcross (new layout) view: support = (images, labels), query = images."""
        description = TaskDescription(self.target, self.classes, self.task_identifier)
        return Task((self.support_images, self.support_labels), self.query_images, description)


def challenge_task(images: torch.Tensor, labels: torch.Tensor, n_support: int, description: TaskDescription) -> Task:
    """A torchcross Task as the challenge ships it: (image, label) support pairs, (image,) queries.

    Every image and label gets its own storage: pickling a view writes its whole base tensor, so a
    task cut from one batch would hold that batch once per image (the demo's 60-image task: 722 MB).
    """
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    support = [(image.clone(), label.clone()) for image, label in zip(images[:n_support], labels[:n_support])]
    return Task(support, [(image.clone(),) for image in images[n_support:]], description)


def load_task(source: str | Path | bytes | Task | TaskData | Any) -> TaskData:
    """Read, normalise and validate a task from a path, pickle bytes or a task object."""
    if isinstance(source, TaskData):
        return source
    if isinstance(source, (str, Path)):
        path = Path(source)
        try:
            source = path.read_bytes()
        except OSError as err:
            raise TaskError(f"cannot read task file {path}: {err.strerror or err}") from err
    if isinstance(source, bytes):
        source = unpickle_task(source)
    return _normalise(source)


def _normalise(obj: Any) -> TaskData:
    if not hasattr(obj, "support") or not hasattr(obj, "query"):
        raise TaskError(f"expected a torchcross Task with support and query, got {type(obj).__name__}")
    description = getattr(obj, "description", None)
    if description is not None:  # new layout (torchcross >= 0.0.5)
        target, classes = description.task_target, description.classes
        identifier = getattr(description, "task_identifier", None)
    elif hasattr(obj, "task_target"):  # old layout (torchcross <= 0.0.4)
        target, classes = obj.task_target, getattr(obj, "classes", None)
        identifier = getattr(obj, "task_identifier", None)
    else:
        raise TaskError("task has neither a description nor a task_target attribute")
    target = _check_target(target)
    images, labels = _collate_support(obj.support)
    query = _collate_query(obj.query)
    _check_images(images, "support")
    if len(query):
        _check_images(query, "query")
        if query.shape[1:] != images.shape[1:]:
            raise TaskError(f"query images have shape {tuple(query.shape[1:])}, support images {tuple(images.shape[1:])}")
    classes = _check_classes(classes, target, labels)
    labels = _check_labels(labels, target, classes)
    return TaskData(images, labels, query, target, classes, identifier)


def _check_target(target: Any) -> TaskTarget:
    if not isinstance(target, TaskTarget):
        raise TaskError(f"unknown task target {target!r}")
    if target in (TaskTarget.BINARY_SEGMENTATION, TaskTarget.MULTILABEL_SEGMENTATION):
        raise TaskError(f"task target {target.name} (segmentation) is not supported: l2l_peft predicts image-level outputs")
    if target not in SUPPORTED_TARGETS:
        raise TaskError(f"unsupported task target {target.name}")
    return target


def _as_tensor(x: Any, what: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(x, (int, float, bool, np.number)) or (isinstance(x, Sequence) and not isinstance(x, str)):
        try:
            return torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TaskError(f"{what} cannot be turned into a tensor: {err}") from err
    raise TaskError(f"{what} is a {type(x).__name__}, expected a tensor")


def _stack(items: list[torch.Tensor], what: str) -> torch.Tensor:
    shapes = {tuple(t.shape) for t in items}
    if len(shapes) > 1:
        first = tuple(items[0].shape)
        bad = next(i for i, t in enumerate(items) if tuple(t.shape) != first)
        raise TaskError(f"{what} {bad} has shape {tuple(items[bad].shape)}, {what} 0 has {first}")
    return torch.stack(items)


def _collate_support(support: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(support, (tuple, list)) and len(support) == 2 and isinstance(support[0], torch.Tensor) and support[0].dim() == 4:
        images, labels = support  # already collated
        return images.float(), _as_tensor(labels, "support labels")
    try:
        pairs = list(support)
    except TypeError as err:
        raise TaskError(f"support is a {type(support).__name__}, expected a list of (image, label) pairs") from err
    if not pairs:
        raise TaskError("support set is empty: nothing to adapt on")
    images, labels = [], []
    for i, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TaskError(f"support item {i} is not an (image, label) pair")
        images.append(_as_tensor(pair[0], f"support image {i}").float())
        labels.append(_as_tensor(pair[1], f"support label {i}"))
    return _stack(images, "support image"), _stack(labels, "support label")


def _collate_query(query: Any) -> torch.Tensor:
    if isinstance(query, torch.Tensor) and query.dim() == 4:
        return query.float()
    if isinstance(query, (tuple, list)) and len(query) in (1, 2) and isinstance(query[0], torch.Tensor) and query[0].dim() == 4:
        return query[0].float()  # collated (images,) or (images, labels)
    try:
        items = list(query)
    except TypeError as err:
        raise TaskError(f"query is a {type(query).__name__}, expected a list of images") from err
    if not items:
        return torch.empty(0, 0, 0, 0)
    images = []
    for i, item in enumerate(items):
        if isinstance(item, (tuple, list)):  # (image,) or (image, label): labels are ignored
            if not item:
                raise TaskError(f"query item {i} is empty")
            item = item[0]
        images.append(_as_tensor(item, f"query image {i}").float())
    return _stack(images, "query image")


def _check_images(images: torch.Tensor, what: str) -> None:
    if images.dim() != 4:
        raise TaskError(f"{what} images must be C x H x W, got shape {tuple(images.shape[1:])}")
    if images.shape[1] not in (1, 3):
        raise TaskError(f"{what} images have {images.shape[1]} channels; only 1 or 3 are supported")
    lo, hi = (float(v) for v in torch.aminmax(images))  # one pass; NaN or inf in any pixel reaches lo or hi
    if not (math.isfinite(lo) and math.isfinite(hi)):
        finite = torch.isfinite(images).flatten(1).all(1)
        raise TaskError(f"{what} image {int((~finite).nonzero()[0])} contains NaN or infinite pixels")
    if lo < -1.5 or hi > 1.5:
        logger.warning("%s pixels span [%.2f, %.2f]; the challenge format is normalised to [-1, 1]", what, lo, hi)


def _check_classes(classes: Any, target: TaskTarget, labels: torch.Tensor) -> dict[Any, str]:
    if target is TaskTarget.REGRESSION:
        return dict(classes or {0: "value"})
    if classes is None or len(classes) == 0:
        raise TaskError(f"{target.name} task has no classes in its description")
    if isinstance(classes, (list, tuple)):
        classes = dict(enumerate(classes))
    if not isinstance(classes, dict):
        raise TaskError(f"task classes must be a dict of id -> name, got {type(classes).__name__}")
    if target is TaskTarget.BINARY_CLASSIFICATION and len(classes) not in (1, 2):
        raise TaskError(f"binary task has {len(classes)} classes; expected 1 or 2")
    if target in (TaskTarget.MULTICLASS_CLASSIFICATION, TaskTarget.ORDINAL_REGRESSION) and len(classes) < 2:
        raise TaskError(f"{target.name} task needs at least 2 classes, has {len(classes)}")
    return dict(classes)


def _check_labels(labels: torch.Tensor, target: TaskTarget, classes: dict[Any, str]) -> torch.Tensor:
    n = len(labels)
    match target:
        case TaskTarget.MULTICLASS_CLASSIFICATION | TaskTarget.ORDINAL_REGRESSION:
            flat = _integral(labels.reshape(n, -1), target)
            if flat.shape[1] != 1:
                raise TaskError(f"{target.name} labels must be scalars, got shape {tuple(labels.shape[1:])}")
            index = {key: i for i, key in enumerate(classes)}
            bad = [i for i, v in enumerate(flat[:, 0].tolist()) if v not in index]
            if bad:
                raise TaskError(
                    f"support label {bad[0]} is {int(flat[bad[0], 0])}, not one of the classes {sorted(index)}"
                )
            return torch.tensor([index[v] for v in flat[:, 0].tolist()], dtype=torch.long)
        case TaskTarget.BINARY_CLASSIFICATION:
            flat = _integral(labels.reshape(n, -1), target)
            if flat.shape[1] != 1:
                raise TaskError(f"binary labels must have shape [1] or be scalars, got {tuple(labels.shape[1:])}")
            bad = ((flat != 0) & (flat != 1)).flatten().nonzero()
            if len(bad):
                raise TaskError(f"support label {int(bad[0])} is {int(flat[bad[0], 0])}; binary labels must be 0 or 1")
            return flat[:, 0].long()
        case TaskTarget.MULTILABEL_CLASSIFICATION:
            if labels.dim() != 2 or labels.shape[1] != len(classes):
                raise TaskError(
                    f"multilabel labels must be multi-hot vectors of length {len(classes)}, got shape {tuple(labels.shape[1:])}"
                )
            flat = _integral(labels, target)
            bad = ((flat != 0) & (flat != 1)).any(1).nonzero()
            if len(bad):
                raise TaskError(f"support label {int(bad[0])} is not multi-hot (values other than 0/1)")
            return flat.long()
        case TaskTarget.REGRESSION:
            values = labels.reshape(n, -1).float()
            if values.shape[1] != 1:
                raise TaskError(f"regression labels must be scalars, got shape {tuple(labels.shape[1:])}")
            if not bool(torch.isfinite(values).all()):
                raise TaskError("regression labels contain NaN or infinite values")
            return values[:, 0]
        case other:
            raise TaskError(f"unsupported task target {other}")


def _integral(labels: torch.Tensor, target: TaskTarget) -> torch.Tensor:
    if labels.is_floating_point():
        if not bool(torch.isfinite(labels).all()):
            raise TaskError(f"{target.name} labels contain NaN or infinite values")
        if not bool((labels == labels.round()).all()):
            raise TaskError(f"{target.name} labels must be integers, got fractional values")
    return labels.long()

