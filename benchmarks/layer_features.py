"""Which layers' features transfer to datasets a backbone never saw? Linear probes on frozen features, CPU.

The product reads concat(global token, mean patch token) of the LAST layer. A backbone pretrained with
supervised heads on a few datasets may specialise its last layers to them; earlier layers can carry
more general features (Evci et al. 2022, Head2Toe). This fits the package's linear probe on each
layer set's features, per sampled task of the datasets the backbone's model card does not list (the
same MedIMeta-protocol tasks as the experiments, test split), and pairs every set with `last` by task.
Each layer's pooled block is layer-normed before concatenation, so deep and shallow blocks weigh alike.

    python benchmarks/layer_features.py --data ../shared/data --out results/layer_features   # ~10 min, 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import common  # noqa: F401  (the checkout's l2l_peft first on sys.path)
import torch
import torch.nn.functional as F

from l2l_peft.backbone import FeatureExtractor, load_backbone
from l2l_peft.cache import REPO_CACHE, resolve_model
from l2l_peft.config import AdaptConfig
from l2l_peft.demo import pretraining_datasets
from l2l_peft.experiments.config import SuiteConfig
from l2l_peft.experiments.metrics import task_metrics
from l2l_peft.experiments.results import bootstrap
from l2l_peft.experiments.suites import Suite
from l2l_peft.frozen import fit_linear_probe
from l2l_peft.head import Head
from l2l_peft.targets import Objective, build_objective

RESAMPLES = 2000
PROBE = AdaptConfig()  # the linear-probe method's defaults: L2 weight and LBFGS iterations


@torch.no_grad()
def layer_blocks(extractor: FeatureExtractor, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """[n, layers + 1, 2 * hidden]: each block's pooled tokens, then the product's own features (final norm)."""
    out = []
    for chunk in images.split(batch):
        result = extractor.model(pixel_values=extractor.preprocess(chunk), output_hidden_states=True)
        blocks = [extractor.pool(h, None) for h in result.hidden_states[1:]]
        blocks.append(extractor.pool(result.last_hidden_state, getattr(result, "pooler_output", None)))
        out.append(torch.stack(blocks, 1).float())
    return torch.cat(out)


def normed_blocks(extractor: FeatureExtractor, images: torch.Tensor) -> torch.Tensor:
    blocks = layer_blocks(extractor, images)
    return F.layer_norm(blocks, blocks.shape[-1:])


def layer_sets(depth: int) -> tuple[str, dict[str, list[int]]]:
    """The primary set's name and named sets of block indices into layer_blocks (index `depth` is the product's
    last-layer feature). Primary, declared before the first run: the layers at a third and two thirds of the
    depth plus the last (4+8+last for 12 layers); the other sets are exploratory."""
    third = max(1, depth // 3)
    primary = f"{third}+{2 * third}+last"
    sets = {"last": [depth]}
    sets |= {f"L{k}": [k - 1] for k in range(third, depth, third)}
    sets |= {primary: [third - 1, 2 * third - 1, depth], f"{2 * third}+last": [2 * third - 1, depth]}
    sets |= {"all": list(range(depth + 1))}
    return primary, sets


def probe_auroc(
    objective: Objective, data, query_labels, support: torch.Tensor, query: torch.Tensor, l2: float
) -> float:
    head = Head(support.shape[1], objective.n_logits)
    fit_linear_probe(head, objective, support, data.support_labels, l2=l2, max_iter=PROBE.probe_max_iter)
    with torch.no_grad():
        probs = objective.probabilities(head(query))
    return task_metrics(data.target, probs, query_labels)["auroc"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default=None, help="backbone directory (default: the cache's default)")
    parser.add_argument("--datasets", nargs="+", help="default: every dataset the model card does not list")
    parser.add_argument("--shots", nargs="+", type=int, default=[5, 10])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--query-per-class", type=int, default=15)
    parser.add_argument("--l2", type=float, default=PROBE.probe_l2, help="the probe's L2 weight (AdaptConfig.probe_l2)")
    args = parser.parse_args()

    source = resolve_model(args.model, str(REPO_CACHE))
    seen = pretraining_datasets(Path(source.location))
    known = json.loads((args.data / "manifest.json").read_text())
    datasets = args.datasets or sorted(d for d in known if seen is not None and d not in seen)
    if not datasets:
        raise SystemExit(f"{source.name}: no dataset it never saw (card lists {seen}); pass --datasets")
    suite = Suite(SuiteConfig(
        sources=[{"kind": "npz", "path": str(args.data), "include": datasets}],
        shots=args.shots, tasks=args.tasks, query_per_class=args.query_per_class, split="test", seed=0,
    ))  # fmt: skip
    extractor = load_backbone(source.location).eval()
    primary, sets = layer_sets(int(extractor.model.config.num_hidden_layers))
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    start = time.monotonic()
    for n, spec in enumerate(suite.specs, 1):
        data, query_labels = suite.build(spec)
        support, query = (normed_blocks(extractor, images) for images in (data.support_images, data.query_images))
        objective = build_objective(data.target, data.classes, data.support_labels)
        scores = {
            name: probe_auroc(objective, data, query_labels, support[:, i].flatten(1), query[:, i].flatten(1), args.l2)
            for name, i in sets.items()
        }
        rows.append({"task": spec.key, "dataset": spec.dataset, "shots": spec.shots, "auroc": scores})
        print(f"[{n}/{len(suite.specs)} {time.monotonic() - start:.0f}s] {spec.key} "
              + " ".join(f"{k} {v:.3f}" for k, v in scores.items()), flush=True)  # fmt: skip
    (args.out / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def cell(selected: list[dict], name: str, minus_last: bool) -> str:
        values = [r["auroc"][name] - (r["auroc"]["last"] if minus_last else 0.0) for r in selected]
        return bootstrap(values, resamples=RESAMPLES).format()

    header = (
        f"Primary (declared before the run): {primary} minus last. Datasets: {', '.join(datasets)}. Probe L2 "
        f"{args.l2}; tasks per dataset and shot count: {args.tasks}; `{' '.join(sys.argv)}`."
    )
    lines = [f"# Probe AUROC by feature layers: {source.name} on {len(datasets)} datasets it never saw", "", header]
    lines += ["", "| layers | " + " | ".join(f"{s}-shot mean | minus last, paired" for s in args.shots) + " |"]
    lines += ["|---" + "|---|---" * len(args.shots) + "|"]
    by_shots = [[r for r in rows if r["shots"] == shots] for shots in args.shots]
    for name in sets:
        lines.append(
            f"| {name} | " + " | ".join(f"{cell(b, name, False)} | {cell(b, name, True)}" for b in by_shots) + " |"
        )
    lines += ["", "Per dataset, minus last (all shot counts):", "", "| layers | " + " | ".join(datasets) + " |"]
    lines += ["|---" * (len(datasets) + 1) + "|"]
    for name in sets:
        lines.append(
            f"| {name} | "
            + " | ".join(cell([r for r in rows if r["dataset"] == d], name, True) for d in datasets)
            + " |"
        )
    (args.out / "layers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
