"""Adaptation speed on one GPU: l2l_peft against a straightforward peft + accelerate loop.

    python benchmarks/bench_adapt.py --out runs/bench_adapt          # the GPU run (a few minutes)
    python benchmarks/bench_adapt.py --smoke --out /tmp/bench          # tiny models, CPU, seconds

Backbones are DINOv2 ViT-S/14 (the default's architecture), ViT-S/16, ViT-B/16 and ViT-L/16 with random
weights (speed does not depend on the weights), saved once as local model directories. Each row reports
the in-process adapt() split (load / adapt / predict, from api.run's timings), training images/s, achieved
training TFLOP/s (FLOPs of one training step counted by torch.utils.flop_counter, times steps, over the training
wall time, warm-up and graph capture included) as a fraction of a bf16 8192^3 matmul measured in
the same run, and peak GPU memory. CLI rows time `python -m l2l_peft` from process start to
output written, `--cli-runs` processes each with a bytecode cache the first one fills; with
`--cli-python` they run in another interpreter, e.g. the container's package set built by
slim_env.py. adapt() rows run best-of-`--repeats` after one warm-up task per backbone.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from common import CLASSES, fresh_accelerate, make_task, matmul_peak, save_model, step_flops, sync
from torch.utils.flop_counter import FlopCounterMode

from l2l_peft import api
from l2l_peft.adapters import find_target_modules
from l2l_peft.config import make_config
from l2l_peft.task import load_task


def reset_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gb() -> float:
    return torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else 0.0


# ---- l2l_peft rows ---------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    name: str
    arch: str
    support: int
    query: int
    batch: int = 0
    steps: int = 0
    load_s: float = 0.0
    adapt_s: float = 0.0
    predict_s: float = 0.0
    train_s: float = 0.0
    total_s: float = 0.0
    cli_s: float | None = None
    images_per_s: float = 0.0
    step_gflop: float = 0.0
    tflops: float = 0.0
    peak_fraction: float = 0.0
    memory_gb: float = 0.0
    note: str = ""


def run_adapt(name: str, arch: str, model_dir: Path, support: int, query: int, size: int, peak: float, repeats: int,
              overrides: dict, *, storage: str = "stream") -> Row:  # fmt: skip
    data = load_task(make_task(support, query, size))
    flops_data = load_task(make_task(support, 1, size))
    # bf16 storage of frozen tensors: "stream" (the default), "matmuls" (float32 residual stream) or "none"
    cast = {
        "stream": api.cast_frozen,
        "matmuls": functools.partial(api.cast_frozen, stream=False),
        "none": lambda *a: 0,
    }[storage]
    patch = mock.patch.object(api, "cast_frozen", cast)
    best = None
    with patch:
        for _ in range(repeats):
            fresh_accelerate()
            reset_memory()
            result = api.run(data, model=str(model_dir), **overrides)
            sync()
            memory = peak_memory_gb()
            if best is None or result.timings["total"] < best[0].timings["total"]:
                best = (result, memory)
        # FLOPs and rate of the first ensemble member: result.train reports that member's steps and seconds
        first = make_config(None, **overrides).methods[0].value
        flops = step_flops(flops_data, model_dir, {**overrides, "method": first})
    result, memory = best
    report = result.train
    rate = report.steps * flops / report.seconds / 1e12
    return Row(
        name,
        arch,
        support,
        query,
        report.batch_size,
        report.steps,
        result.timings["load"],
        result.timings["adapt"],
        result.timings["predict"],
        report.seconds,
        result.timings["total"],
        None,
        report.images_per_second,
        flops / 1e9,
        rate,
        rate / peak,
        memory,
        f"members {result.methods}",
    )


def run_cli(name: str, arch: str, model_dir: Path, support: int, query: int, size: int, work: Path, extra: list[str],
            runs: int = 3, python: str = sys.executable) -> Row:  # fmt: skip
    """Wall time of whole CLI processes. Python bytecode goes to a cache of its own that the first run
    fills (as an image build does; a read-only site-packages without .pyc files recompiles every
    run); the row reports the best later run and notes every run's wall time."""
    task = work / f"{name}.pkl"
    task.write_bytes(pickle.dumps(make_task(support, query, size)))
    out = work / f"{name}.out.pkl"
    env = {**os.environ, "PYTHONPYCACHEPREFIX": str(work / "pycache" / Path(python).parent.parent.name)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    walls, logs = [], []
    for _ in range(runs):
        out.unlink(missing_ok=True)
        start = time.perf_counter()
        proc = subprocess.run(
            [python, "-m", "l2l_peft", str(task), str(out), "--model", str(model_dir), "--strict", *extra],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        walls.append(time.perf_counter() - start)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"CLI failed ({proc.returncode}): {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        logs.append(proc.stdout)
    best = min(range(1, runs), key=walls.__getitem__) if runs > 1 else 0
    phases = next((line.split("timings: ", 1)[1] for line in logs[best].splitlines() if "timings: " in line), None)
    runs_s = ", ".join(f"{w:.2f}" for w in walls)
    note = (
        f"{python} -m l2l_peft, process start to output written; runs {runs_s} s (the first fills the bytecode cache)"
    )
    return Row(name, arch, support, query, cli_s=walls[best], note=note + (f"; best: {phases}" if phases else ""))


# ---- the straightforward reference -----------------------------------------------------------


@dataclasses.dataclass
class Reference:
    """HF ViT + peft LoRA r=16 on q/v + linear head on CLS, accelerate bf16, AdamW, whole support per step."""

    steps: int = 100
    precision: str = "bf16"
    attention: str = "sdpa"
    fused: bool = False  # torch's own default on CUDA is the foreach AdamW
    host_support: bool = False  # support kept on the CPU and copied every step
    sync_every_step: bool = False  # loss.item() each step (logging)


def run_reference(
    name: str, arch: str, model_dir: Path, support: int, query: int, size: int, peak: float, ref: Reference
) -> Row:
    import peft
    from accelerate import Accelerator
    from transformers import AutoModel

    fresh_accelerate()
    reset_memory()
    start = time.perf_counter()
    accelerator = Accelerator(mixed_precision=ref.precision if ref.precision != "fp32" else "no")
    device = accelerator.device
    pooler = {} if arch.startswith("dinov2") else {"add_pooling_layer": False}  # DINOv2 has no pooler
    backbone = AutoModel.from_pretrained(model_dir, attn_implementation=ref.attention, **pooler)
    lora = peft.LoraConfig(r=16, lora_alpha=32, target_modules=find_target_modules(backbone, "qv"))
    backbone = peft.get_peft_model(backbone, lora)
    head = torch.nn.Linear(backbone.config.hidden_size, len(CLASSES))
    model = torch.nn.ModuleDict({"backbone": backbone, "head": head})
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=ref.fused or None)
    model, optimizer = accelerator.prepare(model, optimizer)
    sync()
    built = time.perf_counter()

    task = make_task(support, query, size)
    x = torch.stack([img for img, _ in task.support])
    y = torch.stack([label for _, label in task.support])
    if not ref.host_support:
        x, y = x.to(device), y.to(device)

    def loss_of(x, y):
        with accelerator.autocast():
            logits = model["head"](model["backbone"](pixel_values=x).last_hidden_state[:, 0])
            return F.cross_entropy(logits, y)

    train_start = time.perf_counter()
    for _ in range(ref.steps):
        loss = loss_of(x.to(device), y.to(device))
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        if ref.sync_every_step:
            loss.item()
    sync()
    trained = time.perf_counter()
    queries = torch.stack([item[0] for item in task.query])
    with torch.inference_mode(), accelerator.autocast():
        probs = [model["head"](model["backbone"](pixel_values=q.to(device)).last_hidden_state[:, 0]).softmax(-1)
                 for q in queries.split(256)]  # fmt: skip
        torch.cat(probs).float().cpu()
    done = time.perf_counter()
    memory = peak_memory_gb()

    with FlopCounterMode(display=False) as counter:
        accelerator.backward(loss_of(x.to(device), y.to(device)))
    optimizer.zero_grad()
    flops = counter.get_total_flops()
    seconds = trained - train_start
    rate = ref.steps * flops / seconds / 1e12
    return Row(
        name, arch, support, query, support, ref.steps, built - start, seconds, done - trained, seconds,
        done - start, None, ref.steps * support / seconds, flops / 1e9, rate, rate / peak, memory,
        note="straightforward peft + accelerate loop",
    )  # fmt: skip


# ---- the plan --------------------------------------------------------------------------------


def plan(smoke: bool) -> tuple[list[tuple], list[tuple], list[tuple]]:
    """(adapt rows, reference rows, CLI rows) as (name, arch, support, query, options)."""
    if smoke:
        small = dict(max_steps=3, min_steps=3)
        adapt = [
            ("smoke default", "tiny", 10, 20, small),
            ("smoke prefix", "tiny", 10, 20, {**small, "lora_last_blocks": 1}),
        ]
        return (
            adapt,
            [("smoke reference", "tiny", 10, 20, Reference(steps=3))],
            [("smoke cli", "tiny", 10, 20, ["--max-steps", "3"])],
        )
    archs = ("dinov2-s14", "vit-s16", "vit-b16", "vit-l16")
    adapt = [(f"default {a} s{s}", a, s, 500, {}) for a in archs for s in (10, 50, 200)]
    adapt += [
        (
            "S14 50: LoRA last 4 blocks (the CPU default)",
            "dinov2-s14",
            50,
            500,
            dict(method="lora", lora_last_blocks=4),
        ),
        ("default vit-b16 s500", "vit-b16", 500, 500, {}),
        ("default vit-b16 s50 q2000", "vit-b16", 50, 2000, {}),
        ("S14 50: LoRA alone (the default's first member)", "dinov2-s14", 50, 500, dict(method="lora")),
        ("S14 50: default, full member on the last 6 blocks", "dinov2-s14", 50, 500, dict(full_last_blocks=6)),
        ("B50: lora only", "vit-b16", 50, 500, dict(method="lora")),
        ("B50: full only", "vit-b16", 50, 500, dict(method="full")),
        ("B50: no CUDA graphs", "vit-b16", 50, 500, dict(cuda_graphs=False)),
        ("B50: float32 residual stream", "vit-b16", 50, 500, dict(storage="matmuls")),
        ("B50: no bf16 weight storage", "vit-b16", 50, 500, dict(storage="none")),
        ("B50: fp32 (no autocast), no graphs", "vit-b16", 50, 500, dict(precision="no", cuda_graphs=False)),
        ("B50: LoRA last 4 blocks, prefix cache", "vit-b16", 50, 500, dict(lora_last_blocks=4)),
        ("B50: LoRA last 4 blocks, no prefix cache", "vit-b16", 50, 500, dict(lora_last_blocks=4, prefix_views=0)),
        ("B200 batch 128", "vit-b16", 200, 500, dict(batch_size=128)),
        ("B200 batch 128, no graphs", "vit-b16", 200, 500, dict(batch_size=128, cuda_graphs=False)),
        ("B200 batch 128, float32 residual stream", "vit-b16", 200, 500, dict(batch_size=128, storage="matmuls")),
        ("L200 batch 128", "vit-l16", 200, 500, dict(batch_size=128)),
        ("L200 batch 200", "vit-l16", 200, 500, dict(batch_size=200)),
        ("L200 batch 128, float32 residual stream", "vit-l16", 200, 500, dict(batch_size=128, storage="matmuls")),
        ("S50 batch 50", "vit-s16", 50, 500, dict(batch_size=50)),
        ("B50 batch 50 (as reference), 100 steps", "vit-b16", 50, 500, dict(batch_size=50, min_steps=100)),
    ]
    ref = [
        ("reference B50", "vit-b16", 50, 500, Reference()),
        ("reference B50 fused AdamW", "vit-b16", 50, 500, Reference(fused=True)),
        ("reference B50 eager attention", "vit-b16", 50, 500, Reference(attention="eager")),
        ("reference B50 fp32", "vit-b16", 50, 500, Reference(precision="fp32")),
        ("reference B50 support on host", "vit-b16", 50, 500, Reference(host_support=True)),
        ("reference B50 sync every step", "vit-b16", 50, 500, Reference(sync_every_step=True)),
        ("reference B128", "vit-b16", 128, 500, Reference()),
        ("reference S50", "vit-s16", 50, 500, Reference()),
        ("reference S14 50", "dinov2-s14", 50, 500, Reference()),
        ("reference L200", "vit-l16", 200, 500, Reference()),
    ]
    cli = [(f"cli {a} s50", a, 50, 500, []) for a in archs]
    cli += [  # issue #27's 6-s CLI target: the two ways of cutting the second member's cost
        ("cli S14 50: LoRA alone", "dinov2-s14", 50, 500, ["--method", "lora"]),
        ("cli S14 50: full member on the last 6 blocks", "dinov2-s14", 50, 500, ["--full-last-blocks", "6"]),
    ]
    return adapt, ref, cli


def markdown(rows: list[Row], peak: float, device: str, command: str) -> str:
    lines = [
        f"Device: {device}; bf16 8192^3 matmul peak measured in this run: {peak:.0f} TFLOP/s.",
        f"Command: `{command}`",
        "",
        (
            "| row | support | query | batch | steps | load s | adapt s | predict s | train img/s | TFLOP/s | % peak "
            "| GPU GB | CLI s |"
        ),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if r.cli_s is not None:
            lines.append(f"| {r.name} | {r.support} | {r.query} | | | | | | | | | | {r.cli_s:.2f} |")
            continue
        lines.append(
            f"| {r.name} | {r.support} | {r.query} | {r.batch} | {r.steps} | {r.load_s:.2f} | {r.adapt_s:.2f} | "
            f"{r.predict_s:.2f} | {r.images_per_s:,.0f} | {r.tflops:.0f} | {100 * r.peak_fraction:.0f}% "
            f"| {r.memory_gb:.1f} | |"
        )
    phases = [f"- {r.name}: {r.note.split('; ', 1)[1]}" for r in rows if r.cli_s is not None and "; " in r.note]
    return "\n".join(lines + (["", "CLI phases (from its log):", *phases] if phases else [])) + "\n"


def main() -> None:
    # no abbreviations: run 9 passed `--model DIR`, which argparse took for --models and timed nothing of DIR
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_adapt"))
    parser.add_argument("--models", type=Path, default=Path("/tmp/bench_models"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny models and steps (checks the script, not speed)")
    parser.add_argument(
        "--cli-runs", type=int, default=3, help="processes per CLI row (the first fills the bytecode cache)"
    )
    parser.add_argument(
        "--cli-python", default=sys.executable, help="interpreter of the CLI rows (e.g. a slim_env.py venv)"
    )
    parser.add_argument("--only", default="", help="comma-separated: run only rows whose name contains one of these")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    size = 32 if args.smoke else 224
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    peak = matmul_peak(256 if args.smoke else 8192)
    print(f"{device}: matmul peak {peak:.0f} TFLOP/s", flush=True)
    pick = lambda rows: [r for r in rows if any(k in r[0] for k in args.only.split(","))]
    adapt_rows, ref_rows, cli_rows = map(pick, plan(args.smoke))
    # only the architectures of the picked rows: each costs a save and a warm-up run (ViT-L: many seconds)
    dirs = {
        arch: save_model(arch, args.models, size)
        for arch in dict.fromkeys(r[1] for r in adapt_rows + ref_rows + cli_rows)
    }
    for arch, directory in dirs.items():  # warm-up: CUDA context, cuBLAS handles, the cached pristine backbone
        api.run(load_task(make_task(10, 10, size)), model=str(directory), max_steps=2, min_steps=2)

    rows: list[Row] = []
    command = "python benchmarks/bench_adapt.py " + " ".join(sys.argv[1:])
    meta = {"device": device, "matmul_peak_tflops": peak, "command": command, "torch": torch.__version__}

    def record(name: str, measure) -> None:
        try:
            rows.append(measure())
            print(rows[-1], flush=True)
        except Exception as err:  # noqa: BLE001 - one failing row must not lose the others
            print(f"ROW FAILED {name}: {type(err).__name__}: {err}", flush=True)
        # rewritten after every row, so a run stopped by a time limit keeps what it measured
        (args.out / "bench_adapt.json").write_text(
            json.dumps({**meta, "rows": [dataclasses.asdict(r) for r in rows]}, indent=1)
        )
        (args.out / "bench_adapt.md").write_text(markdown(rows, peak, device, command))

    for name, arch, support, query, ref in ref_rows:
        record(name, functools.partial(run_reference, name, arch, dirs[arch], support, query, size, peak, ref))
    for name, arch, support, query, options in adapt_rows:
        options = dict(options)
        storage = options.pop("storage", "stream")
        measure = functools.partial(
            run_adapt, name, arch, dirs[arch], support, query, size, peak, args.repeats, options, storage=storage
        )
        record(name, measure)
    for name, arch, support, query, extra in cli_rows:
        runs = 2 if args.smoke else args.cli_runs
        measure = functools.partial(
            run_cli, name, arch, dirs[arch], support, query, size, args.models, extra, runs=runs, python=args.cli_python
        )
        record(name, measure)

    print(markdown(rows, peak, device, command))


if __name__ == "__main__":
    main()
