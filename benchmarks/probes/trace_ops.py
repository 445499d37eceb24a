"""Which aten ops a training step issues: matmuls by dtype and host-to-device copies, eager vs graphed.

The kernel profile (profile_step.py) shows float32 GEMMs and pageable host copies but not who
issues them; a dispatch mode sees every op, also inside backward and during CUDA-graph capture.

    python benchmarks/probes/trace_ops.py --arch vit-b16 --batch 32
"""

from __future__ import annotations

import argparse
import collections
import traceback
from pathlib import Path

import _paths  # noqa: F401
import torch
from common import ARCHS, REPO, fresh_accelerate, make_task, save_model
from torch.utils._python_dispatch import TorchDispatchMode

from l2l_peft import api
from l2l_peft.task import load_task

MATMULS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear"}
OWN = ("l2l_peft/", "peft/", "transformers/", "accelerate/", "torch/optim/", "torch/nn/utils/")


def _where() -> str:
    """The innermost frame of our code or the libraries we drive (backward shows its caller)."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        if any(part in frame.filename for part in OWN):
            short = frame.filename.split("site-packages/")[-1].removeprefix(f"{REPO}/")
            return f"{short}:{frame.lineno} {frame.name}"
    return "?"


class Tally(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.found: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if name in MATMULS and any(t.dtype == torch.float32 for t in tensors):
            shapes = " x ".join(f"{tuple(t.shape)}{str(t.dtype)[6:]}" for t in tensors)
            self.found[f"fp32 {name} {shapes} @ {_where()}"] += 1
        out = func(*args, **kwargs)
        if name in ("_to_copy", "copy_", "to", "_copy_from"):
            src = next((t for t in tensors if t.device.type == "cpu"), None)
            dst = out if isinstance(out, torch.Tensor) else None
            if src is not None and dst is not None and dst.device.type == "cuda":
                self.found[f"H2D {name} {tuple(src.shape)} pinned={src.is_pinned()} @ {_where()}"] += 1
        return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="vit-b16", choices=sorted(ARCHS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6, help="graphed: 3 eager warm-up steps, 1 capture, replays")
    parser.add_argument("--models", type=Path, default=Path("/tmp/bench_models"))
    args = parser.parse_args()
    model_dir = str(save_model(args.arch, args.models, 224))
    data = load_task(make_task(args.batch, 4, 224))
    for graphs in (False, True):
        fresh_accelerate()
        tally = Tally()
        with tally:
            api.run(
                data,
                model=model_dir,
                batch_size=args.batch,
                max_steps=args.steps,
                min_steps=args.steps,
                cuda_graphs=graphs,
            )
        print(f"\n== graphs {graphs}: {sum(tally.ops.values())} ops in {args.steps} steps (+ load, predict)")
        print("   top ops:", ", ".join(f"{k} {v}" for k, v in tally.ops.most_common(12)))
        for key, count in tally.found.most_common(40):
            print(f"{count:6d}x {key}")


if __name__ == "__main__":
    main()
