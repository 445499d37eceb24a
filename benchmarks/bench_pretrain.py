"""What a pretraining step costs per recipe, each run alone: the backbone study's arms in images/s.

    python benchmarks/bench_pretrain.py --data /tmp/data --out /tmp/bench_pretrain      # GPU, about 2 min

The backbone study runs its arms at once on one GPU, where runs take turns and no run's rate is its own;
its plans rest on what a step costs (`--flops`: a DINO image 3.44 supervised ones, a 112-px one 0.93)
and need the rates those become on the GPU. This measures them: each arm (`--arms`, configs exactly as
the study writes them: batch, warm-up, crops) pretrains `--steps` steps alone, and the log's images/s per
`--log-every` steps, the first window left out (start-up, cuDNN and allocator warm-up), gives the median
rate; both_lowres gets one for its 112-px phase and one for its 224-px phase, whose first window is left out
too (new shapes: allocator warm-up and, with `--compile`, compilation again). Work per image is
relative to the supervised arm. Writes `bench_pretrain.json` (with the command and configs) and prints
a markdown table. `--smoke` checks the script on the CPU with a tiny ViT at 32 px: machinery, not speed.

`--flops` counts instead of timing (any machine, the real models): one step of each arm and phase in
this process under torch's FlopCounterMode (matrix products, forward and backward, teacher included;
augmentation and the EMA are not counted), per image of the batch.

    python benchmarks/bench_pretrain.py --flops --batch 24 --out /tmp/bench_pretrain    # CPU, about 20 s
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import yaml
from backbone_study import ARMS, arm_config

SMOKE = {  # a tiny ViT at 32 px, so that every arm runs on the CPU in seconds
    "image_size": 32, "patch_size": 8, "local_crop_size": 16, "cpu": True, "ssl_hidden_dim": 32,
    "ssl_bottleneck_dim": 16, "ssl_out_dim": 64,
    "vit_overrides": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37},
}  # fmt: skip


def study_config(arm: str, args: argparse.Namespace) -> tuple[Path, dict]:
    """The arm's config as the backbone study writes it (batch, warm-up, crops), logging every --log-every steps;
    with --smoke, on a tiny ViT at 32 px."""
    study = argparse.Namespace(work=args.out, batch=args.batch, warmup=args.warmup, local_crops=args.local_crops,
                               steps=args.steps)  # fmt: skip
    path = arm_config(arm, study)
    config = yaml.safe_load(path.read_text()) | {"log_every": args.log_every}
    if args.compile:
        config["compile"] = True
    if args.smoke:
        config |= SMOKE | ({"low_res_size": 16} if config.get("low_res_size") else {})
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, config


def measure(arm: str, args: argparse.Namespace) -> dict:
    """Pretrain `arm` alone for --steps; median images/s of each phase from its log (first window left out)."""
    path, config = study_config(arm, args)
    output = args.out / "runs" / arm
    command = [
        sys.executable, "-m", "l2l_peft.pretrain", str(path), "--npz-dir", str(args.data), "--steps", str(args.steps),
        "--output", str(output), "--no-resume", "--log-level", "WARNING",
    ]  # fmt: skip
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    lines = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()][1:]
    switch = config.get("low_res_fraction", 1.0) * args.steps if config.get("low_res_size") else 0
    # a window that spans the switch mixes both phases: left out
    low = [r["images_per_s"] for r in lines if r["step"] <= switch]
    full = [r["images_per_s"] for r in lines if r["step"] - args.log_every >= switch][1 if switch else 0 :]
    result = {"arm": arm, "config": config, "images_per_s": statistics.median(full) if full else None}
    if config.get("low_res_size"):
        result["low_res_images_per_s"] = statistics.median(low) if low else None
    return result


def step_flops(arm: str, args: argparse.Namespace) -> dict:
    """GFLOPs per image of one training step of `arm`, per phase (both_lowres: its low-resolution and full-size
    steps), counted in this process on the CPU."""
    import dataclasses
    import tempfile

    from torch.utils.flop_counter import FlopCounterMode

    from l2l_peft.pretrain.config import load_config
    from l2l_peft.pretrain.loop import pretrain
    from l2l_peft.runtime import make_accelerator

    config = load_config(study_config(arm, args)[0], npz_dir=str(args.data), steps=1, cpu=True)
    phases = {"full": {"low_res_size": None}}
    if config.low_res_size:
        phases = {"low": {"low_res_fraction": 1.0}} | phases
    result = {"arm": arm}
    for phase, changes in phases.items():
        with tempfile.TemporaryDirectory() as output, FlopCounterMode(display=False) as counter:
            phase_config = dataclasses.replace(config, **changes)
            pretrain(phase_config, Path(output), accelerator=make_accelerator(phase_config.precision, cpu=True))
        result[f"gflops_per_image_{phase}"] = counter.get_total_flops() / args.batch / 1e9
    return result


def markdown(results: list[dict]) -> str:
    base = next((r["images_per_s"] for r in results if r["arm"] == "supervised"), None)
    lines = ["| arm | images/s | work per image (supervised = 1) |", "|---|---|---|"]
    for r in results:
        phases = [("", r["images_per_s"])]
        if "low_res_images_per_s" in r:
            side = r["config"]["low_res_size"]
            phases = [(f" ({side} px phase)", r["low_res_images_per_s"]), (" (full-size phase)", r["images_per_s"])]
        for label, rate in phases:
            work = f"{base / rate:.2f}" if base and rate else "-"
            lines.append(f"| {r['arm']}{label} | {rate or '-'} | {work} |")
    return "\n".join(lines)


def flops_markdown(results: list[dict]) -> str:
    """GFLOPs per image and phase, and relative to a supervised image."""
    base = next((r["gflops_per_image_full"] for r in results if r["arm"] == "supervised"), None)
    lines = ["| arm | phase | GFLOPs per image | supervised = 1 |", "|---|---|---|---|"]
    for r in results:
        for phase in ("low", "full"):
            value = r.get(f"gflops_per_image_{phase}")
            if value is not None:
                relative = f"{value / base:.2f}" if base else "-"
                lines.append(f"| {r['arm']} | {phase} | {value:.2f} | {relative} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"), help="development npz folder")
    parser.add_argument("--arms", nargs="+", default=["supervised", "both", "both_lowres"], choices=list(ARMS))
    parser.add_argument("--steps", type=int, default=120, help="steps per arm (both_lowres: 3/4 of them at 112 px)")
    parser.add_argument("--log-every", type=int, default=10, help="steps per throughput window")
    parser.add_argument("--batch", type=int, default=256, help="images per step (the study's)")
    parser.add_argument("--warmup", type=int, default=10, help="warm-up steps")
    parser.add_argument("--local-crops", type=int, default=4, help="DINO's small crops per image (the study's)")
    parser.add_argument("--smoke", action="store_true", help="CPU check: tiny ViT at 32 px")
    parser.add_argument("--flops", action="store_true", help="count GFLOPs per image and phase instead of timing")
    parser.add_argument("--compile", action="store_true", help="torch.compile the models (PretrainConfig.compile)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.flops:
        results = [step_flops(arm, args) for arm in args.arms]
        (args.out / "flops.json").write_text(json.dumps({"command": sys.argv, "results": results}, indent=1) + "\n")
        print(flops_markdown(results), flush=True)
        return
    results = [measure(arm, args) for arm in args.arms]
    record = {"command": sys.argv, "results": results}
    (args.out / "bench_pretrain.json").write_text(json.dumps(record, indent=1) + "\n")
    print(markdown(results), flush=True)


if __name__ == "__main__":
    main()
