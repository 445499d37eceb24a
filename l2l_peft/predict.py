"""Batched inference within the time budget: query probabilities, and the features the heads are fitted on."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

import torch
from accelerate import Accelerator
from torch import nn

from .backbone import FeatureExtractor
from .head import Classifier
from .targets import Objective, class_prior
from .task import TaskData

logger = logging.getLogger(__name__)

FIRST_BATCH = 8  # images in the first batch under a deadline: measures the rate before larger batches


def batches_until(images: torch.Tensor, batch_size: int, deadline: float | None) -> Iterator[torch.Tensor]:
    """The batches of `images` in order; with a deadline (a time.monotonic() value), only those that fit.

    The first batch is small and measures the caller's time per image; each later one is as large as
    the remaining time allows by the previous batch's rate (at most batch_size), so a batch overruns
    the deadline only by a misestimate, not by a whole large batch.
    """
    done, per_image = 0, None
    while done < len(images):
        size = batch_size
        if deadline is not None:
            left = deadline - time.monotonic()
            size = min(batch_size, FIRST_BATCH if per_image is None else int(left / max(per_image, 1e-9)))
            if left <= 0 or size < 1:
                return
        start = time.monotonic()
        chunk = images[done : done + size]
        yield chunk
        per_image, done = (time.monotonic() - start) / len(chunk), done + len(chunk)


@torch.inference_mode()
def run_batched(
    module: nn.Module,
    images: torch.Tensor,
    *,
    width: int,
    accelerator: Accelerator,
    batch_size: int,
    deadline: float | None = None,
    then: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """float32 CPU [n, width]: `module` (eval mode, autocast), then `then` (outside autocast), on the first n
    images: all of them without a deadline, those whose batches fit before it with one."""
    module.eval()
    outputs = [torch.empty(0, width)]
    for chunk in batches_until(images, batch_size, deadline):
        with accelerator.autocast():
            out = module(chunk.to(accelerator.device, non_blocking=True))
        outputs.append((then(out) if then else out).float().cpu())  # .cpu() syncs: the batch's time is real
    return torch.cat(outputs)


def predict(
    model: Classifier,
    objective: Objective,
    images: torch.Tensor,
    *,
    accelerator: Accelerator,
    batch_size: int,
    deadline: float | None = None,
) -> torch.Tensor:
    """float32 CPU probabilities [n, n_outputs] (raw values for regression) of the first n images."""
    return run_batched(
        model, images, width=objective.n_outputs, then=objective.probabilities,
        accelerator=accelerator, batch_size=batch_size, deadline=deadline,
    )  # fmt: skip


def features(
    extractor: FeatureExtractor, images: torch.Tensor, *, accelerator: Accelerator, batch_size: int
) -> torch.Tensor:
    """float32 [n, feature_dim] backbone features of all images, on the accelerator's device (heads fit there)."""
    out = run_batched(extractor, images, width=extractor.feature_dim, accelerator=accelerator, batch_size=batch_size)
    return out.to(accelerator.device)


def fill_with_prior(probabilities: torch.Tensor, data: TaskData) -> torch.Tensor:
    """All query rows: the rows the time budget left unpredicted get the class prior of the support labels
    (the only predictor cheaper than a backbone forward pass)."""
    done, total = len(probabilities), len(data.query_images)
    if done == total:
        return probabilities
    logger.warning(
        "time budget spent after predicting %d of %d query images: the other %d get the class prior of the "
        "support labels",
        done, total, total - done,
    )  # fmt: skip
    return torch.cat([probabilities, class_prior(data)[done:]])
