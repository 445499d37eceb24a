"""Start the GPU in a background thread while the main thread imports and reads the task.

A fresh CLI process spends seconds before its first useful kernel: creating the CUDA context and
lazily loading the cuBLAS, cuDNN and flash-attention kernels on first use. torch creates the
context while holding the GIL (the main thread's imports then stall), so the thread creates it
first through ctypes, which releases the GIL; torch later adopts that primary context. The thread
must be joined before training: a CUDA-graph capture fails if another thread launches work during it.

Opt-in (`--gpu-warmup`): on an H100 it saved about 1 s per CLI run in a large development
environment, but with the container's package set the main thread lost to GIL contention what
the GPU gained (benchmarks/results/bench_adapt.md, run 6).
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time

logger = logging.getLogger(__name__)


class GpuWarmup:
    """`start()` returns at once; `wait()` joins and returns the seconds the caller waited."""

    def __init__(self, bf16: bool = True) -> None:
        self.bf16 = bf16
        self.thread = threading.Thread(target=self._run, name="l2l-gpu-warmup", daemon=True)

    def start(self) -> GpuWarmup:
        self.thread.start()
        return self

    def wait(self) -> float:
        start = time.monotonic()
        self.thread.join()
        return time.monotonic() - start

    def _run(self) -> None:
        try:
            warm_gpu(self.bf16)
        except Exception as err:  # noqa: BLE001  (a failed warm-up only costs its time; training reports real errors)
            logger.debug("GPU warm-up skipped: %s: %s", type(err).__name__, err)


def create_cuda_context(device: int = 0) -> bool:
    """The driver's primary context of `device` (the one torch's runtime uses); False without a GPU driver."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    handle, context = ctypes.c_int(), ctypes.c_void_p()
    ok = driver.cuInit(0) == 0 and driver.cuDeviceGet(ctypes.byref(handle), device) == 0
    return ok and driver.cuDevicePrimaryCtxRetain(ctypes.byref(context), handle) == 0


def warm_gpu(bf16: bool = True) -> bool:
    """A CUDA context, then one tiny training step through the kernels a ViT step uses; False without a GPU."""
    if not create_cuda_context():
        return False
    import torch

    from .attention import has_flash

    device = torch.device("cuda")
    dtype = torch.bfloat16 if bf16 and torch.cuda.is_bf16_supported() else torch.float16
    stream = torch.cuda.Stream()  # off the legacy default stream the main thread may use
    with torch.cuda.stream(stream):
        patch = torch.nn.Conv2d(3, 64, 16, 16).to(device)
        norm, mlp = torch.nn.LayerNorm(64).to(device), torch.nn.Linear(64, 64).to(device)
        with torch.autocast("cuda", dtype=dtype):
            tokens = patch(torch.randn(2, 3, 32, 32, device=device)).flatten(2).transpose(1, 2)  # [2, 4, 64]
            hidden = torch.nn.functional.gelu(mlp(norm(tokens)))
            if has_flash(device.index):  # the kernel attention.py calls
                q = hidden.unsqueeze(1).to(dtype)  # [2, 1, 4, 64]
                hidden = torch.ops.aten._scaled_dot_product_flash_attention(q, q, q, 0.0, False, False)[0]
            loss = hidden.float().square().mean()
        loss.backward()
        params = [*patch.parameters(), *norm.parameters(), *mlp.parameters()]
        torch.optim.AdamW(params, fused=True).step()
    stream.synchronize()
    return True
