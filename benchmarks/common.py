"""What the benchmarks and probes share: random-weight ViT models, synthetic tasks, timing helpers.

Every script runs from the repository root (`python benchmarks/bench_adapt.py`,
`python benchmarks/probes/trace_ops.py`). Importing this module puts the checkout's own
`l2l_peft` first on sys.path, so a script measures the code beside it, not another installed copy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from torch.utils.flop_counter import FlopCounterMode
from torchcross.data.task import Task, TaskDescription, TaskTarget

from l2l_peft import api
from l2l_peft.config import AdaptConfig
from l2l_peft.task import TaskData, challenge_task, load_task

ARCHS = {  # hidden, layers, heads, MLP
    "vit-s16": (384, 12, 6, 1536),
    "vit-b16": (768, 12, 12, 3072),
    "vit-l16": (1024, 24, 16, 4096),
    "dinov2-s14": (384, 12, 6, 1536),  # the default backbone's architecture (DINOv2 ViT-S/14, 257 tokens at 224)
    "tiny": (32, 2, 4, 37),  # --smoke
}
CLASSES = {i: f"class{i}" for i in range(5)}


def save_model(arch: str, root: Path, size: int) -> Path:
    from transformers import ViTConfig, ViTModel

    hidden, layers, heads, mlp = ARCHS[arch]
    directory = root / arch
    if not (directory / "config.json").exists():
        if arch.startswith("dinov2"):  # position embeddings for 518 px, run at `size` (interpolated), as shipped
            from transformers import Dinov2Config, Dinov2Model

            cfg = Dinov2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                               mlp_ratio=mlp // hidden, image_size=518, patch_size=14)  # fmt: skip
            Dinov2Model(cfg).save_pretrained(directory)
        else:
            cfg = ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=mlp, image_size=size, patch_size=16 if size >= 64 else 8)  # fmt: skip
            ViTModel(cfg, add_pooling_layer=False).save_pretrained(directory)
        prep = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3, "crop_size": {"height": size, "width": size}}
        (directory / "preprocessor_config.json").write_text(json.dumps(prep))
    return directory


def make_task(n_support: int, n_query: int, size: int, seed: int = 0) -> Task:
    g = torch.Generator().manual_seed(seed)
    n = n_support + n_query
    images = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    labels = torch.arange(n) % len(CLASSES)
    return challenge_task(
        images, labels, n_support, TaskDescription(TaskTarget.MULTICLASS_CLASSIFICATION, CLASSES, "bench")
    )


def fresh_accelerate() -> None:
    """accelerate keeps one global precision per process; rows with another precision need a reset."""
    from l2l_peft.runtime import reset_accelerate

    reset_accelerate(device=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_peak(n: int) -> float:
    """bf16 n^3 matmul TFLOP/s (median of 20 timed runs on random data)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(20):
        sync()
        t = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / sorted(times)[len(times) // 2] / 1e12


def step_flops(data, model_dir: Path, overrides: dict) -> float:
    """FLOPs of one training step: run(1 step) vs run(2 steps), eager, counted (predict of 1 query cancels)."""
    counts = []
    for steps in (1, 2):
        fresh_accelerate()
        with FlopCounterMode(display=False) as counter:
            api.run(
                data,
                model=str(model_dir),
                **{**overrides, "max_steps": steps, "min_steps": steps, "cuda_graphs": False},
            )
        counts.append(counter.get_total_flops())
    return counts[1] - counts[0]


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The probes' one adapt() call: architecture (random weights), task size, method, steps, model folder."""
    parser.add_argument("--arch", default="dinov2-s14")
    parser.add_argument("--support", type=int, default=50)
    parser.add_argument("--query", type=int, default=500)
    parser.add_argument("--method", default="auto", help="the ensemble (auto: the device's default)")
    parser.add_argument("--steps", type=int, default=None, help="max_steps (default: the recipe's)")
    parser.add_argument("--models", type=Path, default=Path("/tmp/bench_models"))


def run_setup(args: argparse.Namespace, **overrides: Any) -> tuple[TaskData, AdaptConfig]:
    """The task and config of add_run_arguments' call: a saved random-weight model and a synthetic task."""
    size = 32 if args.arch == "tiny" else 224
    model = save_model(args.arch, args.models, size)
    steps = {} if args.steps is None else dict(max_steps=args.steps, min_steps=args.steps)
    config = AdaptConfig(model=str(model), method=args.method, **steps, **overrides)
    return load_task(make_task(args.support, args.query, size)), config
