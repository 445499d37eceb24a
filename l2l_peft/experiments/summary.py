"""summary.md: the headline metric per dataset x shots x method, then every metric and timing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .results import aggregate, paired_differences

METRICS = ["auroc", "accuracy", "balanced_accuracy", "mae", "qwk", "mse"]
TIMINGS = ["adapt_s", "predict_s", "peak_gpu_mb"]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _shots(value: Any) -> str:
    return "given" if value is None else str(value)


def headline(rows: list[dict[str, Any]], metric: str, resamples: int) -> list[str]:
    """One table per dataset x target: methods down, shots across."""
    stats = aggregate(rows, [metric], resamples=resamples)
    variants = list(dict.fromkeys(g[0] for g in stats))
    lines = []
    for dataset, target in dict.fromkeys((g[1], g[2]) for g in stats):
        shots = list(dict.fromkeys(g[3] for g in stats if g[1:3] == (dataset, target)))
        body = [
            [v]
            + [
                stats[(v, dataset, target, s)][metric].format() if (v, dataset, target, s) in stats else "–"
                for s in shots
            ]
            for v in variants
        ]
        lines += [f"### {dataset} / {target}", "", *_table(["method"] + [f"{_shots(s)}-shot" for s in shots], body), ""]
    return lines


def _by_shots(stats: dict[tuple, Any], cell: Callable[[Any], str]) -> list[str]:
    """Variants down, shots across, from {(variant, shots): value}."""
    variants = list(dict.fromkeys(v for v, _ in stats))
    shots = sorted(dict.fromkeys(s for _, s in stats), key=lambda s: -1 if s is None else s)
    body = [[v] + [cell(stats[(v, s)]) if (v, s) in stats else "–" for s in shots] for v in variants]
    return _table(["method"] + [f"{_shots(s)}-shot" for s in shots], body)


def suite_means(rows: list[dict[str, Any]], metric: str, resamples: int) -> list[str]:
    """Mean over every task of the suite (all datasets and targets) per method x shots."""
    stats = aggregate(rows, [metric], resamples=resamples, by=("variant", "shots"))
    return _by_shots(stats, lambda agg: f"{agg[metric].format()} ({agg[metric].n})")


def differences(rows: list[dict[str, Any]], metric: str, reference: str, resamples: int) -> list[str]:
    stats = paired_differences(rows, metric, reference, resamples=resamples)
    return _by_shots(stats, lambda agg: f"{agg.mean:+.3f} [{agg.low:+.3f}, {agg.high:+.3f}] ({agg.n})")


def costs(rows: list[dict[str, Any]], metric: str, resamples: int) -> list[str]:
    """Per method over every task: the metric next to what it costs."""
    stats = aggregate(rows, [metric, "adapt_s", "trainable_parameters"], resamples=resamples, by=("variant",))
    body = [
        [
            v,
            a[metric].format(),
            a["adapt_s"].format(2),
            f"{a['trainable_parameters'].mean:,.0f}" if a["trainable_parameters"].n else "–",
        ]
        for (v,), a in stats.items()
    ]
    return _table(["method", f"{metric} (all tasks)", "adapt s", "trainable parameters (mean)"], body)


def details(rows: list[dict[str, Any]], resamples: int) -> list[str]:
    names = [m for m in METRICS if any(m in (r.get("metrics") or {}) for r in rows)] + TIMINGS
    stats = aggregate(rows, names, resamples=resamples)
    body = [
        [v, d, t, _shots(s), str(max(a.n for a in agg.values()))]
        + [agg[n].format(2 if n in TIMINGS else 3) for n in names]
        for (v, d, t, s), agg in stats.items()
    ]
    return _table(["method", "dataset", "target", "shots", "tasks"] + names, body)


def write_summary(rows: list[dict[str, Any]], path: Path, *, metric: str, resamples: int, reference: str) -> None:
    """reference: the variant the paired differences start from."""
    failed = [r for r in rows if r.get("error")]
    lines = [
        "# Experiment summary",
        "",
        f"{len(rows) - len(failed)} finished rows, {len(failed)} failed. Cells: mean over tasks [95% bootstrap CI].",
        "",
        f"## {metric}: suite mean (tasks)",
        "",
        *suite_means(rows, metric, resamples),
        "",
        f"## {metric}: {reference} minus each method, paired by task (tasks)",
        "",
        *differences(rows, metric, reference, resamples),
        "",
        "## Cost",
        "",
        *costs(rows, metric, resamples),
        "",
        f"## {metric} per dataset",
        "",
        *headline(rows, metric, resamples),
        "## All metrics and timings (seconds per task, peak GPU MiB)",
        "",
        *details(rows, resamples),
        "",
    ]
    if failed:
        lines += ["## Failures", "", *(f"- {r['task']} / {r['variant']}: {r['error']}" for r in failed), ""]
    path.write_text("\n".join(lines))
