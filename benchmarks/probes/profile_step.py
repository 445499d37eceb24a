"""Where a training step's GPU time goes: top kernels of adapt() with and without CUDA graphs.

python benchmarks/probes/profile_step.py --arch vit-b16 --batch 32 128
"""

from __future__ import annotations

import argparse
from pathlib import Path

import _paths  # noqa: F401
from common import ARCHS, fresh_accelerate, make_task, save_model
from torch.profiler import ProfilerActivity, profile

from l2l_peft import api
from l2l_peft.task import load_task


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="vit-b16", choices=sorted(ARCHS))
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--models", type=Path, default=Path("/tmp/bench_models"))
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument(
        "--method", default="auto", help="what trains (auto: the device's default, an ensemble on a GPU)"
    )
    args = parser.parse_args()
    model_dir = str(save_model(args.arch, args.models, 224))
    api.run(load_task(make_task(10, 10, 224)), model=model_dir, max_steps=2, min_steps=2)  # warm-up
    for batch in args.batch:
        data = load_task(make_task(batch, 1, 224))
        for graphs in (False, True):
            fresh_accelerate()
            options = dict(
                model=model_dir,
                method=args.method,
                batch_size=batch,
                max_steps=args.steps,
                min_steps=args.steps,
                cuda_graphs=graphs,
            )
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                result = api.run(data, **options)
            events = [e for e in prof.key_averages() if e.device_time_total > 0]
            total = sum(e.self_device_time_total for e in events)
            print(
                f"\n== batch {batch} graphs {graphs}: {result.train.images_per_second:.0f} img/s, "
                f"GPU busy {total / 1e3 / args.steps:.1f} ms/step, "
                f"wall {1e3 * result.train.seconds / args.steps:.1f} ms/step"
            )
            for e in sorted(events, key=lambda e: -e.self_device_time_total)[: args.top]:
                share = e.self_device_time_total / total
                print(f"{share:6.1%} {e.count:6d}x {e.key[:90]}")


if __name__ == "__main__":
    main()
