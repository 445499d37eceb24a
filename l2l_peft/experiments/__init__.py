"""Experiments: adaptation methods compared on few-shot task suites (`python -m l2l_peft.experiments`).

The names below load on first use, so that a missing `experiments` extra is reported by name
(`pip install "l2l-peft[experiments]"`) before anything imports matplotlib or yaml.
"""

from importlib import import_module

from ..extras import require

_MODULES = {
    "ExperimentConfig": "config", "SuiteConfig": "config", "load_config": "config",
    "MethodSpec": "methods", "Variant": "methods", "run_experiment": "runner",
}  # fmt: skip
__all__ = ["ExperimentConfig", "MethodSpec", "SuiteConfig", "Variant", "load_config", "run_experiment"]


def __getattr__(name: str) -> object:
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    require("experiments", "l2l_peft.experiments")
    return getattr(import_module(f".{_MODULES[name]}", __name__), name)
