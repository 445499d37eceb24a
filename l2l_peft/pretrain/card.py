"""The model card (README.md) written next to the exported backbone."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator

from ..data.datasets import LabelledDataset
from .config import PretrainConfig, PretrainObjective
from .loop import LOG, Progress

OBJECTIVES = {
    PretrainObjective.SUPERVISED: (
        "multi-task supervised learning (one head per dataset, each with its target type's loss)"
    ),
    PretrainObjective.SSL: "DINO self-distillation (multi-crop, EMA teacher; labels unused)",
    PretrainObjective.BOTH: "multi-task supervised learning (one head per dataset) plus DINO self-distillation "
    "(multi-crop, EMA teacher) on the same images",
}


def hardware(accelerator: Accelerator) -> str:
    if accelerator.device.type == "cuda":
        device = torch.cuda.get_device_name(accelerator.device)
    else:
        device = f"CPU ({platform.processor() or platform.machine()})"
    precision = accelerator.mixed_precision
    return f"{accelerator.num_processes} x {device}, mixed precision {precision}, torch {torch.__version__}"


def last_log(output: Path) -> dict:
    path = output / LOG
    lines = path.read_text().splitlines() if path.is_file() else []
    return json.loads(lines[-1]) if lines else {}


def write_card(
    directory: Path,
    *,
    config: PretrainConfig,
    datasets: list[LabelledDataset],
    progress: Progress,
    hardware: str,
    log: dict,
    parameters: int,
) -> None:
    rows = "\n".join(
        f"| {ds.name} | {ds.domain or '-'} | {ds.target.name.lower()} | {len(ds.classes)} | {len(ds)} | "
        f"{'x'.join(map(str, ds.images.shape[-2:]))}x{ds.images.shape[1]} |"
        for ds in datasets
    )
    model_config = json.loads((directory / "config.json").read_text())
    excluded = ", ".join(config.exclude) or "none"
    losses = ", ".join(f"{k} {v:.3f}" for k, v in log.get("losses", {}).items()) or "-"
    shape = (
        f"hidden {model_config['hidden_size']}, {model_config['num_hidden_layers']} layers, "
        f"patch {model_config['patch_size']}"
    )
    origin = f"`{config.init_from}`" if config.init_from else "random initialisation"
    side = f"{config.image_size}x{config.image_size}"
    budget = f", time budget {config.max_minutes} min" if config.max_minutes else ""
    low = config.low_res_size
    phase = f"; views at {low}x{low} for the first {config.low_res_fraction:.0%} of the schedule" if low else ""
    text = f"""---
library_name: transformers
pipeline_tag: image-feature-extraction
tags: [vision-transformer, medical-imaging, l2l_peft]
---

# {config.name}

A ViT ({parameters:,} parameters; {shape},
input {model_config["image_size"]}) pretrained from {origin} by
{OBJECTIVES[config.objective]} on medical images with `python -m l2l_peft.pretrain` (datasets
sampled in balance). Only the backbone is stored (no task heads, no DINO head or teacher), in
{config.save_dtype} safetensors; `config.json` says float32, so it loads in float32.

Inputs: the challenge form, [-1, 1] pixels at {side}, gray images repeated to 3 channels.
`preprocessor_config.json` therefore has mean = std = 0.5 (the identity on [-1, 1]). Features as used
by l2l_peft: concat(CLS token, mean of patch tokens) of the last layer.

## Data
Train and validation rows only (test split, split == 2, left out). Excluded datasets: {excluded}.

| dataset | domain | target | classes | images | native size |
|---|---|---|---|---|---|
{rows}

## Training
- steps: {progress.step} (planned {config.steps}{budget}),
  images seen: {progress.images}, batch per step: {config.batch_size} per process{phase}
- time: {progress.seconds / 60:.1f} min of training on {hardware}
- last logged loss: {log.get("loss", float("nan")):.4f} (per dataset: {losses}); \
throughput {log.get("images_per_s", "-")} images/s

## Recipe
```yaml
{yaml.safe_dump(config.to_dict(), sort_keys=False).strip()}
```
"""
    (directory / "README.md").write_text(text)
