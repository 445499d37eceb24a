"""Would an ensemble's members train faster side by side, each in its own thread and CUDA stream?

    CUDA_VISIBLE_DEVICES=0 python benchmarks/probes/member_streams_probe.py [--arch dinov2-s14] [--repeats 3]

At few-shot batches one member's graphed step leaves most of an H100 idle (run 10: the LoRA member at 22 % of
the matmul peak) and its Python thread mostly waits, so the default's two members (issue #27: 2.99 s adapt +
predict at 50 shots, target 2 s) might overlap. Each case fits and predicts every member of the default config
(`method` auto) on one task: one after the other, as api.run does, or in one thread per member, each on a
stream of its own, with graph capture in either error mode (`global`, torch's default, forbids other threads'
unsafe calls during a capture; `thread_local` only the capturing thread's). Reported per case: the median wall
time, how many graph captures fell back to eager, and how far the probabilities are from the sequential ones
(dropout draws interleave across threads, so they differ; by how much says whether the answer is the same).
Run 11 (one H100, results/benchmarks/bench_adapt.md): both threaded cases break during graph capture, so the
members stay sequential.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from unittest import mock

import _paths  # noqa: F401
import torch
from common import add_run_arguments, run_setup, sync

from l2l_peft import api
from l2l_peft.config import AdaptConfig
from l2l_peft.predict import predict
from l2l_peft.task import TaskData


class Fallbacks(logging.Handler):
    """Counts the graph runner's 'capture failed, training eagerly' warnings."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += "capture failed" in record.getMessage()


def member_probs(data: TaskData, member: AdaptConfig, stream: torch.cuda.Stream | None) -> torch.Tensor:
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        fitted = api.fit(data, member)
        probs = predict(
            fitted.model, fitted.objective, data.query_images, accelerator=fitted.accelerator,
            batch_size=member.predict_batch_size,
        )  # fmt: skip
    return probs


def sequential(data: TaskData, config: AdaptConfig) -> torch.Tensor:
    return torch.stack([member_probs(data, m, None) for m in config.members()]).mean(0)


def concurrent(data: TaskData, config: AdaptConfig) -> torch.Tensor:
    members = config.members()
    streams = [torch.cuda.Stream() if torch.cuda.is_available() else None for _ in members]
    with ThreadPoolExecutor(len(members)) as pool:
        return torch.stack(list(pool.map(functools.partial(member_probs, data), members, streams))).mean(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    data, config = run_setup(args)
    config = config.concrete()
    fallbacks = Fallbacks()
    logging.getLogger("l2l_peft.speed.graphs").addHandler(fallbacks)
    graph = torch.cuda.graph
    cases = {  # global last: a capture that other threads' work breaks can leave the CUDA context unusable
        "sequential": (sequential, "global"),
        "threads, capture thread_local": (concurrent, "thread_local"),
        "threads, capture global": (concurrent, "global"),
    }
    print(f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}; members {config.method}; "
          f"{args.arch}, {args.support} support, {args.query} query", flush=True)  # fmt: skip
    sequential(data, config)  # warm-up: CUDA context, kernels, the cached pristine backbone
    reference = None
    for name, (run, mode) in cases.items():
        walls, fallbacks.count = [], 0
        try:
            with mock.patch("torch.cuda.graph", functools.partial(graph, capture_error_mode=mode)):
                for _ in range(args.repeats):
                    sync()
                    start = time.perf_counter()
                    probs = run(data, config)
                    sync()
                    walls.append(time.perf_counter() - start)
        except Exception as err:  # noqa: BLE001 - a case that breaks is a finding, reported like the others
            print(f"{name}: failed: {type(err).__name__}: {str(err).splitlines()[0]}", flush=True)
            continue
        reference = probs if reference is None else reference
        assert probs.shape == (args.query, len(data.classes)) and torch.allclose(probs.sum(1), torch.ones(args.query))
        print(
            f"{name}: median {statistics.median(walls):.2f} s (runs {', '.join(f'{w:.2f}' for w in walls)}), "
            f"captures fell back {fallbacks.count}x, max |p - sequential| {(probs - reference).abs().max():.4f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
