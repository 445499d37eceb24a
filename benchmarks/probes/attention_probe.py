"""Which attention kernel is fastest for ViT training shapes (197 tokens, head size 64) on this GPU?

    CUDA_VISIBLE_DEVICES=0 python benchmarks/probes/attention_probe.py [--parts check,model,kernels,training]

Run 6's batch-128 profile gave flash attention 17 % of the step's GPU time for about 7 % of its
FLOPs: at 197 tokens the kernels' 128-token tiles are mostly padding. Parts: `check` compares each
SDPA backend's output and gradients with float64 math attention; `model` compares one training
step's LoRA gradients per block with a float32 model's; `kernels` times forward +
backward of each on the projections' strided layout; `training` trains the default recipe at
batch 128 with each (attention.py's direct flash call turned off for the others).
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from unittest import mock

import _paths  # noqa: F401
import torch
import torch.nn.functional as F
from common import CLASSES, fresh_accelerate, make_task, matmul_peak, save_model, step_flops, sync
from torch.nn.attention import SDPBackend, sdpa_kernel
from torchcross.data.task import TaskTarget

from l2l_peft import api
from l2l_peft.backbone import load_backbone
from l2l_peft.config import AdaptConfig
from l2l_peft.speed import attention
from l2l_peft.speed.precision import cast_frozen
from l2l_peft.targets import build_objective
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
        patches.enter_context(mock.patch.object(attention, "TRAINING_BACKENDS", [backend]))
        if backend is not SDPBackend.FLASH_ATTENTION:
            patches.enter_context(mock.patch.object(attention, "_flash_takes", lambda *a: False))
        yield


def kernel_time(
    backend: SDPBackend, batch: int, heads: int, tokens: int = 197, dim: int = 64, iters: int = 30
) -> float:
    """Milliseconds of one forward + backward on [batch, heads, tokens, dim] views of a [batch, tokens, heads*dim]
    tensor."""
    qkv = [
        torch.randn(batch, tokens, heads * dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for _ in range(3)
    ]
    views = lambda: [t.view(batch, tokens, heads, dim).transpose(1, 2) for t in qkv]
    grad = torch.randn(batch, heads, tokens, dim, device="cuda", dtype=torch.bfloat16)
    with sdpa_kernel([backend]):
        for i in range(iters + 5):
            if i == 5:
                sync()
                start = time.perf_counter()
            F.scaled_dot_product_attention(*views()).backward(grad)
    sync()
    return 1e3 * (time.perf_counter() - start) / iters


def gradient_errors(backend: SDPBackend, batch: int, heads: int = 12, tokens: int = 197, dim: int = 64,
                    needs_grad: str = "qkv") -> list[float]:  # fmt: skip
    """Relative error of output and the gradients of `needs_grad` against float64 math attention, in the model's
    layouts.

    As in attention.py: q, k, v are strided [B, H, S, D] views of [B, S, H*D] projections, and
    the output goes back to [B, S, H, D] before the next projection, so its gradient arrives strided.
    needs_grad="qv" is the first block under LoRA on q and v: its input is frozen, so k needs none.
    """
    torch.manual_seed(0)
    base = [torch.randn(batch, tokens, heads * dim, device="cuda", dtype=torch.float64) for _ in range(3)]
    grad = torch.randn(batch, tokens, heads, dim, device="cuda", dtype=torch.float64)
    results = []
    for dtype, kernels in ((torch.float64, [SDPBackend.MATH]), (torch.bfloat16, [backend])):
        qkv = [t.detach().to(dtype, copy=True).requires_grad_(n in needs_grad) for n, t in zip("qkv", base)]
        with sdpa_kernel(kernels):
            out = F.scaled_dot_product_attention(*[t.view(batch, tokens, heads, dim).transpose(1, 2) for t in qkv])
        if needs_grad:
            out.transpose(1, 2).contiguous().backward(grad.to(dtype))
        results.append([out.detach().double(), *(t.grad.double() for t in qkv if t.requires_grad)])
    return [float((b - a).norm() / a.norm()) for a, b in zip(*results)]


def lora_gradients(model_dir: Path, backend: SDPBackend | None, images: torch.Tensor, labels: torch.Tensor,
                   eval_first: bool = False) -> dict[str, torch.Tensor]:  # fmt: skip
    """LoRA gradients of one training step of a fresh ViT (same seed), in float32 with math attention when backend
    is None.

    eval_first runs a no-grad eval forward first, as adapt() does for the prototype head, so a
    kernel that caches its plans meets the training call second.
    """
    torch.manual_seed(0)
    extractor = load_backbone(str(model_dir))
    objective = build_objective(TaskTarget.MULTICLASS_CLASSIFICATION, CLASSES, labels)
    model = api.build_classifier(extractor, objective, AdaptConfig(lora_dropout=0.0)).cuda().train()
    torch.nn.init.normal_(model.head.linear.weight, std=0.1)  # the zero-initialised head would pass no gradient back
    with ExitStack() as context:
        if backend is not None:
            cast_frozen(model, torch.bfloat16)
            context.enter_context(torch.autocast("cuda", torch.bfloat16))
            if backend is not SDPBackend.FLASH_ATTENTION:
                context.enter_context(mock.patch.object(attention, "_flash_takes", lambda *a: False))
        context.enter_context(sdpa_kernel([backend or SDPBackend.MATH]))
        if eval_first:
            with torch.no_grad():
                model.eval()(images)
            model.train()
        loss = objective.loss(model(images), labels)
    loss.backward()
    return {n: p.grad.double() for n, p in model.named_parameters() if "lora_" in n}


def model_errors(model_dir: Path, batch: int, eval_first: bool = False) -> None:
    """Per-block relative error of each kernel's bf16 LoRA gradients against float32 math attention.

    The kernel-level check cannot see how a kernel behaves inside the model (which inputs need
    gradients, the layouts transformers hands it); this compares whole training steps.
    """
    torch.manual_seed(1)
    images = torch.rand(batch, 3, 224, 224, device="cuda") * 2 - 1
    labels = torch.arange(batch, device="cuda") % len(CLASSES)
    reference = lora_gradients(model_dir, None, images, labels)
    for name, backend in BACKENDS.items():
        grads = lora_gradients(model_dir, backend, images, labels, eval_first)
        per_block: dict[int, list[float]] = {}
        for key, ref in reference.items():
            block = int(re.search(r"\.layers?\.(\d+)\.", key).group(1))  # transformers 5.x renamed layer -> layers
            per_block.setdefault(block, []).append(float((grads[key] - ref).norm() / ref.norm().clamp(min=1e-30)))
        text = ", ".join(f"{b}: {max(e):.1e}" for b, e in sorted(per_block.items()))
        print(f"model batch {batch}{', eval forward first' if eval_first else ''}, bf16 {name} vs float32 math, "
              f"worst LoRA-gradient error per block: {text}", flush=True)  # fmt: skip


def check_part(args: argparse.Namespace, peak: float) -> None:
    q = torch.randn(8, 12, 197, 64, device="cuda", dtype=torch.bfloat16)
    print(
        f"SDPA's own choice for bf16 [8, 12, 197, 64]: {SDPBackend(torch._fused_sdp_choice(q, q, q)).name}", flush=True
    )
    for batch, needs_grad in ((8, "qkv"), (128, "qkv"), (128, "qv")):
        for name, backend in BACKENDS.items():
            print(
                f"batch {batch}, grads of {needs_grad}: bf16 {name} vs float64 math, relative error: "
                f"{_errors_text(gradient_errors(backend, batch, needs_grad=needs_grad), needs_grad)}",
                flush=True,
            )
    # First a call at new shapes whose output gradient is contiguous, then the model's strided one
    # (run 8: cuDNN's model-level LoRA gradients were wrong after the kernels part had timed it).
    for name in ("flash", "cudnn"):
        kernel_time(BACKENDS[name], 64, 12, iters=1)
        print(f"batch 64 after a contiguous-gradient call: bf16 {name} vs float64 math, relative error: "
              f"{_errors_text(gradient_errors(BACKENDS[name], 64), 'qkv')}", flush=True)  # fmt: skip
        # inference: a forward on contiguous [B, H, S, D] inputs first, then the model's strided views
        with torch.no_grad(), sdpa_kernel([BACKENDS[name]]):
            F.scaled_dot_product_attention(
                *(torch.randn(32, 12, 197, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            )
        print(f"batch 32 after a contiguous-input forward: bf16 {name} vs float64 math, relative error: "
              f"{_errors_text(gradient_errors(BACKENDS[name], 32, needs_grad=''), '')}", flush=True)  # fmt: skip


def _errors_text(errors: list[float], needs_grad: str) -> str:
    return ", ".join(f"{n} {e:.1e}" for n, e in zip(["out"] + [f"d{n}" for n in needs_grad], errors))


def model_part(args: argparse.Namespace, peak: float) -> None:
    for batch, eval_first in ((32, False), (128, False), (128, True)):
        model_errors(save_model("vit-b16", args.models, 224), batch, eval_first)


def kernels_part(args: argparse.Namespace, peak: float) -> None:
    for arch, heads in (("vit-b16", 12), ("vit-l16", 16)):
        flops = 2 * 2 * 128 * heads * 197 * 197 * 64 * 3.5  # QK^T and PV: forward 1x, backward 2.5x
        for name, backend in BACKENDS.items():
            try:
                ms = kernel_time(backend, 128, heads)
                print(
                    f"{arch} attention batch 128, {name}: {ms:.2f} ms/layer fwd+bwd, {flops / ms / 1e9:.0f} TFLOP/s",
                    flush=True,
                )
            except RuntimeError as err:
                print(f"{arch} attention, {name}: unavailable ({str(err).splitlines()[0][:100]})", flush=True)


def training_part(args: argparse.Namespace, peak: float) -> None:
    for arch in args.archs.split(","):
        model_dir = save_model(arch, args.models, 224)
        options = dict(batch_size=128)
        data = load_task(make_task(128, 500, 224))
        flops = step_flops(load_task(make_task(128, 1, 224)), model_dir, options)
        for name in args.backends.split(","):
            for seed in range(args.seeds):
                try:
                    with training_attention(BACKENDS[name]):
                        fresh_accelerate()
                        report = api.run(data, model=str(model_dir), seed=seed, **options).train
                except RuntimeError as err:
                    print(f"{arch} training, {name}: failed ({str(err).splitlines()[0][:100]})", flush=True)
                    break
                rate = report.steps * flops / report.seconds / 1e12
                print(
                    f"{arch} training batch 128, {name}{' (direct call)' if name == 'flash' else ''}, seed {seed}: "
                    f"{report.seconds:.2f}s {report.images_per_second:.0f} img/s {rate:.0f} TFLOP/s {rate / peak:.0%} "
                    f"loss {report.final_loss:.3f}",
                    flush=True,
                )


PARTS = {"check": check_part, "model": model_part, "kernels": kernels_part, "training": training_part}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", type=Path, default=Path("/tmp/bench_models"))
    parser.add_argument(
        "--parts", default="check,model,kernels,training", help="comma-separated parts, run in this order"
    )
    parser.add_argument("--archs", default="vit-b16,vit-l16", help="models of the training part")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="kernels of the training part")
    parser.add_argument("--seeds", type=int, default=1, help="training runs per kernel (seeds 0, 1, ...)")
    args = parser.parse_args()
    peak = matmul_peak(8192)
    print(f"{torch.cuda.get_device_name()}: matmul peak {peak:.0f} TFLOP/s", flush=True)
    for part in args.parts.split(","):
        PARTS[part](args, peak)


if __name__ == "__main__":
    main()
