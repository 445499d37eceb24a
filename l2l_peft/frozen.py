"""Baselines on frozen features: nearest-centroid prototypes and an L2-regularised linear probe.

Features of support and query are computed once (inference mode, the same backbone and feature
rule as adapt()); both predictors then run on these vectors in milliseconds. The head is the
package's Head (LayerNorm + Linear), so the prototype rule is Head.init_from_prototypes and the
probe minimises the target's own Objective.loss: every task target works without new per-target
code, and probabilities come out in adapt()'s format.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from enum import Enum

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from .api import AdaptResult
from .backbone import FeatureExtractor, load_backbone
from .config import AdaptConfig
from .head import Head
from .predict import batches_until, fill_with_prior
from .targets import Objective, build_objective, output_size
from .task import TaskData, TaskError
from .train import make_accelerator


class Frozen(str, Enum):
    PROTOTYPES = "prototypes"
    LINEAR_PROBE = "linear_probe"


@dataclass
class ProbeConfig:
    """Linear-probe settings (the prototype rule has none)."""

    l2: float = field(default=1e-3, metadata={"help": "weight of the squared L2 norm of the probe weights"})
    max_iter: int = field(default=200, metadata={"help": "LBFGS iterations (full batch; convex, converges fast)"})

    def __post_init__(self) -> None:
        if self.l2 < 0:
            raise ValueError(f"ProbeConfig.l2 must be >= 0, got {self.l2!r}")
        if self.max_iter < 1:
            raise ValueError(f"ProbeConfig.max_iter must be >= 1, got {self.max_iter!r}")


@torch.inference_mode()
def features(
    extractor: FeatureExtractor, images: torch.Tensor, *, accelerator: Accelerator, batch_size: int, deadline: float | None = None
) -> torch.Tensor:
    """float32 [n, feature_dim] on the accelerator's device: all images, or those whose batches fit before the deadline."""
    extractor.eval()
    out = [torch.empty(0, extractor.feature_dim, device=accelerator.device)]
    for chunk in batches_until(images, batch_size, deadline):
        with accelerator.autocast():
            out.append(extractor(chunk.to(accelerator.device)).float())
    return torch.cat(out)


def prototype_head(objective: Objective, support: torch.Tensor, labels: torch.Tensor) -> Head:
    """Nearest class mean per logit (positive vs negative support samples), as Head initialises it."""
    positives = objective.positives(labels)
    if positives is None:
        raise TaskError("prototypes need class labels; they do not apply to regression")
    head = Head(support.shape[1], objective.n_logits).to(support.device)
    head.init_from_prototypes(support, positives.to(support.device))
    return head


def fit_linear_probe(objective: Objective, support: torch.Tensor, labels: torch.Tensor, probe: ProbeConfig) -> Head:
    """Minimise Objective.loss + l2 * |W|^2 over the whole support with LBFGS (deterministic)."""
    head = Head(support.shape[1], objective.n_logits).to(support.device)
    support, labels = support.clone(), labels.to(support.device)  # clone: inference tensors cannot enter autograd
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=probe.max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = objective.loss(head(support), labels) + probe.l2 * head.linear.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return head


def run_frozen(data: TaskData, config: AdaptConfig, kind: Frozen | str, probe: ProbeConfig | None = None) -> AdaptResult:
    """Prototype or linear-probe predictions with adapt()'s timings (adapt = support features + fit)."""
    kind = Frozen(kind)
    start = time.monotonic()
    config = config.with_env()
    deadline = start + config.time_budget if config.time_budget else None
    accelerator = make_accelerator(config)
    result = AdaptResult(torch.empty(0, output_size(data.target, data.classes)), config, precision=accelerator.mixed_precision)
    if len(data.query_images) == 0:
        return result
    set_seed(config.seed)
    extractor = load_backbone(config.model, config.cache_dir).to(accelerator.device)
    loaded = time.monotonic()
    objective = build_objective(data.target, data.classes, data.support_labels)
    batch = config.predict_batch_size
    support = features(extractor, data.support_images, accelerator=accelerator, batch_size=batch)
    if kind is Frozen.PROTOTYPES:
        head = prototype_head(objective, support, data.support_labels)
    else:
        head = fit_linear_probe(objective, support, data.support_labels, probe or ProbeConfig())
    result.trainable_parameters = sum(p.numel() for p in head.parameters())
    fitted = time.monotonic()
    query = features(extractor, data.query_images, accelerator=accelerator, batch_size=batch, deadline=deadline)
    with torch.inference_mode():
        result.probabilities = fill_with_prior(objective.probabilities(head(query)).float().cpu(), data)
    result.prior_rows = len(data.query_images) - len(query)
    done = time.monotonic()
    result.timings = {"load": loaded - start, "adapt": fitted - loaded, "predict": done - fitted, "total": done - start}
    return result


def probe_config(params: dict) -> tuple[ProbeConfig, dict]:
    """Split method params into ProbeConfig fields and the rest (AdaptConfig overrides)."""
    names = {f.name for f in dataclasses.fields(ProbeConfig)}
    return ProbeConfig(**{k: v for k, v in params.items() if k in names}), {k: v for k, v in params.items() if k not in names}
