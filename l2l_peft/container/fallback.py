"""Container-mode robustness: whenever the task was readable, produce a valid prediction.

Degrades in order, logging each step and why: the full recipe -> the recipe with half the batch
and half the steps (fp32 when the loss went non-finite) -> a nearest-prototype classifier on
frozen features -> the class prior of the support labels (needs no model at all). Every attempt
gets what is left of one shared time budget; a result that has the wrong shape or non-finite
values counts as a failure.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import torch

from ..api import AdaptResult, run
from ..cache import BackboneError
from ..config import AdaptConfig, Method, Precision
from ..targets import class_prior, output_size
from ..task import TaskData
from ..train import TrainingError

logger = logging.getLogger(__name__)

RETRY_MIN_BUDGET_FRACTION = 0.3  # a smaller retry needs about this share of the budget to finish


@dataclasses.dataclass(frozen=True)
class Attempt:
    """One predictor of the chain: a name for the log and the config api.run gets, built when its turn comes
    from the run's config and the previous failure."""

    name: str
    config: Callable[[AdaptConfig, Exception | None], AdaptConfig]
    min_budget_fraction: float = 0.0  # skipped when less of the budget is left


def smaller(config: AdaptConfig, *, diverged: bool) -> AdaptConfig:
    """Half the batch and steps (OOM, slowness), the ensemble's first method only; fp32 as well when
    the loss became NaN/inf."""
    config = config.concrete()
    return dataclasses.replace(
        config,
        method=config.methods[0].value,
        batch_size=max(1, config.batch_size // 2),
        predict_batch_size=max(1, config.predict_batch_size // 2),
        max_steps=max(1, config.max_steps // 2),  # the upper bound: min_steps cannot raise it (train.plan)
        precision=Precision.FP32 if diverged else config.precision,
    )


def chain() -> list[Attempt]:
    """The predictors in the order they are tried; every one runs through api.run."""
    return [
        Attempt("adapted", lambda config, failure: config),
        Attempt(
            "adapted (smaller retry)",
            lambda config, failure: smaller(config, diverged=isinstance(failure, TrainingError)),
            RETRY_MIN_BUDGET_FRACTION,
        ),
        Attempt("prototypes on frozen features", lambda config, failure: prototypes(config)),
    ]


def prototypes(config: AdaptConfig) -> AdaptConfig:
    """Frozen features, head set to the nearest-mean rule of the support (no training)."""
    return dataclasses.replace(config, method=Method.PROTOTYPES.value)


def run_with_fallbacks(data: TaskData, config: AdaptConfig) -> tuple[AdaptResult, str]:
    """(result, name of the predictor that produced it); never raises for a readable task."""
    start = time.monotonic()
    budget = config.time_budget
    failure: Exception | None = None
    for attempt in chain():
        remaining = None if budget is None else budget - (time.monotonic() - start)
        if remaining is not None and remaining <= 0:
            logger.warning("skipping %s: time budget exhausted", attempt.name)
            break
        if remaining is not None and remaining < attempt.min_budget_fraction * budget:
            logger.warning("skipping %s: %.0fs of the budget left", attempt.name, remaining)
            continue
        attempt_config = attempt.config(config, failure)  # another precision: make_accelerator resets accelerate
        try:
            result = run(data, dataclasses.replace(attempt_config, time_budget=remaining))
            check(result.probabilities, data)
            return result, attempt.name
        except Exception as err:  # noqa: BLE001 - container mode must always answer; every failure is logged
            failure = err
            logger.warning("%s failed: %s: %s; falling back", attempt.name, type(err).__name__, err)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if isinstance(err, BackboneError):
                break  # no backbone: neither a retry nor prototypes can work
    logger.warning("falling back to the class prior of the support labels")
    return AdaptResult(class_prior(data), config), "class prior of the support labels"


def check(probabilities: torch.Tensor, data: TaskData) -> None:
    """The challenge needs [n_query, n_outputs] finite values."""
    expected = (len(data.query_images), output_size(data.target, data.classes))
    if tuple(probabilities.shape) != expected:
        raise ValueError(f"predictions have shape {tuple(probabilities.shape)}, expected {expected}")
    if not bool(torch.isfinite(probabilities).all()):
        raise ValueError("predictions contain NaN or inf")
