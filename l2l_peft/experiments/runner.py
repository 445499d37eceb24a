"""Run every method variant on every task of a suite; one process or many, same rows.

    accelerate launch -m l2l_peft.experiments configs/experiments/dev_suite.yaml --output runs/dev

Each process adapts whole tasks (task i of a round goes to rank i; no DDP inside a task). After
each round the main process gathers the rows and appends them to results.jsonl, so a killed run
loses at most one round and a rerun skips what is finished. Task sampling and adapt seeds derive
from the task's identity, never from the rank, so the number of processes does not change results.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import subprocess
import sys
import time
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from ..config import AdaptConfig, make_config
from ..runtime import make_accelerator, set_up_logging
from .config import ExperimentConfig, load_config
from .methods import Variant, build_variants
from .metrics import task_metrics
from .plots import write_plots
from .results import RESULTS, append_rows, finished, read_rows
from .suites import Suite, TaskSpec
from .summary import write_summary

logger = logging.getLogger("l2l_peft.experiments")

PACKAGES = ["l2l-peft", "torch", "transformers", "peft", "accelerate", "torchcross", "torchmetrics", "medimeta"]


def _finite_or_none(metrics: dict[str, float]) -> dict[str, float | None]:
    return {k: (None if math.isnan(v) else v) for k, v in metrics.items()}  # NaN -> null: strict JSON


def _peak_memory_mb(accelerator: Accelerator, reset: bool) -> float | None:
    if accelerator.device.type != "cuda":
        return None
    if reset:
        torch.cuda.reset_peak_memory_stats(accelerator.device)
        return None
    return torch.cuda.max_memory_allocated(accelerator.device) / 2**20


def run_task(
    suite: Suite, spec: TaskSpec, variants: list[Variant], base: AdaptConfig, accelerator: Accelerator
) -> list[dict[str, Any]]:
    """One row per variant; a failing variant (or task) becomes a row with its error, not a crash."""
    common = dict(
        task=spec.key,
        dataset=spec.dataset,
        target=spec.target,
        shots=spec.shots,
        index=spec.index,
        rank=accelerator.process_index,
    )
    try:
        data, labels = suite.build(spec)
    except Exception as err:  # noqa: BLE001 - recorded per row and retried on rerun
        logger.warning("task %s cannot be built: %s", spec.key, err)
        return [dict(common, variant=v.name, method=v.method, error=f"{type(err).__name__}: {err}") for v in variants]
    rows = []
    for variant in variants:
        row = dict(
            common, variant=variant.name, method=variant.method, kind=variant.kind.value, params=variant.params,
            target_type=data.target.name.lower(), n_support=len(data.support_labels), n_query=len(labels), error=None,
        )  # fmt: skip
        _peak_memory_mb(accelerator, reset=True)
        try:
            result = variant.run(data, base, seed=spec.seed, dataset=spec.dataset)
            row.update(
                metrics=_finite_or_none(task_metrics(data.target, result.probabilities, labels)),
                adapt_s=result.timings.get("adapt"), predict_s=result.timings.get("predict"),
                load_s=result.timings.get("load"), peak_gpu_mb=_peak_memory_mb(accelerator, reset=False),
                steps=result.train.steps if result.train else None, trainable_parameters=result.trainable_parameters,
                precision=result.precision, seed=result.config.seed,
            )  # fmt: skip
        except Exception as err:  # noqa: BLE001 - one method failing on one task must not end the run
            logger.warning("%s on %s failed: %s: %s", variant.name, spec.key, type(err).__name__, err)
            row["error"] = f"{type(err).__name__}: {err}"
        rows.append(row)
    return rows


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def _source_digest() -> str:
    """sha256 of the package's Python sources: identifies the code where a checkout's git state cannot
    (a copied working tree can carry an older .git, as the GPU machine's does)."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def resolved_config(
    config: ExperimentConfig, variants: list[Variant], base: AdaptConfig, accelerator: Accelerator, n_tasks: int
) -> dict[str, Any]:
    return {
        "config": dataclasses.asdict(config),
        "variants": {v.name: v.config(base, seed=0).to_dict() for v in variants},  # seed: + each task's seed
        "tasks": n_tasks,
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "device": str(accelerator.device),
        "git_commit": _git_commit(),
        "source_sha256": _source_digest(),
        "versions": _versions(),
        "python": sys.version.split()[0],
        "command": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


HISTORY = "config.history.jsonl"


def run_experiment(config: ExperimentConfig, output: Path) -> Path:
    """Run (or resume) the experiment into `output`; returns the results file."""
    base = AdaptConfig(model=config.model, cache_dir=config.cache_dir, precision=config.precision, cpu=config.cpu)
    base = make_config(base, **config.defaults)
    accelerator = make_accelerator(base.precision, cpu=base.cpu)
    variants = build_variants(config.methods, base)
    if config.reference is not None and config.reference not in {v.name for v in variants}:
        raise ValueError(f"reference {config.reference!r} is not a variant; variants: {[v.name for v in variants]}")
    reference = config.reference or variants[0].name  # from the config, not the row order a resume may shuffle
    suite = Suite(config.suite)
    results = output / RESULTS
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    done = finished(read_rows(results))  # read by every rank before any rank writes
    todo = [(s, [v for v in variants if (s.key, v.name) not in done]) for s in suite.specs]
    todo = [(s, vs) for s, vs in todo if vs]
    if accelerator.is_main_process:
        resolved = resolved_config(config, variants, base, accelerator, len(suite.specs))
        (output / "config.resolved.json").write_text(json.dumps(resolved, indent=2, default=str))
        with (output / HISTORY).open("a") as f:  # every invocation, so resumed rows keep their provenance
            f.write(json.dumps(resolved | {"tasks_to_run": len(todo)}, default=str) + "\n")
        logger.info(
            "%d tasks x %d variants; %d tasks to run on %d process(es)",
            len(suite.specs),
            len(variants),
            len(todo),
            accelerator.num_processes,
        )
    world, rank = accelerator.num_processes, accelerator.process_index
    progress = tqdm(total=len(todo), desc="tasks", disable=not accelerator.is_main_process)
    start_time = time.monotonic()
    for start in range(0, len(todo), world):
        mine = todo[start + rank] if start + rank < len(todo) else None
        rows = run_task(suite, mine[0], mine[1], base, accelerator) if mine else []
        rows = gather_object(rows)  # rank order = task order, whatever the world size
        if accelerator.is_main_process:
            append_rows(results, rows)
        progress.update(min(world, len(todo) - start))
    progress.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        seconds = time.monotonic() - start_time
        logger.info(
            "ran %d tasks in %.1fs on %d process(es): %.2f tasks/s",
            len(todo),
            seconds,
            world,
            len(todo) / max(seconds, 1e-9),
        )
        rows = read_rows(results)
        write_summary(
            rows, output / "summary.md", metric=config.metric, resamples=config.bootstrap, reference=reference
        )
        write_plots(rows, output, metric=config.metric, resamples=config.bootstrap)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m l2l_peft.experiments", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path, help="experiment YAML (see configs/)")
    parser.add_argument("--output", type=Path, required=True, help="run directory: results.jsonl, summary.md, plots")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    set_up_logging(args.log_level, stream=sys.stderr)
    warnings.filterwarnings("ignore", module="torchmetrics")  # single-class queries: handled as NaN
    config = load_config(args.config)
    run_experiment(config, args.output)
    return 0
