"""The process around every front end (CLI, adapt(), experiments, pretraining): accelerator, logging, exit.

accelerate keeps one global state per process; this module is the only one that resets it.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from typing import IO, NoReturn

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from .config import Precision

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
QUIET = ("transformers", "accelerate", "peft", "torchopt")  # libraries whose warnings are not ours to show


def set_up_logging(level: str, *, stream: IO[str] = sys.stdout) -> None:
    """Time-stamped log lines at `level`; the libraries of QUIET only report errors."""
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=stream)
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.ERROR)


def make_accelerator(precision: Precision, *, cpu: bool) -> Accelerator:
    """An Accelerator with this precision (AUTO: bf16 where supported, else fp16; fp32 on the CPU) and device.

    accelerate keeps one global state per process and ignores the arguments of later Accelerators,
    so a second adapt() call or an experiment variant with another precision would silently run
    with the first one's; such a call resets the state (a distributed process group stays).
    """
    cpu = cpu or not torch.cuda.is_available()
    if precision is not Precision.AUTO:
        mixed = precision.value
    elif cpu:
        mixed = "no"
    else:
        mixed = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if AcceleratorState._shared_state:
        state = AcceleratorState()
        on_cpu = state.device.type == "cpu"
        if state.mixed_precision == mixed and on_cpu == cpu:
            return Accelerator()
        if on_cpu != cpu and state.num_processes > 1:
            raise ValueError(f"cpu={cpu} cannot change inside a distributed run on {state.device}")
        reset_accelerate(device=on_cpu != cpu)
    # cpu=True without CUDA: accelerate 1.15 only forms a CPU process group (gloo) when told so
    return Accelerator(mixed_precision=mixed, cpu=cpu)


def reset_accelerate(*, device: bool) -> None:
    """Forget accelerate's global state (precision, gradient state); with `device` also the process state
    (device, process group), which a change between CPU and GPU needs."""
    AcceleratorState._reset_state(reset_partial_state=device)
    GradientState._reset_state()


def exit_process(code: int) -> NoReturn:
    """End the process once main() has returned: atexit handlers run, the interpreter's teardown does not.

    In a distributed run the processes first meet, then leave the process group; a failing process
    leaves at once (the launcher stops the others). The teardown is skipped because it is
    - unsafe in a distributed run: gloo's worker threads outlive destroy_process_group (torch modules
      imported after the group exists, e.g. torch.distributed.nn through transformers' model import,
      hold it as a default argument), and a worker that drops the last reference to a finished
      collective's tensors takes the GIL, which during the teardown ends the thread inside a noexcept
      destructor: std::terminate and SIGABRT after all work was done (2 of 7 CI runs of the 2-process tests);
    - slow: torch, transformers and a CUDA context took 0.6 s (2 CPU cores) to 1.4 s (the H100
      machine) to tear down, after the CLI's output was written.
    An exception inside main() never gets here and exits the usual way.
    """
    dist = sys.modules.get("torch.distributed")  # only if something imported it
    if dist is not None and dist.is_available() and dist.is_initialized():
        if code == 0:
            dist.barrier()
        dist.destroy_process_group()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
