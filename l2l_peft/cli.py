"""Command line: `python -m l2l_peft TASK.pkl OUT.pkl [options]` (also the `l2l-peft` script).

Flags mirror AdaptConfig fields (`--max-steps` sets max_steps). By default a run that fails
after the task was read degrades to simpler predictors instead of failing (see fallback.py), so
the challenge always gets a valid output; `--strict` turns that off.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
import typing
from enum import Enum
from pathlib import Path
from typing import NoReturn

from . import environment
from .config import ENV_TIME_BUDGET, AdaptConfig

logger = logging.getLogger("l2l_peft")

CONTAINER_TIME_BUDGET = 600.0  # seconds; a safe whole-run default when neither flag nor env var sets one
EXIT_BAD_INPUT, EXIT_NO_MODEL, EXIT_WRITE = 2, 3, 4


def _field_type(hint: typing.Any) -> typing.Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="l2l-peft", description=__doc__.split("\n\n")[0])
    parser.add_argument("task", type=Path, help="input task pickle (torchcross Task, old or new layout)")
    parser.add_argument("output", type=Path, help="where to write the pickled probability tensor")
    hints = typing.get_type_hints(AdaptConfig)
    for f in dataclasses.fields(AdaptConfig):
        kind = _field_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default: {getattr(f.default, 'value', f.default)})"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        elif isinstance(kind, type) and issubclass(kind, Enum):
            parser.add_argument(flag, choices=[m.value for m in kind], default=f.default.value, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=f.default, help=help_text)
    parser.add_argument("--strict", action="store_true", help="fail instead of falling back to simpler predictors")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def _process_age() -> float:
    """Seconds since this process started (interpreter and torch import count against the budget)."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def main(argv: list[str] | None = None) -> int:
    start = time.monotonic() - (_process_age() if argv is None else 0.0)  # argv None: we are the process
    args = build_parser().parse_args(argv)
    scratch = environment.prepare()
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    for noisy in ("transformers", "accelerate", "peft", "torchopt"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    if scratch:
        logger.info("no writable HOME: caches go to %s", scratch)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(AdaptConfig)}
    try:
        config = AdaptConfig(**values).with_env()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from .api import run  # after the flags are checked: a usage error should not wait for torch
    from .backbone import BackboneError, resolve_model
    from .fallback import run_with_fallbacks
    from .io import save_predictions
    from .task import TaskError, load_task

    imported = time.monotonic()
    try:
        data = load_task(args.task)
    except (TaskError, OSError) as err:
        print(f"error: {args.task}: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    read = time.monotonic()
    elapsed = read - start
    if config.time_budget is None and ENV_TIME_BUDGET not in os.environ:
        config = dataclasses.replace(config, time_budget=CONTAINER_TIME_BUDGET)
    config = dataclasses.replace(config, time_budget=max(1.0, config.time_budget - elapsed))
    logger.info(
        "task %s: %s, %d classes, %d support, %d query, images %s",
        data.task_identifier or args.task.name, data.target.name, len(data.classes),
        len(data.support_images), len(data.query_images), tuple(data.support_images.shape[1:]),
    )  # fmt: skip

    if args.strict:
        try:
            result, how = run(data, config), "adapted"
        except BackboneError as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_NO_MODEL
    else:
        result, how = run_with_fallbacks(data, config)
    adapted = time.monotonic()

    try:
        save_predictions(result.probabilities, args.output)
    except OSError as err:
        print(f"error: cannot write {args.output}: {err}", file=sys.stderr)
        return EXIT_WRITE
    written = time.monotonic()
    try:
        model = resolve_model(config.model, config.cache_dir).name
    except BackboneError:
        model = config.model or "(none)"
    report = result.train
    logger.info(
        "%s: model %s, target %s, support %d, query %d, method %s, steps %s, precision %s, output %s, "
        "%.1fs of %.0fs budget",
        how, model, data.target.name, len(data.support_images), len(data.query_images), config.method.value,
        f"{report.steps}/{report.planned_steps}" if report else 0, result.precision,
        tuple(result.probabilities.shape), time.monotonic() - start, elapsed + config.time_budget,
    )  # fmt: skip
    phases = {"startup and imports": imported - start, "task read": read - imported}
    phases |= {k: v for k, v in result.timings.items() if k != "total"}  # model load, adapt, predict
    phases |= {"fallbacks": adapted - read - result.timings.get("total", 0.0), "write": written - adapted}
    phases["total"] = time.monotonic() - start  # a caller's wall time minus this is interpreter exit
    logger.info("timings: %s", ", ".join(f"{name} {seconds:.2f}s" for name, seconds in phases.items()))
    return 0


def entry() -> NoReturn:
    """The process entry point: main(), then exit without the interpreter's teardown (see exit_process)."""
    environment.exit_process(main())
