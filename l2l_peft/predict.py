"""Batched inference on the query set, within the time budget."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import torch
from accelerate import Accelerator

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
def predict(
    model: Classifier,
    objective: Objective,
    images: torch.Tensor,
    *,
    accelerator: Accelerator,
    batch_size: int,
    deadline: float | None = None,
) -> torch.Tensor:
    """float32 CPU probabilities [n, n_outputs] (raw values for regression) of the first n images:
    all of them without a deadline, those whose batches fit before it with one."""
    model.eval()
    outputs = [torch.empty(0, objective.n_outputs)]
    for chunk in batches_until(images, batch_size, deadline):
        with accelerator.autocast():
            logits = model(chunk.to(accelerator.device, non_blocking=True))
        outputs.append(objective.probabilities(logits).float().cpu())  # .cpu() syncs: the batch's time is real
    return torch.cat(outputs)


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
