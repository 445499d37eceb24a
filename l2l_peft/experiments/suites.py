"""A suite: the ordered list of task specs, and how one spec becomes a task with query labels.

Specs are cheap (names and seeds, no images), identical on every process, and each carries its own
sampling seed derived from (suite seed, dataset, target, shots, index): sharding never changes a
task. Images are converted to the challenge form only for the sampled rows.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torchcross.data.task import Task, TaskDescription, TaskTarget

from ..data.datasets import to_challenge
from ..data.sampling import derive_seed, sample_task
from ..data.sources import Target, load_targets
from ..task import TaskData, TaskError, load_task, unpickle_task
from .config import SuiteConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskSpec:
    key: str  # unique id of the task in results.jsonl
    dataset: str
    target: str
    shots: int | None  # None for given task pickles
    index: int
    seed: int  # sampling seed; also the base of every method's adapt seed on this task
    path: str | None = None  # task pickle, for pickle sources


def encode_labels(labels: torch.Tensor, target: TaskTarget, classes: dict) -> torch.Tensor:
    """Labels in the encoding task.py gives support labels (class index, 0/1, multi-hot, float)."""
    placeholder = torch.zeros(len(labels), 1, 1, 1)
    task = Task((placeholder, labels), placeholder[:0], TaskDescription(target, classes))
    return load_task(task).support_labels


def _pickle_query_labels(raw: object) -> torch.Tensor | None:
    query = raw.query
    if (
        isinstance(query, (tuple, list))
        and len(query) == 2
        and isinstance(query[0], torch.Tensor)
        and query[0].dim() == 4
    ):
        return torch.as_tensor(query[1])  # collated (images, labels)
    items = list(query)
    if items and all(isinstance(item, (tuple, list)) and len(item) == 2 for item in items):
        return torch.stack([torch.as_tensor(item[1]) for item in items])
    return None


def load_pickle_task(path: str | Path, side_labels: dict[str, list] | None) -> tuple[TaskData, torch.Tensor]:
    """A challenge task pickle; query labels from the pickle itself or the side file (keyed by file stem)."""
    path = Path(path)
    raw = unpickle_task(path.read_bytes())
    data = load_task(raw)
    labels = _pickle_query_labels(raw)
    if labels is None:
        if side_labels is None or path.stem not in side_labels:
            raise TaskError(f"{path.name}: the query has no labels and the side file has no entry {path.stem!r}")
        labels = torch.as_tensor(side_labels[path.stem])
    return data, encode_labels(labels, data.target, data.classes)


class Suite:
    """Loads the sources once per process and turns specs into tasks on demand."""

    def __init__(self, config: SuiteConfig) -> None:
        self.config = config
        self.targets: dict[tuple[str, str], Target] = {}
        self.side_labels: dict[str, dict[str, list] | None] = {}
        self.specs: list[TaskSpec] = []
        for entry in config.sources:
            if entry.get("kind") == "pickles":
                self.specs += self._pickle_specs(**{k: v for k, v in entry.items() if k != "kind"})
            else:
                for target in load_targets(entry, config.split):
                    self.targets[(target.dataset, target.name)] = target
                    self.specs += self._sampled_specs(target)

    def _sampled_specs(self, target: Target) -> list[TaskSpec]:
        specs = []
        for shots in self.config.shots:
            for index in range(self.config.tasks):
                seed = derive_seed(self.config.seed, target.dataset, target.name, shots, index)
                key = f"{target.dataset}/{target.name}/{shots}-shot/{index}"
                specs.append(TaskSpec(key, target.dataset, target.name, shots, index, seed))
        return specs

    def _pickle_specs(self, path: str, labels: str | None = None, name: str | None = None) -> list[TaskSpec]:
        directory = Path(path)
        files = sorted(directory.glob("*.pkl"))
        if not files:
            raise ValueError(f"pickles source: no *.pkl files in {directory}")
        name = name or directory.name
        self.side_labels[name] = json.loads(Path(labels).read_text()) if labels else None
        return [
            TaskSpec(f"{name}/{f.stem}", name, "given", None, i, derive_seed(self.config.seed, name, f.stem), str(f))
            for i, f in enumerate(files)
        ]

    def build(self, spec: TaskSpec) -> tuple[TaskData, torch.Tensor]:
        """(task, encoded query labels)."""
        if spec.path is not None:
            return load_pickle_task(spec.path, self.side_labels[spec.dataset])
        target = self.targets[(spec.dataset, spec.target)]
        ds = target.data
        support, query = sample_task(
            ds.labels, ds.target, target.pool(self.config.split),
            shots=spec.shots, query_per_class=self.config.query_per_class, seed=spec.seed,
        )  # fmt: skip
        size = self.config.image_size
        data = TaskData(
            to_challenge(ds.images[support], size), encode_labels(ds.labels[support], ds.target, ds.classes),
            to_challenge(ds.images[query], size), ds.target, ds.classes, spec.key,
        )  # fmt: skip
        return data, encode_labels(ds.labels[query], ds.target, ds.classes)
