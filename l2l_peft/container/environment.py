"""The challenge's sandbox settings: offline mode, and a scratch HOME when the real one is not writable.

The CLI calls `prepare()` before anything imports huggingface_hub or transformers (both read
their settings at import). Only unset variables are filled, so a container's own settings win.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# The CLI only ever loads local files; saying so also stops version checks, telemetry and bars.
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # no progress bars in the evaluation log
}

# Every cache or config directory the stack may write to, relative to a scratch directory.
WRITABLE = {
    "HOME": "home",  # catch-all for libraries that write to ~/.something
    "HF_HOME": "huggingface",
    "TORCH_HOME": "torch",
    "TRITON_CACHE_DIR": "triton",
    "TORCHINDUCTOR_CACHE_DIR": "torchinductor",
    "CUDA_CACHE_PATH": "nv",
    "MPLCONFIGDIR": "matplotlib",
    "XDG_CACHE_HOME": "cache",
    "XDG_CONFIG_HOME": "config",
    "XDG_DATA_HOME": "data",
}


def home_is_writable(environ: dict[str, str] | os._Environ = os.environ) -> bool:
    home = environ.get("HOME")
    return bool(home) and Path(home).is_dir() and os.access(home, os.W_OK)


def prepare(environ: dict[str, str] | os._Environ = os.environ) -> Path | None:
    """Force offline mode; without a writable HOME, point HOME and unset caches at a scratch dir.

    The scratch dir lives under $TMPDIR (else /tmp) and is removed when the process exits.
    """
    for key, value in OFFLINE.items():
        environ.setdefault(key, value)
    if home_is_writable(environ):
        return None
    scratch = Path(tempfile.mkdtemp(prefix="l2l_peft-"))
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    for key, sub in WRITABLE.items():
        if key == "HOME" or key not in environ:  # an unusable HOME is replaced, other settings kept
            environ[key] = str(scratch / sub)
            (scratch / sub).mkdir()
    return scratch
