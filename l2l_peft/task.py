"""Task input: challenge pickles (read through `unpickle`), both torchcross layouts, validation.

Reading is bounded before anything is built: the file's size, then the number of images and the
bytes every image and label will take as tensors, counted through shared references (a list
nested 30 deep by reference is 2^30 numbers in a few hundred pickle bytes). docs/input_limits.md
says why each limit has its value. Every failure while reading is a one-line TaskError.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sized
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchcross.data.task import Task, TaskDescription, TaskTarget

from .unpickle import PickleRefused, clip, describe, safe_loads

logger = logging.getLogger(__name__)

MAX_FILE_BYTES = 8 << 30  # a task file: the pixel limit below, pickled as float64
MAX_TASK_BYTES = 4 << 30  # support + query images as float32 and labels as int64, each repeat counted
MAX_IMAGES = 100_000  # support + query images
MAX_SIDE = 4096  # image height and width (the challenge's images are 224 x 224)
MAX_NESTING = 8  # list levels inside one image or label given as nested lists (C x H x W takes 3)
_MAX_ITEM_ELEMENTS = 3 * MAX_SIDE * MAX_SIDE  # one image or label


class TaskError(ValueError):
    """The task cannot be read or is inconsistent; the message, one line, names the problem."""

    def __init__(self, message: str) -> None:
        super().__init__(clip(message, 1000))


SUPPORTED_TARGETS = (
    TaskTarget.MULTICLASS_CLASSIFICATION,
    TaskTarget.BINARY_CLASSIFICATION,
    TaskTarget.MULTILABEL_CLASSIFICATION,
    TaskTarget.ORDINAL_REGRESSION,
    TaskTarget.REGRESSION,
)


@contextmanager
def _task_errors(doing: str) -> Iterator[None]:
    """Whatever fails while reading a task becomes one TaskError: hostile pickles reach odd corners of Python."""
    try:
        yield
    except TaskError:
        raise
    except PickleRefused as err:
        raise TaskError(str(err)) from err
    except MemoryError as err:
        raise TaskError(f"not enough memory to {doing}") from err
    except Exception as err:
        if isinstance(err, RuntimeError) and "can't allocate memory" in str(err):  # torch's CPU allocator
            raise TaskError(f"not enough memory to {doing}: {err}") from err
        raise TaskError(f"cannot {doing}: {type(err).__name__}: {err}") from err


def unpickle_task(data: bytes) -> Any:
    """Unpickle untrusted bytes, executing nothing outside the allowlist."""
    with _task_errors("unpickle the task"):
        return safe_loads(data)


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
        with _task_errors("read the task file"):
            source = _read(Path(source))
    if isinstance(source, bytes):
        source = unpickle_task(source)
    with _task_errors("validate the task"):
        return _normalise(source)


def _read(path: Path) -> bytes:
    """The file's bytes; more than MAX_FILE_BYTES is refused, before reading where the size is known."""
    try:
        with path.open("rb") as file:
            too_big = os.fstat(file.fileno()).st_size > MAX_FILE_BYTES
            data = b"" if too_big else file.read(MAX_FILE_BYTES + 1)  # a pipe or device has no size
    except OSError as err:
        raise TaskError(f"cannot read task file {path}: {err.strerror or err}") from err
    if too_big or len(data) > MAX_FILE_BYTES:
        raise TaskError(f"task file {path} is larger than {MAX_FILE_BYTES >> 30} GiB, the most a task may take")
    return data


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
    support_images, support_labels = _support_items(obj.support)
    query_images = _query_items(obj.query)
    _check_size(support_images, support_labels, query_images)
    images = _collate_images(support_images, "support image")
    labels = _stack([_as_tensor(y, f"support label {i}") for i, y in enumerate(support_labels)], "support label")
    query = _collate_images(query_images, "query image")
    _check_pixels(images, "support")
    if len(query):
        _check_pixels(query, "query")
        if query.shape[1:] != images.shape[1:]:
            raise TaskError(
                f"query images have shape {tuple(query.shape[1:])}, support images {tuple(images.shape[1:])}"
            )
    classes = _check_classes(classes, target)
    labels = _check_labels(labels, target, classes)
    if identifier is not None and not isinstance(identifier, str):
        identifier = describe(identifier)
    return TaskData(images, labels, query, target, classes, identifier)


def _check_target(target: Any) -> TaskTarget:
    if not isinstance(target, TaskTarget):
        raise TaskError(f"unknown task target {describe(target)}")
    if target in (TaskTarget.BINARY_SEGMENTATION, TaskTarget.MULTILABEL_SEGMENTATION):
        raise TaskError(
            f"task target {target.name} (segmentation) is not supported: l2l_peft predicts image-level outputs"
        )
    if target not in SUPPORTED_TARGETS:
        raise TaskError(f"unsupported task target {target.name}")
    return target


def _is_batch(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.dim() == 4


def _items(seq: Any, what: str) -> list[Any]:
    """`seq` as a list of at most MAX_IMAGES entries, counted before listing where it has a length."""
    if isinstance(seq, Sized) and len(seq) > MAX_IMAGES:
        raise TaskError(f"{what} has {len(seq)} entries; at most {MAX_IMAGES} images are read")
    try:
        items = list(seq)
    except TypeError as err:
        raise TaskError(f"{what} is a {type(seq).__name__}, expected a list") from err
    if len(items) > MAX_IMAGES:
        raise TaskError(f"{what} has {len(items)} entries; at most {MAX_IMAGES} images are read")
    return items


def _support_items(support: Any) -> tuple[list[Any], list[Any]]:
    """The support images and labels, not yet built, from collated (images, labels) or (image, label) pairs."""
    if isinstance(support, (tuple, list)) and len(support) == 2 and _is_batch(support[0]):
        images, labels = _items(support[0], "support"), _items(support[1], "support labels")
        if len(images) != len(labels):
            raise TaskError(f"support has {len(images)} images but {len(labels)} labels")
        return images, labels
    pairs = _items(support, "support")
    if not pairs:
        raise TaskError("support set is empty: nothing to adapt on")
    for i, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TaskError(f"support item {i} is not an (image, label) pair")
    return [image for image, _ in pairs], [label for _, label in pairs]


def _query_items(query: Any) -> list[Any]:
    """The query images, not yet built: a batch, collated (images,) or (images, labels), or a list of items."""
    if _is_batch(query):
        return _items(query, "query")
    if isinstance(query, (tuple, list)) and len(query) in (1, 2) and _is_batch(query[0]):
        return _items(query[0], "query")
    items = _items(query, "query")
    for i, item in enumerate(items):
        if isinstance(item, (tuple, list)):  # (image,) or (image, label): labels are ignored
            if not item:
                raise TaskError(f"query item {i} is empty")
            items[i] = item[0]
    return items


def _check_size(support_images: list[Any], support_labels: list[Any], query_images: list[Any]) -> None:
    """Refuse a task whose tensors would exceed the limits, before building any of them.

    Nested lists are counted with every reference to a shared list counted again, as a tensor
    would hold it; each distinct list is visited once, so counting stays as cheap as the pickle.
    """
    counted: dict[int, int] = {}  # id(list) -> elements; -1 while its children are being counted

    def numel(node: Any, what: str, depth: int) -> int:
        if isinstance(node, (torch.Tensor, np.ndarray)):
            return node.numel() if isinstance(node, torch.Tensor) else node.size
        if not isinstance(node, (list, tuple)):
            return 1
        if counted.get(id(node)) == -1:
            raise TaskError(f"{what} contains itself")
        if id(node) not in counted:
            if depth == MAX_NESTING:
                raise TaskError(f"{what} is nested more than {MAX_NESTING} lists deep")
            counted[id(node)], total = -1, 0
            for child in node:
                total += numel(child, what, depth + 1)
                if total > _MAX_ITEM_ELEMENTS:
                    break
            counted[id(node)] = total
        return counted[id(node)]

    if (n := len(support_images) + len(query_images)) > MAX_IMAGES:
        raise TaskError(f"task has {n} images; at most {MAX_IMAGES} are read")
    nbytes = 0
    for what, items, itemsize in [
        ("support image", support_images, 4),
        ("query image", query_images, 4),
        ("support label", support_labels, 8),
    ]:
        for i, item in enumerate(items):
            elements = numel(item, f"{what} {i}", 0)
            if elements > _MAX_ITEM_ELEMENTS:
                raise TaskError(f"{what} {i} has more than {_MAX_ITEM_ELEMENTS} values (3 x {MAX_SIDE} x {MAX_SIDE})")
            nbytes += elements * itemsize
            if nbytes > MAX_TASK_BYTES:
                raise TaskError(
                    f"task images and labels exceed {MAX_TASK_BYTES >> 30} GiB as tensors by {what} {i}"
                    " (every repeat of a shared image counts)"
                )


def _as_tensor(x: Any, what: str) -> torch.Tensor:
    """One image or label as a detached, real-valued tensor (its size was checked before)."""
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "biuf":
            raise TaskError(f"{what} is a numpy array of {x.dtype}, expected numbers")
        x = torch.from_numpy(np.require(x, x.dtype.newbyteorder("="), ["C", "W"]))
    elif isinstance(x, (list, tuple, int, float, bool, np.number, np.bool_)):
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TaskError(f"{what} cannot be turned into a tensor: {err}") from err
    elif not isinstance(x, torch.Tensor):
        raise TaskError(f"{what} is a {type(x).__name__}, expected a tensor")
    if x.is_complex():
        raise TaskError(f"{what} holds complex numbers ({x.dtype}); expected real ones")
    return x.detach()


def _collate_images(items: list[Any], what: str) -> torch.Tensor:
    """Images into one float32 [N, C, H, W] tensor, each built and copied into place in turn."""
    if not items:
        return torch.empty(0, 0, 0, 0)
    first = _as_tensor(items[0], f"{what} 0")
    if first.dim() != 3:
        raise TaskError(f"{what}s must be C x H x W, got shape {tuple(first.shape)}")
    if first.shape[0] not in (1, 3):
        raise TaskError(f"{what}s have {first.shape[0]} channels; only 1 or 3 are supported")
    if not all(1 <= side <= MAX_SIDE for side in first.shape[1:]):
        raise TaskError(f"{what}s are {first.shape[1]} x {first.shape[2]} pixels; sides must be 1 to {MAX_SIDE}")
    batch = torch.empty(len(items), *first.shape)
    for i, item in enumerate(items):
        image = first if i == 0 else _as_tensor(item, f"{what} {i}")
        if image.shape != first.shape:
            raise TaskError(f"{what} {i} has shape {tuple(image.shape)}, {what} 0 has {tuple(first.shape)}")
        batch[i] = image
    return batch


def _stack(items: list[torch.Tensor], what: str) -> torch.Tensor:
    shapes = {tuple(t.shape) for t in items}
    if len(shapes) > 1:
        first = tuple(items[0].shape)
        bad = next(i for i, t in enumerate(items) if tuple(t.shape) != first)
        raise TaskError(f"{what} {bad} has shape {tuple(items[bad].shape)}, {what} 0 has {first}")
    return torch.stack(items)


def _check_pixels(images: torch.Tensor, what: str) -> None:
    lo, hi = (float(v) for v in torch.aminmax(images))  # one pass; NaN or inf in any pixel reaches lo or hi
    if not (math.isfinite(lo) and math.isfinite(hi)):
        finite = torch.isfinite(images).flatten(1).all(1)
        raise TaskError(f"{what} image {int((~finite).nonzero()[0])} contains NaN or infinite pixels")
    if lo < -1.5 or hi > 1.5:
        logger.warning("%s pixels span [%.2f, %.2f]; the challenge format is normalised to [-1, 1]", what, lo, hi)


def _check_classes(classes: Any, target: TaskTarget) -> dict[Any, str]:
    if target is TaskTarget.REGRESSION:
        return dict(classes) if isinstance(classes, dict) and classes else {0: "value"}
    if isinstance(classes, (list, tuple)):
        classes = dict(enumerate(classes))
    if classes is not None and not isinstance(classes, dict):
        raise TaskError(f"task classes must be a dict of id -> name, got {type(classes).__name__}")
    if not classes:
        raise TaskError(f"{target.name} task has no classes in its description")
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
                    f"support label {bad[0]} is {int(flat[bad[0], 0])}, not one of the classes {describe(list(index))}"
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
                    f"multilabel labels must be multi-hot vectors of length {len(classes)}, "
                    f"got shape {tuple(labels.shape[1:])}"
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
