"""Create the CUDA context in a background thread while the main thread imports and reads the task.

A fresh CLI process spends about a second creating the CUDA context. torch creates it while
holding the GIL, so it cannot overlap with imports; the driver call through ctypes releases the
GIL, and torch later adopts that primary context. The thread does nothing else: an earlier form
that also ran a tiny training step to load kernels contended for the GIL and slowed the task
read by as much as it saved (benchmarks/results/bench_adapt.md, run 6). It is joined before any
CUDA work of the main thread.
"""

from __future__ import annotations

import ctypes
import threading
import time


class GpuWarmup:
    """`start()` returns at once; `wait()` joins and returns the seconds the caller waited."""

    def __init__(self, device: int = 0) -> None:
        self.ready = False
        self.thread = threading.Thread(target=self._run, args=(device,), name="l2l-gpu-warmup", daemon=True)

    def start(self) -> GpuWarmup:
        self.thread.start()
        return self

    def wait(self) -> float:
        start = time.monotonic()
        self.thread.join()
        return time.monotonic() - start

    def _run(self, device: int) -> None:
        self.ready = create_cuda_context(device)


def create_cuda_context(device: int = 0) -> bool:
    """Retain the driver's primary context of `device` (the one torch's runtime uses); False without a GPU driver."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    handle, context = ctypes.c_int(), ctypes.c_void_p()
    ok = driver.cuInit(0) == 0 and driver.cuDeviceGet(ctypes.byref(handle), device) == 0
    return ok and driver.cuDevicePrimaryCtxRetain(ctypes.byref(context), handle) == 0
