"""Command line: `python -m l2l_peft TASK.pkl OUT.pkl [options]` (also the `l2l-peft` script).

Flags mirror AdaptConfig fields (`--max-steps` sets max_steps). Once the task is read the output
always holds a valid answer: the class prior of the support labels is written first and replaced
by the best predictions when they are ready; a run that fails degrades to simpler predictors (see
container/fallback.py), and SIGTERM or SIGINT end the run at once with what the file holds. `--strict`
turns the prior and the fallbacks off.

Exit status: 0 written; 2 unreadable or invalid task or flags; 3 no backbone (--strict); 4 output
not writable; 128 + the signal number (143 SIGTERM, 130 SIGINT) when stopped by a signal.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import signal
import sys
import time
import typing
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from .config import AdaptConfig
from .container import environment
from .runtime import exit_process, set_up_logging

if TYPE_CHECKING:
    import torch
    from typing_extensions import Self  # typing.Self needs Python 3.11

    from .api import AdaptResult
    from .task import TaskData

logger = logging.getLogger("l2l_peft")

CONTAINER_TIME_BUDGET = 600.0  # seconds; a safe whole-run default when neither flag nor env var sets one
EXIT_BAD_INPUT, EXIT_NO_MODEL, EXIT_WRITE = 2, 3, 4
MAX_ERROR = 500  # characters of an error line
PRIOR = "the class prior of the support labels"


def _fail(message: str, code: int) -> int:
    """Print `error: MESSAGE` as one line of at most MAX_ERROR characters; returns the exit code."""
    text = " ".join(message.split())
    if len(text) > MAX_ERROR:
        text = f"{text[:MAX_ERROR]}... ({len(text)} characters)"
    print(f"error: {text}", file=sys.stderr)
    return code


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """Usage errors as one line too (argparse prints the usage first and echoes bad values whole)."""
        _fail(f"{message} (see --help)", EXIT_BAD_INPUT)
        sys.exit(EXIT_BAD_INPUT)


def _field_type(hint: typing.Any) -> typing.Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="l2l-peft", description=__doc__.split("\n\n")[0])
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


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)  # also through symlinks and hard links
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


class Stopped(BaseException):
    """SIGTERM or SIGINT arrived (a BaseException, so the fallback chain does not catch it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Output:
    """The output file and what it holds. While active (a context), SIGTERM and SIGINT raise Stopped
    at once, except during a write, which they never interrupt: they raise when it is done."""

    def __init__(self, path: Path) -> None:
        self.path, self.holds = path, "nothing"
        self._writing, self._pending, self._previous = False, 0, {}

    def __enter__(self) -> Self:
        self._previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _on_signal(self, signum: int, frame: object) -> None:
        if not self._writing:
            raise Stopped(signum)
        self._pending = signum

    def write(self, probabilities: torch.Tensor, what: str) -> None:
        from .io import save_predictions

        self._writing = True
        try:
            save_predictions(probabilities, self.path)
            self.holds = what
        finally:
            self._writing = False
            if self._pending:
                raise Stopped(self._pending)


class _Exit(Exception):
    """An expected failure: main() prints it as one line and returns `code`."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def main(argv: list[str] | None = None) -> int:
    start = time.monotonic() - (_process_age() if argv is None else 0.0)  # argv None: we are the process
    args = build_parser().parse_args(argv)
    try:
        if _same_file(args.task, args.output):
            raise _Exit(f"the output {args.output} is the input task; give another output path", EXIT_BAD_INPUT)
        _set_up_logging(args.log_level)
        config = _config(args)
        data, phases = _read_task(args.task, start)
        with Output(args.output) as output:
            try:
                return _answer(data, config, output, strict=args.strict, start=start, phases=phases)
            except Stopped as stop:
                code = 128 + stop.signum
                logger.warning("stopped by %s: %s holds %s; exit %d", stop, output.path, output.holds, code)
                return code
    except _Exit as failure:
        return _fail(str(failure), failure.code)


def _set_up_logging(level: str) -> None:
    """Log lines to stdout; a scratch HOME (environment.prepare) is said once logging is up."""
    scratch = environment.prepare()
    set_up_logging(level)
    if scratch:
        logger.info("no writable HOME: caches go to %s", scratch)


def _config(args: argparse.Namespace) -> AdaptConfig:
    """The flags and the environment as an AdaptConfig; an invalid value names its flag, not the field."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(AdaptConfig)}
    try:
        return AdaptConfig(**values).with_env()
    except ValueError as err:  # AdaptConfig.time_budget -> --time-budget
        message = re.sub(r"AdaptConfig\.(\w+)", lambda m: "--" + m[1].replace("_", "-"), str(err))
        raise _Exit(message, EXIT_BAD_INPUT) from err


def _read_task(path: Path, start: float) -> tuple[TaskData, dict[str, float]]:
    """The task and the seconds its phases took so far (startup with imports, reading)."""
    from .task import TaskError, load_task  # after the flags are checked: a usage error should not wait for torch

    imported = time.monotonic()
    try:
        data = load_task(path)
    except (TaskError, OSError) as err:
        raise _Exit(f"{path}: {err}", EXIT_BAD_INPUT) from err
    except (MemoryError, RuntimeError) as err:  # failed allocations (torch's are RuntimeErrors), recursion limits
        reason = f"{type(err).__name__}: {str(err) or 'out of memory'}"
        raise _Exit(f"{path}: cannot read the task ({reason})", EXIT_BAD_INPUT) from err
    logger.info(
        "task %s: %s, %d classes, %d support, %d query, images %s",
        data.task_identifier or path.name, data.target.name, len(data.classes),
        len(data.support_images), len(data.query_images), tuple(data.support_images.shape[1:]),
    )  # fmt: skip
    return data, {"startup and imports": imported - start, "task read": time.monotonic() - imported}


def _answer(
    data: TaskData, config: AdaptConfig, output: Output, *, strict: bool, start: float, phases: dict[str, float]
) -> int:
    """The class prior on disk first (unless strict), then the best predictions within the budget."""
    from .targets import class_prior

    begun = time.monotonic()
    if not strict:
        _write(output, class_prior(data), PRIOR)
        logger.info("wrote %s to %s; better predictions replace it when ready", PRIOR, output.path)
    phases["class prior"] = time.monotonic() - begun
    elapsed = time.monotonic() - start
    config = _left_of_budget(config, elapsed)
    begun = time.monotonic()
    result, how = _predict(data, config, strict=strict)
    adapted = time.monotonic()
    _write(output, result.probabilities, how)
    written = time.monotonic()
    _log_result(data, config, result, how, start=start, budget=elapsed + config.time_budget)
    phases |= {k: v for k, v in result.timings.items() if k != "total"}  # model load, adapt, predict
    phases |= {"fallbacks": adapted - begun - result.timings.get("total", 0.0), "write": written - adapted}
    phases["total"] = time.monotonic() - start  # a caller's wall time minus this is interpreter exit
    logger.info("timings: %s", ", ".join(f"{name} {seconds:.2f}s" for name, seconds in phases.items()))
    return 0


def _write(output: Output, probabilities: torch.Tensor, what: str) -> None:
    try:
        output.write(probabilities, what)
    except OSError as err:
        raise _Exit(f"cannot write {output.path}: {err}", EXIT_WRITE) from err


def _left_of_budget(config: AdaptConfig, elapsed: float) -> AdaptConfig:
    """The time budget counts the whole process (CONTAINER_TIME_BUDGET unless set): what is left after `elapsed`.

    `config` has been through with_env(): a budget in $L2L_PEFT_TIME_BUDGET is already its time_budget."""
    if config.time_budget is None:
        config = dataclasses.replace(config, time_budget=CONTAINER_TIME_BUDGET)
    return dataclasses.replace(config, time_budget=max(1.0, config.time_budget - elapsed))


def _predict(data: TaskData, config: AdaptConfig, *, strict: bool) -> tuple[AdaptResult, str]:
    """(result, what produced it): the fallback chain, or with --strict the recipe alone (no backbone: exit 3)."""
    from .api import run
    from .cache import BackboneError
    from .container.fallback import run_with_fallbacks

    if not strict:
        return run_with_fallbacks(data, config)
    try:
        return run(data, config), "adapted"
    except BackboneError as err:
        raise _Exit(str(err), EXIT_NO_MODEL) from err


def _log_result(
    data: TaskData, config: AdaptConfig, result: AdaptResult, how: str, *, start: float, budget: float
) -> None:
    """One line that says what answered, with which model and method, in how much of the budget."""
    from .cache import BackboneError, resolve_model

    try:
        model = resolve_model(config.model, config.cache_dir).name
    except BackboneError:
        model = config.model or "(none)"
    report = result.train
    logger.info(
        "%s: model %s, target %s, support %d, query %d, method %s, steps %s, precision %s, output %s%s, "
        "%.1fs of %.0fs budget",
        how, model, data.target.name, len(data.support_images), len(data.query_images), result.methods or config.method,
        f"{report.steps}/{report.planned_steps}" if report else 0, result.precision, tuple(result.probabilities.shape),
        f" ({result.prior_rows} rows class prior: out of time)" if result.prior_rows else "",
        time.monotonic() - start, budget,
    )  # fmt: skip


def entry() -> NoReturn:
    """The process entry point: main(), then exit without the interpreter's teardown (see exit_process)."""
    exit_process(main())
