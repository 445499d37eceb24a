"""Do experiments and pretraining give the same results on 2 GPUs as on 1, and how much faster?

    python benchmarks/bench_multi_gpu.py --out /tmp/multi_gpu      # a machine with >= 2 GPUs, minutes

Experiments: one suite on the development data (`--data`, the shipped default backbone, the default
recipe) launched with 1 and with 2 processes. Rows and metrics must agree (tasks are sampled and
seeded by identity, not by rank), and tasks/s comes from the runner's own timing of its task loop,
so start-up and model load are not counted. With `--repeat`, the 1-process run is repeated, the
baseline for how far two runs may differ (run 9: not at all, every metric bit for bit).
Pretraining: the tiny recipe (configs/pretrain/vit_tiny_med.yaml) for `--steps` steps in each `--layouts`
entry (processes x images per process and step, DDP): images/s, and the loss at each logged step
against the first entry where the global batch is equal (1 x 512 vs 2 x 256).
Writes `multi_gpu.json` and prints a markdown summary. `--smoke` checks the script on the CPU
(2 gloo processes, one shot count, 4 pretraining steps): machinery only, no speed-up to expect.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from common import REPO

from l2l_peft.experiments.results import RESULTS, read_rows

THROUGHPUT = re.compile(r"ran (\d+) tasks in ([\d.]+)s on (\d+) process")


def free_port() -> int:
    """A port of this launch's own: another distributed job (or test) may hold accelerate's default 29500."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(processes: int, module: str, args: list[str], log: Path, cpu: bool) -> float:
    """`accelerate launch` on the first `processes` GPUs (or CPU processes); returns wall seconds, raises on failure."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no" if cpu else "bf16",
        "--dynamo_backend",
        "no",
        *(["--multi_gpu", "--main_process_port", str(free_port())] if processes > 1 else []),
        "-m",
        module,
        *args,
    ]
    # keeps the rest of the environment (NCCL_NVLS_ENABLE=0 on the GPU machines)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "" if cpu else ",".join(map(str, range(processes)))}
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}); see {log}\n{proc.stderr[-2000:]}")
    return seconds


def experiments(out: Path, data: Path, tasks: int, repeat: bool, smoke: bool) -> dict:
    config = {
        # the smoke run uses the committed 5.5 M backbone: the default is built by prefetch.py, and slow on a CPU
        "model": "l2l-vit-tiny-med" if smoke else None,
        "cpu": smoke,
        "suite": {
            "seed": 0,
            "shots": [1] if smoke else [1, 5, 10, 20],
            "tasks": tasks,
            "query_per_class": 2 if smoke else 10,
            "split": "test",
            "sources": [{"kind": "npz", "path": str(data), "exclude": ["lc25000_lung_histo"]}],
        },
        "methods": [{"name": "default", **({"params": {"max_steps": 2, "min_steps": 1}} if smoke else {})}],
    }
    path = out / "experiments.yaml"
    path.write_text(yaml.safe_dump(config))
    runs = {}
    for name, processes in [("1 GPU", 1), ("2 GPUs", 2)] + ([("1 GPU again", 1)] if repeat else []):
        run_dir = out / f"experiments_{name.replace(' ', '_')}"
        log = out / f"experiments_{name.replace(' ', '_')}.log"
        wall = launch(processes, "l2l_peft.experiments", [str(path), "--output", str(run_dir)], log, smoke)
        n, seconds, _ = THROUGHPUT.search(log.read_text()).groups()
        runs[name] = {"processes": processes, "wall_s": round(wall, 1), "tasks": int(n), "task_loop_s": float(seconds),
                      "tasks_per_s": int(n) / float(seconds), "rows": read_rows(run_dir / RESULTS)}  # fmt: skip
    reference = {(r["task"], r["variant"]): r["metrics"] for r in runs["1 GPU"]["rows"]}
    for name, run in runs.items():
        other = {(r["task"], r["variant"]): r["metrics"] for r in run.pop("rows")}
        run["same_rows"] = set(other) == set(reference)
        diffs = [abs(other[k][m] - v) for k, ms in reference.items() if k in other for m, v in ms.items()
                 if v is not None and other[k].get(m) is not None]  # fmt: skip
        run["max_metric_diff"] = max(diffs, default=0.0)
        run["metrics_differing"] = sum(d > 1e-6 for d in diffs)
        run["metrics_compared"] = len(diffs)
        run["speedup"] = run["tasks_per_s"] / runs["1 GPU"]["tasks_per_s"]
    return runs


def pretraining(
    out: Path, data: Path, steps: int, layouts: list[tuple[int, int]], seed: int, compile_: bool, smoke: bool
) -> dict:
    """Each (processes, images per process and step) layout; the first is the baseline of speed-up and loss."""
    base = yaml.safe_load((REPO / "configs" / "pretrain" / "vit_tiny_med.yaml").read_text())
    runs = {}
    for processes, per_process in layouts:
        name = f"{processes} GPU{'s' if processes > 1 else ''} x {per_process}"
        slug = name.replace(" ", "_")
        config = base | {
            "batch_size": per_process,
            "steps": steps,
            "seed": seed,
            "compile": compile_,
            "log_every": 1 if smoke else 25,
            "checkpoint_every": steps,
            "warmup_steps": 2 if smoke else 50,
            "sources": [{"kind": "npz", "path": str(data)}],
        }
        config |= {"image_size": 32, "patch_size": 8, "precision": "no"} if smoke else {}
        path = out / f"pretrain_{slug}.yaml"
        path.write_text(yaml.safe_dump(config))
        args = [str(path), "--output", str(out / f"pretrain_{slug}"), "--no-resume", *(["--cpu"] if smoke else [])]
        wall = launch(processes, "l2l_peft.pretrain", args, out / f"pretrain_{slug}.log", smoke)
        log = [json.loads(line) for line in (out / f"pretrain_{slug}" / "log.jsonl").read_text().splitlines()]
        runs[name] = {
            "processes": processes,
            "global_batch": processes * per_process,
            "wall_s": round(wall, 1),
            "loss": [r["loss"] for r in log],
            "steps": [r["step"] for r in log],
            "images_per_s": statistics.median(r["images_per_s"] for r in log[1:]),
        }  # fmt: skip (the first window holds warm-up)
    first = next(iter(runs.values()))
    for run in runs.values():
        run["speedup"] = run["images_per_s"] / first["images_per_s"]
        if run["global_batch"] == first["global_batch"]:  # the same optimisation: losses comparable step by step
            run["max_relative_loss_diff"] = max(abs(a - b) / a for a, b in zip(first["loss"], run["loss"]))
    return runs


def markdown(result: dict) -> str:
    lines = [f"Device: {result['device']}; torch {result['torch']}; command: `{result['command']}`"]
    if "experiments" in result:
        lines += [
            "",
            (
                "| experiments | processes | tasks | task loop s | tasks/s | speed-up | same rows "
                "| metrics differing / compared | max difference | wall s |"
            ),
            "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
        ]
    for name, r in result.get("experiments", {}).items():
        lines.append(
            f"| {name} | {r['processes']} | {r['tasks']} | {r['task_loop_s']:.1f} | {r['tasks_per_s']:.2f} "
            f"| {r['speedup']:.2f}x | {r['same_rows']} | {r['metrics_differing']} / {r['metrics_compared']} "
            f"| {r['max_metric_diff']:.2g} | {r['wall_s']} |"
        )
    if "pretraining" in result:
        lines += [
            "",
            (
                "| pretraining | global batch | median images/s | speed-up | largest loss difference to the first row "
                "| loss at each logged step | wall s |"
            ),
            "| --- | ---: | ---: | ---: | ---: | --- | ---: |",
        ]
    for name, r in result.get("pretraining", {}).items():
        losses = ", ".join(f"{x:.3f}" for x in r["loss"])
        diff = f"{r['max_relative_loss_diff']:.1%}" if "max_relative_loss_diff" in r else "(other batch)"
        lines.append(
            f"| {name} | {r['global_batch']} | {r['images_per_s']:,.0f} | {r['speedup']:.2f}x | {diff} | {losses} "
            f"| {r['wall_s']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="npz development data")
    parser.add_argument("--tasks", type=int, default=4, help="tasks per dataset x target x shots")
    parser.add_argument("--steps", type=int, default=300, help="pretraining steps")
    parser.add_argument("--layouts", default="1x512,2x256,1x256,2x512",
                        help="pretraining runs as PROCESSESxBATCH_PER_PROCESS; the first is the baseline")  # fmt: skip
    parser.add_argument("--compile", action="store_true", help="pretrain with PretrainConfig.compile")
    parser.add_argument(
        "--seed", type=int, default=0, help="pretraining seed (another seed shows the run-to-run spread of the loss)"
    )
    parser.add_argument("--repeat", action="store_true", help="repeat the 1-GPU experiments run")
    parser.add_argument("--only", default="experiments,pretraining")
    parser.add_argument("--smoke", action="store_true", help="CPU check of the script (1 task per cell, 4 steps)")
    args = parser.parse_args()
    layouts = [(1, 8), (2, 4)] if args.smoke else [tuple(map(int, x.split("x"))) for x in args.layouts.split(",")]
    needed = max([2 if "experiments" in args.only else 1] + [p for p, _ in layouts if "pretraining" in args.only])
    if not args.smoke and torch.cuda.device_count() < needed:
        sys.exit(f"needs {needed} GPUs, found {torch.cuda.device_count()}")
    args.out.mkdir(parents=True, exist_ok=True)
    device = "CPU (smoke)" if args.smoke else torch.cuda.get_device_name()
    result = {"device": device, "torch": torch.__version__, "command": " ".join(sys.argv)}
    if "experiments" in args.only:
        result["experiments"] = experiments(
            args.out, args.data.resolve(), 1 if args.smoke else args.tasks, args.repeat, args.smoke
        )
    if "pretraining" in args.only:
        steps = 4 if args.smoke else args.steps
        result["pretraining"] = pretraining(
            args.out, args.data.resolve(), steps, layouts, args.seed, args.compile, args.smoke
        )
    (args.out / "multi_gpu.json").write_text(json.dumps(result, indent=2))
    print(markdown(result))


if __name__ == "__main__":
    main()
