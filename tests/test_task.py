"""Task reading: safe unpickling, both torchcross layouts, validation errors."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import CLASSES, make_task, old_layout, write_task
from torchcross.data.task import Task, TaskDescription, TaskTarget

from l2l_peft import TaskError, load_task
from l2l_peft.task import challenge_task


class _Evil:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    task, _ = make_task()
    task.description.task_identifier = _Evil(str(marker))
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(task))
    with pytest.raises(TaskError, match="not allowed"):
        load_task(path)
    assert not marker.exists()


def test_payload_nested_in_tensor_blob_is_refused(tmp_path):
    """A storage blob is itself a pickle: it must be loaded with weights_only=True."""
    marker = tmp_path / "pwned"
    blob = pickle.dumps(_Evil(str(marker)), protocol=2)

    class Blob:
        def __reduce__(self):
            return (torch.storage._load_from_bytes, (blob,))

    task, _ = make_task()
    task.description.task_identifier = Blob()
    with pytest.raises(TaskError):
        load_task(pickle.dumps(task))
    assert not marker.exists()


def test_enum_pickled_by_name_loads(monkeypatch):
    """Python 3.11.2 (Debian bookworm) pickles enum members as builtins.getattr(TaskTarget, name)."""
    monkeypatch.setattr(TaskTarget, "__reduce_ex__", lambda self, protocol: (getattr, (type(self), self.name)))
    task, _ = make_task(TaskTarget.BINARY_CLASSIFICATION)
    data = pickle.dumps(task)
    assert b"getattr" in data
    assert load_task(data).target is TaskTarget.BINARY_CLASSIFICATION


def test_getattr_other_than_enum_member_is_refused():
    class Probe:
        def __reduce__(self):
            return (getattr, (set, "__subclasses__"))

    task, _ = make_task()
    task.description.task_identifier = Probe()
    with pytest.raises(TaskError, match="only enum members"):
        load_task(pickle.dumps(task))


@pytest.mark.parametrize("data", [b"", b"not a pickle", pickle.dumps({"x": 1})[:-3]])
def test_garbage_bytes(data):
    with pytest.raises(TaskError):
        load_task(data)


def test_missing_file(tmp_path):
    with pytest.raises(TaskError, match="cannot read"):
        load_task(tmp_path / "nope.pkl")


@pytest.mark.parametrize("layout", ["new", "old"])
def test_both_layouts_roundtrip(tmp_path, layout):
    task, _ = make_task(TaskTarget.MULTILABEL_CLASSIFICATION)
    if layout == "old":
        task = old_layout(task)
    data = load_task(write_task(task, tmp_path / "t.pkl"))
    assert data.target is TaskTarget.MULTILABEL_CLASSIFICATION
    assert data.classes == CLASSES[TaskTarget.MULTILABEL_CLASSIFICATION]
    assert data.support_images.shape == (12, 3, 32, 32)
    assert data.support_labels.shape == (12, 3)
    assert data.query_images.shape == (9, 3, 32, 32)


def test_collated_task_and_numpy_images():
    task, _ = make_task(n_support=6)
    images = np.stack([x.numpy() for x, _ in task.support])
    labels = torch.stack([y for _, y in task.support])
    query = torch.stack([x for x, _ in task.query])
    collated = Task((torch.from_numpy(images), labels), (query,), task.description)
    data = load_task(pickle.dumps(collated))
    assert data.support_images.shape == (6, 3, 32, 32)
    assert data.query_images.shape == (9, 3, 32, 32)


def test_query_forms_are_equivalent():
    task, _ = make_task()
    images_only = Task(task.support, [x for x, _ in task.query], task.description)
    singles = Task(task.support, [(x,) for x, _ in task.query], task.description)
    a, b, c = (load_task(t).query_images for t in (task, images_only, singles))
    assert torch.equal(a, b) and torch.equal(a, c)


def test_class_keys_not_zero_based_are_mapped_in_dict_order():
    task, _ = make_task(n_support=6)
    keys = {5: "x", 9: "y", 7: "z"}
    support = [(x, torch.tensor([5, 9, 7][int(y)])) for x, y in task.support]
    data = load_task(Task(support, task.query, TaskDescription(TaskTarget.MULTICLASS_CLASSIFICATION, keys)))
    assert data.support_labels.tolist() == [0, 1, 2, 0, 1, 2]


def _with(task: Task, *, support=None, query=None, target=None, classes=None) -> Task:
    d = task.description
    return Task(
        task.support if support is None else support,
        task.query if query is None else query,
        TaskDescription(target or d.task_target, d.classes if classes is None else classes),
    )


def _bad_cases():
    task, _ = make_task()
    img, lab = task.support[0]
    binary, _ = make_task(TaskTarget.BINARY_CLASSIFICATION)
    multi, _ = make_task(TaskTarget.MULTILABEL_CLASSIFICATION)
    nan, inf = img.clone(), img.clone()
    nan[0, 0, 0], inf[0, 1, 1] = float("nan"), -float("inf")
    return {
        "non-finite": (_with(task, support=[(nan, lab)] + task.support[1:]), "NaN"),
        "infinite query": (_with(task, query=task.query[:2] + [(inf,)]), "query image 2 contains NaN or infinite"),
        "shapes": (_with(task, support=task.support + [(img[:, :16], lab)]), "shape"),
        "channels": (_with(task, support=[(torch.zeros(2, 32, 32), lab)] * 3), "channels"),
        "empty support": (_with(task, support=[]), "empty"),
        "multiclass range": (_with(task, support=task.support + [(img, torch.tensor(3))]), "not one of the classes"),
        "binary value": (_with(binary, support=binary.support + [(img, torch.tensor([2]))]), "0 or 1"),
        "binary shape": (_with(binary, support=[(img, torch.tensor([1, 0]))] * 4), "shape"),
        "multilabel length": (_with(multi, support=[(img, torch.tensor([1, 0]))] * 4), "multi-hot"),
        "multilabel values": (_with(multi, support=multi.support + [(img, torch.tensor([1, 2, 0]))]), "multi-hot"),
        "ordinal range": (
            _with(task, target=TaskTarget.ORDINAL_REGRESSION, support=task.support + [(img, torch.tensor(7))]),
            "not one of",
        ),
        "segmentation": (_with(task, target=TaskTarget.BINARY_SEGMENTATION), "segmentation"),
        "unknown target": (_with(task, target="classify"), "unknown task target"),
        "query shape": (_with(task, query=[torch.zeros(3, 16, 16)]), "query images"),
        "fractional label": (_with(task, support=task.support + [(img, torch.tensor(0.5))]), "integers"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_validation_errors_name_the_problem(case):
    task, message = _bad_cases()[case]
    with pytest.raises(TaskError, match=message):
        load_task(pickle.dumps(task))


def test_empty_query_is_allowed():
    task, _ = make_task()
    assert load_task(_with(task, query=[])).query_images.shape[0] == 0


def test_challenge_task_round_trips_and_pickles_each_image_once():
    images, labels = torch.rand(12, 3, 16, 16) * 2 - 1, torch.arange(12) % 3
    task = challenge_task(
        images,
        labels,
        6,
        TaskDescription(TaskTarget.MULTICLASS_CLASSIFICATION, CLASSES[TaskTarget.MULTICLASS_CLASSIFICATION], "t"),
    )
    blob = pickle.dumps(task)
    data = load_task(blob)
    torch.testing.assert_close(data.support_images, images[:6])
    torch.testing.assert_close(data.query_images, images[6:])
    assert data.support_labels.tolist() == labels[:6].tolist()
    assert len(blob) < 2 * images.numel() * 4  # views would have pickled all 12 images per image
    with pytest.raises(ValueError, match="12 images but 11 labels"):
        challenge_task(images, labels[:11], 6, task.description)


def _replace(task: Task, placeholder: str, opcodes: bytes) -> bytes:
    """The task pickled (protocol 4) with the string `placeholder` swapped for raw pickle opcodes."""
    data = pickle.dumps(task, protocol=4)
    op = b"\x8c%c%s" % (len(placeholder), placeholder.encode())
    assert data.count(op) == 1
    return data.replace(op, opcodes)


_LOAD_AND_TIME = """
import sys, time
from l2l_peft import TaskError, load_task
start = time.monotonic()
try:
    load_task(sys.argv[1])
except TaskError as err:
    print(f"{time.monotonic() - start:.3f} {err}")
"""


def test_billion_laughs_image_fails_fast(tmp_path):
    """A list nested 30 deep by reference: 2^30 numbers from 30 pickled lists.

    The old code stalled in torch.as_tensor, which holds the GIL: no in-process timeout can stop
    that, so the load runs in a subprocess that a regression makes time out (60 s), not hang the suite.
    """
    task, _ = make_task(n_support=3)
    laughs = [0.0]
    for _ in range(30):
        laughs = [laughs, laughs]
    assert len(pickle.dumps(laughs)) < 500
    path = tmp_path / "laughs.pkl"
    path.write_bytes(pickle.dumps(_with(task, support=[(laughs, task.support[0][1])] + task.support[1:])))
    proc = subprocess.run(
        [sys.executable, "-c", _LOAD_AND_TIME, str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    seconds, message = proc.stdout.split(" ", 1)
    assert "nested more than 8 lists deep" in message, proc.stderr
    assert float(seconds) < 5


def test_query_repeating_one_image_is_refused_before_it_is_built():
    """A few-MB pickle: one 3 x 1024 x 1024 image referenced 400 times would be 5 GB as a tensor."""
    task, _ = make_task(n_support=3)
    big = torch.zeros(3, 1024, 1024)
    with pytest.raises(TaskError, match="exceed 4 GiB as tensors"):
        load_task(pickle.dumps(_with(task, support=[(big, y) for _, y in task.support], query=[big] * 400)))
    with pytest.raises(TaskError, match="at most 100000"):
        load_task(pickle.dumps(_with(task, query=[task.query[0][0]] * 200_000)))


@pytest.mark.parametrize("dtype", [object, str, complex])
def test_numpy_images_that_are_not_real_numbers(dtype):
    task, _ = make_task(n_support=3)
    image = np.zeros((3, 32, 32), dtype=dtype)
    with pytest.raises(TaskError, match="support image 0"):
        load_task(pickle.dumps(_with(task, support=[(image, task.support[0][1])] + task.support[1:])))


def test_deeply_nested_target_is_a_task_error():
    """repr() of a list nested 100,000 deep raised RecursionError (a traceback, exit 1)."""
    task, _ = make_task(n_support=3)
    depth = 100_000
    data = _replace(_with(task, target="DEEP"), "DEEP", b"]" * depth + b"a" * (depth - 1))
    with pytest.raises(TaskError, match=r"unknown task target \[\[\[") as err:
        load_task(data)
    assert len(str(err.value)) <= 200


def test_zero_size_images_are_refused():
    task, _ = make_task(n_support=3)
    with pytest.raises(TaskError, match="0 x 32 pixels"):
        load_task(_with(task, support=[(torch.zeros(3, 0, 32), y) for _, y in task.support]))


def test_label_missing_from_mixed_key_classes():
    """sorted() of {0, "b"} raised TypeError while naming the classes."""
    task, _ = make_task(n_support=3)
    with pytest.raises(TaskError, match=r"support label 2 is 2, not one of the classes \[0, 1, 'two'\]"):
        load_task(_with(task, classes={0: "a", 1: "b", "two": "c"}))


def test_collated_support_with_fewer_labels_than_images():
    task, _ = make_task(n_support=6)
    images = torch.stack([x for x, _ in task.support])
    labels = torch.stack([y for _, y in task.support])
    with pytest.raises(TaskError, match="6 images but 5 labels"):
        load_task(_with(task, support=(images, labels[:5])))


def test_tensors_are_detached_from_autograd():
    task, _ = make_task(n_support=3)
    support = [(x.clone().requires_grad_(), y) for x, y in task.support]
    data = load_task(_with(task, support=support))
    assert not data.support_images.requires_grad and data.support_images.grad_fn is None


def test_messages_are_one_bounded_line():
    task, _ = make_task(n_support=3)
    with pytest.raises(TaskError) as err:
        load_task(_with(task, target="x\n" * 5_000_000))
    assert "\n" not in str(err.value) and len(str(err.value)) <= 1000


def test_running_out_of_memory_is_a_task_error(monkeypatch):
    def exhausted(data):
        raise MemoryError

    monkeypatch.setattr("l2l_peft.task.safe_loads", exhausted)
    with pytest.raises(TaskError, match="not enough memory"):
        load_task(pickle.dumps(make_task()[0]))


def test_cli_hostile_input_is_one_line_and_exit_2(tmp_path, vit_dir):
    task, _ = make_task(n_support=3)
    path = tmp_path / "in.pkl"
    path.write_bytes(pickle.dumps(_with(task, support=[(np.zeros((3, 32, 32), object), y) for _, y in task.support])))
    proc = subprocess.run(
        [sys.executable, "-m", "l2l_peft", str(path), str(tmp_path / "out.pkl"), "--model", str(vit_dir), "--cpu"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "numpy array of object" in proc.stderr
