"""Batched inference on the query set."""

from __future__ import annotations

import torch
from accelerate import Accelerator

from .head import Classifier
from .targets import Objective


@torch.inference_mode()
def predict(
    model: Classifier, objective: Objective, images: torch.Tensor, *, accelerator: Accelerator, batch_size: int
) -> torch.Tensor:
    """float32 CPU probabilities [n_query, n_outputs] (raw values for regression)."""
    model.eval()
    outputs = []
    for chunk in images.split(batch_size):
        with accelerator.autocast():
            logits = model(chunk.to(accelerator.device, non_blocking=True))
        outputs.append(objective.probabilities(logits))
    return torch.cat(outputs).float().cpu()
