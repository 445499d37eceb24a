"""Continued pretraining from DINOv2 (issue #28): objectives compared on datasets held out of pretraining, by fold.

Each arm (configs/pretrain/dinov2_s14_*.yaml: the imported DINOv2 ViT-S/14 continued with supervised heads, DINO
self-distillation with DINOv2's crops, or both) is pretrained once per fold WITHOUT that fold's datasets (the train
and val rows of the other fold; test rows never reach pretraining), each run on the same wall-clock budget (its
cosine anneals over it), --concurrent runs at a time on the GPU. Each dataset's test tasks are then adapted on the
fold backbone that never saw it, with the default adapt() and a linear probe, against DINOv2 as imported (the
reference: it saw none of these datasets) and, for the frozen-feature goal, a random-init copy of the same
architecture (probe only). Paired by task with bootstrap intervals, per dataset and overall; the issue's ship rule
on the adapted default; `both_seed1` repeats `both` with another seed (pretraining noise).

    python benchmarks/continued_study.py --data /tmp/data --model /tmp/model --work /tmp/continued   # GPU
    python benchmarks/continued_study.py --work DIR --analyse-only                                  # tables again

--data is an unpacked data224 copy (pack224.py unpack), --model the imported DINOv2 (python prefetch.py).
Outputs under --work: random/ (the random-init copy), pretrain/ARM/FOLD (backbone, log.jsonl, card),
eval/DATASET/ARM (experiment config, results.jsonl), logs/, study.md and decision.json. A rerun keeps what exists.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import common  # noqa: F401  (the checkout's l2l_peft first on sys.path)
import yaml
from backbone_study import (
    RESAMPLES,
    Job,
    compare,
    evaluation_config,
    experiment_job,
    gpu_count,
    run_jobs,
    scores,
    verdict,
    write_study,
)

from l2l_peft.experiments.results import bootstrap

# Two folds of five, each with a blood-smear, a brain-MRI and a CT dataset (BCCD's two tasks, one source, together):
# a fold's backbones never see its datasets, which are evaluated on them.
FOLDS = {
    "A": ["bccd_multilabel", "wbc_type_bccd", "brain_tumor_mri", "isic_skin_8class", "kidney_ct_4class"],
    "B": ["pbc_blood_cells", "alzheimer_mri_4class", "lc25000_lung_histo", "lung_ultrasound_pocus", "covid_ct_ucsd"],
}
ARMS = {
    "both": "configs/pretrain/dinov2_s14_both.yaml",
    "ssl": "configs/pretrain/dinov2_s14_ssl.yaml",
    "supervised": "configs/pretrain/dinov2_s14_supervised.yaml",
    "both_seed1": "configs/pretrain/dinov2_s14_both.yaml",  # the same run with another seed: pretraining noise
}
ARM_SETTINGS = {"both_seed1": {"seed": 1}}
REPEATS = {"both_seed1": "both"}  # arm -> the arm it repeats
REFERENCE, RANDOM = "imported", "random"
SHOTS = [5, 10]
# the ship rule: +0.02 at 5 and 10 shots, interval above zero, no dataset worse by more than 0.02; its goal
# for frozen features: the probe beats a random-init copy by FROZEN_GOAL
GAIN, WORST, FROZEN_GOAL = 0.02, -0.02, 0.08


def fold_of(dataset: str) -> str:
    return next(fold for fold, datasets in FOLDS.items() if dataset in datasets)


def random_copy(model: Path, out: Path) -> Path:
    """The imported model's architecture with random weights (seed 0) and its preprocessing: the frozen-feature
    baseline of the issue's goal."""
    if not (out / "model.safetensors").is_file():
        import torch
        from transformers import AutoConfig, AutoModel

        torch.manual_seed(0)
        AutoModel.from_config(AutoConfig.from_pretrained(model)).save_pretrained(out)
        shutil.copy(model / "preprocessor_config.json", out / "preprocessor_config.json")
    return out


def pretrain_jobs(args: argparse.Namespace) -> list[Job]:
    """Each arm once per fold without that fold's datasets (the whole fold, also where --datasets picks part of it;
    folds with no studied dataset are not trained), at most --concurrent at once (a run starts when the one
    --concurrent places before it ended; GPU memory, not time, limits how many DINO runs share one card)."""
    jobs, needed = [], {fold_of(d) for d in studied(args)}
    for arm in args.arms:
        config = yaml.safe_load(Path(ARMS[arm]).read_text()) | ARM_SETTINGS.get(arm, {})
        config |= {"init_from": str(args.model.resolve()), "batch_size": args.batch, "steps": args.max_steps}
        path = args.work / "configs" / f"{arm}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        for fold, held_out in FOLDS.items():
            output = args.work / "pretrain" / arm / fold
            if fold not in needed or (output / "model.safetensors").is_file():
                continue
            command = [
                sys.executable, "-m", "l2l_peft.pretrain", str(path), "--npz-dir", str(args.data),
                "--exclude", *held_out, "--max-minutes", str(args.minutes),
                "--output", str(output), "--no-resume", "--log-level", "WARNING",
            ]  # fmt: skip
            jobs.append(Job(f"{arm}-{fold}", command))
    for i, job in enumerate(jobs[args.concurrent :]):
        job.after_end.append(jobs[i].name)
    return jobs


def studied(args: argparse.Namespace, narrow: bool = True) -> list[str]:
    """The datasets this study evaluates: FOLDS' that the data folder holds (all when it is not here: tables made
    elsewhere), narrowed by --datasets unless `narrow` is off (tables joined with --rows-from judge them all)."""
    manifest = None if args.data is None else args.data / "manifest.json"
    present = json.loads(manifest.read_text()) if manifest is not None and manifest.is_file() else None
    return [
        d for ds in FOLDS.values() for d in ds
        if (present is None or d in present) and (not narrow or args.datasets is None or d in args.datasets)
    ]  # fmt: skip


def evaluation_jobs(args: argparse.Namespace, random: Path) -> list[Job]:
    """The reference job of every dataset (imported DINOv2 adapted and probed, the random copy probed) at once, then
    arm by arm (in --arms order) one job per dataset once its fold's backbone exists: a run cut short by the GPU
    budget leaves whole arms unevaluated rather than whole datasets, so the arms it finished can still be judged."""
    imported, datasets = args.model.resolve(), studied(args)
    jobs = []
    for name in [REFERENCE, *args.arms]:
        for dataset in datasets:
            out = args.work / "eval" / dataset / name
            if (out / "results.jsonl").is_file():
                continue
            if name == REFERENCE:
                backbones, after = {"adapt": {name: imported}, "probe": {name: imported, RANDOM: random}}, []
            else:
                fold = fold_of(dataset)
                model = (args.work / "pretrain" / name / fold).resolve()
                backbones, after = {"adapt": {name: model}, "probe": {name: model}}, [f"{name}-{fold}"]
            config = evaluation_config(dataset, args.data, args.tasks, SHOTS, backbones)
            jobs.append(experiment_job(f"eval-{dataset}-{name}", out, config, after))
    return jobs


def _row(label: str, cells: list) -> str:
    return f"| {label} | " + " | ".join(c.format() for c in cells) + " |"


def analyse(work: Path, arms: list[str], datasets: list[str], earlier: Sequence[Path] = ()) -> dict:
    """study.md and decision.json: mean AUROC per variant; each arm minus the imported DINOv2 (adapted and probed),
    per dataset and overall; probes minus the random-init copy; the repeat seed; the ship rule's verdicts.

    `datasets`: those the study set out to evaluate; one without enough tasks (none: its jobs never ran) keeps
    every arm from shipping, as a failed arm's missing rows do. `earlier`: studies whose rows join this one's
    (this one's replace a variant's row of the same task), e.g. a fold finished in another session."""
    table = scores(work, earlier)
    missing = sorted(set(datasets) - {d for d, _, _ in table})
    datasets = sorted(datasets)
    shots = " | ".join(f"{n}-shot" for n in SHOTS)
    done = len(datasets) - len(missing)
    lines = [f"# Continued pretraining from DINOv2 ViT-S/14: {done} of {len(datasets)} held-out datasets, AUROC", ""]
    lines += ["Intervals: 95 % bootstrap over tasks, each fold's backbone fixed (pretraining noise: the seed rows).",
              ""]  # fmt: skip
    if missing:
        lines += [f"**Incomplete**: no evaluated task on {', '.join(missing)}.", ""]
    if earlier:
        lines += [f"Rows also from: {', '.join(map(str, earlier))} (its pretraining runs are in its own study.md).", ""]
    lines += ["## Mean AUROC", "", f"| variant | {shots} |", "|---" * (len(SHOTS) + 1) + "|"]
    present = {v for s in table.values() for v in s}
    for variant in [f"{p}_{a}" for p in ("adapt", "probe") for a in [REFERENCE, *arms, RANDOM]]:
        if variant in present:
            cells = [bootstrap([s[variant] for (_, _, n), s in table.items() if n == k and variant in s],
                               resamples=RESAMPLES) for k in SHOTS]  # fmt: skip
            lines.append(_row(variant, cells))
    decision = {}
    evaluated = {(n, d) for d in datasets for n in SHOTS}
    for prefix in ("adapt", "probe"):
        lines += ["", f"## {prefix}: arm minus {prefix}_{REFERENCE}, paired by task (positive: the arm is better)", ""]
        lines += [f"| arm | dataset | {shots} |", "|---|---" + "|---" * len(SHOTS) + "|"]
        for arm in arms:
            cells = {(n, d): compare(table, f"{prefix}_{arm}", f"{prefix}_{REFERENCE}", n, d)
                     for d in [None, *datasets] for n in SHOTS}  # fmt: skip
            for d in [None, *datasets]:
                lines.append(_row(f"{arm} | {d or '**all**'}", [cells[(n, d)] for n in SHOTS]))
            if prefix == "adapt":
                decision[arm] = verdict(cells, evaluated, gain=GAIN, worst_allowed=WORST, shots=SHOTS)
    lines += ["", f"## Frozen features: probe minus probe_{RANDOM} (goal: >= +{FROZEN_GOAL})", ""]
    lines += [f"| backbone | {shots} |", "|---" * (len(SHOTS) + 1) + "|"]
    for arm in [REFERENCE, *arms]:
        lines.append(_row(arm, [compare(table, f"probe_{arm}", f"probe_{RANDOM}", n) for n in SHOTS]))
    repeats = {arm: of for arm, of in REPEATS.items() if arm in arms and of in arms}
    if repeats:
        lines += ["", "## Pretraining noise: a repeat minus the arm it repeats (another seed)", ""]
        lines += [f"| repeat | {' | '.join(f'{p} {n}-shot' for p in ('adapt', 'probe') for n in SHOTS)} |"]
        lines += ["|---" * (2 * len(SHOTS) + 1) + "|"]
        for arm, of in repeats.items():
            cells = [compare(table, f"{p}_{arm}", f"{p}_{of}", n) for p in ("adapt", "probe") for n in SHOTS]
            lines.append(_row(f"{arm} - {of}", cells))
    rule = f"ships if every shot count gains >= {GAIN}, CI low > 0, no dataset < {WORST}"
    return write_study(work, lines, decision, rule, "several at once on one GPU")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="study folder (resumable)")
    parser.add_argument("--data", type=Path, help="unpacked data224 folder (needed unless --analyse-only)")
    parser.add_argument("--model", type=Path, help="the imported DINOv2 directory (needed unless --analyse-only)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--datasets", nargs="+", help="evaluate only these (smoke runs); folds stay whole")
    parser.add_argument("--minutes", type=float, default=2.0, help="wall-clock budget of each pretraining run")
    parser.add_argument("--max-steps", type=int, default=5000, help="steps cap (the budget ends runs first)")
    parser.add_argument("--batch", type=int, default=64, help="pretraining images per step, every arm")
    parser.add_argument("--concurrent", type=int, default=3, help="pretraining runs at once")
    parser.add_argument("--jobs", type=int, default=4, help="evaluation processes at once (4-5 GB of GPU memory each)")
    parser.add_argument("--tasks", type=int, default=8, help="tasks per dataset and shot count")
    parser.add_argument("--analyse-only", action="store_true", help="only rebuild study.md from eval/")
    parser.add_argument(
        "--rows-from", nargs="+", type=Path, default=[], metavar="WORK",
        help="earlier studies whose rows join this one's tables (e.g. the other fold, run in another session)",
    )  # fmt: skip
    args = parser.parse_args()
    if not args.analyse_only and (args.data is None or args.model is None):
        parser.error("--data and --model are needed to run the study (only --analyse-only goes without)")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    if not args.analyse_only:
        random = random_copy(args.model, args.work / RANDOM)
        jobs = pretrain_jobs(args) + evaluation_jobs(args, random.resolve())
        codes = run_jobs(jobs, args.work / "logs", parallel=args.concurrent + args.jobs, gpus=gpu_count())
        failed = {k: v for k, v in codes.items() if v}
        if failed:  # the tables still show what finished
            print(f"failed: {failed} (logs in {args.work / 'logs'})", flush=True)
    analyse(args.work, args.arms, studied(args, narrow=not args.rows_from), args.rows_from)


if __name__ == "__main__":
    main()
