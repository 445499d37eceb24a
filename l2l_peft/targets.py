"""Everything that depends on the task target, in one place: head size, loss, probabilities.

Conventions follow torchcross: multiclass and ordinal give len(classes) probabilities that sum
to 1 (column i = i-th class of the task's class dict), binary one sigmoid probability of the
positive class, multilabel one sigmoid per class, regression one raw value. Labels arrive as
encoded by task.py: class indices, 0/1, multi-hot rows or floats.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchcross.data.task import TaskTarget

from .task import TaskData, TaskError

# pos_weight = negatives / positives, clipped so one positive among 100 does not dominate the loss
_POS_WEIGHT_RANGE = (0.1, 10.0)
_EPS = 1e-8  # inside the logarithm of an entropy: p log p -> 0 as p -> 0


class Objective:
    """Head size, loss and probability map of one task target."""

    n_logits: int
    n_outputs: int

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def positives(self, labels: torch.Tensor) -> torch.Tensor | None:
        """[N, n_logits] bool: which support samples each logit should fire for (head init)."""
        return None

    def soft_positives(self, probabilities: torch.Tensor) -> torch.Tensor | None:
        """[N, n_logits] in [0, 1]: the expected `positives` under predicted probabilities."""
        return None

    def information(self, logits: torch.Tensor) -> torch.Tensor | None:
        """Mean prediction entropy minus the entropy of the mean prediction, to minimise on unlabelled
        images (TIM, Boudiaf et al. 2020): confident answers, but spread over the classes, so that
        the term cannot collapse every image onto one class. None where a target has no such term."""
        return None


def _categorical_information(probabilities: torch.Tensor) -> torch.Tensor:
    def entropy(p: torch.Tensor) -> torch.Tensor:
        return -(p * p.clamp(min=_EPS).log()).sum(-1)

    return entropy(probabilities).mean() - entropy(probabilities.mean(0))


def _bernoulli_information(probabilities: torch.Tensor) -> torch.Tensor:
    """Per column (binary or multilabel) as for two classes, averaged over the columns."""

    def entropy(p: torch.Tensor) -> torch.Tensor:
        return -(p * p.clamp(min=_EPS).log() + (1 - p) * (1 - p).clamp(min=_EPS).log())

    return entropy(probabilities).mean() - entropy(probabilities.mean(0)).mean()


class Softmax(Objective):
    def __init__(self, n_classes: int) -> None:
        self.n_logits = self.n_outputs = n_classes

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float().softmax(-1)

    def positives(self, labels: torch.Tensor) -> torch.Tensor:
        return F.one_hot(labels, self.n_logits).bool()

    def soft_positives(self, probabilities: torch.Tensor) -> torch.Tensor:
        return probabilities.float()

    def information(self, logits: torch.Tensor) -> torch.Tensor:
        return _categorical_information(self.probabilities(logits))


class Sigmoid(Objective):
    """Binary (one column) and multilabel (one column per class), with support-balanced pos_weight."""

    def __init__(self, labels: torch.Tensor) -> None:
        labels = labels.reshape(len(labels), -1).float()
        self.n_logits = self.n_outputs = labels.shape[1]
        pos = labels.sum(0)
        neg = len(labels) - pos
        weight = torch.where(pos > 0, neg / pos.clamp(min=1), torch.ones_like(pos))
        self.pos_weight = weight.clamp(*_POS_WEIGHT_RANGE)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        target = labels.reshape(logits.shape).float()
        if self.pos_weight.device != logits.device:  # moved once: a copy per step would block CUDA-graph capture
            self.pos_weight = self.pos_weight.to(logits.device)
        return F.binary_cross_entropy_with_logits(logits.float(), target, pos_weight=self.pos_weight)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float().sigmoid()

    def positives(self, labels: torch.Tensor) -> torch.Tensor:
        return labels.reshape(len(labels), -1).bool()

    def soft_positives(self, probabilities: torch.Tensor) -> torch.Tensor:
        return probabilities.float()

    def information(self, logits: torch.Tensor) -> torch.Tensor:
        return _bernoulli_information(self.probabilities(logits))


class Corn(Objective):
    """Ordinal grades via CORN (Shi et al. 2023): logit k models P(y > k | y > k-1).

    The cumulative product of the conditionals is monotone, so per-grade probabilities
    (differences of consecutive cumulative terms) are non-negative and sum to 1.
    """

    def __init__(self, n_grades: int) -> None:
        self.n_outputs = n_grades
        self.n_logits = n_grades - 1

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        grades = torch.arange(self.n_logits, device=labels.device)
        at_risk = labels[:, None] >= grades  # samples that passed grade k-1 take part in task k
        target = (labels[:, None] > grades).float()
        losses = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
        return (losses * at_risk).sum() / at_risk.sum().clamp(min=1)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        above = logits.float().sigmoid().cumprod(-1)  # P(y > k)
        ones = torch.ones_like(above[:, :1])
        zeros = torch.zeros_like(above[:, :1])
        return (torch.cat([ones, above], -1) - torch.cat([above, zeros], -1)).clamp(min=0)

    def positives(self, labels: torch.Tensor) -> torch.Tensor:
        return labels[:, None] > torch.arange(self.n_logits, device=labels.device)

    def soft_positives(self, probabilities: torch.Tensor) -> torch.Tensor:
        """P(y > k) for k < n_logits: one minus the cumulative grade probabilities."""
        return (1 - probabilities.float().cumsum(-1)[:, : self.n_logits]).clamp(0, 1)

    def information(self, logits: torch.Tensor) -> torch.Tensor:
        return _categorical_information(self.probabilities(logits))


class Regression(Objective):
    """One raw value; trained on support-standardised targets, returned in the original units."""

    def __init__(self, labels: torch.Tensor) -> None:
        self.n_logits = self.n_outputs = 1
        self.mean = float(labels.mean())
        std = float(labels.std()) if len(labels) > 1 else 0.0
        self.std = std if std > 1e-8 else 1.0

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(logits.float()[:, 0], (labels.float() - self.mean) / self.std)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float() * self.std + self.mean


def build_objective(target: TaskTarget, classes: dict, labels: torch.Tensor) -> Objective:
    match target:
        case TaskTarget.MULTICLASS_CLASSIFICATION:
            return Softmax(len(classes))
        case TaskTarget.BINARY_CLASSIFICATION | TaskTarget.MULTILABEL_CLASSIFICATION:
            return Sigmoid(labels)
        case TaskTarget.ORDINAL_REGRESSION:
            return Corn(len(classes))
        case TaskTarget.REGRESSION:
            return Regression(labels)
        case other:
            raise TaskError(f"unsupported task target {other}")


def output_size(target: TaskTarget, classes: dict) -> int:
    """Columns of the prediction tensor, without looking at labels (for empty outputs)."""
    match target:
        case TaskTarget.BINARY_CLASSIFICATION | TaskTarget.REGRESSION:
            return 1
        case _:
            return len(classes)


def class_prior(data: TaskData) -> torch.Tensor:
    """Support label frequencies (Laplace-smoothed), repeated for every query image: needs no model."""
    labels, n_query = data.support_labels, len(data.query_images)
    match data.target:
        case TaskTarget.MULTICLASS_CLASSIFICATION | TaskTarget.ORDINAL_REGRESSION:
            counts = torch.bincount(labels, minlength=len(data.classes)).float() + 1
            prior = counts / counts.sum()
        case TaskTarget.BINARY_CLASSIFICATION | TaskTarget.MULTILABEL_CLASSIFICATION:
            labels = labels.reshape(len(labels), -1).float()
            prior = (labels.sum(0) + 1) / (len(labels) + 2)
        case _:
            prior = labels.float().mean().reshape(1)
    return prior.expand(n_query, -1).clone()
