"""Safe unpickling of untrusted task bytes: an allowlisting unpickler.

Challenge tasks are pickles, i.e. programs. We run them through an unpickler whose globals are a
closed table: torchcross task types, checked tensor and numpy rebuilds, plain containers; any
other global raises PickleRefused before it is called. It is pickle's pure-Python unpickler (the C
one cannot refuse an opcode), so that BUILD, pickle's only way to set attributes, works only on
objects this load created: a pickle cannot rewrite `TaskDescription`, an enum member or a function.
Tensor storages are legacy `torch.save` blobs (a nested pickle torch would load with
`weights_only=False`); we read them ourselves and size them from their bytes, not from a claim.
A rebuilt tensor must lie inside its storage without overlapping itself, so no pickle can make a
tensor larger than its own bytes; gradients, hooks and tensor metadata are dropped.
"""

from __future__ import annotations

import _compat_pickle
import enum
import io
import math
import pickle
import reprlib
import sys
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torchcross.data.task import TaskDescription, TaskTarget

try:  # numpy >= 2 (numpy.core is deprecated and warns from numpy 2.5 on); pickles may name either module
    from numpy._core import multiarray as _multiarray
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _multiarray

MAX_TENSOR_DIMS = 8  # a task holds at most 4-D tensors (collated images)


class PickleRefused(ValueError):
    """The pickle does something a task pickle never does; nothing of it was executed."""


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 200


def clip(text: str, limit: int = 200) -> str:
    """`text` as one line of at most `limit` characters, for messages that echo untrusted values."""
    text = " ".join(str(text)[: 4 * limit].split())  # cut first: a 10 MB value costs no more than a short one
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(value: Any) -> str:
    """A bounded one-line repr: nested, huge or broken values cannot blow up an error message."""
    try:
        return clip(_REPR.repr(value))
    except Exception:  # noqa: BLE001  (a repr that fails, too deep or broken, still names the type)
        return f"<{type(value).__name__}>"


class LegacyTask:
    """Stand-in for any pickled torchcross Task: keeps the state whatever the layout."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


class _NdarrayClass:
    """Stands for `numpy.ndarray` as `_reconstruct`'s argument; calling it cannot allocate an array."""


@dataclass(frozen=True)
class _Storage:
    """A tensor storage read from its blob: the flat data, which bounds every tensor built on it."""

    data: torch.Tensor  # 1-D, contiguous


_BUILDABLE = (LegacyTask, TaskDescription, np.ndarray, np.dtype)  # objects a task pickle sets state on


def _refuse(message: str) -> PickleRefused:
    return PickleRefused(f"{message} (refused)")


def _int_tuple(values: Any, what: str) -> tuple[int, ...]:
    if (
        not isinstance(values, tuple)
        or len(values) > MAX_TENSOR_DIMS
        or not all(type(v) is int and v >= 0 for v in values)
    ):
        raise _refuse(f"a tensor in the task pickle has {what} {describe(values)}")
    return values


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_grad_hooks_metadata: Any) -> torch.Tensor:
    """torch's `_rebuild_tensor_v2` (and v1), checked: the view lies inside its storage and never overlaps itself.

    requires_grad, backward hooks and metadata are ignored: a task's tensors are plain data.
    """
    if not isinstance(storage, _Storage):
        raise _refuse(f"a tensor in the task pickle is built on a {type(storage).__name__}, not a storage")
    size, stride, numel = _int_tuple(size, "size"), _int_tuple(stride, "strides"), storage.data.numel()
    if type(offset) is not int or not 0 <= offset <= numel or len(size) != len(stride):
        raise _refuse(f"a tensor in the task pickle has offset {describe(offset)}, size {size}, strides {stride}")
    if math.prod(size):
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= numel:
            raise _refuse(
                f"a tensor of size {size} in the task pickle reaches element {last} of a {numel}-element storage"
            )
        reach = 1  # elements spanned by the dimensions of smaller stride; a larger stride must step over them
        for s, n in sorted((s, n) for n, s in zip(size, stride) if n > 1):
            if s < reach:
                raise _refuse(f"a tensor of size {size} in the task pickle overlaps itself (strides {stride})")
            reach += s * (n - 1)
    return storage.data.as_strided(size, stride, offset)


def _rebuild_parameter(data: Any, *_grad_hooks: Any) -> torch.Tensor:
    """A pickled nn.Parameter becomes its (already checked) plain tensor."""
    if not isinstance(data, torch.Tensor):
        raise _refuse(f"a parameter in the task pickle wraps a {type(data).__name__}")
    return data


_STORAGE_DTYPES = {
    ("torch", f"{name}Storage"): dtype
    for name, dtype in [
        ("Float", torch.float32), ("Double", torch.float64), ("Half", torch.float16), ("BFloat16", torch.bfloat16),
        ("Byte", torch.uint8), ("Char", torch.int8), ("Short", torch.int16), ("Int", torch.int32),
        ("Long", torch.int64), ("Bool", torch.bool),
    ]
}  # fmt: skip


def _storage_from_blob(blob: Any) -> _Storage:
    """A legacy `torch.save(storage)` blob as tensor pickles embed it, read without `torch.load`.

    The blob is five small pickles (magic number, format version, system info, the persistent id
    ('storage', XStorage, key, location, numel, None), the list of keys), numel as 8 bytes and
    the raw data. The storage is as large as the data present, whatever the blob claims.
    """
    if not isinstance(blob, bytes):
        raise _refuse(f"a tensor storage in the task pickle is a {type(blob).__name__}, not bytes")
    file = io.BytesIO(blob)
    magic, version, info = (_Unpickler(file, {}).load() for _ in range(3))
    ref = _Unpickler(file, _STORAGE_DTYPES, persistent_ids=True).load()
    keys = _Unpickler(file, {}).load()
    ok = (
        magic == torch.serialization.MAGIC_NUMBER
        and version == torch.serialization.PROTOCOL_VERSION
        and isinstance(info, dict)
        and info.get("little_endian") == (sys.byteorder == "little")
        and isinstance(ref, tuple)
        and len(ref) in (5, 6)
        and ref[0] == "storage"
        and isinstance(ref[1], torch.dtype)
        and type(ref[4]) is int
        and ref[5:] in ((), (None,))
        and keys == [ref[2]]
    )
    if not ok:
        raise _refuse("a tensor storage in the task pickle is not a plain legacy torch.save storage")
    dtype, numel = ref[1], ref[4]
    header = file.read(8)
    data = memoryview(blob)[file.tell() :]
    if int.from_bytes(header, "little") != numel or len(data) != numel * dtype.itemsize:
        raise _refuse(
            f"a tensor storage in the task pickle claims {numel} elements but holds {len(data)} bytes of {dtype}"
        )
    return _Storage(torch.frombuffer(bytearray(data), dtype=dtype) if numel else torch.empty(0, dtype=dtype))


def _empty_array(subtype: Any, shape: Any, typecode: Any) -> np.ndarray:
    """numpy's `_reconstruct` as array pickles call it: an empty array that BUILD fills (numpy checks the sizes)."""
    if subtype is not _NdarrayClass or shape != (0,):
        raise _refuse(f"task pickle builds a numpy array of shape {describe(shape)} before its data")
    return _multiarray._reconstruct(np.ndarray, (0,), typecode)


def _array_from_buffer(buf: Any, dtype: Any, shape: Any, order: Any, axis_order: Any = None) -> np.ndarray:
    """numpy's protocol-5 array pickle (`_frombuffer`): the array is its buffer, reshaped; numpy checks the sizes."""
    if not isinstance(buf, (bytes, bytearray)) or not isinstance(dtype, np.dtype):
        raise _refuse(f"task pickle builds a numpy array from a {type(buf).__name__} and {describe(dtype)}")
    array = np.frombuffer(buf, dtype=dtype)
    if order == "K" and axis_order is not None:
        return array.reshape(shape, order="C").transpose(axis_order)
    return array.reshape(shape, order=order)


def _enum_member(cls: Any, name: Any) -> Any:
    """`getattr` as some Python 3.11 releases (bookworm's 3.11.2) pickle enum members, by name: enum lookups only."""
    if isinstance(cls, type) and issubclass(cls, enum.Enum) and isinstance(name, str) and name in cls.__members__:
        return cls[name]
    raise _refuse(f"task pickle calls getattr({describe(cls)}, {describe(name)}); only enum members are allowed")


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """copyreg's rebuild of plain classes in protocol 0 and 1 pickles, for the task classes only."""
    if cls not in (LegacyTask, TaskDescription) or base is not object or state is not None:
        raise _refuse(f"task pickle rebuilds {describe(cls)} from {describe(base)} through copyreg")
    return object.__new__(cls)


def _latin1(text: Any, encoding: Any) -> bytes:
    """How protocol 0-2 pickles spell bytes: `codecs.encode(str, "latin1")`."""
    if not isinstance(text, str) or encoding != "latin1":
        raise _refuse(f"task pickle calls codecs.encode with encoding {describe(encoding)}")
    return text.encode("latin-1")


def _empty_bytes() -> bytes:
    """How protocol 0-2 pickles spell b"" (numpy arrays with no elements hold it)."""
    return b""


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """Both spellings that pickles use (numpy 1 wrote numpy.core, numpy 2 writes numpy._core)."""
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): _NdarrayClass, ("numpy", "dtype"): np.dtype}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = _empty_array
        allowed[(module, "scalar")] = _multiarray.scalar
    for module in ("numpy.core.numeric", "numpy._core.numeric"):
        allowed[(module, "_frombuffer")] = _array_from_buffer
    return allowed


_TASK_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _storage_from_blob,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "getattr"): _enum_member,
    ("builtins", "object"): object,
    ("builtins", "bytes"): _empty_bytes,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("_codecs", "encode"): _latin1,
    **{(module, "Task"): LegacyTask for module in ("torchcross.data.task", "torchcross.data")},
    **{(module, "TaskDescription"): TaskDescription for module in ("torchcross.data.task", "torchcross.data")},
    **{(module, "TaskTarget"): TaskTarget for module in ("torchcross.data.task", "torchcross.data")},
    **{("torch", name): dtype for name, dtype in vars(torch).items() if isinstance(dtype, torch.dtype)},
    **_numpy_globals(),
}


class _Unpickler(pickle._Unpickler):
    """pickle's pure-Python unpickler with a closed table of globals and BUILD limited to `_BUILDABLE`."""

    dispatch: ClassVar[dict[int, Any]] = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: io.BytesIO, allowed: dict[tuple[str, str], Any], *, persistent_ids: bool = False) -> None:
        super().__init__(file)
        self.allowed, self.persistent_ids = allowed, persistent_ids

    def find_class(self, module: str, name: str) -> Any:
        if self.proto < 3:  # protocol 0-2 pickles name Python 2 modules (copy_reg, __builtin__)
            module, name = _compat_pickle.NAME_MAPPING.get(
                (module, name), (_compat_pickle.IMPORT_MAPPING.get(module, module), name)
            )
        try:
            return self.allowed[(module, name)]
        except (KeyError, TypeError):
            where = clip(f"{module}.{name}")
            raise PickleRefused(
                f"task pickle refers to {where}, which is not allowed in a task (refused, not executed)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        if self.persistent_ids:
            return pid
        raise _refuse("task pickle uses persistent ids, which plain task pickles never do")

    def load_build(self) -> None:
        target = self.stack[-2]  # BUILD pops the state; the object below it receives it
        if not isinstance(target, _BUILDABLE):
            raise _refuse(f"task pickle sets attributes of {describe(target)}; only objects it creates take state")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build


def safe_loads(data: bytes) -> Any:
    """Unpickle untrusted bytes, executing nothing outside the allowlist."""
    return _Unpickler(io.BytesIO(data), _TASK_GLOBALS).load()
