"""The image's self-check (`singularity test` runs `python -m l2l_peft.selfcheck`)."""

from __future__ import annotations

import os
import subprocess
import sys


def test_selfcheck_adapts_and_checks_the_output(vit_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "L2L_PEFT_MODEL": str(vit_dir)}
    command = [sys.executable, "-m", "l2l_peft.selfcheck", "--time-budget", "60"]
    proc = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "selfcheck: ok, output (6, 3)" in proc.stdout
