"""Does torch.compile lift large-batch training toward the matmul peak?

    CUDA_VISIBLE_DEVICES=0 python benchmarks/probes/compile_probe.py [--only vit-b16]

Each case trains the default recipe at a large batch (200+ support, 500 query), eagerly or with
the backbone compiled. A compiled case runs twice in one process: the first run pays compilation,
the second reuses the compiled code (what a long experiment run sees after its first task).
TFLOP/s are the eager step's counted FLOPs over the measured step time, as in bench_adapt.py.
Run 6 (run6_compile_probe.log) compiled each block under dynamo's default recompile limit (8),
so only 8 blocks per model were compiled; the limit is now raised.
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import _paths  # noqa: F401
import torch
from attention_probe import training_attention
from common import fresh_accelerate, make_task, matmul_peak, save_model, step_flops, sync
from torch.nn.attention import SDPBackend

from l2l_peft import api
from l2l_peft.adapters import blocks
from l2l_peft.task import load_task

BUILD = api.build_classifier

NO_DROPOUT = dict(lora_dropout=0.0)
# (arch, support = batch, what is compiled: None, "blocks" or "model", compile mode, AdaptConfig
# overrides, cuDNN attention instead of the direct flash call)
CASES = [
    ("vit-b16", 128, None, None, {}, False),
    ("vit-b16", 128, None, None, NO_DROPOUT, False),
    ("vit-b16", 128, "blocks", None, {}, False),
    ("vit-b16", 128, "model", None, {}, False),
    ("vit-b16", 128, "model", None, NO_DROPOUT, False),
    ("vit-b16", 256, None, None, {}, False),
    ("vit-b16", 256, "model", None, {}, False),
    ("vit-l16", 128, None, None, {}, False),
    ("vit-l16", 128, "model", None, {}, False),
    ("vit-l16", 128, "model", None, NO_DROPOUT, False),
    # every lever at once: the ceiling of what torch offers here without custom kernels
    ("vit-b16", 128, "model", None, NO_DROPOUT, True),
    ("vit-b16", 256, "model", None, NO_DROPOUT, True),
    ("vit-l16", 128, "model", None, NO_DROPOUT, True),
    ("vit-b16", 128, "model", "max-autotune-no-cudagraphs", NO_DROPOUT, False),
]


def compiling(target: str, mode: str | None):
    def build(extractor, objective, config):
        model = BUILD(extractor, objective, config)
        if target == "model":
            model.extractor.compile(dynamic=False, mode=mode)
        else:
            for name in blocks(model.extractor.model):
                model.extractor.model.get_submodule(name).compile(dynamic=False, mode=mode)
        return model

    return build


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="", help="run only cases whose label contains this")
    parser.add_argument("--models", type=Path, default=Path("/tmp/bench_models"))
    args = parser.parse_args()
    torch._dynamo.config.recompile_limit = 64  # blocks share one code object: each compiles once
    peak = matmul_peak(8192)
    print(f"{torch.cuda.get_device_name()}: matmul peak {peak:.0f} TFLOP/s", flush=True)
    flops: dict[tuple, float] = {}
    for arch, batch, target, mode, overrides, cudnn in CASES:
        label = f"{arch} batch {batch} {target or 'eager'} {mode or ''} {overrides or ''}{' cudnn' if cudnn else ''}"
        if args.only not in label:
            continue
        model_dir = save_model(arch, args.models, 224)
        options = dict(batch_size=batch, **overrides)
        data = load_task(make_task(batch, 500, 224))
        if (arch, batch) not in flops:
            flops[arch, batch] = step_flops(load_task(make_task(batch, 1, 224)), model_dir, dict(batch_size=batch))
        build = compiling(target, mode) if target else BUILD
        for attempt in ("first", "again") if target else ("eager",):
            if attempt == "first":
                torch._dynamo.reset()
            fresh_accelerate()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            with ExitStack() as patches:
                patches.enter_context(mock.patch.object(api, "build_classifier", build))
                if cudnn:  # attention_probe.py: the kernel is 30 % faster than flash at 197 tokens
                    patches.enter_context(training_attention(SDPBackend.CUDNN_ATTENTION))
                report = api.run(data, model=str(model_dir), **options).train
            sync()
            rate = report.steps * flops[arch, batch] / report.seconds / 1e12
            print(
                f"{label} {attempt}: wall {time.perf_counter() - start:.1f}s "
                f"train {report.seconds:.2f}s ({report.steps} steps) "
                f"{report.images_per_second:.0f} img/s {rate:.0f} TFLOP/s {rate / peak:.0%} "
                f"mem {torch.cuda.max_memory_allocated() / 1e9:.1f} GB loss {report.final_loss:.3f}",
                flush=True,
            )


if __name__ == "__main__":
    sys.exit(main())
