"""Score the recipe study's raw predictions (benchmarks/recipe_study.py) on the CPU, paired by task.

    python benchmarks/recipe_analysis.py DIR [DIR ...] [--reference lora] [--out table.md]

Every candidate is a function of one task record: trained recipes as stored, their flip
test-time views, frozen-feature baselines (prototypes, linear probe, the package's own code),
transductive rules on frozen or LoRA-adapted features, and probability ensembles. Prints mean
AUROC per candidate x shots and the paired difference candidate - reference with a 95% bootstrap
interval; per dataset with --per-dataset.
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import common  # noqa: F401  (the checkout's l2l_peft first on sys.path)
import torch
from torchcross.data.task import TaskTarget
from transductive import TransductiveConfig, refine

from l2l_peft.config import AdaptConfig
from l2l_peft.experiments.metrics import task_metrics
from l2l_peft.experiments.results import bootstrap
from l2l_peft.frozen import fit_linear_probe, fit_prototypes
from l2l_peft.head import Head
from l2l_peft.targets import build_objective

Record = dict
Candidate = Callable[[Record], torch.Tensor]


def load(dirs: list[Path]) -> list[Record]:
    """Records of every study file; runs of the same task from several passes are merged.

    Passes pair by task key; one whose task has other labels under that key (a changed sampler or
    dataset) is refused, not paired."""
    by_key: dict[str, Record] = {}
    for d in dirs:
        for path in sorted(d.glob("**/study_*.pt")):
            for record in torch.load(path, weights_only=False):
                merged = by_key.setdefault(record["key"], record)
                if merged is not record:  # another process's recipes (or backbone) on the same task
                    for labels in ("support_labels", "query_labels"):
                        if not torch.equal(torch.as_tensor(merged[labels]), torch.as_tensor(record[labels])):
                            raise ValueError(f"{path}: task {record['key']} has other {labels} than an earlier pass")
                    merged["runs"].update(record["runs"])
                    for name, value in record.items():
                        merged.setdefault(name, value)
    return list(by_key.values())


def objective_of(r: Record):
    target = TaskTarget[r["target"]]
    return build_objective(target, {i: str(i) for i in range(r["n_classes"])}, r["support_labels"])


def stored(name: str, *, tta: bool = False) -> Candidate:
    def get(r: Record) -> torch.Tensor:
        run = r["runs"][name]
        return (run["probs"] + run["probs_flip"]) / 2 if tta else run["probs"]

    return get


def feats(r: Record, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    if source == "frozen":
        return r["frozen"]["support"].float(), r["frozen"]["query"].float()
    if source == "frozen_tta":
        f = r["frozen"]
        return (f["support"].float() + f["support_flip"].float()) / 2, (
            f["query"].float() + f["query_flip"].float()
        ) / 2
    return r["runs"][source]["support"].float(), r["runs"][source]["query"].float()


def frozen_rule(kind: str, source: str = "frozen") -> Candidate:
    def get(r: Record) -> torch.Tensor:
        objective = objective_of(r)
        support, query = feats(r, source)
        head = Head(support.shape[1], objective.n_logits)
        if kind == "prototypes":
            fit_prototypes(head, objective, support, r["support_labels"])
        else:
            defaults = AdaptConfig()
            fit_linear_probe(
                head, objective, support, r["support_labels"], l2=defaults.probe_l2, max_iter=defaults.probe_max_iter
            )
        with torch.no_grad():
            return objective.probabilities(head(query))

    return get


def transductive(source: str, start: Candidate | None, config: TransductiveConfig) -> Candidate:
    def get(r: Record) -> torch.Tensor:
        objective = objective_of(r)
        support, query = feats(r, source)
        initial = start(r) if start else None
        return refine(objective, support, r["support_labels"], query, config, initial=initial)

    return get


def mean_of(*parts: Candidate) -> Candidate:
    return lambda r: sum(p(r) for p in parts) / len(parts)


def candidates() -> dict[str, Candidate]:
    out: dict[str, Candidate] = {}
    for name in ("lora", "full", "lora_all", "head"):
        out[name] = stored(name)
        out[f"{name}+flip"] = stored(name, tta=True)
    out["prototypes"] = frozen_rule("prototypes")
    out["linear_probe"] = frozen_rule("probe")
    out["prototypes+flip"] = frozen_rule("prototypes", "frozen_tta")
    out["probe+flip"] = frozen_rule("probe", "frozen_tta")
    out["prototypes(lora feats)"] = frozen_rule("prototypes", "lora")
    out["probe(lora feats)"] = frozen_rule("probe", "lora")
    out["lora+full"] = mean_of(stored("lora"), stored("full"))
    out["lora+full+flip"] = mean_of(stored("lora", tta=True), stored("full", tta=True))
    out["lora+lora_all+full+flip"] = mean_of(
        stored("lora", tta=True), stored("lora_all", tta=True), stored("full", tta=True)
    )
    out["lora+probe"] = mean_of(stored("lora"), frozen_rule("probe"))
    for name in ("lora_lr3e-3", "lora_long", "full_lr1e-4", "lora_tim", "lora_tim0.3", "full_tim"):
        out[name] = stored(name)
    out["lora_tim+full_tim"] = mean_of(stored("lora_tim"), stored("full_tim"))
    out["lora_tim+full"] = mean_of(stored("lora_tim"), stored("full"))
    out["lora_lr3e-3+full"] = mean_of(stored("lora_lr3e-3"), stored("full"))
    out["lora_long+full"] = mean_of(stored("lora_long"), stored("full"))
    out["lora+full_lr1e-4"] = mean_of(stored("lora"), stored("full_lr1e-4"))
    out["full+full_lr1e-4"] = mean_of(stored("full"), stored("full_lr1e-4"))
    out["lora+full+full_lr1e-4"] = mean_of(stored("lora"), stored("full"), stored("full_lr1e-4"))
    for w in (0.5, 1.0):
        cfg = TransductiveConfig(query_weight=w)
        out[f"trans proto frozen w{w}"] = transductive("frozen", None, cfg)
        out[f"trans lora feats w{w}"] = transductive("lora", None, cfg)
        out[f"trans lora feats from lora w{w}"] = transductive("lora", stored("lora"), cfg)
    cfg = TransductiveConfig()
    out["trans lora feats from lora+flip"] = transductive("lora", stored("lora", tta=True), cfg)
    out["mean(lora+flip, trans)"] = mean_of(
        stored("lora", tta=True), transductive("lora", stored("lora", tta=True), cfg)
    )
    out["trans frozen from lora+full+flip"] = transductive(
        "frozen_tta", mean_of(stored("lora", tta=True), stored("full", tta=True)), cfg
    )
    return out


def resolve(name: str, known: dict[str, Candidate]) -> Candidate:
    """A named candidate, else a stored run, else `a+b+...`: the mean probabilities of candidates or stored runs."""
    if name in known:
        return known[name]
    parts = name.split("+")
    if len(parts) == 1:
        return stored(name)
    return mean_of(*(resolve(part, known) for part in parts))


def table(
    scores: dict[str, dict[str, float]], records: list[Record], reference: str, group: Callable[[Record], object]
) -> str:
    keys = {r["key"]: r for r in records}
    groups = sorted({group(r) for r in records}, key=str)
    lines = ["| candidate | " + " | ".join(f"{g}" for g in groups) + " |", "|---|" + "---|" * len(groups)]
    for name, per_task in scores.items():
        cells = []
        for g in groups:
            tasks = [k for k, r in keys.items() if group(r) == g]
            mine = [per_task[k] for k in tasks]
            mean = bootstrap(mine, resamples=1)
            if name == reference:
                cells.append(f"{mean.mean:.3f}")
                continue
            diffs = [per_task[k] - scores[reference][k] for k in tasks]
            d = bootstrap([x for x in diffs if math.isfinite(x)], resamples=2000)
            star = "**" if d.low > 0 or d.high < 0 else ""
            cells.append(f"{mean.mean:.3f} ({star}{d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}]{star})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path)
    parser.add_argument("--reference", default="lora")
    parser.add_argument(
        "--only", nargs="*", help="candidates to score (default: all): named ones, stored runs, or `a+b` ensembles"
    )
    parser.add_argument("--per-dataset", action="store_true")
    parser.add_argument("--shots", nargs="*", type=int, help="score only tasks of these shot counts")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    records = [r for r in load(args.dirs) if not args.shots or r["shots"] in args.shots]
    known = candidates()
    chosen = {k: resolve(k, known) for k in [args.reference, *(args.only or [])]} if args.only else known
    scores: dict[str, dict[str, float]] = defaultdict(dict)
    for r in records:
        target = TaskTarget[r["target"]]
        for name, candidate in chosen.items():
            scores[name][r["key"]] = task_metrics(target, candidate(r).float(), r["query_labels"])["auroc"]
    scores = {args.reference: scores.pop(args.reference), **scores}
    text = [f"{len(records)} tasks; AUROC mean (candidate - {args.reference}, paired, 95% CI)", ""]
    text.append(table(scores, records, args.reference, lambda r: f"{r['shots']}-shot"))
    if args.per_dataset:
        for shots in sorted({r["shots"] for r in records}):
            subset = [r for r in records if r["shots"] == shots]
            text += ["", f"{shots}-shot by dataset", "", table(scores, subset, args.reference, lambda r: r["dataset"])]
    print("\n".join(text))
    if args.out:
        args.out.write_text("\n".join(text) + "\n")


if __name__ == "__main__":
    main()
