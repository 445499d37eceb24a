"""On a CPU, whether the time budget allows LoRA on every block instead of the last CPU_LAST_BLOCKS.

LoRA on every block is 0.010 to 0.019 mean AUROC ahead of LoRA on the last 4 blocks (DINOv2 ViT-S/14, the
confirmation set of docs/recipe_foundation.md) but several times slower on a CPU. `method="auto"` takes
it when a forward pass timed on a few support images says a whole run (plan()'s steps and batch, then
the query) fits in a share of the time left; without a budget, or when the estimate does not fit, it
stays on the last blocks. Training still stops at the deadline if the estimate was wrong.
"""

from __future__ import annotations

import logging
import time

import torch

from .backbone import FeatureExtractor, load_backbone
from .config import AdaptConfig, Method
from .task import TaskData
from .train import plan

logger = logging.getLogger(__name__)

# A training image of full-depth LoRA costs about this many forward passes (forward, backward through every block,
# optimizer): 2.7 measured on 2 cores (docs/recipe_foundation.md: estimate 365 s, run 343 s); 3 leaves some room.
STEP_COST = 3.0
SHARE = 0.8  # the estimate must fit in this share of the time left (loading and set-up take the rest)
PROBE_IMAGES = 4


def seconds_per_image(extractor: FeatureExtractor, images: torch.Tensor) -> float:
    """Forward time per image on this machine, after one untimed call (thread pool, allocations)."""
    with torch.inference_mode():
        extractor(images[:1])
        start = time.monotonic()
        extractor(images)
    return (time.monotonic() - start) / len(images)


def full_depth_fits(data: TaskData, config: AdaptConfig, deadline: float | None) -> bool:
    """True when `method="auto"` runs on a CPU with a deadline, leaves the depth to the default, and a full-depth
    LoRA run is estimated to fit in SHARE of the time left."""
    if config.methods != (Method.AUTO,) or config.lora_last_blocks is not None or not config.on_cpu or deadline is None:
        return False
    extractor = load_backbone(config.model, config.cache_dir, again=True)  # fit() copies it, reading nothing
    per_image = seconds_per_image(extractor, data.support_images[:PROBE_IMAGES])
    batch, steps = plan(len(data.support_images), config)
    estimate = per_image * (STEP_COST * batch * steps + len(data.query_images))
    left = deadline - time.monotonic()
    fits = estimate <= SHARE * left
    logger.info(
        "cpu: LoRA on every block would take about %.0fs (%d steps of %d, %.2fs a forward image) of %.0fs left: "
        "training %s", estimate, steps, batch, per_image, left, "every block" if fits else "the last blocks only",
    )  # fmt: skip
    return fits
