"""Heads fitted on frozen features: nearest-centroid prototypes and an L2-regularised linear probe.

These are the methods `prototypes` and `linear-probe` of AdaptConfig.method: api.fit() runs them
like any other method (same backbone, same prediction, may join an ensemble) but, instead of
training, sets the head from the support features, computed once. The head is the package's Head
(LayerNorm + Linear), so the prototype rule is Head.init_from_prototypes and the probe minimises
the target's own Objective.loss: every task target works without new per-target code.
"""

from __future__ import annotations

import copy

import torch
from accelerate import Accelerator

from .config import AdaptConfig, Method
from .head import Classifier, Head
from .predict import features
from .targets import Objective
from .task import TaskError

FEATURE_METHODS = (Method.PROTOTYPES, Method.LINEAR_PROBE)


def fit_head(
    model: Classifier,
    objective: Objective,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    config: AdaptConfig,
    accelerator: Accelerator,
) -> None:
    """Fit model.head on the support features with the method's rule (no backbone training)."""
    support = features(model.extractor, images, accelerator=accelerator, batch_size=config.predict_batch_size)
    if config.methods[0] is Method.PROTOTYPES:
        fit_prototypes(model.head, objective, support, labels)
    else:
        fit_linear_probe(model.head, objective, support, labels, l2=config.probe_l2, max_iter=config.probe_max_iter)


def fit_prototypes(head: Head, objective: Objective, support: torch.Tensor, labels: torch.Tensor) -> Head:
    """Nearest class mean per logit (positive vs negative support samples), set in place; returns `head`."""
    positives = objective.positives(labels)
    if positives is None:
        raise TaskError("prototypes need class labels; they do not apply to regression")
    head.init_from_prototypes(support, positives.to(support.device))
    return head


def fit_linear_probe(
    head: Head, objective: Objective, support: torch.Tensor, labels: torch.Tensor, *, l2: float, max_iter: int
) -> Head:
    """Minimise Objective.loss + l2 * |W|^2 over the whole support with LBFGS (full batch, deterministic), in
    place from `head`'s weights; returns `head`.

    Solved on the CPU in float32 and copied back: the problem is tiny (support x feature_dim) but LBFGS's line
    search reads the loss on the host at every evaluation, hundreds of GPU syncs that took 30-330 s a task when
    12 evaluations shared one H200 (backbone study), against milliseconds on one CPU core.
    """
    solver = copy.deepcopy(head).to(device="cpu", dtype=torch.float32)
    # copies: features from inference mode cannot enter autograd
    support = support.to(device="cpu", dtype=torch.float32, copy=True)
    labels = labels.to(device="cpu", copy=True)
    optimizer = torch.optim.LBFGS(solver.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = objective.loss(solver(support), labels) + l2 * solver.linear.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    head.load_state_dict(solver.state_dict())
    return head
