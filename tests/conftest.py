"""Tiny offline models and synthetic tasks shared by the tests."""

from __future__ import annotations

import json
import os
import pickle
import socket
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # pytest -n N: the workers (and their children) share the cores
    _share = len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _share)))

import numpy as np
import pytest
import torch
from torchcross.data.task import Task, TaskDescription, TaskTarget

TINY = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=32, patch_size=8
)


def _tiny_models() -> dict[str, object]:
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModel,
        DeiTConfig,
        DeiTModel,
        Dinov2Config,
        Dinov2Model,
        SiglipVisionConfig,
        SiglipVisionModel,
        SwinConfig,
        SwinModel,
        ViTConfig,
        ViTModel,
    )

    return {
        "vit": lambda: ViTModel(ViTConfig(**TINY), add_pooling_layer=False),
        "dinov2": lambda: Dinov2Model(Dinov2Config(**TINY)),
        "clip": lambda: CLIPVisionModel(CLIPVisionConfig(**TINY)),
        "siglip": lambda: SiglipVisionModel(SiglipVisionConfig(**TINY)),
        "deit": lambda: DeiTModel(DeiTConfig(**TINY), add_pooling_layer=False),
        "swin": lambda: SwinModel(
            SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4)
        ),
    }


def save_tiny_model(family: str, directory: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = _tiny_models()[family]()
    model.save_pretrained(directory)
    prep = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "size": {"height": 32, "width": 32}}
    (directory / "preprocessor_config.json").write_text(json.dumps(prep))
    return directory


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Every tiny family saved once per session."""
    root = tmp_path_factory.mktemp("models")
    return {family: save_tiny_model(family, root / family) for family in _tiny_models()}


@pytest.fixture(scope="session")
def vit_dir(model_dirs) -> Path:
    return model_dirs["vit"]


DINOV2_PREP = {"crop_size": {"height": 32, "width": 32}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}


@pytest.fixture
def dinov2_trained_larger(tmp_path) -> Path:
    """A tiny DINOv2 trained at 64 px (8 x 8 positions) and run at 32 (4 x 4), as the shipped one is at 518 and 224.

    Function-scoped: tests that change how it loads must not leave a cached copy to another test."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(**{**TINY, "image_size": 64})).save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(DINOV2_PREP))
    return tmp_path


@pytest.fixture
def sdpa_calls(monkeypatch) -> list[tuple[bool, bool]]:
    """(gradients on, cuDNN kernel allowed) of every SDPA call while the fixture is active."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls: list[tuple[bool, bool]] = []

    def recorded(*args, **kwargs):
        calls.append((torch.is_grad_enabled(), torch.backends.cuda.cudnn_sdp_enabled()))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recorded)
    return calls


CLASSES = {
    TaskTarget.MULTICLASS_CLASSIFICATION: {0: "a", 1: "b", 2: "c"},
    TaskTarget.BINARY_CLASSIFICATION: {0: "neg", 1: "pos"},
    TaskTarget.MULTILABEL_CLASSIFICATION: {0: "x", 1: "y", 2: "z"},
    TaskTarget.ORDINAL_REGRESSION: {0: "g0", 1: "g1", 2: "g2", 3: "g3"},
    TaskTarget.REGRESSION: {0: "value"},
}


def _labels(target: TaskTarget, n: int, g: torch.Generator) -> torch.Tensor:
    k = len(CLASSES[target])
    match target:
        case TaskTarget.MULTICLASS_CLASSIFICATION | TaskTarget.ORDINAL_REGRESSION:
            return torch.arange(n) % k
        case TaskTarget.BINARY_CLASSIFICATION:
            return (torch.arange(n) % 2).reshape(n, 1)
        case TaskTarget.MULTILABEL_CLASSIFICATION:
            hot = torch.randint(0, 2, (n, k), generator=g)
            hot[torch.arange(n), torch.arange(n) % k] = 1 - hot[torch.arange(n), torch.arange(n) % k]
            return hot
        case _:
            return torch.rand(n, generator=g) * 10


def _images(labels: torch.Tensor, channels: int, size: int, g: torch.Generator) -> torch.Tensor:
    """Brightness follows the label (first label for multi-hot): learnable from any backbone."""
    level = labels.reshape(len(labels), -1).float()[:, 0]
    level = level / max(float(level.max()), 1.0)
    base = (level * 1.6 - 0.8).reshape(-1, 1, 1, 1)
    noise = 0.1 * torch.randn(len(labels), channels, size, size, generator=g)
    return (base + noise).clamp(-1, 1)


def make_task(
    target: TaskTarget = TaskTarget.MULTICLASS_CLASSIFICATION,
    *,
    n_support: int = 12,
    n_query: int = 9,
    channels: int = 3,
    size: int = 32,
    seed: int = 0,
) -> tuple[Task, torch.Tensor]:
    """(new-layout torchcross Task with list-of-pairs support, query labels)."""
    g = torch.Generator().manual_seed(seed)
    labels = _labels(target, n_support + n_query, g)
    images = _images(labels, channels, size, g)
    support = [(images[i], labels[i]) for i in range(n_support)]
    query = [(images[i], labels[i]) for i in range(n_support, n_support + n_query)]
    task = Task(support, query, TaskDescription(target, CLASSES[target], "synthetic"))
    return task, labels[n_support:]


def old_layout(task: Task) -> Task:
    """The challenge's torchcross <= 0.0.4 layout: target and classes on the task itself."""
    old = object.__new__(Task)
    old.__dict__ = {
        "support": task.support,
        "query": task.query,
        "task_target": task.description.task_target,
        "classes": task.description.classes,
    }
    return old


def write_task(task: Task, path: Path) -> Path:
    path.write_bytes(pickle.dumps(task))
    return path


def save_npz_dataset(
    root: Path, name: str, images: np.ndarray, labels: np.ndarray, task: str, split: np.ndarray | None = None, **meta
) -> None:
    """One dataset in the development-data npz layout, registered in root/manifest.json."""
    arrays = {"images": images, "labels": labels} | ({} if split is None else {"split": split.astype(np.int8)})
    np.savez(root / f"{name}.npz", **arrays)
    manifest_path = root / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    n_classes = labels.shape[1] if labels.ndim == 2 else int(labels.max()) + 1
    names = "abc" if task == "multiclass" else "xyz"
    manifest[name] = {"task": task, "class_names": {str(i): names[i] for i in range(n_classes)}, **meta}
    manifest_path.write_text(json.dumps(manifest))


def level_images(levels: np.ndarray, shape: tuple[int, ...], step: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 images whose brightness follows `levels` (one per image), plus noise."""
    spread = levels.reshape(len(levels), *[1] * len(shape))
    return (spread * step + rng.integers(0, 40, (len(levels), *shape))).astype(np.uint8)


def python_path(*first: Path) -> str:
    """PYTHONPATH for a child interpreter: `first`, then the inherited entries, where this interpreter may
    find its own packages (the GPU machine's torchcross is in /tmp/site through PYTHONPATH)."""
    return os.pathsep.join([*map(str, first), *filter(None, [os.environ.get("PYTHONPATH")])])


def free_port() -> int:
    """A port no other test run is using: parallel runs must not meet on accelerate's default 29500."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def gloo_launch() -> list[str]:
    """`accelerate launch` of 2 CPU processes (gloo) on a port of their own; accelerate 1.15's
    `--cpu --num_processes 2` would start only one."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    return launch + ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                     "--main_process_port", str(free_port())]  # fmt: skip


GLOO_ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
