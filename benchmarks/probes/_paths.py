"""Imported first by every probe: run as `python benchmarks/probes/NAME.py`, a probe sees only its own
folder on sys.path; this adds benchmarks/ so that `from common import ...` finds the shared helpers."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
