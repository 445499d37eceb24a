"""Recipe study (issue #17): raw predictions of candidate recipes on datasets the backbone never saw.

The GPU produces, per sampled task, the query probabilities of several trained recipes (plain and
with a horizontal-flip test-time view) plus frozen and LoRA-adapted features of support and query;
`benchmarks/recipe_analysis.py` then scores every recipe, transductive rule and ensemble on the
CPU, paired by task. One GPU pass feeds many offline comparisons.

    python benchmarks/recipe_study.py --data /tmp/data --out $OUT --shots 1 5 10 --tasks 8 \
        --start 0 --max-minutes 8          # resumable: --start N skips the first N tasks

Tasks are ordered index-major (every dataset and shot count before the next index), so a run cut
short by --max-minutes still covers every cell evenly.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import common  # noqa: F401  (the checkout's l2l_peft first on sys.path)
import torch

from l2l_peft.api import fit
from l2l_peft.backbone import load_backbone
from l2l_peft.config import AdaptConfig
from l2l_peft.experiments.config import SuiteConfig
from l2l_peft.experiments.suites import Suite
from l2l_peft.predict import features, predict
from l2l_peft.runtime import make_accelerator

# Datasets the shipped l2l-vit-tiny-med never saw (its model card lists the six it was trained on).
UNSEEN = [
    "isic_skin_8class",
    "pbc_blood_cells",
    "lung_ultrasound_pocus",
    "covid_ct_ucsd",
    "kidney_ct_4class",
    "alzheimer_mri_4class",
]
RECIPES: dict[str, dict] = {
    "lora": {"method": "lora"},
    "full": {"method": "full", "lr_full": 1e-3, "layer_decay": 1.0},  # the full member as it was until issue #27
    "lora_all": {"method": "lora", "lora_targets": "all"},
    "head": {"method": "head"},
    "lora_lr3e-3": {"method": "lora", "lr_adapter": 3e-3},
    "lora_long": {"method": "lora", "epochs": 100.0, "max_steps": 200},
    "full_lr1e-4": {"method": "full", "lr_full": 1e-4, "layer_decay": 1.0},
    # the transductive information term (AdaptConfig.transductive) at its weight
    "lora_tim": {"method": "lora", "transductive": 1.0},
    "lora_tim0.3": {"method": "lora", "transductive": 0.3},
    "full_tim": {"method": "full", "lr_full": 1e-3, "layer_decay": 1.0, "transductive": 1.0},
    # issue #27: candidates for a foundation backbone (DINOv2 ViT-S/14) at 224 px
    "full_llrd": {"method": "full", "lr_full": 1e-4, "layer_decay": 0.7},  # today's full member
    "lora_lr3e-4": {"method": "lora", "lr_adapter": 3e-4},
    "lora_r4": {"method": "lora", "lora_rank": 4, "lora_alpha": 8.0},
    "lora_noaug": {"method": "lora", "augment": False},
    "lora_head1e-3": {"method": "lora", "lr_head": 1e-3},
    "lora_zero": {"method": "lora", "head_init": "zero"},
    "lora_last4": {"method": "lora", "lora_last_blocks": 4},
    # issue #27's speed lever: the full member's first 6 blocks (<= 0.082x its rate under decay 0.7) frozen, cached
    "full_llrd_last6": {"method": "full", "lr_full": 1e-4, "layer_decay": 0.7, "full_last_blocks": 6},
}
FEATURES_OF = "lora"  # the recipe whose adapted features are kept for transductive rules


def flip(images: torch.Tensor) -> torch.Tensor:
    return images.flip(-1)


def study_task(data, seed: int, model: str | None, recipes: list[str], *, prefix: str = "") -> dict:
    base = AdaptConfig(model=model, seed=seed)
    accelerator = make_accelerator(base.precision, cpu=base.cpu)
    extractor = load_backbone(model).to(accelerator.device)
    batch = base.predict_batch_size

    def feats(ex, images: torch.Tensor) -> torch.Tensor:
        return features(ex, images, accelerator=accelerator, batch_size=batch).half().cpu()

    record = {"runs": {}}
    if not prefix:  # a second backbone's runs (prefixed) join the records of the first, whose features stay
        record["frozen"] = {
            "support": feats(extractor, data.support_images),
            "query": feats(extractor, data.query_images),
            "support_flip": feats(extractor, flip(data.support_images)),
            "query_flip": feats(extractor, flip(data.query_images)),
        }
    for name in recipes:
        config = dataclasses.replace(base, **RECIPES[name])
        start = time.monotonic()
        fitted = fit(data, config)
        if fitted.accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.monotonic() - start
        run = {
            "probs": predict(
                fitted.model, fitted.objective, data.query_images, accelerator=fitted.accelerator, batch_size=batch
            ),
            "probs_flip": predict(
                fitted.model,
                fitted.objective,
                flip(data.query_images),
                accelerator=fitted.accelerator,
                batch_size=batch,
            ),
            "seconds": seconds,
            "steps": fitted.report.steps,
        }
        if name == FEATURES_OF:
            ex = fitted.model.extractor
            run |= {"support": feats(ex, data.support_images), "query": feats(ex, data.query_images)}
        record["runs"][prefix + name] = run
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="npz directory (development-data layout)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--datasets", nargs="+", default=UNSEEN)
    parser.add_argument("--shots", nargs="+", type=int, default=[1, 5, 10])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--query-per-class", type=int, default=15)
    parser.add_argument("--recipes", nargs="+", default=["lora", "full", "lora_all", "head"], choices=list(RECIPES))
    parser.add_argument("--model", default=None, help="backbone (default: the cache's default)")
    parser.add_argument("--prefix", default="", help="prefix of the run names (e.g. tiny_ for a second backbone)")
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--max-minutes", type=float, default=8.0)
    parser.add_argument(
        "--chunk", type=int, default=25, help="tasks per output file (a GPU call returns files of <= 16 MiB)"
    )
    args = parser.parse_args()

    suite = Suite(SuiteConfig(
        sources=[{"kind": "npz", "path": args.data, "include": args.datasets}],
        shots=args.shots, tasks=args.tasks, query_per_class=args.query_per_class, split=None, seed=0,
    ))  # fmt: skip
    specs = sorted(suite.specs, key=lambda s: (s.index, s.shots, s.dataset))
    args.out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + 60 * args.max_minutes
    records, done = [], args.start

    def save() -> None:
        if records:
            torch.save(records, args.out / f"study_{done - len(records):04d}_{done:04d}.pt")
            records.clear()

    for spec in specs[args.start :]:
        if time.monotonic() > deadline:
            break
        data, query_labels = suite.build(spec)
        record = study_task(data, spec.seed, args.model, args.recipes, prefix=args.prefix)
        record |= {
            "key": spec.key, "dataset": spec.dataset, "shots": spec.shots, "index": spec.index,
            "target": data.target.name, "n_classes": len(data.classes),
            "support_labels": data.support_labels, "query_labels": query_labels,
        }  # fmt: skip
        records.append(record)
        done += 1
        times = " ".join(f"{k} {v['seconds']:.2f}s" for k, v in record["runs"].items())
        print(f"[{done}/{len(specs)}] {spec.key}: {times}", flush=True)
        if len(records) == args.chunk:
            save()
    save()
    print(f"done {done} of {len(specs)} tasks (next --start {done})")


if __name__ == "__main__":
    main()
