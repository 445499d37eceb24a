"""Few-shot task sampling following the MedIMeta protocol.

Support: n shots per class over all classes of the target (binary: n positives + n negatives);
multilabel: a greedy set with at least n positives and n negatives per label. Query: the same
rule with `query_per_class` from the remaining images, so support and query never share an image.
A class with too few images contributes what it has (its metrics may become NaN, never an error).
"""

from __future__ import annotations

import hashlib

import torch
from torchcross.data.task import TaskTarget


def derive_seed(*parts: object) -> int:
    """A stable seed from the task's identity (Python's hash() changes between processes)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def per_class(labels: torch.Tensor, pool: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """n random pool indices of every class value (fewer where a class has fewer)."""
    order = pool[torch.randperm(len(pool), generator=generator)]
    values = labels[order]
    picked = [order[values == value][:n] for value in values.unique()]
    return torch.cat(picked).sort().values


def greedy_multilabel(labels: torch.Tensor, pool: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """Walk a random order, keep an image when it adds a still-missing positive or negative for some label."""
    order = pool[torch.randperm(len(pool), generator=generator)]
    need_pos = torch.full((labels.shape[1],), n)
    need_neg = need_pos.clone()
    picked = []
    for i in order.tolist():
        y = labels[i].bool()
        if bool(((y & (need_pos > 0)) | (~y & (need_neg > 0))).any()):
            picked.append(i)
            need_pos -= y.long()
            need_neg -= (~y).long()
            if bool((need_pos <= 0).all() and (need_neg <= 0).all()):
                break
    return torch.tensor(sorted(picked), dtype=torch.long)


def sample_task(
    labels: torch.Tensor, target: TaskTarget, pool: torch.Tensor, *, shots: int, query_per_class: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(support indices, query indices) into `labels`, drawn from `pool`."""
    match target:
        case TaskTarget.MULTICLASS_CLASSIFICATION | TaskTarget.ORDINAL_REGRESSION | TaskTarget.BINARY_CLASSIFICATION:
            pick = per_class
            labels = labels.reshape(len(labels))
        case TaskTarget.MULTILABEL_CLASSIFICATION:
            pick = greedy_multilabel
        case other:
            raise ValueError(f"cannot sample few-shot tasks for {other.name}: the MedIMeta protocol needs classes")
    generator = torch.Generator().manual_seed(seed)
    support = pick(labels, pool, shots, generator)
    rest = pool[~torch.isin(pool, support)]
    return support, pick(labels, rest, query_per_class, generator)
