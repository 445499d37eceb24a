"""The process around a front end: the challenge's sandbox settings, and how the process ends.

The CLI calls `prepare()` before anything imports huggingface_hub or transformers (both read
their settings at import). Only unset variables are filled, so a container's own settings win.
Every front end's process ends through `exit_process()`.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

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


def exit_process(code: int) -> NoReturn:
    """End the process once main() has returned: atexit handlers run, the interpreter's teardown does not.

    In a distributed run the processes first meet, then leave the process group; a failing process
    leaves at once (the launcher stops the others). The teardown is skipped because it is
    - unsafe in a distributed run: gloo's worker threads outlive destroy_process_group (torch modules
      imported after the group exists, e.g. torch.distributed.nn through transformers' model import,
      hold it as a default argument), and a worker that drops the last reference to a finished
      collective's tensors takes the GIL, which during the teardown ends the thread inside a noexcept
      destructor: std::terminate and SIGABRT after all work was done (2 of 7 CI runs of the 2-process tests);
    - slow: torch, transformers and a CUDA context took 0.6 s (2 CPU cores) to 1.4 s (the H100
      machine) to tear down, after the CLI's output was written.
    An exception inside main() never gets here and exits the usual way.
    """
    dist = sys.modules.get("torch.distributed")  # only if something imported it
    if dist is not None and dist.is_available() and dist.is_initialized():
        if code == 0:
            dist.barrier()
        dist.destroy_process_group()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
