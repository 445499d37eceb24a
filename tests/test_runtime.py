"""How a front end's process ends: exit_process()."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# A one-process gloo group whose worker threads outlive destroy_process_group, as in a launched run.
ENDS_A_DISTRIBUTED_RUN = """
import atexit, os, sys
import torch
import torch.distributed as dist
from l2l_peft.runtime import exit_process

dist.init_process_group("gloo", init_method=sys.argv[1], rank=0, world_size=1)
import torch.distributed.nn  # noqa: F401  holds the group as a default argument, as transformers' imports do

class Teardown:
    def __del__(self, write=os.write):
        write(1, b"interpreter teardown\\n")

marker = Teardown()
dist.all_reduce(torch.ones(1))
atexit.register(lambda: print("atexit; group destroyed:", not dist.is_initialized()))
exit_process(3)
"""


def test_exit_process_leaves_the_group_and_skips_the_interpreter_teardown(tmp_path):
    """The teardown would run while gloo's threads live; a worker taking the GIL then aborts the process."""
    store = f"file://{tmp_path / 'store'}"
    command = [sys.executable, "-c", ENDS_A_DISTRIBUTED_RUN, store]
    done = subprocess.run(command, check=False, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr[-2000:]
    assert done.stdout == "atexit; group destroyed: True\n"
