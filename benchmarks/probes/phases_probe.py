"""Where an ensemble's adapt + predict time goes, phase by phase and member by member.

    CUDA_VISIBLE_DEVICES=0 python benchmarks/probes/phases_probe.py [--arch dinov2-s14] [--full-last-blocks 6]

Issue #27 wants 50 shots and 500 queries in 2 s on one H100; run 11 measured the default at 2.87 s and with the
full member on the last 6 blocks 2.18 s, without saying which part of a member the time is in. Each phase of
api.run (backbone copy, method, bf16 cast, prototype head, frozen-prefix cache, the training loop's first eager
warm-up steps, the graph capture, the replays, prediction) is timed between device synchronisations; the
per-step synchronisation costs little once steps replay a graph. Reported per member after a warm-up run, with
the uninstrumented wall time of the same call beside it; `--warmup 3 1` compares eager warm-up steps
before the capture, `--host-images` the copy of the task's images to the GPU per member (before api.resident).
Run 12 (one H100, results/benchmarks/bench_adapt.md): graph replays are most of it (8.7 ms a LoRA step, 14.9 ms a
full one), each eager warm-up step cost about 4 replays (now one instead of three), and a member's predict halved
with the images on the GPU once.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from unittest import mock

import _paths  # noqa: F401
import torch
from common import add_run_arguments, run_setup, sync

from l2l_peft import api, train
from l2l_peft.speed import graphs

PHASES = {  # module, name -> phase
    (api, "load_backbone"): "backbone copy",
    (api, "build_classifier"): "method + head",
    (api, "cast_frozen"): "bf16 cast",
    (api, "init_head"): "prototype head",
    (train, "prefix_batches"): "prefix cache",
    (api, "predict"): "predict",
}


class Clock:
    """Seconds per (member, phase); a member starts at each backbone copy."""

    def __init__(self) -> None:
        self.member = -1
        self.seconds: dict[tuple[int, str], float] = defaultdict(float)
        self.steps: dict[int, list[float]] = defaultdict(list)

    def timed(self, phase: str, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            if phase == "backbone copy":
                self.member += 1
            sync()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            sync()
            self.seconds[self.member, phase] += time.perf_counter() - start
            return out

        return wrapper

    def runner(self, step, optimizer, *, graphed: bool):
        run = graphs.step_runner(step, optimizer, graphed=graphed)

        def timed_step(x, y):
            sync()
            start = time.perf_counter()
            loss = run(x, y)
            sync()
            self.steps[self.member].append(time.perf_counter() - start)
            return loss

        return timed_step

    @contextlib.contextmanager
    def patched(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for (module, name), phase in PHASES.items():
                stack.enter_context(mock.patch.object(module, name, self.timed(phase, getattr(module, name))))
            stack.enter_context(mock.patch.object(train, "step_runner", self.runner))
            yield


def report(clock: Clock, methods: list[str], warmup: int) -> None:
    for member, method in enumerate(methods):
        steps = clock.steps[member]
        parts = {phase: clock.seconds[member, phase] for phase in PHASES.values()}
        if warmup:
            eager, capture, replays = steps[:warmup], steps[warmup : warmup + 1], steps[warmup + 1 :]
            parts |= {f"{len(eager)} eager steps": sum(eager), "capture step": sum(capture)}
            parts[f"{len(replays)} replays"] = sum(replays)
        else:
            eager, replays = steps, []
            parts[f"{len(eager)} eager steps"] = sum(eager)
        total = sum(parts.values())
        print(f"member {member} ({method}): {total:.3f} s timed")
        for phase, seconds in parts.items():
            print(f"  {phase:>18}: {seconds:.3f} s")
        if replays:
            print(f"  {'replay median':>18}: {1000 * statistics.median(replays):.1f} ms, eager median "
                  f"{1000 * statistics.median(eager or [0]):.1f} ms")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    parser.add_argument("--full-last-blocks", type=int, default=None)
    parser.add_argument("--warmup", type=int, nargs="+", default=[graphs.WARMUP_STEPS],
                        help="eager steps before the graph capture, one case each")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--host-images", action="store_true", help="each member copies the task's images to the GPU")
    args = parser.parse_args()
    data, config = run_setup(args, full_last_blocks=args.full_last_blocks)
    if args.host_images:
        mock.patch.object(api, "resident", lambda data, device: data).start()
    api.run(data, config)  # warm-up: CUDA context, kernels, the cached pristine backbone
    for warmup in args.warmup:
        with mock.patch.object(graphs, "WARMUP_STEPS", warmup):
            walls = []
            for _ in range(args.repeats):
                sync()
                start = time.perf_counter()
                result = api.run(data, config)
                sync()
                walls.append(time.perf_counter() - start)
            print(f"eager warm-up steps {warmup}: uninstrumented {statistics.median(walls):.3f} s median wall (runs "
                  f"{', '.join(f'{w:.3f}' for w in walls)}), last timings "
                  f"{ {k: round(v, 3) for k, v in result.timings.items()} }")  # fmt: skip
            clock = Clock()
            with clock.patched():
                start = time.perf_counter()
                result = api.run(data, config)
                sync()
            print(f"instrumented: {time.perf_counter() - start:.3f} s wall")
            report(clock, result.methods.split("+"), warmup if torch.cuda.is_available() else 0)


if __name__ == "__main__":
    main()
