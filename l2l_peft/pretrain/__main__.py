"""Pretrain a medical ViT backbone and export it as an ordinary HF checkpoint.

    accelerate launch -m l2l_peft.pretrain configs/pretrain/vit_tiny_med.yaml --output runs/vit_tiny_med
    python -m l2l_peft.pretrain configs/pretrain/vit_tiny_med.yaml --output DIR --max-minutes 8   # one process

DIR then holds config.json, model.safetensors, preprocessor_config.json and README.md (the
model card) for adapt(model=DIR) / `prefetch.py --model DIR`, plus checkpoint/ (rerunning the
same command resumes from it; `--stop-at STEP` splits one schedule over several jobs) and
log.jsonl (loss and throughput).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..extras import exit_without

exit_without("experiments", "python -m l2l_peft.pretrain")

from ..runtime import exit_process, make_accelerator, set_up_logging
from .card import hardware, last_log, write_card
from .config import load_config
from .loop import pretrain
from .model import export_backbone


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m l2l_peft.pretrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path, help="YAML file of PretrainConfig fields")
    parser.add_argument(
        "--output", type=Path, required=True, help="run directory: exported model, checkpoint/, log.jsonl"
    )
    parser.add_argument("--npz-dir", help="override the path of the config's npz sources")
    parser.add_argument("--exclude", nargs="*", help="override the config's exclude list")
    parser.add_argument("--steps", type=int, help="override the number of steps")
    parser.add_argument("--max-minutes", type=float, help="override the training time budget")
    parser.add_argument("--seed", type=int, help="override the seed")
    parser.add_argument("--stop-at", type=int, help="end this run at this step, schedule unchanged; rerun to continue")
    parser.add_argument("--cpu", action="store_true", default=None, help="train on the CPU")
    parser.add_argument(
        "--compile", action="store_true", default=None, help="torch.compile the model (see PretrainConfig.compile)"
    )
    parser.add_argument("--no-resume", dest="resume", action="store_false", help="ignore an existing checkpoint")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    set_up_logging(args.log_level)
    try:
        config = load_config(
            args.config, npz_dir=args.npz_dir, exclude=args.exclude, steps=args.steps, max_minutes=args.max_minutes,
            seed=args.seed, cpu=args.cpu, compile=args.compile,
        )  # fmt: skip
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    accelerator = make_accelerator(config.precision, cpu=config.cpu)
    try:
        result = pretrain(config, args.output, accelerator=accelerator, resume=args.resume, stop_at=args.stop_at)
    except ValueError as err:  # data selection or checkpoint mismatch: the message says the fix
        print(f"error: {err}", file=sys.stderr)
        return 2
    if accelerator.is_main_process:
        backbone = result.model.extractor
        export_backbone(backbone, args.output, save_dtype=config.save_dtype)
        write_card(
            args.output, config=config, datasets=result.datasets, progress=result.progress,
            hardware=hardware(accelerator), log=last_log(args.output),
            parameters=sum(p.numel() for p in backbone.model.parameters()),
        )  # fmt: skip
        logging.getLogger("l2l_peft.pretrain").info("exported %s after %d steps", args.output, result.progress.step)
    return 0


if __name__ == "__main__":
    exit_process(main())
