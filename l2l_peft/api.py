"""adapt(): task -> backbone -> adapters + head -> train -> predict; the one door for every method."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed

from .adapters import apply_method, trainable_parameters
from .backbone import FeatureExtractor, load_backbone
from .budget import full_depth_fits
from .config import AdaptConfig, HeadInit, Method, make_config
from .frozen import FEATURE_METHODS, fit_head, fit_prototypes
from .head import Classifier, Head
from .predict import features, fill_with_prior, predict
from .runtime import make_accelerator
from .speed.precision import cast_frozen
from .targets import Objective, build_objective, output_size
from .task import TaskData, load_task
from .train import TrainReport, train
from .vpt import VPT_METHODS, add_visual_prompts

logger = logging.getLogger(__name__)


@dataclass
class AdaptResult:
    probabilities: torch.Tensor  # float32 CPU [n_query, n_outputs]
    config: AdaptConfig
    timings: dict[str, float] = field(default_factory=dict)
    train: TrainReport | None = None
    trainable_parameters: int = 0
    precision: str = "no"
    prior_rows: int = 0  # query rows given the class prior because the time budget ran out
    methods: str = ""  # the ensemble members whose probabilities were averaged, e.g. "lora+full"


def build_classifier(extractor: FeatureExtractor, objective: Objective, config: AdaptConfig) -> Classifier:
    """Attach the method's trainable parameters to a frozen backbone and add a fresh head."""
    if config.methods[0] in VPT_METHODS:
        add_visual_prompts(extractor, deep=config.methods[0] is Method.VPT_DEEP, n_tokens=config.vpt_tokens)
    else:
        extractor.model = apply_method(extractor.model, config)
    return Classifier(extractor, Head(extractor.feature_dim, objective.n_logits))


def init_head(
    model: Classifier, objective: Objective, images: torch.Tensor, labels: torch.Tensor, *, accelerator, batch_size: int
) -> None:
    """Start the head from the prototype rule of the support (no-op for regression, which has no classes)."""
    if objective.positives(labels) is not None:
        support = features(model.extractor, images, accelerator=accelerator, batch_size=batch_size)
        fit_prototypes(model.head, objective, support, labels)


@dataclass
class Fitted:
    """A classifier trained on one task's support set, ready to predict (or to give features)."""

    model: Classifier
    objective: Objective
    accelerator: Any  # accelerate.Accelerator
    report: TrainReport | None  # None for the frozen-feature methods, which do not train
    trainable_parameters: int
    loaded_at: float  # time.monotonic() when the backbone was loaded (training starts after it)


def fit(data: TaskData, config: AdaptConfig, *, deadline: float | None = None, again: bool = False) -> Fitted:
    """Load the backbone, attach the method and a head, train on the support set (the frozen-feature
    methods fit the head on the support features instead). `again`: a further member will load the same
    backbone (load_backbone keeps its original instead of reading the files twice)."""
    config = config.concrete()
    accelerator = make_accelerator(config.precision, cpu=config.cpu)
    set_seed(config.seed)
    extractor = load_backbone(config.model, config.cache_dir, again=again)
    loaded = time.monotonic()
    objective = build_objective(data.target, data.classes, data.support_labels)
    model = build_classifier(extractor, objective, config).to(accelerator.device)
    n_trainable = trainable_parameters([model])
    if config.methods[0] in FEATURE_METHODS:
        if config.transductive:
            logger.info("transductive: %s fits its head on the support features alone", config.method)
        fit_head(model, objective, data.support_images, data.support_labels, config=config, accelerator=accelerator)
        return Fitted(model, objective, accelerator, None, n_trainable, loaded)
    if accelerator.mixed_precision == "bf16":
        cast_frozen(model, torch.bfloat16)
    if config.head_init is HeadInit.PROTOTYPE:
        init_head(
            model,
            objective,
            data.support_images,
            data.support_labels,
            accelerator=accelerator,
            batch_size=config.predict_batch_size,
        )
    report = train(
        model, objective, data.support_images, data.support_labels,
        config=config, accelerator=accelerator, deadline=deadline, predict_images=len(data.query_images),
        unlabelled=data.query_images,
    )  # fmt: skip
    return Fitted(model, objective, accelerator, report, n_trainable, loaded)


ENSEMBLE_HEADROOM = 1.25  # a further member starts only if 1.25x the last member's time is left
RESIDENT_SHARE = 0.25  # an ensemble keeps the task's images on the GPU when they take at most this share of free memory


def resident(data: TaskData, device: torch.device) -> TaskData:
    """The task with its images on the GPU, so that an ensemble's members copy them there once, not once each (50
    support and 500 query images are 331 MB of float32); as it was on a CPU or where they would crowd training."""
    if device.type != "cuda":
        return data
    size = sum(t.numel() * t.element_size() for t in (data.support_images, data.query_images))
    if size > RESIDENT_SHARE * torch.cuda.mem_get_info(device)[0]:
        return data
    return dataclasses.replace(
        data, support_images=data.support_images.to(device), query_images=data.query_images.to(device)
    )


def run(task: Any, config: AdaptConfig | None = None, **overrides: Any) -> AdaptResult:
    """adapt() with its timings and training report (used by the CLI and the experiments).

    Each method of `config.method` ('lora+full': an ensemble) is fitted and predicts in turn; the
    query probabilities are their mean. With a time budget a further member runs only when the
    time left allows it, so a slow machine gets the first member alone instead of a late answer.
    """
    start = time.monotonic()
    config = make_config(config, **overrides).with_env()
    deadline = start + config.time_budget if config.time_budget else None
    data = task if isinstance(task, TaskData) else load_task(task if not isinstance(task, Path) else str(task))
    config = config.concrete(full_depth=len(data.query_images) > 0 and full_depth_fits(data, config, deadline))
    accelerator = make_accelerator(config.precision, cpu=config.cpu)
    result = AdaptResult(
        torch.empty(0, output_size(data.target, data.classes)), config, precision=accelerator.mixed_precision
    )
    if len(data.query_images) == 0:
        return result

    total, used, predict_s, loaded, last = None, [], 0.0, start, 0.0
    members = config.members()
    if len(members) > 1:
        data = resident(data, accelerator.device)
    for i, member in enumerate(members):
        begun = time.monotonic()
        if used and deadline is not None and deadline - begun < ENSEMBLE_HEADROOM * last:
            logger.info(
                "ensemble: %s skipped, %.1fs of the budget left (a member took %.1fs)",
                member.method,
                deadline - begun,
                last,
            )
            break
        fitted = fit(data, member, deadline=deadline, again=i + 1 < len(members))
        trained = time.monotonic()
        predicted = predict(
            fitted.model, fitted.objective, data.query_images, accelerator=fitted.accelerator,
            batch_size=config.predict_batch_size, deadline=deadline,
        )  # fmt: skip
        done = time.monotonic()
        if not used:
            result.train, loaded = fitted.report, fitted.loaded_at
            result.prior_rows = len(data.query_images) - len(predicted)
            total = fill_with_prior(predicted, data)
        elif len(predicted) < len(data.query_images):
            logger.warning("ensemble: %s ran out of time while predicting; its predictions are left out", member.method)
            break
        else:
            total = total + predicted
        result.trainable_parameters += fitted.trainable_parameters
        predict_s += done - trained
        used.append(member.method)
        last = done - begun
    result.probabilities = total / len(used)
    result.methods = "+".join(used)
    total_s = time.monotonic() - start  # adapt: every member's training (and later members' loads)
    result.timings = {
        "load": loaded - start,
        "adapt": total_s - (loaded - start) - predict_s,
        "predict": predict_s,
        "total": total_s,
    }
    return result


def adapt(task: Any, config: AdaptConfig | None = None, **overrides: Any) -> torch.Tensor:
    """Adapt a backbone to a few-shot task and return query probabilities.

    `task` is a torchcross Task (old or new layout) or a path to its pickle. Returns float32 CPU
    [n_query, n_outputs]: softmax rows for multiclass/ordinal, sigmoid columns for binary/
    multilabel, raw values for regression. Overrides are AdaptConfig fields, e.g. max_steps=50.
    With a time_budget, query rows that prediction did not reach in time get the class prior of the
    support labels (logged; run() reports how many as prior_rows).
    """
    return run(task, config, **overrides).probabilities
