"""`python -m l2l_peft.demo`: one few-shot task end to end, offline, on a fresh clone.

Samples a 5-shot task from real medical images: by default the blood-cell sample shipped with the
package (l2l_peft/data/: 240 single-cell images of 4 types from the PBC dataset, CC BY 4.0; see its
SOURCE.md), or any dataset of an npz folder in the layout of the development data (`--data-dir`).
Writes the task as a challenge pickle (kept only with --out-dir), runs the CLI on it exactly as the
container would, and prints the output's shape, the query accuracy and AUROC, and whether the
backbone's model card lists the dataset among its pretraining data (then the score is in-domain,
not a transfer result).
Uses the cache's default backbone; when there is none it builds a random-weight ViT and says so,
since its numbers then mean nothing.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import tempfile
from pathlib import Path

import torch
from torchcross.data.task import Task, TaskDescription

from . import cli
from .cache import REPO_CACHE, BackboneError, resolve_model
from .config import ENV_CACHE, ENV_MODEL
from .container import environment
from .data.datasets import load_npz_dir, to_challenge
from .extras import exit_without
from .task import challenge_task

logger = logging.getLogger("l2l_peft.demo")
SAMPLE_DATA = Path(__file__).resolve().parent / "data"
DEV_DATA = REPO_CACHE.parent.parent / "shared" / "data"


def sample_demo_task(data_dir: Path, dataset: str, shots: int, seed: int) -> tuple[Task, torch.Tensor]:
    """A challenge task of `shots` support and 10 query images per class, and its query labels."""
    from .data.sampling import sample_task

    ds = load_npz_dir(data_dir, include=[dataset])[dataset]
    # the test split where there is one: the shipped backbone was pretrained on the other splits
    pool = torch.arange(len(ds)) if ds.split is None else (ds.split == 2).nonzero()[:, 0]
    support, query = sample_task(ds.labels, ds.target, pool, shots=shots, query_per_class=10, seed=seed)
    images = to_challenge(ds.images[torch.cat([support, query])])
    labels = ds.labels[torch.cat([support, query])]
    n = len(support)
    description = TaskDescription(ds.target, ds.classes, f"{dataset}-{shots}shot")
    return challenge_task(images, labels, n, description), labels[n:]


def pretraining_datasets(model_dir: Path) -> list[str] | None:
    """Datasets in the Data table of the model card that `l2l_peft.pretrain` writes; None without one."""
    card = model_dir / "README.md"
    if not card.is_file() or "\n## Data\n" not in (text := card.read_text()):
        return None
    section = text.split("\n## Data\n", 1)[1].split("\n## ", 1)[0]
    cells = [line.split("|")[1].strip() for line in section.splitlines() if line.startswith("| ")]
    return [cell for cell in cells if cell != "dataset"]


def random_backbone(directory: Path) -> Path:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768)
    ViTModel(config, add_pooling_layer=False).save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(
        '{"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "size": {"height": 224, "width": 224}}'
    )
    return directory


def backbone_note(dataset: str, work: Path) -> tuple[list[str], str]:
    """CLI arguments for the backbone and a line saying what its score means."""
    try:  # the model the CLI will load: $L2L_PEFT_MODEL, else the cache's default
        source = resolve_model(os.environ.get(ENV_MODEL), os.environ.get(ENV_CACHE))
    except BackboneError:
        model_dir = random_backbone(work / "random-vit")
        note = (
            f"NOTE: hf_cache/ has no default backbone, so this demo uses a RANDOM-WEIGHT ViT ({model_dir}); its "
            "predictions are near chance. Run `python prefetch.py` to fetch a pretrained one."
        )
        return ["--model", str(model_dir)], note
    seen = pretraining_datasets(Path(source.location))
    if seen is None:
        return [], f"backbone {source.name}: its model card does not list its pretraining data"
    where = "IN" if dataset in seen else "NOT in"
    return [], f"backbone {source.name}: {dataset} is {where} its pretraining data ({', '.join(seen)})"


def main(argv: list[str] | None = None) -> int:
    exit_without("experiments", "python -m l2l_peft.demo")
    environment.prepare()  # as the CLI would, before the demo's own steps import transformers (no loading bars)
    parser = argparse.ArgumentParser(prog="python -m l2l_peft.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=SAMPLE_DATA, help=f"npz folder (development data: {DEV_DATA})")
    parser.add_argument("--dataset", default="pbc_blood_cells", help="dataset of --data-dir's manifest.json")
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--time-budget", type=float, default=110.0, help="seconds for the CLI run (the demo stays under 2 minutes)"
    )
    parser.add_argument(
        "--out-dir", type=Path, help="keep the task and result pickles here (default: a temporary folder, removed)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(message)s")
    if args.out_dir is not None:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        return run_demo(args, args.out_dir)
    # Each run writes a ~36 MB task pickle: left in /tmp, repeated runs (and the test suite) fill the disk.
    with tempfile.TemporaryDirectory(prefix="l2l_peft_demo_") as tmp:
        return run_demo(args, Path(tmp))


def run_demo(args: argparse.Namespace, work: Path) -> int:
    from .experiments.metrics import task_metrics

    task, query_labels = sample_demo_task(args.data_dir, args.dataset, args.shots, args.seed)
    task_path, out_path = work / "task.pkl", work / "result.pkl"
    task_path.write_bytes(pickle.dumps(task))
    model_args, note = backbone_note(args.dataset, work)
    logger.info("task %s (%d support, %d query images) written to %s", task.description.task_identifier,
                len(task.support), len(task.query), task_path)  # fmt: skip

    status = cli.main([str(task_path), str(out_path), "--time-budget", str(args.time_budget), *model_args])
    if status != 0:
        return status
    with out_path.open("rb") as f:
        probs = pickle.load(f)
    metrics = task_metrics(task.description.task_target, probs, query_labels)
    logger.info("output %s written to %s", tuple(probs.shape), out_path)
    logger.info("%s: query accuracy %.3f, AUROC %.3f (chance 0.5)", args.dataset, metrics["accuracy"], metrics["auroc"])
    logger.info(note)
    if args.out_dir is None:
        logger.info("the temporary folder is removed now; --out-dir DIR keeps the task and result pickles")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
