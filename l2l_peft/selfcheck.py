"""Container self-check (`singularity test IMAGE.sif`): adapt to a generated task, check the output.

    python -m l2l_peft.selfcheck [--time-budget 120]

Builds a 3-class task of 12 support / 6 query random images in /tmp, runs the real command line
(`python -m l2l_peft`) on it with the image's default model, and exits non-zero unless the output
is a finite [6, 3] tensor of probabilities.
"""

from __future__ import annotations

import argparse
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torchcross.data.task import Task, TaskDescription, TaskTarget

from .task import challenge_task

N_SUPPORT, N_QUERY, CLASSES = 12, 6, {0: "a", 1: "b", 2: "c"}


def generated_task() -> Task:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(N_SUPPORT + N_QUERY) % len(CLASSES)
    images = torch.rand(len(labels), 3, 64, 64, generator=g) * 2 - 1
    return challenge_task(images, labels, N_SUPPORT, TaskDescription(TaskTarget.MULTICLASS_CLASSIFICATION, CLASSES))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m l2l_peft.selfcheck", description=__doc__.split("\n\n")[0])
    parser.add_argument("--time-budget", type=float, default=120.0, help="seconds for the adaptation run")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="l2l_peft-selfcheck-") as tmp:
        task, out = Path(tmp) / "task.pkl", Path(tmp) / "result.pkl"
        task.write_bytes(pickle.dumps(generated_task()))
        command = [sys.executable, "-m", "l2l_peft", str(task), str(out), "--time-budget", str(args.time_budget)]
        if subprocess.run(command, check=False).returncode != 0:
            print("selfcheck: FAILED, the command line exited non-zero", file=sys.stderr)
            return 1
        probabilities = pickle.loads(out.read_bytes())
    ok = probabilities.shape == (N_QUERY, len(CLASSES)) and bool(torch.isfinite(probabilities).all())
    print(f"selfcheck: {'ok' if ok else 'FAILED'}, output {tuple(probabilities.shape)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
