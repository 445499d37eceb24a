"""PNG plots of a results file: metric vs shots per method, per-dataset bars, time per task, metric vs cost."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on cluster nodes
import matplotlib.pyplot as plt
import numpy as np

from .results import Aggregate, aggregate


def _errors(aggs: list[Aggregate]) -> np.ndarray:
    return np.array([[a.mean - a.low, a.high - a.mean] for a in aggs]).T


def metric_vs_shots(rows: list[dict[str, Any]], path: Path, *, metric: str, resamples: int) -> None:
    stats = aggregate(
        [r for r in rows if r.get("shots") is not None], [metric], resamples=resamples, by=("variant", "shots")
    )
    variants = list(dict.fromkeys(v for v, _ in stats))
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, variant in enumerate(variants):
        points = sorted((s, a[metric]) for (v, s), a in stats.items() if v == variant and a[metric].n)
        if points:
            shots, aggs = zip(*points)
            dodge = 1.04 ** (i - (len(variants) - 1) / 2)  # side by side, so the intervals stay readable
            ax.errorbar(
                [s * dodge for s in shots],
                [a.mean for a in aggs],
                yerr=_errors(list(aggs)),
                marker="o",
                capsize=3,
                label=variant,
            )
    ax.set_xscale("log")
    ax.minorticks_off()
    ticks = sorted({s for _, s in stats})
    ax.set_xticks(ticks, labels=[str(s) for s in ticks])
    ax.set(xlabel="shots per class", ylabel=f"{metric} (mean over tasks, 95% CI)", title=f"{metric} vs shots")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _bars(ax: Any, groups: list[str], variants: list[str], stats: dict[tuple, Aggregate]) -> None:
    width = 0.8 / max(len(variants), 1)
    x = np.arange(len(groups))
    for i, variant in enumerate(variants):
        aggs = [stats.get((variant, g)) for g in groups]
        means = [a.mean if a and a.n else np.nan for a in aggs]
        errs = _errors([a if a and a.n else Aggregate(np.nan, np.nan, np.nan, 0) for a in aggs])
        ax.bar(x + (i - (len(variants) - 1) / 2) * width, means, width, yerr=errs, capsize=2, label=variant)
    ax.set_xticks(x, labels=groups, rotation=20, ha="right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)


def per_dataset(rows: list[dict[str, Any]], path: Path, *, metric: str, resamples: int) -> None:
    named = [{**r, "group": f"{r['dataset']}/{r['target']}"} for r in rows]
    agg = aggregate(named, [metric], resamples=resamples, by=("variant", "group"))
    stats = {k: v[metric] for k, v in agg.items()}
    groups = list(dict.fromkeys(g for _, g in stats))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups)), 4))
    _bars(ax, groups, list(dict.fromkeys(v for v, _ in stats)), stats)
    ax.set(ylabel=f"{metric} (mean over tasks and shots, 95% CI)", title=f"{metric} per dataset")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def time_per_task(rows: list[dict[str, Any]], path: Path, *, resamples: int) -> None:
    agg = aggregate(rows, ["adapt_s", "predict_s"], resamples=resamples, by=("variant",))
    variants = [v for (v,) in agg]
    stats = {(v, phase): agg[(v,)][f"{phase}_s"] for v in variants for phase in ("adapt", "predict")}
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(variants)), 4))
    _bars(ax, variants, ["adapt", "predict"], {(p, v): a for (v, p), a in stats.items()})
    ax.set(ylabel="seconds per task (mean, 95% CI)", title="time per task")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def metric_vs_cost(rows: list[dict[str, Any]], path: Path, *, metric: str, resamples: int) -> None:
    """One line per variant: its score over all tasks, labelled with what it costs (parameters, time)."""
    agg = aggregate(rows, [metric, "adapt_s", "trainable_parameters"], resamples=resamples, by=("variant",))
    shown = [(v, a) for (v,), a in agg.items() if a[metric].n][::-1]  # first variant on top
    labels = [
        f"{v} ({a['trainable_parameters'].mean / 1e3:,.1f}k params, {a['adapt_s'].mean:.1f} s)"
        if a["trainable_parameters"].n
        else v
        for v, a in shown
    ]
    fig, ax = plt.subplots(figsize=(7, 1.5 + 0.35 * len(shown)))
    ax.errorbar(
        [a[metric].mean for _, a in shown],
        range(len(shown)),
        xerr=_errors([a[metric] for _, a in shown]),
        fmt="o",
        capsize=3,
    )
    ax.set_yticks(range(len(shown)), labels=labels, fontsize=8)
    ax.set(xlabel=f"{metric} (mean over all tasks, 95% CI)", title=f"{metric} and cost per method")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_plots(rows: list[dict[str, Any]], directory: Path, *, metric: str, resamples: int) -> list[Path]:
    paths = [
        directory / f"{metric}_vs_shots.png",
        directory / f"{metric}_per_dataset.png",
        directory / "time_per_task.png",
        directory / f"{metric}_vs_cost.png",
    ]
    metric_vs_shots(rows, paths[0], metric=metric, resamples=resamples)
    per_dataset(rows, paths[1], metric=metric, resamples=resamples)
    time_per_task(rows, paths[2], resamples=resamples)
    metric_vs_cost(rows, paths[3], metric=metric, resamples=resamples)
    return paths
