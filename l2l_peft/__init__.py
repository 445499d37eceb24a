"""l2l_peft: few-shot adaptation of pretrained vision transformers to medical imaging tasks."""

from .api import AdaptResult, adapt, run
from .cache import BackboneError
from .config import AdaptConfig, Method, Precision
from .io import save_predictions
from .task import TaskError, load_task

__all__ = [
    "AdaptConfig",
    "AdaptResult",
    "BackboneError",
    "Method",
    "Precision",
    "TaskError",
    "adapt",
    "load_task",
    "run",
    "save_predictions",
]
