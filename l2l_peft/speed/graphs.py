"""CUDA-graph capture of the whole training step (forward, backward, clipping, AdamW).

At few-shot batch sizes one ViT step is a few milliseconds of GPU work behind a couple of
thousand kernel launches issued from Python (peft wrappers, autocast, autograd); replaying a
captured graph issues them in one call. Shapes are static because train.plan() uses full batches
only. The first WARMUP_STEPS steps run eagerly on a side stream (real steps: they initialise the
optimizer state and library workspaces), the next one is captured, then every step is
copy-inputs + replay. The optimizer must be built with capturable=True and tensor learning rates,
so the scheduler's in-place updates reach the replayed graph. `step_runner` picks the graphed or
the eager runner; both are called alike.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from accelerate import Accelerator

logger = logging.getLogger(__name__)

Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# Measured on an H100 (results/benchmarks): graphs pay at batch 32 (ViT-B 875 -> 1,129 img/s) but
# replays ran slower than eager at batch 128 (2,458 -> 1,284 img/s), so larger batches stay eager.
GRAPH_MAX_BATCH = 64
# Eager steps before the capture: the first initialises the optimizer state and library workspaces. One is enough
# (tests/test_speed_paths.py), and each costs about 4 replays (H100, 2026-12-07, benchmarks/probes/phases_probe.py).
WARMUP_STEPS = 1


class EagerStep:
    """zero_grad + step(x, y): the plain path (CPU, fp16 loss scaling, or graphs turned off)."""

    def __init__(self, step: Step, optimizer: torch.optim.Optimizer) -> None:
        self.step, self.optimizer = step, optimizer

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        return self.step(x, y)


class GraphedStep(EagerStep):
    """Eager warm-up, one capture, then replays. The returned loss is overwritten by the next call."""

    def __init__(self, step: Step, optimizer: torch.optim.Optimizer, warmup: int = WARMUP_STEPS) -> None:
        super().__init__(step, optimizer)
        self.warmup, self.calls = warmup, 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed = False

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.failed:
            return super().__call__(x, y)
        if self.graph is None and self.calls <= self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                loss = super().__call__(x, y)
            torch.cuda.current_stream().wait_stream(side)
            return loss
        if self.graph is None and not self._capture(x, y):
            return super().__call__(x, y)
        self.x.copy_(x)
        self.y.copy_(y)
        self.graph.replay()
        return self.loss

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        self.x, self.y = x.clone(), y.clone()
        self.optimizer.zero_grad(set_to_none=True)  # backward allocates the grads inside the graph's pool
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.loss = self.step(self.x, self.y)
        except RuntimeError as err:  # an op that cannot be captured: keep training eagerly
            logger.warning("CUDA graph capture failed, training eagerly: %s", str(err).splitlines()[0])
            self.failed = True
            self.optimizer.zero_grad(set_to_none=True)
            _release_rng_from_capture(x.device)
            return False
        self.graph = graph
        return True


def _release_rng_from_capture(device: torch.device) -> None:
    """A capture that fails ends before the CUDA generator leaves capture mode, and the next eager dropout
    then raises "Offset increment outside graph capture" (seen on an H200, torch 2.11, 2026-12-02). Give
    the generator a fresh state at the same seed and offset."""
    generator = torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    fresh = torch.Generator(device=device)
    fresh.set_state(generator.get_state())
    generator.graphsafe_set_state(fresh.graphsafe_get_state())


def use_graphs(enabled: bool, accelerator: Accelerator, batch: int) -> bool:
    """Capture when asked for, on CUDA, without fp16 loss scaling, at batches up to GRAPH_MAX_BATCH."""
    on_cuda = accelerator.device.type == "cuda"
    return enabled and on_cuda and accelerator.mixed_precision != "fp16" and batch <= GRAPH_MAX_BATCH


def step_runner(step: Step, optimizer: torch.optim.Optimizer, *, graphed: bool) -> EagerStep:
    return GraphedStep(step, optimizer, WARMUP_STEPS) if graphed else EagerStep(step, optimizer)
