"""Per-task metrics with torchmetrics, defined as torchcross defines them.

AUROC: binary, or macro over classes (one-vs-rest) for multiclass/ordinal/multilabel; accuracy:
micro (argmax for multiclass/ordinal, threshold 0.5 for sigmoid outputs); balanced accuracy: the
mean per-class recall (multilabel: mean over labels of the binary balanced accuracy). Ordinal adds
MAE of the argmax grade and quadratic-weighted kappa; regression reports MAE and MSE only.
A class without both positives and negatives in the query has no AUROC: it is left out of the
macro mean, and a task with no such class at all gets NaN (the aggregates skip NaNs).
"""

from __future__ import annotations

import math

import torch
import torchmetrics.functional.classification as C
import torchmetrics.functional.regression as R
from torchcross.data.task import TaskTarget


def _macro_auroc(per_class: torch.Tensor, onehot: torch.Tensor) -> float:
    valid = (onehot.sum(0) > 0) & (onehot.sum(0) < len(onehot))
    return float(per_class[valid].mean()) if bool(valid.any()) else math.nan


def task_metrics(target: TaskTarget, probabilities: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Metrics of one task's query predictions against its encoded labels."""
    p = probabilities.float()
    match target:
        case TaskTarget.MULTICLASS_CLASSIFICATION | TaskTarget.ORDINAL_REGRESSION:
            k = p.shape[1]
            onehot = torch.nn.functional.one_hot(labels, k)
            out = {
                "auroc": _macro_auroc(C.multiclass_auroc(p, labels, k, average=None), onehot),
                "accuracy": float(C.multiclass_accuracy(p, labels, k, average="micro")),
                "balanced_accuracy": _balanced(p.argmax(1), labels, k),
            }
            if target is TaskTarget.ORDINAL_REGRESSION:
                out["mae"] = float((p.argmax(1) - labels).abs().float().mean())
                out["qwk"] = float(C.multiclass_cohen_kappa(p, labels, k, weights="quadratic"))
            return out
        case TaskTarget.BINARY_CLASSIFICATION:
            y = labels.reshape(-1)
            onehot = torch.nn.functional.one_hot(y, 2)
            return {
                "auroc": _macro_auroc(C.binary_auroc(p.reshape(-1), y).reshape(1), onehot[:, 1:]),
                "accuracy": float(C.binary_accuracy(p.reshape(-1), y)),
                "balanced_accuracy": _balanced((p.reshape(-1) >= 0.5).long(), y, 2),
            }
        case TaskTarget.MULTILABEL_CLASSIFICATION:
            k = p.shape[1]
            hard = (p >= 0.5).long()
            balanced = [_balanced(hard[:, j], labels[:, j], 2) for j in range(k)]
            return {
                "auroc": _macro_auroc(C.multilabel_auroc(p, labels, k, average=None), labels),
                "accuracy": float(C.multilabel_accuracy(p, labels, k, average="micro")),
                "balanced_accuracy": _nanmean(balanced),
            }
        case TaskTarget.REGRESSION:
            pred, y = p.reshape(-1), labels.float().reshape(-1)
            return {"mae": float(R.mean_absolute_error(pred, y)), "mse": float(R.mean_squared_error(pred, y))}
        case other:
            raise ValueError(f"no metrics for task target {other}")


def _balanced(predicted: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Mean recall over the classes present in the query."""
    recall = C.multiclass_recall(predicted, labels, k, average=None)
    present = torch.bincount(labels, minlength=k) > 0
    return float(recall[present].mean()) if bool(present.any()) else math.nan


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan
