"""Medical backbone pretraining: `python -m l2l_peft.pretrain CONFIG.yaml --output DIR` (see __main__).

The names below load on first use, so that a missing `experiments` extra (yaml, tqdm) is reported
by name (`pip install "l2l-peft[experiments]"`) rather than as a bare import error.
"""

from importlib import import_module

from ..extras import require

_MODULES = {"PretrainConfig": "config", "load_config": "config", "PretrainResult": "loop", "pretrain": "loop"}
__all__ = ["PretrainConfig", "PretrainResult", "load_config", "pretrain"]


def __getattr__(name: str) -> object:
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    require("experiments", "l2l_peft.pretrain")
    return getattr(import_module(f".{_MODULES[name]}", __name__), name)
