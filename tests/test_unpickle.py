"""The allowlisting unpickler against hand-made hostile pickles, and legitimate pickles of every protocol."""

from __future__ import annotations

import io
import pickle
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch
from conftest import make_task, old_layout
from torchcross.data.task import Task, TaskDescription, TaskTarget

from l2l_peft import TaskError, load_task
from l2l_peft.task import unpickle_task


class Call:
    """Pickles as `func(*args)`: how the hostile pickles below are written."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def storage(n: int = 4, dtype=torch.uint8, *, claim: int | None = None) -> Call:
    """A legacy storage blob of `n` elements, as tensor pickles embed it; `claim` rewrites the element count it
    states."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # TypedStorage is deprecated, but it is what tensor pickles hold
        warnings.simplefilter("ignore")
        torch.save(torch.zeros(n, dtype=dtype).storage(), buffer, _use_new_zipfile_serialization=False)
    blob = buffer.getvalue()
    if claim is not None:
        assert blob.count(b"K%cN" % n) == 1
        blob = blob.replace(b"K%cN" % n, b"\x8a\x08" + claim.to_bytes(8, "little") + b"N")
    return Call(torch.storage._load_from_bytes, blob)


def tensor(size, stride, *, offset=0, source=None, requires_grad=False, hooks=None) -> Call:
    args = (source or storage(), offset, size, stride, requires_grad, hooks or OrderedDict())
    return Call(torch._utils._rebuild_tensor_v2, *args)


def with_image(image) -> bytes:
    task, _ = make_task(n_support=3, n_query=1)
    return pickle.dumps(Task([(image, task.support[0][1])] + task.support[1:], task.query, task.description))


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize("layout", ["new", "old"])
def test_every_protocol_loads(layout, protocol):
    """Protocols 0-2 spell bytes and plain classes through codecs.encode and copyreg._reconstructor."""
    task, _ = make_task(TaskTarget.BINARY_CLASSIFICATION, n_support=4, n_query=2)
    data = load_task(pickle.dumps(task if layout == "new" else old_layout(task), protocol=protocol))
    assert data.target is TaskTarget.BINARY_CLASSIFICATION
    torch.testing.assert_close(data.support_images, torch.stack([x for x, _ in task.support]))
    assert data.query_images.shape == (2, 3, 32, 32)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_numpy_arrays_of_every_protocol_load(protocol):
    """Protocol 5 pickles (transposed) arrays through numpy's _frombuffer; an empty array's data is b""
    (builtins.bytes below 3)."""
    task, _ = make_task(n_support=4, n_query=0)
    numpy_task = Task(
        [(x.numpy().transpose(0, 2, 1), y.numpy()) for x, y in task.support], np.zeros((0, 32, 32, 3)), task.description
    )
    data = load_task(pickle.dumps(numpy_task, protocol=protocol))
    torch.testing.assert_close(data.support_images, torch.stack([x.transpose(1, 2) for x, _ in task.support]))
    assert len(data.query_images) == 0


def test_tensor_claiming_more_than_its_storage_is_refused_before_allocating():
    """2^40 elements over a 4-byte storage: torch's own rebuild resizes the storage to fit (a 2^31 claim took 8 GB)."""
    with pytest.raises(TaskError, match="4-element storage"):
        load_task(with_image(tensor((2**40,), (1,))))


def test_tensor_overlapping_itself_is_refused():
    """A stride-0 view turns 4 stored bytes into an image of any size."""
    with pytest.raises(TaskError, match="overlaps itself"):
        load_task(with_image(tensor((3, 32, 32), (0, 0, 0))))


def test_storage_blob_claiming_more_than_it_holds_is_refused():
    with pytest.raises(TaskError, match="claims 1099511627776 elements but holds 4 bytes"):
        load_task(with_image(tensor((4,), (1,), source=storage(claim=2**40))))


def test_tensors_come_without_gradients_or_hooks():
    """A pickled tensor can carry requires_grad and backward hooks (any allowlisted callable) that would run in
    training."""
    hooked = tensor((2, 2), (2, 1), source=storage(4, torch.float32), requires_grad=True, hooks=OrderedDict([(0, set)]))
    loaded = unpickle_task(pickle.dumps([hooked]))[0]
    assert not loaded.requires_grad and not loaded._backward_hooks
    assert loaded.shape == (2, 2)


def _build(target: bytes, state: bytes) -> bytes:
    """PROTO 4, push `target`, push `state`, BUILD, STOP: the attribute-overwrite attack."""
    return b"\x80\x04" + target + state + b"b."


def _global(module: str, name: str) -> bytes:
    return b"".join(b"\x8c%c%s" % (len(s), s.encode()) for s in (module, name)) + b"\x93"


_NO_INIT = b"N}\x8c\x08__init__Ns\x86"  # (None, {"__init__": None}): slot state, i.e. setattr(target, "__init__", None)


@pytest.mark.parametrize(
    "attack",
    [
        "class",  # setattr(TaskDescription, "__init__", None): every later TaskDescription(...) fails
        "enum member",  # TaskTarget.BINARY_CLASSIFICATION._value_ = 99 for the rest of the process
        "function",  # setattr(torch._utils._rebuild_tensor_v2, "__defaults__", None)
    ],
)
def test_build_cannot_rewrite_allowlisted_objects(monkeypatch, attack):
    rebuild = torch._utils._rebuild_tensor_v2
    member = TaskTarget.BINARY_CLASSIFICATION
    # put back by monkeypatch even where the attack works, so that it cannot leak into other tests
    monkeypatch.setattr(TaskDescription, "__init__", TaskDescription.__init__)
    monkeypatch.setattr(member, "_value_", member._value_)
    monkeypatch.setattr(rebuild, "__defaults__", rebuild.__defaults__)
    before = (TaskDescription.__init__, member._value_, rebuild.__defaults__)
    data = {
        "class": _build(_global("torchcross.data.task", "TaskDescription"), _NO_INIT),
        "enum member": _build(_global("torchcross.data.task", "TaskTarget") + b"K\x02\x85R", b"}\x8c\x07_value_Kcs"),
        "function": _build(_global("torch._utils", "_rebuild_tensor_v2"), b"N}\x8c\x0c__defaults__Ns\x86"),
    }[attack]
    with pytest.raises(TaskError):
        load_task(data)
    assert (TaskDescription.__init__, member._value_, rebuild.__defaults__) == before
