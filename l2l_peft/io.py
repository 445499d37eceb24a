"""Writing predictions in the challenge's format: a pickled float tensor."""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path

import torch


def save_predictions(probabilities: torch.Tensor, path: str | Path) -> None:
    """Atomically write a pickled tensor (a partial file never replaces a good one)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump(probabilities.detach().float().cpu().contiguous(), f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
