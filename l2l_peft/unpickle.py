"""Safe unpickling of untrusted task bytes: an allowlisting unpickler.

Challenge tasks are pickles, i.e. programs. We run them through an allowlisting unpickler that
only rebuilds tensors, torchcross task types, numpy arrays and plain containers; any other
global raises PickleRefused before it is called. Tensor storages in these pickles are legacy
`torch.save` blobs that torch would load with `weights_only=False` (a second, nested pickle);
we load them with `weights_only=True` instead.
"""

from __future__ import annotations

import enum
import io
import pickle
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from torchcross.data.task import TaskDescription, TaskTarget


class PickleRefused(ValueError):
    """The pickle does something a task pickle never does; nothing of it was executed."""


class LegacyTask:
    """Stand-in for any pickled torchcross Task: keeps the state whatever the layout."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


def _load_storage_safely(blob: bytes) -> Any:
    try:
        return torch.load(io.BytesIO(blob), weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, AttributeError...
        raise PickleRefused(f"a tensor blob in the task pickle is not a plain tensor storage ({err})") from err


def _enum_member(cls: Any, name: str) -> Any:
    """`getattr` as some Python 3.11 releases (bookworm's 3.11.2) pickle enum members, by name: enum lookups only."""
    if isinstance(cls, type) and issubclass(cls, enum.Enum) and isinstance(name, str) and name in cls.__members__:
        return cls[name]
    raise PickleRefused(f"task pickle calls getattr({cls!r}, {name!r}); only enum members are allowed (refused)")


def _numpy_globals() -> dict[tuple[str, str], Any]:
    from numpy.core import multiarray  # noqa: F401  (old pickles name numpy.core)

    allowed = {}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = np.core.multiarray._reconstruct
        allowed[(module, "scalar")] = np.core.multiarray.scalar
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    return allowed


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage_safely,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "getattr"): _enum_member,
    ("torchcross.data.task", "Task"): LegacyTask,
    ("torchcross.data.task", "TaskDescription"): TaskDescription,
    ("torchcross.data.task", "TaskTarget"): TaskTarget,
    ("torchcross.data", "Task"): LegacyTask,
    ("torchcross.data", "TaskDescription"): TaskDescription,
    ("torchcross.data", "TaskTarget"): TaskTarget,
}


class _AllowlistUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if (module, name) in _NUMPY:
            return _NUMPY[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise PickleRefused(
            f"task pickle refers to {module}.{name}, which is not allowed in a task (refused, not executed)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise PickleRefused("task pickle uses persistent ids, which plain task pickles never do")


_NUMPY = _numpy_globals()


def safe_loads(data: bytes) -> Any:
    """Unpickle untrusted bytes, executing nothing outside the allowlist."""
    return _AllowlistUnpickler(io.BytesIO(data)).load()
