"""The pretraining loop under accelerate (DDP across processes, bf16 autocast), readable top to bottom.

Each step every process draws the same number of images from every dataset, augments them on
the device and sums nothing by hand: the loss is the mean over datasets of each dataset's own
objective, so a small dataset counts as much as a large one; with a self-supervised objective
(ssl.py) the DINO loss on multi-crop views of the same images replaces it or is added to it.
The learning rate follows warm-up and a cosine over progress = max(step / steps, seconds / budget),
so a time-limited run still anneals; progress and checkpoints survive restarts (`accelerator.save_state`).
With low_res_size, the views of the first low_res_fraction of that progress are smaller (fewer patches per
image, the same schedule), the rest at the model's size, as adapt() feeds it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast, set_seed
from tqdm.auto import tqdm

from ..data.datasets import LabelledDataset
from ..speed.attention import training_kernels
from ..train import TrainingError, by_depth
from .augment import MultiCrop
from .config import PretrainConfig
from .data import BalancedSampler, load_sources
from .model import MultiTaskModel, build_extractor
from .ssl import DinoHead, DinoTeacher

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"
PROGRESS = "progress.json"
LOG = "log.jsonl"


@dataclass
class Progress:
    step: int = 0
    seconds: float = 0.0  # training seconds over all runs (the time budget's clock)
    images: int = 0  # images seen over all processes
    datasets: list[str] = field(default_factory=list)  # head names, so a resume cannot mix up heads
    objective: str = "supervised"  # likewise for the model's and the checkpoint's parts

    @classmethod
    def read(cls, directory: Path) -> Progress:
        path = directory / PROGRESS
        return cls(**json.loads(path.read_text())) if path.is_file() else cls()

    def write(self, directory: Path) -> None:
        (directory / PROGRESS).write_text(json.dumps(self.__dict__) + "\n")


def _param_groups(model: MultiTaskModel, config: PretrainConfig) -> list[dict]:
    """AdamW groups: weight decay on matrices only (biases, norms, CLS and position embeddings are exempt);
    `lr_scale` by depth in the backbone (config.layer_decay), 1 for the heads; `backbone` marks what
    head_warmup_steps holds still."""
    inside = {id(p) for p in model.extractor.parameters()}
    parts = [(params, scale, True) for scale, params in by_depth(model.extractor, config.layer_decay).items()]
    parts.append(([p for p in model.parameters() if id(p) not in inside], 1.0, False))
    groups = []
    for params, scale, backbone in parts:
        for matrices, weight_decay in ((True, config.weight_decay), (False, 0.0)):
            chosen = [p for p in params if (p.dim() >= 2 and p.shape[0] > 1) == matrices]
            if chosen:
                groups.append({"params": chosen, "weight_decay": weight_decay, "lr_scale": scale, "backbone": backbone})
    return groups


def lr_factor(step: int, progress: float, config: PretrainConfig, *, backbone: bool = False) -> float:
    """Linear warm-up then cosine to min_lr_frac over progress; the backbone's warm-up starts once
    head_warmup_steps are done (before, its factor is 0)."""
    if backbone:
        step -= config.head_warmup_steps
        if step < 0:
            return 0.0
    warm = min(1.0, (step + 1) / max(1, config.warmup_steps))
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return warm * (config.min_lr_frac + (1 - config.min_lr_frac) * cosine)


def _ssl_head(config: PretrainConfig, feature_dim: int) -> DinoHead | None:
    if not config.objective.ssl:
        return None
    return DinoHead(feature_dim, hidden_dim=config.ssl_hidden_dim, bottleneck_dim=config.ssl_bottleneck_dim,
                    out_dim=config.ssl_out_dim)  # fmt: skip


def _loss_weights(config: PretrainConfig, n_heads: int, device: torch.device) -> torch.Tensor:
    """Weights of the loss parts [per-dataset losses..., DINO loss]: the mean over datasets (+ ssl_weight * DINO)."""
    ssl = [] if not config.objective.ssl else [config.ssl_weight if n_heads else 1.0]
    return torch.tensor([1 / max(n_heads, 1)] * n_heads + ssl, device=device)


@dataclass
class PretrainResult:
    model: MultiTaskModel  # unwrapped
    progress: Progress
    datasets: list[LabelledDataset]  # what was trained on (test rows removed)


def pretrain(
    config: PretrainConfig, output: Path, *, accelerator: Accelerator, resume: bool = True, stop_at: int | None = None
) -> PretrainResult:
    """Train, or continue from output/checkpoint, until the steps or the time budget are used up.

    `stop_at` ends this invocation at that step without changing the schedule (jobs with a
    wall-clock limit): rerunning the command continues exactly where it stopped.
    """
    output.mkdir(parents=True, exist_ok=True)
    set_seed(config.seed)
    datasets = load_sources(config)
    extractor = build_extractor(config)
    sampler = BalancedSampler(
        datasets, batch_size=config.batch_size, device=accelerator.device, seed=config.seed,
        rank=accelerator.process_index, labelled=config.objective.supervised,
    )  # fmt: skip
    heads = {s.name: s.objective.n_logits for s in sampler.sources} if config.objective.supervised else {}
    model = MultiTaskModel(extractor, heads, _ssl_head(config, extractor.feature_dim))
    teacher = None if model.ssl_head is None else DinoTeacher(extractor, model.ssl_head, config).to(accelerator.device)
    if config.compile:
        for module in filter(None, (model, teacher)):
            module.compile(dynamic=False)  # in place: parameter names, checkpoints and the export stay as without
    optimizer = torch.optim.AdamW(
        _param_groups(model, config),
        lr=config.lr,
        betas=(0.9, 0.999),
        fused=accelerator.device.type == "cuda",
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    student = accelerator.unwrap_model(model)
    if teacher is not None:
        accelerator.register_for_checkpointing(teacher)  # the teacher and its center resume with the run
    views = MultiCrop.for_config(config)
    low_res_views = MultiCrop.for_config(config, config.low_res_size) if config.low_res_size else None

    names = [s.name for s in sampler.sources]
    progress = Progress(datasets=names, objective=config.objective.value)
    if resume and (output / CHECKPOINT).is_dir():
        progress = Progress.read(output / CHECKPOINT)
        if (progress.datasets, progress.objective) != (names, config.objective.value):
            raise ValueError(
                f"{output / CHECKPOINT} was trained on {progress.datasets} ({progress.objective}), this config selects "
                f"{names} ({config.objective.value}): use another --output or --no-resume"
            )
        accelerator.load_state(str(output / CHECKPOINT))
        logger.info("resumed from %s at step %d (%.0fs trained)", output / CHECKPOINT, progress.step, progress.seconds)
    budget = config.max_minutes * 60 if config.max_minutes else math.inf
    counts = [sampler.per_source] * len(sampler.sources)
    global_batch = sampler.batch_size * accelerator.num_processes
    weights = _loss_weights(config, len(heads), accelerator.device)
    log_names = [*heads, *(["ssl"] if teacher is not None else [])]

    model.train()
    bar = tqdm(
        total=config.steps, initial=progress.step, disable=not accelerator.is_local_main_process, desc="pretrain"
    )
    start, seconds0, window = time.monotonic(), progress.seconds, (time.monotonic(), progress.step)
    elapsed = seconds0  # synchronised across processes at log steps, so all stop at the same step
    last = min(config.steps, stop_at if stop_at is not None else config.steps)
    while progress.step < last and elapsed < budget:
        step = progress.step
        fraction = max(step / max(1, config.steps), elapsed / budget)
        for group in optimizer.param_groups:
            group["lr"] = config.lr * group["lr_scale"] * lr_factor(step, fraction, config, backbone=group["backbone"])
        generator, batches = sampler.draw(step)
        crops = low_res_views if low_res_views and fraction < config.low_res_fraction else views
        images, local_crops = crops([x for x, _ in batches], generator)
        with accelerator.autocast(), training_kernels():
            logits, projections = model(images, counts, local_crops)
            targets = None if teacher is None else teacher(images)
        losses = [s.objective.loss(z, y) for s, z, (_, y) in zip(sampler.sources, logits, batches)]
        if teacher is not None:
            losses.append(teacher.loss(projections, targets))
        losses = torch.stack(losses)
        accelerator.backward((losses * weights).sum())
        accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if teacher is not None:
            teacher.update(student.extractor, student.ssl_head, fraction)
        progress.step, progress.images = step + 1, progress.images + global_batch
        bar.update(1)

        if progress.step % config.log_every == 0 or progress.step == config.steps:
            now = torch.tensor([seconds0 + time.monotonic() - start], dtype=torch.float64, device=accelerator.device)
            elapsed = progress.seconds = float(broadcast(now)[0])
            window = _log(accelerator, output, progress, losses, weights, log_names, optimizer, window, global_batch,
                          bar)  # fmt: skip
        if progress.step % config.checkpoint_every == 0:
            save_checkpoint(accelerator, output, progress)
    bar.close()
    progress.seconds = seconds0 + time.monotonic() - start
    save_checkpoint(accelerator, output, progress)
    return PretrainResult(accelerator.unwrap_model(model), progress, datasets)


def _log(
    accelerator, output, progress, losses, weights, names, optimizer, window, global_batch, bar
) -> tuple[float, int]:
    """One JSON line (main process): loss and its parts (datasets, ssl) over processes, lr, images/s
    since the last line."""
    losses = accelerator.reduce(losses.detach().float(), reduction="mean")
    if not bool(torch.isfinite(losses).all()):
        raise TrainingError(f"pretraining loss became non-finite at step {progress.step}: {losses.tolist()}")
    now = time.monotonic()
    rate = (progress.step - window[1]) * global_batch / max(now - window[0], 1e-9)
    if accelerator.is_main_process:
        record = {
            "step": progress.step,
            "loss": round(float((losses * weights).sum()), 5),
            "lr": max(group["lr"] for group in optimizer.param_groups),  # the heads' and the last block's
            "images_per_s": round(rate, 1), "seconds": round(progress.seconds, 1),
            "losses": {n: round(v, 5) for n, v in zip(names, losses.tolist())},
        }  # fmt: skip
        with (output / LOG).open("a") as f:
            f.write(json.dumps(record) + "\n")
        bar.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{rate:.0f}")
    return now, progress.step


def save_checkpoint(accelerator: Accelerator, output: Path, progress: Progress) -> None:
    """Model, optimizer and RNG states (all processes take part) plus the progress counters."""
    accelerator.wait_for_everyone()
    accelerator.save_state(str(output / CHECKPOINT))
    if accelerator.is_main_process:
        progress.write(output / CHECKPOINT)
    accelerator.wait_for_everyone()
