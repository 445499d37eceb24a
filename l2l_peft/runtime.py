"""The process around every front end (CLI, adapt(), experiments, pretraining): its accelerator.

accelerate keeps one global state per process; this module is the only one that resets it.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from .config import Precision


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
