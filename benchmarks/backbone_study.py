"""Backbone objective study (issue #16): pretraining objectives compared on datasets held out of pretraining.

Held out by fold of datasets, so that one GPU session holds the whole study: every arm (a pretraining
config: supervised heads, DINO, both, both on ViT-small, both after a first stage on generated images, both
with a low-resolution first phase, the supervised recipe longer or on ViT-small)
is pretrained once per fold WITHOUT that fold's datasets, all runs at once on the GPU, with equal batch
and steps (STEPS_FACTOR: arms matched in work instead). Then each dataset's test tasks are adapted on the
fold backbone that never saw the dataset, with the default adapt() and a linear probe, on the random init
all arms start from and, where its model card says it never saw the dataset, on today's default backbone
(what a user gets now). Paired by task, every arm is compared with `--reference` (default: the supervised
arm, the current recipe); `--rows-from` adds earlier studies' rows; `--ship STEPS` then
pretrains each arm that passes the issue's rule on every dataset (same recipe, STEPS long: a default
should see at least as many images as today's) and exports it. Folds keep the
two BCCD datasets (one source) together. `--folds loo` makes each dataset its own fold (the issue's
leave-one-dataset-out: 11 runs per arm), for a machine of several GPUs.

    python benchmarks/backbone_study.py --data /tmp/data --work /tmp/study            # GPU, ~20 min
    python benchmarks/backbone_study.py --work results/backbone_study --analyse-only    # CPU: tables again

Outputs under --work: pretrain/ARM/FOLD (model, log.jsonl, card), eval/DATASET/ARM (experiment config
and results.jsonl), study.md and decision.json. A rerun keeps exported backbones and finished rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import common  # noqa: F401  (the checkout's l2l_peft first on sys.path)
import yaml

from l2l_peft.cache import REPO_CACHE, resolve_model
from l2l_peft.demo import pretraining_datasets
from l2l_peft.experiments.results import Aggregate, bootstrap, read_rows

FOLDS = {
    "A": ["bccd_multilabel", "wbc_type_bccd", "brain_tumor_mri", "covid_ct_ucsd"],
    "B": ["pbc_blood_cells", "alzheimer_mri_4class", "pneumoniamnist", "isic_skin_8class"],
    "C": ["lc25000_lung_histo", "kidney_ct_4class", "retinamnist", "lung_ultrasound_pocus"],
}
# --folds loo (the leave-one-dataset-out, 11 backbones per arm): each dataset is its own fold, except
# datasets of one source, held out together
SAME_SOURCE = [["bccd_multilabel", "wbc_type_bccd"]]
ARMS = {
    "supervised": "configs/pretrain/vit_tiny_med.yaml",
    "supervised_x3": "configs/pretrain/vit_tiny_med.yaml",  # with STEPS_FACTOR's longer schedule
    "ssl": "configs/pretrain/vit_tiny_ssl.yaml",
    "both": "configs/pretrain/vit_tiny_both.yaml",
    "both_small": "configs/pretrain/vit_tiny_both.yaml",  # size (item 4): `both` on ViT-small (ARM_SETTINGS)
    "proc_both": "configs/pretrain/vit_tiny_both.yaml",  # item 3: the same, continued from STAGE_ONE's backbone
    "both_lowres": "configs/pretrain/vit_tiny_both.yaml",  # the same, with the cheaper first phase of ARM_SETTINGS
    "supervised_small": "configs/pretrain/vit_tiny_med.yaml",  # size (item 4): the supervised recipe on ViT-small
}
# settings an arm changes in its config: both_lowres sees 112-px views (49 patches, not 196) for the first 3/4 of
# its schedule; at equal steps it costs 0.45 of `both`'s FLOPs (bench_pretrain.py --flops) but 0.75 of its time on
# one H200 (bench_pretrain.py, batched augmentation: small steps use the GPU less well)
# the *_small arms: ViT-small/16 (21.7 M parameters, 43 MB in bf16); their random reference is still the tiny init
ARM_SETTINGS = {
    "both_lowres": {"low_res_size": 112, "low_res_fraction": 0.75},
    "supervised_small": {"model_size": "small", "name": "l2l-vit-small-med"},
    "both_small": {"model_size": "small", "name": "l2l-vit-small-med-both"},
}
# arms whose length is not --steps, to match work (bench_pretrain.py --flops, per image of a step, supervised ViT-tiny
# = 1): supervised_x3 does about the work of `both` (3.44) at --steps, the compute-matched reference of run 4;
# supervised_small (3.96) trains 3/4 of --steps, about supervised_x3's work again
STEPS_FACTOR = {"supervised_x3": 3, "supervised_small": 0.75}
CURRENT_RECIPE = {"supervised", "supervised_x3"}  # references: judged like the others, never shipped
# pre-pretraining (item 3): the arm's first stage, on images made by formula. It sees no real image, so one run
# serves every fold; its extra steps (--stage-one-steps) are compute the other arms do not get.
STAGE_ONE = {"proc_both": "configs/pretrain/vit_tiny_procedural.yaml"}
REFERENCE = "supervised"
SHIPPED = "shipped"  # the home-made backbone of hf_cache, evaluated on the datasets its card says it never saw
HOME_MADE = "l2l-vit-tiny-med"
SHOTS = [5, 10]
# the rule for shipping: overall gain >= GAIN at every shot count with the CI above zero,
# no dataset's mean worse by more than WORST, and at least MIN_TASKS tasks in every evaluated cell
GAIN, WORST = 0.03, -0.03
MIN_TASKS = 8  # paired tasks per dataset and shot count before the rule may say yes (a cell with none: not sampled)
RESAMPLES = 2000


@dataclass
class Job:
    name: str
    command: list[str]
    after: list[str] = field(default_factory=list)  # jobs that must have ended well first
    after_start: list[str] = field(default_factory=list)  # jobs that must have started (or been skipped) first
    after_end: list[str] = field(default_factory=list)  # jobs that must have ended, well or not, first


def run_jobs(jobs: list[Job], logs: Path, parallel: int, gpus: int = 1) -> dict[str, int]:
    """Run each job once its `after` jobs exited 0, its `after_end` jobs ended and its `after_start` jobs left the
    queue, at most `parallel` at once; their exit codes.

    A job whose prerequisite failed is skipped (code -1). Each child gets its share of the CPU
    cores as its thread count: 12 evaluation processes with torch's default (every core each)
    spent 13-25 s loading a model and 12-35 s per adaptation on a 16-core H200 machine (first
    device run), against about 1 s alone. With several `gpus`, each child sees one of them
    (CUDA_VISIBLE_DEVICES), the one running the fewest children when it starts: runs sharing a GPU
    take turns on it, and a machine's device time counts the same for one GPU or eight.
    """
    logs.mkdir(parents=True, exist_ok=True)
    threads = str(max(1, (os.cpu_count() or 1) // max(1, min(parallel, len(jobs)))))
    env = os.environ | {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    pending, running, codes, on_gpu = list(jobs), {}, {}, {}
    listed = {job.name for job in jobs}
    while pending or running:
        for job in list(pending):
            after = [name for name in job.after if name in listed]  # the others ended in an earlier run
            queued = {other.name for other in pending}
            if any(codes.get(name, 0) != 0 for name in after):
                pending.remove(job)
                codes[job.name] = -1
                print(f"{time.strftime('%H:%M:%S')} {job.name}: skipped (a prerequisite failed)", flush=True)
            elif (
                len(running) < parallel
                and all(name in codes for name in [*after, *(n for n in job.after_end if n in listed)])
                and not queued & {*job.after_start}
            ):
                pending.remove(job)
                child_env = env
                if gpus > 1:
                    busy = [sum(on_gpu[name] == gpu for name in running) for gpu in range(gpus)]
                    on_gpu[job.name] = busy.index(min(busy))
                    child_env = env | {"CUDA_VISIBLE_DEVICES": str(on_gpu[job.name])}
                with open(logs / f"{job.name}.log", "w") as log:  # the child keeps its own copy
                    running[job.name] = subprocess.Popen(
                        job.command, stdout=log, stderr=subprocess.STDOUT, env=child_env
                    )
        for name, proc in list(running.items()):
            if proc.poll() is not None:
                codes[name] = running.pop(name).returncode
                print(f"{time.strftime('%H:%M:%S')} {name}: exit {codes[name]}", flush=True)
        time.sleep(2)
    return codes


def gpu_count() -> int:
    """GPUs this process may use (0 without CUDA); CUDA_VISIBLE_DEVICES narrows them as for any torch program."""
    import torch

    return torch.cuda.device_count()


def arm_config(arm: str, args: argparse.Namespace, stage_one: bool = False) -> Path:
    """The arm's config (or its first stage's) with this study's batch, warm-up and crops (equal across arms)."""
    config = yaml.safe_load(Path(STAGE_ONE[arm] if stage_one else ARMS[arm]).read_text())
    config.update(batch_size=args.batch, warmup_steps=args.warmup, checkpoint_every=args.steps, log_every=25)
    if not stage_one:
        config.update(ARM_SETTINGS.get(arm, {}))
    if "local_crops" in config:
        config["local_crops"] = args.local_crops
    if arm in STAGE_ONE and not stage_one:
        config["init_from"] = str(stage_one_dir(arm, args).resolve())
    path = args.work / "configs" / f"{arm}{'-stage1' if stage_one else ''}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def stage_one_dir(arm: str, args: argparse.Namespace) -> Path:
    return args.work / "pretrain" / arm / "stage1"


def pretrain_command(
    arm: str, exclude: list[str], output: Path, args: argparse.Namespace, steps: int | None = None,
    stage_one: bool = False,
) -> list[str]:  # fmt: skip
    config = arm_config(arm, args, stage_one)
    steps = round(args.steps * STEPS_FACTOR.get(arm, 1)) if steps is None else steps
    return [
        sys.executable, "-m", "l2l_peft.pretrain", str(config), "--npz-dir", str(args.data),
        "--exclude", *exclude, "--steps", str(steps),
        "--max-minutes", str(args.max_minutes),
        "--output", str(output), "--no-resume", "--log-level", "WARNING",
    ]  # fmt: skip


def pretrain_jobs(args: argparse.Namespace) -> list[Job]:
    """The random init every arm starts from (same seed), and each arm once per fold without that fold.

    A backbone exported by an earlier run of the same --work is kept: its job is left out. The whole
    fold is held out, also where --datasets picks some of it. An arm with a first stage (STAGE_ONE) runs it
    once, on generated images, and its fold runs wait for it.
    """
    root, held_out, chosen = args.work / "pretrain", fold_table(args), folds(args)
    wanted = [(Job("random", pretrain_command(REFERENCE, [], root / "random", args, steps=0)), root / "random")]
    for arm in args.arms:
        first = [f"{arm}-stage1"] if arm in STAGE_ONE else []
        if first:
            command = pretrain_command(arm, [], stage_one_dir(arm, args), args, args.stage_one_steps, stage_one=True)
            wanted.append((Job(first[0], command), stage_one_dir(arm, args)))
        for fold in chosen:
            command = pretrain_command(arm, held_out[fold], root / arm / fold, args)
            wanted.append((Job(f"{arm}-{fold}", command, after=first), root / arm / fold))
    return [job for job, output in wanted if not (output / "model.safetensors").is_file()]


def fold_table(args: argparse.Namespace) -> dict[str, list[str]]:
    """{fold: the datasets its backbones never see}: the three FOLDS, or one per dataset (SAME_SOURCE together)."""
    if args.folds == "three":
        return FOLDS
    grouped = {d: group for group in SAME_SOURCE for d in group}
    datasets = [d for ds in FOLDS.values() for d in ds]
    return {"+".join(grouped.get(d, [d])): grouped.get(d, [d]) for d in datasets}


def folds(args: argparse.Namespace) -> dict[str, list[str]]:
    """{fold: its datasets to evaluate} (all, or those of --datasets)."""
    known = json.loads((args.data / "manifest.json").read_text())
    table = fold_table(args)
    missing = sorted(set(known) - {d for ds in table.values() for d in ds})
    if missing:
        raise SystemExit(f"datasets {missing} are in no fold: add them to FOLDS")
    chosen = {f: [d for d in ds if args.datasets is None or d in args.datasets] for f, ds in table.items()}
    return {f: ds for f, ds in chosen.items() if ds}


def backbone_dir(arm: str, fold: str, args: argparse.Namespace) -> Path:
    """The backbone an evaluation of `arm` loads: today's default, the random init or the arm's fold run."""
    if arm == SHIPPED:
        return shipped_model()[0]
    pretrained = args.work.resolve() / "pretrain"
    return pretrained / "random" if arm == "random" else pretrained / arm / fold


def experiment_config(dataset: str, fold: str, arms: list[str], args: argparse.Namespace) -> dict:
    """Default adapt() and linear probe on the backbones of `arms` (fold runs, random init, today's default)."""
    backbones = {arm: backbone_dir(arm, fold, args) for arm in arms}
    return evaluation_config(dataset, args.data, args.tasks, SHOTS, {"adapt": backbones, "probe": backbones})


def evaluation_config(
    dataset: str, data: Path, tasks: int, shots: list[int], backbones: dict[str, dict[str, Path]]
) -> dict:
    """An experiments config: the test tasks of one dataset, `backbones` {"adapt" | "probe": {name: model
    directory}} each adapted with the default adapt() (variant adapt_NAME) or a linear probe (probe_NAME).
    Tasks derive from the suite seed and their identity, so every job of a study pairs by task."""
    kinds = {"adapt": "adapt", "probe": "linear_probe"}
    methods = [
        {"name": f"{prefix}_{name}", "kind": kinds[prefix], "params": {"model": str(model)}}
        for prefix, models in backbones.items()
        for name, model in models.items()
    ]
    return {
        "precision": "auto",
        "bootstrap": 200,
        "suite": {
            "seed": 0, "shots": shots, "tasks": tasks, "query_per_class": 15, "split": "test",
            "sources": [{"kind": "npz", "path": str(data.resolve()), "include": [dataset]}],
        },
        "methods": methods,
    }  # fmt: skip


def experiment_job(name: str, out: Path, config: dict, after: list[str]) -> Job:
    """A job running the experiments `config` (written to out/experiment.yaml) into `out` once `after` ended well."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "experiment.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    command = [sys.executable, "-m", "l2l_peft.experiments", str(out / "experiment.yaml"), "--output", str(out)]
    return Job(name, command, after)


@cache
def shipped_model() -> tuple[Path, list[str] | None]:
    """The backbone trained here (l2l-vit-tiny-med, the default until issue #27) and the datasets it was pretrained
    on (its card's Data table; None: unknown), read once (every evaluation job asks)."""
    location = Path(resolve_model(HOME_MADE, str(REPO_CACHE)).location)
    return location, pretraining_datasets(location)


def references(arm: str, dataset: str) -> list[str]:
    """The arms one evaluation job adapts: the reference job also runs the random init and, where it never saw
    the dataset, the home-made backbone that was the default before issue #27."""
    if arm != REFERENCE:
        return [arm]
    seen = shipped_model()[1]
    return [arm, "random"] + ([SHIPPED] if seen is not None and dataset not in seen else [])


def evaluation_jobs(args: argparse.Namespace, staged: list[str]) -> list[Job]:
    """One job per dataset and arm, started as soon as that arm's fold backbone exists and every
    pretraining run of a second stage (`staged`) is on the GPU.

    The supervised arm (with the random init) starts while the slower self-supervised arms still
    train. A second-stage run that started after twelve evaluations ran out of GPU memory (third
    device run: 15 GB each for six DINO runs plus 4-5 GB for each evaluation), so none starts before
    them. Tasks derive from the suite seed and their identity, so every job samples the same tasks
    and the rows pair by task across jobs.
    """
    jobs = []
    for fold, datasets in folds(args).items():
        for dataset in datasets:
            for arm in args.arms:
                arms = references(arm, dataset)
                config = experiment_config(dataset, fold, arms, args)
                after = [f"{arm}-{fold}"] + (["random"] if "random" in arms else [])
                job = experiment_job(f"eval-{dataset}-{arm}", args.work / "eval" / dataset / arm, config, after)
                jobs.append(dataclasses.replace(job, after_start=staged))
    return jobs


def scores(work: Path, earlier: Sequence[Path] = ()) -> dict[tuple[str, str, int], dict[str, float]]:
    """{(dataset, task, shots): {variant: AUROC}} over every evaluated dataset, `earlier` studies' rows first (this
    study's replace a variant they share); rows compressed for the repository (results.jsonl.gz) read the same."""
    table: dict[tuple[str, str, int], dict[str, float]] = defaultdict(dict)
    for path in [p for study in [*earlier, work] for p in sorted((study / "eval").rglob("results.jsonl*"))]:
        for row in read_rows(path):
            auroc = (row.get("metrics") or {}).get("auroc")
            if not row.get("error") and auroc is not None and math.isfinite(auroc):
                table[(row["dataset"], row["task"], row["shots"])][row["variant"]] = auroc
    return table


def compare(table, variant: str, reference: str, shots: int, dataset: str | None = None) -> Aggregate:
    """variant minus reference, paired by task (positive: the variant is better)."""
    diffs = [
        s[variant] - s[reference]
        for (d, _, n), s in table.items()
        if n == shots and (dataset is None or d == dataset) and variant in s and reference in s
    ]
    return bootstrap(diffs, resamples=RESAMPLES)


def runs(work: Path) -> list[str]:
    """One row per pretraining run: how far it got, its wall time and throughput (runs shared the GPU)."""
    lines = ["| run | steps | images | seconds | images/s at the end | loss |", "|---|---|---|---|---|---|"]
    for log in sorted([*work.glob("pretrain/*/*/log.jsonl"), *work.glob("ship/*/log.jsonl")]):
        last = json.loads(log.read_text().splitlines()[-1])  # the final step is always logged
        path = log.parent / "checkpoint" / "progress.json"  # not brought back from the device by every study
        progress = json.loads(path.read_text()) if path.is_file() else {"images": "n/a"} | last
        run = log.parent.relative_to(work)
        lines.append(
            f"| {run} | {progress['step']} | {progress['images']} | {progress['seconds']:.0f} "
            f"| {last['images_per_s']:.0f} | {last['loss']:.3f} |"
        )
    return lines


def verdict(
    cells: dict[tuple[int, str | None], Aggregate], evaluated: set[tuple[int, str]], *,
    gain: float = GAIN, worst_allowed: float = WORST, shots: Sequence[int] = SHOTS,
) -> dict:  # fmt: skip
    """The issue's rule on one arm's paired differences {(shots, dataset or None for all): arm minus reference}:
    every shot count's mean gain >= `gain` with the interval above zero, no dataset below `worst_allowed`.

    `evaluated`: the (shots, dataset) cells the reference has tasks in; an arm with fewer there (none:
    its backbone failed) cannot ship on the others alone.
    """
    overall = [cells[(n, None)] for n in shots]
    per_dataset = {key: c for key, c in cells.items() if key[1] is not None}
    worst = min((c.mean for c in per_dataset.values() if c.n), default=math.nan)
    short = sorted(
        f"{d} {n}-shot: {c.n}" for (n, d), c in per_dataset.items() if (n, d) in evaluated and c.n < MIN_TASKS
    )
    ships = all(o.mean >= gain and o.low > 0 for o in overall) and worst >= worst_allowed and not short
    return {"overall": [o.mean for o in overall], "low": [o.low for o in overall], "worst_dataset": worst,
            "too_few_tasks": short, "ships": ships}  # fmt: skip


def analyse(work: Path, arms: list[str], reference: str = REFERENCE, earlier: Sequence[Path] = ()) -> dict:
    """study.md and decision.json: each arm against `reference` (paired by task) and the baselines; the rule's
    verdicts. `earlier`: studies whose rows join this one's (arms evaluated there are not rerun)."""
    table = scores(work, earlier)
    datasets = sorted({d for d, _, _ in table})
    lines = [f"# Backbone objective study: {len(datasets)} held-out datasets, AUROC", ""]
    lines += [
        "Intervals are over tasks, each fold's backbone fixed: pretraining noise is not in them (a rerun of one",
        "arm moved its mean by up to 0.009: docs/pretraining.md, fifth run).",
        "",
    ]
    lines += [
        "## Mean AUROC [95% bootstrap CI over tasks]",
        "",
        "| variant | " + " | ".join(f"{n}-shot" for n in SHOTS) + " |",
    ]
    lines += ["|---" * (len(SHOTS) + 1) + "|"]
    present = {variant for s in table.values() for variant in s}
    baselines = [b for b in ("random", SHIPPED) if f"adapt_{b}" in present]
    variants = [f"{p}_{a}" for p in ("adapt", "probe") for a in [*arms, *baselines]]
    for v in variants:
        cells = [bootstrap([s[v] for (_, _, n), s in table.items() if n == shots and v in s], resamples=RESAMPLES)
                 for shots in SHOTS]  # fmt: skip
        lines.append(f"| {v} | " + " | ".join(c.format() for c in cells) + " |")
    decision = {}
    evaluated = {(n, d) for (d, _, n), s in table.items() if f"adapt_{reference}" in s}
    for prefix in ("adapt", "probe"):
        others = [a for a in [*arms, *baselines] if a != reference]
        lines += ["", f"## {prefix}: arm minus {prefix}_{reference}, paired by task (positive: the arm is better)", ""]
        lines += [
            "| arm | dataset | " + " | ".join(f"{n}-shot" for n in SHOTS) + " |",
            "|---|---" + "|---" * len(SHOTS) + "|",
        ]
        for arm in others:
            cells = {
                (n, d): compare(table, f"{prefix}_{arm}", f"{prefix}_{reference}", n, d)
                for d in [None, *datasets]
                for n in SHOTS
            }  # None: all datasets
            for dataset in [None, *datasets]:
                row = " | ".join(cells[(n, dataset)].format() for n in SHOTS)
                lines.append(f"| {arm} | {dataset or '**all**'} | {row} |")
            if prefix == "adapt" and arm not in baselines:
                decision[arm] = verdict(cells, evaluated)
    shipped = [SHIPPED] if SHIPPED in baselines else []
    pairs = [(arm, "random") for arm in [*arms, *shipped]] + [(arm, SHIPPED) for arm in arms if shipped]
    lines += [
        "",
        "## Minus a baseline, paired by task (probe: frozen features; today's default: datasets it never saw)",
    ]
    lines += ["", "| arm | baseline | " + " | ".join(f"{p} {n}-shot" for p in ("adapt", "probe") for n in SHOTS) + " |"]
    lines += ["|---|---" + "|---" * (2 * len(SHOTS)) + "|"]
    for arm, baseline in pairs:
        cells = [compare(table, f"{p}_{arm}", f"{p}_{baseline}", n) for p in ("adapt", "probe") for n in SHOTS]
        lines.append(f"| {arm} | {baseline} | " + " | ".join(c.format() for c in cells) + " |")
    rule = f"ships if every shot count gains >= {GAIN}, CI low > 0, no dataset < {WORST}, >= {MIN_TASKS} tasks a cell"
    return write_study(work, lines, decision, rule, "all at once on one GPU")


def write_study(work: Path, lines: list[str], decision: dict, rule: str, runs_note: str) -> dict:
    """study.md (`lines`, then the decision under `rule` and the pretraining runs) and decision.json; printed too."""
    lines += ["", f"## Decision ({rule})", "", "```", json.dumps(decision, indent=1), "```", ""]
    lines += [f"## Pretraining runs ({runs_note})", "", *runs(work), ""]
    (work / "study.md").write_text("\n".join(lines))
    (work / "decision.json").write_text(json.dumps(decision, indent=1) + "\n")
    print("\n".join(lines), flush=True)
    return decision


def ship(args: argparse.Namespace, decision: dict) -> None:
    """Pretrain every winning arm on all datasets for --ship steps (the evaluated recipe, nothing held out).

    Today's default saw 3.16 M images (6,200 steps x 512): a winner trained for the study's few hundred
    steps could be the better recipe and still the weaker backbone, hence its own length. The current
    recipe at other lengths (CURRENT_RECIPE) is a reference, never a new default.
    """
    jobs = [
        Job(f"ship-{arm}", pretrain_command(arm, [], args.work / "ship" / arm, args, steps=args.ship))
        for arm, verdict in decision.items()
        if verdict["ships"] and arm not in CURRENT_RECIPE
    ]
    if not jobs:
        print("no arm passes the rule: nothing to ship", flush=True)
        return
    codes = run_jobs(jobs, args.work / "logs", parallel=len(jobs), gpus=gpu_count())
    if any(codes.values()):
        raise SystemExit(f"ship pretraining failed: {codes}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="study folder (resumable)")
    parser.add_argument("--data", type=Path, default=Path("../shared/data"), help="development npz folder")
    parser.add_argument(  # default: the current recipe, it at three times the steps, and DINO beside it (runs 3-5)
        "--arms", nargs="+", default=["supervised", "supervised_x3", "both"], choices=list(ARMS)
    )
    parser.add_argument("--datasets", nargs="+", help="only these datasets (smoke runs)")
    parser.add_argument(
        "--folds", choices=["three", "loo"], default="three",
        help="three folds of four datasets (one GPU) or leave-one-dataset-out (11 runs per arm: several GPUs)",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=1000, help="pretraining steps (STEPS_FACTOR scales some arms)")
    parser.add_argument("--batch", type=int, default=256, help="pretraining images per step, every arm")
    parser.add_argument("--warmup", type=int, default=100, help="warm-up steps")
    parser.add_argument("--local-crops", type=int, default=4, help="DINO's small crops per image")
    parser.add_argument(
        "--stage-one-steps", type=int, default=400, help="pre-pretraining steps of the arms in STAGE_ONE (procedural)"
    )
    parser.add_argument(
        "--max-minutes", type=float, default=12.0, help="guard per pretraining run (compresses the schedule)"
    )
    parser.add_argument("--tasks", type=int, default=8, help="tasks per dataset and shot count")
    parser.add_argument("--jobs", type=int, default=6, help="evaluation processes at once (4-5 GB of GPU memory each)")
    parser.add_argument(
        "--ship", type=int, metavar="STEPS", help="pretrain the winning arms on every dataset for STEPS steps"
    )
    parser.add_argument("--analyse-only", action="store_true", help="only rebuild study.md from eval/")
    parser.add_argument(
        "--rows-from", nargs="+", type=Path, default=[], metavar="WORK",
        help="earlier studies (same data copy, steps and tasks) whose evaluated rows join this one's tables",
    )  # fmt: skip
    parser.add_argument(
        "--reference",
        default=REFERENCE,
        choices=list(ARMS),
        help="the arm every other is paired with and judged against",
    )
    args = parser.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    if not args.analyse_only:
        pretraining = pretrain_jobs(args)
        evaluations = evaluation_jobs(args, staged=[job.name for job in pretraining if job.after])
        parallel = len(pretraining) + args.jobs
        codes = run_jobs(pretraining + evaluations, args.work / "logs", parallel=parallel, gpus=gpu_count())
        if any(codes.values()):
            raise SystemExit(f"failed: { {k: v for k, v in codes.items() if v} } (logs in {args.work / 'logs'})")
    decision = analyse(args.work, args.arms, args.reference, args.rows_from)
    if args.ship is not None and not args.analyse_only:
        ship(args, decision)


if __name__ == "__main__":
    main()
