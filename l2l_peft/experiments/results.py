"""results.jsonl (one row per task x method variant, append-only, resumable) and its aggregates.

A row is finished when it has no error; a rerun skips finished rows and retries failed ones, and
readers keep the last row of each (task, variant). Aggregates are per variant x dataset x target x
shots: the mean over tasks with a 95% percentile-bootstrap confidence interval (NaNs skipped).
"""

from __future__ import annotations

import gzip
import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = "results.jsonl"
GROUP = ("variant", "dataset", "target", "shots")


def row_key(row: dict[str, Any]) -> tuple[str, str]:
    return row["task"], row["variant"]


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The last row of each (task, variant), in file order; a torn last line (killed run) is ignored.

    A `.gz` path reads the same: committed studies keep their rows compressed (a tenth of the size),
    so that the working tree still fits, with the data, in what one GPU call carries.
    """
    if not path.is_file():
        return []
    text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        rows.pop(row_key(row), None)
        rows[row_key(row)] = row
    return list(rows.values())


def finished(rows: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {row_key(r) for r in rows if not r.get("error")}


def append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps(row, allow_nan=False) + "\n")
        f.flush()


@dataclass
class Aggregate:
    mean: float
    low: float
    high: float
    n: int  # tasks with a finite value

    def format(self, digits: int = 3) -> str:
        if self.n == 0:
            return "–"
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def bootstrap(values: list[float], *, resamples: int, seed: int = 0) -> Aggregate:
    """Mean and 95% percentile-bootstrap interval of the finite values."""
    x = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if len(x) == 0:
        return Aggregate(math.nan, math.nan, math.nan, 0)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return Aggregate(float(x.mean()), float(low), float(high), len(x))


def value(row: dict[str, Any], name: str) -> float:
    """A metric or timing of a row (NaN when absent, e.g. AUROC of a regression task)."""
    got = (row.get("metrics") or {}).get(name, row.get(name))
    return float(got) if got is not None else math.nan


def aggregate(
    rows: list[dict[str, Any]], names: list[str], *, resamples: int, by: tuple[str, ...] = GROUP
) -> dict[tuple, dict[str, Aggregate]]:
    """{group values: {metric: Aggregate}} over finished rows, groups in first-seen order."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if not row.get("error"):
            groups[tuple(row[k] for k in by)].append(row)
    return {
        g: {n: bootstrap([value(r, n) for r in rs], resamples=resamples) for n in names} for g, rs in groups.items()
    }


def paired_differences(
    rows: list[dict[str, Any]], metric: str, reference: str, *, resamples: int
) -> dict[tuple, Aggregate]:
    """{(variant, shots): reference minus variant}, over the tasks where both have a finite value.

    Pairing by task removes the task-to-task spread that dominates few-shot scores, so these
    intervals are much narrower than the difference of two unpaired means.
    """
    scores: dict[tuple[str, str], float] = {row_key(r): value(r, metric) for r in rows if not r.get("error")}
    diffs: dict[tuple, list[float]] = defaultdict(list)
    for row in rows:
        ref = scores.get((row["task"], reference))
        mine = scores.get(row_key(row))
        if row["variant"] != reference and ref is not None and mine is not None and math.isfinite(ref - mine):
            diffs[(row["variant"], row["shots"])].append(ref - mine)
    return {g: bootstrap(d, resamples=resamples) for g, d in diffs.items()}
