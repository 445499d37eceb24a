"""Container-mode robustness: whenever the task was readable, produce a valid prediction.

Degrades in order, logging each step and why: the full recipe -> the recipe with half the
batch and steps in fp32 -> a nearest-prototype classifier on frozen features -> the class prior
of the support labels (needs no model at all).
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torchcross.data.task import TaskTarget

from .api import AdaptResult, init_head, run
from .backbone import load_backbone
from .config import AdaptConfig, Method, Precision
from .head import Classifier, Head
from .predict import predict
from .targets import build_objective
from .task import TaskData
from .train import make_accelerator

logger = logging.getLogger(__name__)


def run_with_fallbacks(data: TaskData, config: AdaptConfig) -> tuple[AdaptResult, str]:
    """(result, name of the predictor that produced it)."""
    smaller = dataclasses.replace(
        config,
        batch_size=max(1, config.batch_size // 2),
        max_steps=max(1, config.max_steps // 2),
        min_steps=min(config.min_steps, max(1, config.max_steps // 2)),
        precision=Precision.FP32 if config.precision is not Precision.AUTO or torch.cuda.is_available() else config.precision,
    )
    attempts = [
        ("adapted", lambda: run(data, config)),
        ("adapted (smaller retry)", lambda: run(data, smaller)),
        ("prototypes on frozen features", lambda: prototype_result(data, config)),
    ]
    for name, attempt in attempts:
        try:
            return attempt(), name
        except Exception as err:  # noqa: BLE001 - container mode must always answer; every failure is logged
            logger.warning("%s failed: %s: %s; falling back", name, type(err).__name__, err)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return AdaptResult(class_prior(data), config), "class prior of the support labels"


@torch.no_grad()
def prototype_result(data: TaskData, config: AdaptConfig) -> AdaptResult:
    if data.target is TaskTarget.REGRESSION:
        raise ValueError("prototypes do not apply to regression")
    config = dataclasses.replace(config.with_env(), method=Method.HEAD)
    accelerator = make_accelerator(config)
    extractor = load_backbone(config.model, config.cache_dir)
    objective = build_objective(data.target, data.classes, data.support_labels)
    model = Classifier(extractor, Head(extractor.feature_dim, objective.n_logits)).to(accelerator.device)
    init_head(model, objective, data.support_images, data.support_labels, accelerator=accelerator, batch_size=config.predict_batch_size)
    probs = predict(model, objective, data.query_images, accelerator=accelerator, batch_size=config.predict_batch_size)
    if not bool(torch.isfinite(probs).all()):
        raise ValueError("prototype predictions are not finite")
    return AdaptResult(probs, config)


def class_prior(data: TaskData) -> torch.Tensor:
    """Support label frequencies (Laplace-smoothed), repeated for every query image."""
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
