"""Which attention kernel is fastest for ViT training shapes (197 tokens, head size 64) on this GPU?

    CUDA_VISIBLE_DEVICES=0 python benchmarks/attention_probe.py [--parts check,kernels,training]

Run 6's batch-128 profile gave flash attention 17 % of the step's GPU time for about 7 % of its
FLOPs: at 197 tokens the kernels' 128-token tiles are mostly padding. Parts: `check` compares each
SDPA backend's output and gradients with float64 math attention; `kernels` times forward +
backward of each on the projections' strided layout; `training` trains the default recipe at
batch 128 with each (attention.py's direct flash call turned off for the others).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from bench_adapt import fresh_accelerate, make_task, matmul_peak, save_model, step_flops, sync
from torch.nn.attention import SDPBackend, sdpa_kernel

from l2l_peft import api, attention, train
from l2l_peft.task import load_task

BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


@contextmanager
def training_attention(backend: SDPBackend) -> Iterator[None]:
    """adapt() trains with `backend`: flash keeps attention.py's direct call, the others go through SDPA."""
    with ExitStack() as patches:
        patches.enter_context(mock.patch.object(train, "ATTENTION_BACKENDS", [backend]))
        if backend is not SDPBackend.FLASH_ATTENTION:
            patches.enter_context(mock.patch.object(attention, "_flash_takes", lambda *a: False))
        yield


def kernel_time(backend: SDPBackend, batch: int, heads: int, tokens: int = 197, dim: int = 64, iters: int = 30) -> float:
    """Milliseconds of one forward + backward on [batch, heads, tokens, dim] views of a [batch, tokens, heads*dim] tensor."""
    qkv = [torch.randn(batch, tokens, heads * dim, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    views = lambda: [t.view(batch, tokens, heads, dim).transpose(1, 2) for t in qkv]  # noqa: E731
    grad = torch.randn(batch, heads, tokens, dim, device="cuda", dtype=torch.bfloat16)
    with sdpa_kernel([backend]):
        for i in range(iters + 5):
            if i == 5:
                sync()
                start = time.perf_counter()
            F.scaled_dot_product_attention(*views()).backward(grad)
    sync()
    return 1e3 * (time.perf_counter() - start) / iters


def gradient_errors(backend: SDPBackend, batch: int, heads: int = 12, tokens: int = 197, dim: int = 64) -> list[float]:
    """Relative error of output, dq, dk, dv against float64 math attention, in the model's layouts.

    As in attention.py: q, k, v are strided [B, H, S, D] views of [B, S, H*D] projections, and
    the output goes back to [B, S, H, D] before the next projection, so its gradient arrives strided.
    """
    torch.manual_seed(0)
    base = [torch.randn(batch, tokens, heads * dim, device="cuda", dtype=torch.float64) for _ in range(3)]
    grad = torch.randn(batch, tokens, heads, dim, device="cuda", dtype=torch.float64)
    results = []
    for dtype, kernels in ((torch.float64, [SDPBackend.MATH]), (torch.bfloat16, [backend])):
        qkv = [t.detach().to(dtype, copy=True).requires_grad_() for t in base]
        with sdpa_kernel(kernels):
            out = F.scaled_dot_product_attention(*[t.view(batch, tokens, heads, dim).transpose(1, 2) for t in qkv])
        out.transpose(1, 2).contiguous().backward(grad.to(dtype))
        results.append([out.double(), *(t.grad.double() for t in qkv)])
    return [float((b - a).norm() / a.norm()) for a, b in zip(*results)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", type=Path, default=Path("/tmp/bench_models"))
    parser.add_argument("--parts", default="check,kernels,training", help="comma-separated parts to run")
    args = parser.parse_args()
    peak = matmul_peak(8192)
    print(f"{torch.cuda.get_device_name()}: matmul peak {peak:.0f} TFLOP/s", flush=True)
    for batch in (8, 128) if "check" in args.parts else ():
        for name, backend in BACKENDS.items():
            errors = ", ".join(f"{n} {e:.1e}" for n, e in zip(("out", "dq", "dk", "dv"), gradient_errors(backend, batch)))
            print(f"batch {batch}: bf16 {name} vs float64 math, relative error: {errors}", flush=True)
    for arch, heads in (("vit-b16", 12), ("vit-l16", 16)) if "kernels" in args.parts else ():
        flops = 2 * 2 * 128 * heads * 197 * 197 * 64 * 3.5  # QK^T and PV: forward 1x, backward 2.5x
        for name, backend in BACKENDS.items():
            try:
                ms = kernel_time(backend, 128, heads)
                print(f"{arch} attention batch 128, {name}: {ms:.2f} ms/layer fwd+bwd, {flops / ms / 1e9:.0f} TFLOP/s", flush=True)
            except RuntimeError as err:
                print(f"{arch} attention, {name}: unavailable ({str(err).splitlines()[0][:100]})", flush=True)
    for arch in ("vit-b16", "vit-l16") if "training" in args.parts else ():
        model_dir = save_model(arch, args.models, 224)
        options = dict(batch_size=128)
        data = load_task(make_task(128, 500, 224))
        flops = step_flops(load_task(make_task(128, 1, 224)), model_dir, options)
        for name, backend in BACKENDS.items():
            direct = name == "flash"
            try:
                with training_attention(backend):
                    fresh_accelerate()
                    report = api.run(data, model=str(model_dir), **options).train
            except RuntimeError as err:
                print(f"{arch} training, {name}: failed ({str(err).splitlines()[0][:100]})", flush=True)
                continue
            rate = report.steps * flops / report.seconds / 1e12
            print(f"{arch} training batch 128, {name}{' (direct call)' if direct else ''}: {report.seconds:.2f}s "
                  f"{report.images_per_second:.0f} img/s {rate:.0f} TFLOP/s {rate / peak:.0%} loss {report.final_loss:.3f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
