"""`python -m l2l_peft.demo`: one few-shot task end to end, offline, on a fresh clone.

Samples a 5-shot task from the development data (../shared/data) when present, else makes a
synthetic one; writes it as a challenge pickle; runs the CLI on it exactly as the container
would; prints the output's shape and the query AUROC. Uses the cache's default backbone; when
there is none it builds a random-weight ViT and says so, since its numbers then mean nothing.
"""

from __future__ import annotations

import argparse
import logging
import pickle
import tempfile
from pathlib import Path

import torch
from torchcross.data.task import Task, TaskDescription, TaskTarget
from torchmetrics.functional.classification import multiclass_auroc

from . import cli
from .backbone import BackboneError, REPO_CACHE, resolve_model
from .datasets import load_npz_dir, to_challenge
from .task import challenge_task

logger = logging.getLogger("l2l_peft.demo")
DEV_DATA = REPO_CACHE.parent.parent / "shared" / "data"


def sample_dev_task(data_dir: Path, dataset: str, shots: int, seed: int) -> tuple[Task, torch.Tensor]:
    from .experiments.sampling import sample_task

    ds = load_npz_dir(data_dir, include=[dataset])[dataset]
    # the test split: the shipped backbone was pretrained on the other splits of these datasets
    pool = torch.arange(len(ds)) if ds.split is None else (ds.split == 2).nonzero()[:, 0]
    support, query = sample_task(ds.labels, ds.target, pool, shots=shots, query_per_class=10, seed=seed)
    images = to_challenge(ds.images[torch.cat([support, query])])
    labels = ds.labels[torch.cat([support, query])]
    n = len(support)
    return challenge_task(images, labels, n, TaskDescription(ds.target, ds.classes, f"{dataset}-{shots}shot")), labels[n:]


def synthetic_task(shots: int, seed: int) -> tuple[Task, torch.Tensor]:
    """Three classes that differ in brightness: learnable by any backbone."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat(shots + 10)
    images = (labels.float().view(-1, 1, 1, 1) * 0.6 - 0.6) + 0.2 * torch.randn(len(labels), 1, 224, 224, generator=g)
    n = 3 * shots
    classes = {0: "dark", 1: "grey", 2: "bright"}
    description = TaskDescription(TaskTarget.MULTICLASS_CLASSIFICATION, classes, "synthetic-brightness")
    return challenge_task(images.clamp(-1, 1), labels, n, description), labels[n:]


def random_backbone(directory: Path) -> Path:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768)
    ViTModel(config, add_pooling_layer=False).save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text('{"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "size": {"height": 224, "width": 224}}')
    return directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="brain_tumor_mri", help="dataset in the development data")
    parser.add_argument("--data-dir", type=Path, default=DEV_DATA)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-budget", type=float, default=120.0, help="seconds for the whole CLI run")
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(message)s")

    work = Path(tempfile.mkdtemp(prefix="l2l_peft_demo_"))
    if (args.data_dir / "manifest.json").is_file():
        task, query_labels = sample_dev_task(args.data_dir, args.dataset, args.shots, args.seed)
    else:
        logger.info("no development data at %s: using a synthetic task", args.data_dir)
        task, query_labels = synthetic_task(args.shots, args.seed)
    task_path, out_path = work / "task.pkl", work / "result.pkl"
    task_path.write_bytes(pickle.dumps(task))

    model_args: list[str] = []
    try:
        resolve_model(None, None)
    except BackboneError:
        model_dir = random_backbone(work / "random-vit")
        logger.warning(
            "NOTE: hf_cache/ has no default backbone, so this demo uses a RANDOM-WEIGHT ViT (%s). "
            "Its predictions are near chance; run `python prefetch.py` to fetch a pretrained one.", model_dir
        )  # fmt: skip
        model_args = ["--model", str(model_dir)]

    logger.info("task %s written to %s", task.description.task_identifier, task_path)
    status = cli.main([str(task_path), str(out_path), "--time-budget", str(args.time_budget), *model_args])
    if status != 0:
        return status
    with out_path.open("rb") as f:
        probs = pickle.load(f)
    auroc = float(multiclass_auroc(probs, query_labels, num_classes=probs.shape[1])) if probs.shape[1] > 1 else float("nan")
    logger.info("output %s written to %s; query AUROC %.3f (chance 0.5)", tuple(probs.shape), out_path, auroc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
