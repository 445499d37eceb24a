"""Transductive refinement (studied in docs/recipe.md, not adopted: it lost on every shot count).

The query set is handed over at prediction time, so it can be used.

Soft k-means over support and query features: start from query probabilities (a trained model's,
or the support prototypes'), then alternate between weighted class prototypes (support labels as
they are, query samples by their predicted probabilities, down-weighted by `query_weight`) and new
query probabilities from those prototypes. It works per logit on the package's Head, as prototype
initialisation does, so every classification target (multiclass, binary, multilabel, ordinal)
goes through the same code. Query labels are never read; a query image's output depends on the
other query images, but not on their order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from l2l_peft.head import Head
from l2l_peft.targets import Objective
from l2l_peft.task import TaskError


@dataclass
class TransductiveConfig:
    """Settings of the soft k-means refinement."""

    iterations: int = field(default=10, metadata={"help": "prototype / assignment alternations"})
    query_weight: float = field(
        default=0.5, metadata={"help": "weight of a query sample in the prototypes relative to a support sample"}
    )
    centre: bool = field(
        default=False, metadata={"help": "subtract the mean feature of support and query before the rule"}
    )

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ValueError(f"TransductiveConfig.iterations must be >= 1, got {self.iterations!r}")
        if not 0 < self.query_weight <= 1:
            raise ValueError(f"TransductiveConfig.query_weight must be in (0, 1], got {self.query_weight!r}")


@torch.no_grad()
def refine(
    objective: Objective,
    support: torch.Tensor,
    labels: torch.Tensor,
    query: torch.Tensor,
    config: TransductiveConfig,
    *,
    initial: torch.Tensor | None = None,
) -> torch.Tensor:
    """Query probabilities [n_query, n_outputs] from support + query features ([N, D] each)."""
    hard = objective.positives(labels.to(support.device))
    if hard is None:
        raise TaskError("transductive refinement needs class labels; it does not apply to regression")
    support, query = support.float(), query.float()
    if config.centre:
        mean = torch.cat([support, query]).mean(0)
        support, query = support - mean, query - mean
    head = Head(support.shape[1], objective.n_logits).to(support.device)
    if initial is None:
        head.init_from_prototypes(support, hard)
        initial = objective.probabilities(head(query))
    probabilities = initial.float().to(support.device)
    both = torch.cat([support, query])
    weights = torch.cat([torch.ones(len(support)), torch.full((len(query),), config.query_weight)]).to(support.device)
    for _ in range(config.iterations):
        soft = torch.cat([hard.float(), objective.soft_positives(probabilities)])
        head.init_from_prototypes(both, soft, weights)
        probabilities = objective.probabilities(head(query))
    return probabilities.float().cpu()
