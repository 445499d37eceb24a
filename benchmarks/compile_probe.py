"""Does torch.compile of each transformer block lift batch-128 training toward the matmul peak?

    CUDA_VISIBLE_DEVICES=0 python benchmarks/compile_probe.py vit-b16 vit-l16

Per arch: the default recipe at batch 128 eagerly, then with every block compiled (the first run
pays compilation), then once more (compiled code reused). Run 6
(benchmarks/results/run6_compile_probe.log) ran under dynamo's default recompile limit (8): each
block recompiled, so 8 blocks per model were compiled and the rest ran eagerly. The limit is now
an option (default: enough for every block of ViT-L).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from unittest import mock

import torch
from bench_adapt import ARCHS, fresh_accelerate, make_task, matmul_peak, save_model, step_flops, sync

from l2l_peft import api
from l2l_peft.prefix import blocks
from l2l_peft.task import load_task

BUILD = api.build_classifier


def compiled_classifier(extractor, objective, config):
    model = BUILD(extractor, objective, config)
    for name in blocks(model.extractor.model):
        model.extractor.model.get_submodule(name).compile(dynamic=False)
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("archs", nargs="+", choices=sorted(ARCHS))
    parser.add_argument("--models", type=Path, default=Path("/tmp/bench_models"))
    parser.add_argument("--recompile-limit", type=int, default=64)
    args = parser.parse_args()
    torch._dynamo.config.recompile_limit = args.recompile_limit
    peak = matmul_peak(8192)
    print(f"peak {peak:.0f}", flush=True)
    options = dict(batch_size=128)
    for arch in args.archs:
        model_dir = save_model(arch, args.models, 224)
        data = load_task(make_task(200, 500, 224))
        flops = step_flops(load_task(make_task(200, 1, 224)), model_dir, options)
        for label, build in (("eager", BUILD), ("compiled", compiled_classifier), ("compiled again", compiled_classifier)):
            fresh_accelerate()
            start = time.perf_counter()
            with mock.patch.object(api, "build_classifier", build):
                report = api.run(data, model=str(model_dir), **options).train
            sync()
            rate = report.steps * flops / report.seconds / 1e12
            print(f"{arch} {label}: wall {time.perf_counter() - start:.1f}s train {report.seconds:.2f}s "
                  f"{report.images_per_second:.0f} img/s {rate:.0f} TFLOP/s {rate / peak:.0%} "
                  f"mem {torch.cuda.max_memory_allocated() / 1e9:.1f} GB loss {report.final_loss:.3f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
