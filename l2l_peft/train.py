"""The accelerate training loop for one task, readable top to bottom.

Each process adapts whole tasks, so the model is never wrapped in DDP: accelerate supplies the
device, autocast, loss scaling (fp16) and the optimizer wrapper, not distribution.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass

import torch
from accelerate import Accelerator

from .adapters import BLOCK
from .batches import SupportBatches
from .config import AdaptConfig, Method
from .head import Classifier
from .speed.attention import training_kernels
from .speed.graphs import step_runner, use_graphs
from .speed.prefix import prefix_batches
from .targets import Objective

logger = logging.getLogger(__name__)

GRAD_CLIP = 1.0


class TrainingError(RuntimeError):
    """Training diverged (non-finite loss); callers may fall back to a simpler predictor."""


@dataclass
class TrainReport:
    steps: int
    planned_steps: int
    batch_size: int
    final_loss: float
    seconds: float
    stopped_early: bool

    @property
    def images_per_second(self) -> float:
        return self.steps * self.batch_size / max(self.seconds, 1e-9)


def plan(n_support: int, config: AdaptConfig) -> tuple[int, int]:
    """(batch size, steps): full batches only, steps from epochs, at least min_steps, at most max_steps
    (the upper bound wins: `--max-steps 5` alone trains 5 steps, not the default min_steps)."""
    batch = min(config.batch_size, n_support)
    steps = math.ceil(config.epochs * n_support / batch)
    return batch, min(config.max_steps, max(config.min_steps, steps))


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress))


def train(
    model: Classifier,
    objective: Objective,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    config: AdaptConfig,
    accelerator: Accelerator,
    deadline: float | None = None,
    predict_images: int = 0,
    unlabelled: torch.Tensor | None = None,
) -> TrainReport:
    """Optimise the trainable parameters on the support set.

    With a deadline (time.monotonic() value), training stops when the measured step time says
    another step plus predicting `predict_images` query images would overrun it. With
    config.transductive, `unlabelled` images (the query) add the objective's information term.
    """
    start = time.monotonic()
    images, labels = images.to(accelerator.device), labels.to(accelerator.device)
    batch, steps = plan(len(images), config)
    logger.debug("training %d steps of batch %d", steps, batch)
    generator = torch.Generator(accelerator.device).manual_seed(config.seed)
    batches = prefix_batches(
        model, images, labels, batch=batch, config=config, autocast=accelerator.autocast, generator=generator
    ) or SupportBatches(
        images, labels, batch=batch, generator=generator, augment=config.augment, unlabelled=_unlabelled(
            unlabelled, objective, config, accelerator.device
        ),
    )  # fmt: skip
    graphed = use_graphs(config.cuda_graphs, accelerator, batch)
    optimizer, scheduler = _optimizer(model, config, steps, device=accelerator.device, graphed=graphed)
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    optimizer = accelerator.prepare_optimizer(optimizer)  # loss scaling under fp16; no DDP model wrap

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with accelerator.autocast(), training_kernels():
            logits = batches.logits(model, x)
            loss = objective.loss(logits[: len(y)], y)
            if len(logits) > len(y):  # the query batch behind the support's
                loss = loss + config.transductive * objective.information(logits[len(y) :])
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(trainable, GRAD_CLIP)
        optimizer.step()
        return loss.detach()

    run_step = step_runner(step, optimizer, graphed=graphed)
    model.train()
    running = torch.zeros((), device=accelerator.device)
    done, stopped_early = 0, False
    with batches.active():
        for x, y in itertools.islice(batches, steps):
            loss = run_step(x, y)
            scheduler.step()
            running = loss.clone() if done == 0 else 0.9 * running + 0.1 * loss
            done += 1
            if deadline is not None and _out_of_time(start, done, batch, predict_images, deadline):
                stopped_early = done < steps
                break

    final = float(running)  # the loop's only host-device sync
    if not math.isfinite(final):
        raise TrainingError(f"training loss became {final} after {done} steps")
    seconds = time.monotonic() - start
    logger.debug("trained %d/%d steps of batch %d in %.2fs, loss %.4f", done, steps, batch, seconds, final)
    return TrainReport(done, steps, batch, final, seconds, stopped_early)


def _unlabelled(
    images: torch.Tensor | None, objective: Objective, config: AdaptConfig, device: torch.device
) -> torch.Tensor | None:
    """The query images for the transductive term, on the device; None when the term is off or undefined."""
    if not config.transductive or images is None or len(images) == 0:
        return None
    if type(objective).information is Objective.information:  # the base class's: no term for this target
        logger.info("transductive: the task target has no information term; training on the support alone")
        return None
    return images.to(device)


def _optimizer(
    model: Classifier, config: AdaptConfig, steps: int, *, device: torch.device, graphed: bool
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW on the head and the method's parameters, linear warm-up then cosine decay; under method full the
    backbone's weights train at lr_full with layer-wise decay.

    A CUDA graph replays the optimizer step as captured: it needs capturable=True and tensor learning
    rates, which the scheduler updates in place (speed/graphs.py).
    """
    head_params = [p for p in model.head.parameters() if p.requires_grad]
    lr = (lambda v: torch.tensor(v, device=device)) if graphed else float
    groups = [{"params": head_params, "lr": lr(config.lr_head)}]
    full = config.methods == (Method.FULL,)
    base, decay = (config.lr_full, config.layer_decay) if full else (config.lr_adapter, 1.0)
    for scale, params in by_depth(model.extractor, decay).items():
        groups.append({"params": params, "lr": lr(base * scale)})
    optimizer = torch.optim.AdamW(
        groups, weight_decay=config.weight_decay, fused=device.type == "cuda", capturable=graphed
    )
    warmup = max(1, round(config.warmup_frac * steps))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, steps, warmup))


def by_depth(backbone: torch.nn.Module, decay: float) -> dict[float, list[torch.nn.Parameter]]:
    """The backbone's trainable parameters grouped by learning-rate scale: decay ** (L + 1 - depth), with
    depth 0 for the embeddings, i + 1 for block i, L + 1 for what follows the blocks (final norm).

    Layer-wise decay keeps a pretrained model's early, general layers close to where they were (adaptation's
    method full and continued pretraining both use it)."""
    named = [(n, p) for n, p in backbone.named_parameters() if p.requires_grad]
    if decay == 1:
        return {1.0: [p for _, p in named]} if named else {}
    index = {n: int(m.group(1).rsplit(".", 1)[1]) for n, _ in named if (m := BLOCK.match(n))}
    top = 1 + max(index.values(), default=-1)
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for name, param in named:
        depth = index[name] + 1 if name in index else 0 if "embed" in name else top + 1
        groups.setdefault(decay ** (top + 1 - depth), []).append(param)
    return groups


def _out_of_time(start: float, done: int, batch: int, predict_images: int, deadline: float) -> bool:
    now = time.monotonic()
    per_step = (now - start) / done
    # Reserve a training step's per-image time for each query image: a forward pass is a third of
    # a step on a quiet GPU, but on a loaded 2-core CPU (README demo, 2026-12-02) inference took
    # 0.5 s per image against 0.33 s per image of training, and a third left 32 of 40 rows unpredicted.
    predict_cost = per_step * predict_images / batch
    return now + per_step + predict_cost > deadline
