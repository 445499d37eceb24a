"""Experiments: adaptation methods compared on few-shot task suites (`python -m l2l_peft.experiments`)."""

from .config import ExperimentConfig, SuiteConfig, load_config
from .methods import MethodSpec, Variant
from .runner import run_experiment

__all__ = ["ExperimentConfig", "MethodSpec", "SuiteConfig", "Variant", "load_config", "run_experiment"]
