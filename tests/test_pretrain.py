"""Pretraining: a tiny CPU run exports a backbone adapt() loads offline; resume continues exactly; DINO."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import GLOO_ENV, free_port, gloo_launch, level_images, make_task, python_path, save_npz_dataset
from safetensors import safe_open

from l2l_peft import adapt
from l2l_peft.backbone import load_backbone
from l2l_peft.pretrain import data as pretrain_data
from l2l_peft.pretrain.__main__ import main
from l2l_peft.pretrain.augment import MultiCrop, StrongAugment
from l2l_peft.pretrain.config import load_config
from l2l_peft.pretrain.data import load_sources
from l2l_peft.pretrain.model import build_extractor
from l2l_peft.pretrain.ssl import DinoHead, DinoTeacher, cosine_schedule

TINY_VIT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Two synthetic datasets: gray multiclass with a test split, RGB multilabel without splits."""
    root = tmp_path_factory.mktemp("npz")
    rng = np.random.default_rng(0)
    labels = np.arange(30) % 3
    split = np.array([0] * 20 + [2] * 10)
    save_npz_dataset(
        root, "gray_mc", level_images(labels, (16, 16), 80, rng), labels, "multiclass", split, domain="synthetic gray"
    )
    save_npz_dataset(
        root, "rgb_ml", rng.integers(0, 255, (12, 20, 24, 3), dtype=np.uint8), rng.integers(0, 2, (12, 3)), "multilabel"
    )
    return root


@pytest.fixture(scope="module")
def config_path(data_dir, tmp_path_factory) -> Path:
    config = {
        "sources": [{"kind": "npz", "path": str(data_dir)}],
        "image_size": 32,
        "patch_size": 8,
        "vit_overrides": TINY_VIT,
        "steps": 4,
        "batch_size": 8,
        "log_every": 1,
        "checkpoint_every": 2,
        "warmup_steps": 2,
        "name": "tiny-test",
    }
    path = tmp_path_factory.mktemp("cfg") / "pretrain.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    with safe_open(directory / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict: it has keys(), no __iter__


def test_sources_drop_test_split_and_excluded(config_path):
    datasets = load_sources(load_config(config_path))
    assert [d.name for d in datasets] == ["gray_mc", "rgb_ml"]
    assert len(datasets[0]) == 20 and int(datasets[0].split.max()) == 0  # the 10 test rows are gone
    assert len(datasets[1]) == 12 - 2 and int(datasets[1].split.max()) <= 1  # rgb_ml: its derived test part too
    assert [d.name for d in load_sources(load_config(config_path, exclude=["gray_mc"]))] == ["rgb_ml"]
    with pytest.raises(ValueError, match="unknown pretraining setting"):
        load_config(config_path, learning_rate=1.0)


@pytest.mark.parametrize(
    "setting, value, error",
    [
        ("max_minutes", 0, "> 0 or null"),
        ("lr", 0.0, "> 0"),
        ("warmup_steps", -1, ">= 0"),
        ("vflip", 1.5, r"in \[0, 1\]"),
    ],
)
def test_out_of_range_settings_are_errors(config_path, setting, value, error):
    """Rejected by name instead of silently meaning something else (max_minutes 0 used to mean no budget)."""
    with pytest.raises(ValueError, match=rf"PretrainConfig\.{setting} must be {error}"):
        load_config(config_path, **{setting: value})


def test_augment_gives_challenge_form():
    images = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8)
    augment = StrongAugment(size=32)
    out = augment(images, torch.Generator().manual_seed(0))
    assert out.shape == (6, 3, 32, 32) and out.min() >= -1 and out.max() <= 1
    assert torch.equal(out[:, 0], out[:, 2])  # gray stays gray in all three channels
    assert torch.equal(out, augment(images, torch.Generator().manual_seed(0)))
    assert not torch.equal(out[0], out[1].roll(0))  # samples get different transforms
    rgb = augment(torch.randint(0, 256, (4, 3, 40, 30), dtype=torch.uint8), torch.Generator().manual_seed(1))
    assert rgb.shape == (4, 3, 32, 32)


def test_export_is_a_backbone_adapt_loads_offline(config_path, tmp_path):
    out = tmp_path / "run"
    assert main([str(config_path), "--output", str(out), "--exclude", "rgb_ml", "--cpu", "--log-level", "WARNING"]) == 0
    weights = _weights(out)
    assert weights and all(t.dtype == torch.bfloat16 for t in weights.values())
    assert not any("heads" in k or "pooler" in k for k in weights)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    prep = json.loads((out / "preprocessor_config.json").read_text())
    assert prep["image_mean"] == prep["image_std"] == [0.5, 0.5, 0.5] and prep["size"]["height"] == 32
    card = (out / "README.md").read_text()
    assert "gray_mc" in card and "Excluded datasets: rgb_ml" in card and "steps: 4" in card
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(r["images_per_s"] > 0 for r in log)

    task, _ = make_task(n_support=6, n_query=5)
    probs = adapt(task, model=str(out), max_steps=2, min_steps=1, cpu=True)
    assert probs.shape == (5, 3) and torch.allclose(probs.sum(1), torch.ones(5), atol=1e-5)


def test_resume_continues_the_same_run(config_path, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    args = ["--cpu", "--log-level", "WARNING"]
    assert main([str(config_path), "--output", str(whole), *args]) == 0
    assert main([str(config_path), "--output", str(split), "--stop-at", "2", *args]) == 0
    assert json.loads((split / "checkpoint" / "progress.json").read_text())["step"] == 2
    assert main([str(config_path), "--output", str(split), *args]) == 0  # resumes at step 2
    progress = json.loads((split / "checkpoint" / "progress.json").read_text())
    assert progress["step"] == 4 and progress["datasets"] == ["gray_mc", "rgb_ml"]
    a, b = _weights(whole), _weights(split)
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise: weights, optimizer state and sampling all resumed
    assert main([str(config_path), "--output", str(split), "--exclude", "rgb_ml", *args]) == 2  # other heads: refused


def test_two_process_launch(config_path, tmp_path):
    """DDP across 2 CPU processes (gloo) through accelerate launch; both must agree on the stop step."""
    out = tmp_path / "ddp"
    command = [*gloo_launch(), "-m", "l2l_peft.pretrain", str(config_path), "--output", str(out), "--steps", "2"]
    command += ["--cpu", "--log-level", "WARNING"]
    done = subprocess.run(command, env=GLOO_ENV, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 2 and "2 x CPU" in (out / "README.md").read_text()


SHIPPED = Path(__file__).resolve().parent.parent / "hf_cache" / "l2l-vit-tiny-med"


@pytest.mark.skipif(not (SHIPPED / "model.safetensors").is_file(), reason="shipped backbone not in this checkout")
def test_home_made_backbone_loads_offline_by_name():
    """l2l-vit-tiny-med (committed; the default before DINOv2) stays one name away."""
    from l2l_peft.backbone import load_backbone
    from l2l_peft.cache import resolve_model

    assert resolve_model("l2l-vit-tiny-med", None).location == str(SHIPPED)
    assert (SHIPPED / "model.safetensors").stat().st_size <= 15 * 2**20
    extractor = load_backbone("l2l-vit-tiny-med")
    assert extractor.input_size == 224 and extractor.feature_dim == 384
    assert next(extractor.parameters()).dtype == torch.float32
    features = extractor(torch.zeros(2, 1, 28, 28))  # gray, native size: preprocess repeats and resizes
    assert features.shape == (2, 384) and bool(torch.isfinite(features).all())


def test_leave_one_out_script_pretrains_without_each_dataset(data_dir, tmp_path):
    """scripts/pretrain_loo.sh: one run per dataset with that dataset excluded, plus the random init."""
    repo = Path(__file__).resolve().parent.parent
    shutil.copytree(repo / "configs", tmp_path / "configs")
    # the script's `python3` is this interpreter, as when run from its activated venv
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    env = {**os.environ, "PATH": path, "PYTHONPATH": python_path(repo), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        ["bash", str(repo / "scripts" / "pretrain_loo.sh"), "0", str(data_dir)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("gray_mc", "rgb_ml"):
        card = (tmp_path / "runs" / "loo" / name / "README.md").read_text()
        assert f"Excluded datasets: {name}." in card
    assert (tmp_path / "runs" / "random_vit_tiny" / "model.safetensors").is_file()


def test_pretraining_keeps_attention_off_cudnn(config_path, tmp_path, sdpa_calls):
    """As adapt(): training forwards run with cuDNN's attention kernel disabled (attention.TRAINING_BACKENDS)."""
    assert (
        main([str(config_path), "--output", str(tmp_path / "run"), "--stop-at", "1", "--cpu", "--log-level", "WARNING"])
        == 0
    )
    training = [cudnn for grad, cudnn in sdpa_calls if grad]
    assert training and not any(training)


def test_compiled_pretraining_trains_like_eager(config_path, tmp_path):
    """--compile changes kernels, not the optimisation: same losses (float32 on the CPU), same exported weight names."""
    args = ["--steps", "2", "--cpu", "--no-resume", "--log-level", "WARNING"]
    assert main([str(config_path), "--output", str(tmp_path / "eager"), *args]) == 0
    from torch._dynamo.utils import counters

    counters.clear()
    assert main([str(config_path), "--output", str(tmp_path / "compiled"), "--compile", *args]) == 0
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo did compile the model
    eager, compiled = (
        [json.loads(line)["loss"] for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
        for run in ("eager", "compiled")
    )
    assert compiled == pytest.approx(eager, rel=1e-3)
    assert _weights(tmp_path / "eager").keys() == _weights(tmp_path / "compiled").keys()


# --- self-supervised objective (DINO, issue #16) ---------------------------------------------------------------------

SSL = {"local_crops": 2, "local_crop_size": 16, "ssl_hidden_dim": 32, "ssl_bottleneck_dim": 16, "ssl_out_dim": 64}


def _variant(config_path: Path, directory: Path, **changes) -> Path:
    path = directory / "variant.yaml"
    path.write_text(yaml.safe_dump(yaml.safe_load(config_path.read_text()) | changes))
    return path


@pytest.mark.parametrize(
    "changes, name",
    [
        ({"objective": "dino"}, "objective"),
        ({"objective": "ssl", "local_crop_size": 12}, "local_crop_size"),  # not a multiple of patch_size 8
        ({"objective": "ssl", "local_crop_size": 40}, "local_crop_size"),  # larger than image_size 32
        ({"teacher_momentum": [1.0, 0.99]}, "teacher_momentum"),
        ({"teacher_temp": 0}, "teacher_temp"),
        ({"ssl_weight": -1}, "ssl_weight"),
        ({"global_crop_scale": [0.5, 0.2]}, "global_crop_scale"),
        ({"local_crop_scale": [0, 0.2]}, "local_crop_scale"),
        ({"ssl_out_dim": 0}, "ssl_out_dim"),
        ({"local_crops": -1}, "local_crops"),
        ({"center_momentum": 1}, "center_momentum"),
    ],
)
def test_ssl_settings_are_validated(config_path, changes, name):
    with pytest.raises(ValueError, match=f"PretrainConfig.{name} "):
        load_config(config_path, **changes)
    assert load_config(config_path, local_crop_size=12).objective == "supervised"  # crop sizes only matter for ssl


def test_multi_crop_views(config_path):
    """ssl: two global views at image_size and small local ones, view-major; supervised: today's single view."""
    batches = [
        torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8),
        torch.randint(0, 256, (2, 3, 20, 24), dtype=torch.uint8),
    ]
    images, local = MultiCrop.for_config(load_config(config_path, objective="ssl", **SSL))(
        batches, torch.Generator().manual_seed(0)
    )
    assert images.shape == (2 * 5, 3, 32, 32) and local.shape == (2 * 5, 3, 16, 16)
    assert not torch.equal(images[:5], images[5:])  # two different views of the same images
    images, local = MultiCrop.for_config(load_config(config_path))(batches, torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)
    assert local is None and torch.equal(images, torch.cat([StrongAugment(32)(x, generator) for x in batches]))


def test_views_of_same_shaped_datasets_are_augmented_together():
    """One augmentation call per image shape, every view in it; the views come back view-major in dataset order."""
    from l2l_peft.pretrain.augment import _views

    def constant(values, shape):  # flat images: the centre pixel names the image whatever the crop and flips
        return torch.tensor(values, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, *shape).contiguous()

    gray, rgb = (1, 28, 28), (3, 20, 24)
    batches = [constant([10, 20, 30], gray), constant([40, 50], rgb), constant([60, 70, 80, 90], gray)]
    plain = StrongAugment(size=32, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), max_rotation=0, vflip=0, jitter=0,
                          grayscale=0)  # fmt: skip
    calls = []

    def counted(x, generator):
        calls.append(len(x))
        return plain(x, generator)

    views = _views(counted, batches, 2, torch.Generator().manual_seed(0))
    assert calls == [2 * 7, 2 * 2]  # the two 28x28 gray datasets in one call, the RGB one alone
    centre = ((views[:, 0, 16, 16] + 1) / 2 * 255).round().int().tolist()
    assert centre == [10, 20, 30, 40, 50, 60, 70, 80, 90] * 2
    random_views = _views(StrongAugment(size=32), batches, 2, torch.Generator().manual_seed(0))
    assert not torch.equal(random_views[:9], random_views[9:])  # each view its own transforms


@pytest.mark.parametrize(
    "changes", [{"low_res_size": 12}, {"low_res_size": 32}, {"low_res_size": 0}, {"low_res_fraction": 0}]
)
def test_low_resolution_settings_are_validated(config_path, changes):
    """low_res_size: a multiple of the patch (8) below image_size (32); the fraction in (0, 1]."""
    with pytest.raises(ValueError, match=f"PretrainConfig.{next(iter(changes))} "):
        load_config(config_path, **changes)


def test_low_resolution_views_keep_the_local_to_global_ratio(config_path):
    """At half the side, global views are 16 px and local crops 8 (16 at full size): one patch, not upsampled."""
    config = load_config(config_path, objective="ssl", **SSL)
    batches = [torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)]
    images, local = MultiCrop.for_config(config, 16)(batches, torch.Generator().manual_seed(0))
    assert images.shape == (2 * 3, 3, 16, 16) and local.shape == (2 * 3, 3, 8, 8)


def test_low_resolution_phase_then_full_size(config_path, tmp_path, monkeypatch):
    """The first low_res_fraction of the steps feeds student and teacher views at low_res_size (position embeddings
    interpolated, no upsampling), the rest at image_size; the export is the usual image_size backbone."""
    from l2l_peft.pretrain import model as pretrain_model
    from l2l_peft.pretrain import ssl as pretrain_ssl

    sides, original = [], pretrain_model.view_features

    def recording(extractor, views):
        sides.append(views.shape[-1])
        return original(extractor, views)

    monkeypatch.setattr(pretrain_model, "view_features", recording)  # the student
    monkeypatch.setattr(pretrain_ssl, "view_features", recording)  # the teacher
    path = _variant(config_path, tmp_path, objective="both", low_res_size=16, low_res_fraction=0.5, **SSL)
    out = tmp_path / "run"
    assert main([str(path), "--output", str(out), "--cpu", "--log-level", "WARNING"]) == 0
    assert sides == [16, 16, 16, 16, 32, 32, 32, 32]  # steps 0-1 (progress < 0.5): student, teacher; then 32
    assert json.loads((out / "config.json").read_text())["image_size"] == 32
    assert "views at 16x16 for the first 50% of the schedule" in (out / "README.md").read_text()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in log)


def test_dino_teacher_is_an_ema_without_gradients(config_path):
    """The student fits the teacher's targets on a fixed batch; the teacher gets no gradients and moves by EMA only."""
    config = load_config(config_path, objective="ssl", **SSL)
    torch.manual_seed(0)
    extractor = build_extractor(config)
    head = DinoHead(extractor.feature_dim, hidden_dim=32, bottleneck_dim=16, out_dim=64)
    teacher = DinoTeacher(extractor, head, config)
    batches = [torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)]
    images, local = MultiCrop.for_config(config)(batches, torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([*extractor.parameters(), *head.parameters()], lr=1e-3)
    losses = []
    for _ in range(6):
        student = head(torch.cat([extractor(images), extractor.native_size_features(local)]))
        loss = teacher.loss(student, teacher(images))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        before = [p.clone() for p in teacher.parameters()]
        teacher.update(extractor, head, fraction=0.0)
        losses.append(loss.item())
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    expected = [b + (1 - 0.996) * (s - b) for b, s in zip(before, [*extractor.parameters(), *head.parameters()])]
    assert all(torch.allclose(p, e, atol=1e-7) for p, e in zip(teacher.parameters(), expected))  # EMA, m = 0.996
    assert not torch.equal(teacher.head.prototypes, head.prototypes) and bool(teacher.center.abs().sum() > 0)
    assert losses[-1] < losses[0] and all(math.isfinite(v) for v in losses)
    assert cosine_schedule(0.996, 1.0, 0.0) == 0.996 and cosine_schedule(0.996, 1.0, 1.0) == 1.0


def test_ssl_needs_no_labels_and_exports_only_the_backbone(config_path, tmp_path, monkeypatch):
    """objective ssl builds no supervised objective (labels never read); teacher and heads stay in the checkpoint."""
    monkeypatch.setattr(pretrain_data, "build_objective", lambda *a: pytest.fail("ssl built a supervised objective"))
    out = tmp_path / "run"
    assert (
        main(
            [
                str(_variant(config_path, tmp_path, objective="ssl", **SSL)),
                "--output",
                str(out),
                "--cpu",
                "--log-level",
                "WARNING",
            ]
        )
        == 0
    )
    weights = _weights(out)
    assert weights and not any(part in k for k in weights for part in ("heads", "ssl", "teacher", "center"))
    features = load_backbone(str(out))(torch.zeros(2, 1, 28, 28))
    assert features.shape == (2, 64) and bool(torch.isfinite(features).all())
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(
        r["losses"].keys() == {"ssl"} and math.isfinite(r["loss"]) for r in log
    )
    teacher = torch.load(out / "checkpoint" / "custom_checkpoint_0.pkl", weights_only=True)
    assert {"center", "head.prototypes"} <= teacher.keys() and any(k.startswith("backbone.model.") for k in teacher)


def test_both_resumes_with_teacher_and_center(config_path, tmp_path):
    """both = mean supervised loss + ssl_weight * DINO; split at step 2 and resumed = uninterrupted, bitwise
    (student, optimizer, teacher and center all come back)."""
    path = _variant(config_path, tmp_path, objective="both", ssl_weight=0.5, **SSL)
    whole, split = tmp_path / "whole", tmp_path / "split"
    args = ["--cpu", "--log-level", "WARNING"]
    assert main([str(path), "--output", str(whole), *args]) == 0
    last = json.loads((whole / "log.jsonl").read_text().splitlines()[-1])
    assert last["losses"].keys() == {"gray_mc", "rgb_ml", "ssl"}
    assert last["loss"] == pytest.approx(
        (last["losses"]["gray_mc"] + last["losses"]["rgb_ml"]) / 2 + 0.5 * last["losses"]["ssl"], abs=1e-4
    )
    assert main([str(path), "--output", str(split), "--stop-at", "2", *args]) == 0
    assert main([str(path), "--output", str(split), *args]) == 0
    a, b = _weights(whole), _weights(split)
    assert all(torch.equal(a[k], b[k]) for k in a)
    teachers = [torch.load(run / "checkpoint" / "custom_checkpoint_0.pkl", weights_only=True) for run in (whole, split)]
    assert all(torch.equal(teachers[0][k], teachers[1][k]) for k in teachers[0])
    assert (
        main([str(config_path), "--output", str(split), *args]) == 2
    )  # a supervised config on this checkpoint: refused


CENTER_WORKER = """
import os, sys, torch, torch.distributed as dist
from l2l_peft.pretrain.config import PretrainConfig
from l2l_peft.pretrain.ssl import DinoHead, DinoTeacher
dist.init_process_group("gloo")
rank = dist.get_rank()
config = PretrainConfig(sources=[{"kind": "npz", "path": "-"}], objective="ssl")
teacher = DinoTeacher(torch.nn.Identity(), DinoHead(4, hidden_dim=4, bottleneck_dim=4, out_dim=3), config)
targets = torch.full((4, 3), float(rank + 1))  # each process sees other teacher outputs
teacher.loss(torch.zeros(8, 3), targets)
torch.save(teacher.center, os.path.join(sys.argv[1], f"center{rank}.pt"))
dist.destroy_process_group()
"""


def test_center_is_averaged_over_processes(tmp_path):
    """DDP: the center's update all-reduces the batch means, so every process keeps the same center."""
    (tmp_path / "worker.py").write_text(CENTER_WORKER)
    env = {**os.environ, "PYTHONPATH": python_path(Path(__file__).resolve().parent.parent), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}  # fmt: skip
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(tmp_path)], env={**env, "RANK": str(r)},
                              stderr=subprocess.PIPE, text=True) for r in range(2)]  # fmt: skip
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read()[-2000:]
    centers = [torch.load(tmp_path / f"center{r}.pt") for r in range(2)]
    assert torch.equal(centers[0], centers[1])
    assert torch.allclose(centers[0], torch.full((1, 3), 0.1 * 1.5))  # (1 - 0.9) * mean(1, 2)


PRETRAIN_CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs" / "pretrain").glob("*.yaml"))


@pytest.mark.parametrize("path", PRETRAIN_CONFIGS, ids=lambda p: p.stem)
def test_pretrain_configs_are_valid(path):
    """The GPU runs' configs pass validation (a typo would surface only on the device); headers name them."""
    assert load_config(path).sources and f"-m l2l_peft.pretrain configs/pretrain/{path.name}" in path.read_text()


def test_two_stages_generated_images_then_real_data(data_dir, tmp_path):
    """Stage 1 trains on generated images only; stage 2 starts from its backbone (0 steps: the same weights)."""
    common = {"image_size": 32, "patch_size": 8, "vit_overrides": TINY_VIT, "batch_size": 8, "warmup_steps": 1}
    first = tmp_path / "stage1.yaml"
    first.write_text(yaml.safe_dump({
        **common, "sources": [{"kind": "procedural", "images": 40, "size": 16}], "steps": 3, "objective": "both",
        "local_crops": 2, "local_crop_size": 16, "ssl_out_dim": 64, "ssl_hidden_dim": 32, "ssl_bottleneck_dim": 16,
    }))  # fmt: skip
    assert main([str(first), "--output", str(tmp_path / "one"), "--cpu", "--log-level", "WARNING"]) == 0
    assert "| dead_leaves | procedural |" in (tmp_path / "one" / "README.md").read_text()
    second = tmp_path / "stage2.yaml"
    second.write_text(yaml.safe_dump({
        **common, "sources": [{"kind": "npz", "path": str(data_dir)}], "init_from": str(tmp_path / "one"),
    }))  # fmt: skip
    assert (
        main([str(second), "--output", str(tmp_path / "two"), "--steps", "0", "--cpu", "--log-level", "WARNING"]) == 0
    )
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


IMAGENET = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory) -> Path:
    """A tiny DINOv2 checkpoint with ImageNet statistics and a 32-px crop, as the imported default is laid out."""
    from transformers import Dinov2Config, Dinov2Model

    init = tmp_path_factory.mktemp("dinov2")
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
                             image_size=28, patch_size=8)).save_pretrained(init)  # fmt: skip
    (init / "preprocessor_config.json").write_text(json.dumps({**IMAGENET, "crop_size": {"height": 32, "width": 32}}))
    return init


def _continued(data_dir: Path, init: Path, **changes) -> dict:
    """Continued-pretraining settings of a tiny run from `init` (DINO, float32 export), with `changes`."""
    return {"sources": [{"kind": "npz", "path": str(data_dir)}], "image_size": 32, "batch_size": 8,
            "warmup_steps": 1, "init_from": str(init), "patch_size": 8, "objective": "ssl", "local_crops": 2,
            "local_crop_size": 16, "ssl_out_dim": 64, "ssl_hidden_dim": 32, "ssl_bottleneck_dim": 16,
            "save_dtype": "fp32"} | changes  # fmt: skip


def test_continued_pretraining_starts_from_a_dinov2_bit_for_bit(data_dir, tiny_dinov2, tmp_path):
    """init_from a DINOv2 (ImageNet statistics, as the imported default): student and DINO teacher start from its
    weights bit for bit, the input normalisation it was trained with is kept, and 0 steps export it unchanged
    (float32 export; the default bf16 one rounds)."""
    from transformers import Dinov2Model

    from l2l_peft.pretrain.config import PretrainConfig

    init, imagenet = tiny_dinov2, IMAGENET
    settings = _continued(data_dir, init)
    extractor = build_extractor(PretrainConfig(**settings))
    start = Dinov2Model.from_pretrained(init).state_dict()
    assert all(torch.equal(start[k], v) for k, v in extractor.model.state_dict().items())
    assert extractor.mean.flatten().tolist() == pytest.approx(imagenet["image_mean"])
    teacher = DinoTeacher(extractor, DinoHead(extractor.feature_dim, hidden_dim=32, bottleneck_dim=16, out_dim=64),
                          PretrainConfig(**settings))  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(teacher.backbone.parameters(), extractor.parameters(), strict=True))

    config = tmp_path / "continue.yaml"
    config.write_text(yaml.safe_dump(settings))
    out = tmp_path / "out"
    assert main([str(config), "--output", str(out), "--steps", "0", "--cpu", "--log-level", "WARNING"]) == 0
    exported = Dinov2Model.from_pretrained(out).state_dict()
    assert exported.keys() == start.keys() and all(torch.equal(start[k], exported[k]) for k in start)
    prep = json.loads((out / "preprocessor_config.json").read_text())
    assert prep["image_mean"] == pytest.approx(imagenet["image_mean"]) and prep["size"]["height"] == 32


def test_init_from_needs_the_models_patch_size(data_dir, tiny_dinov2):
    from l2l_peft.pretrain.config import PretrainConfig

    with pytest.raises(ValueError, match="patch_size is 16 but .* has patches of 8 px"):
        build_extractor(PretrainConfig(**_continued(data_dir, tiny_dinov2, patch_size=16)))


def test_layer_decay_scales_the_backbone_by_depth_and_heads_warm_up_alone(data_dir, tiny_dinov2, tmp_path):
    """layer_decay 0.5 on 2 blocks: embeddings at lr/8, block 0 at lr/4, block 1 at lr/2, final norm and the heads
    at lr; with head_warmup_steps 2 the first two steps leave the DINOv2 unchanged bit for bit (only the heads
    learn), and the backbone moves once they are over."""
    from transformers import Dinov2Model

    from l2l_peft.pretrain.config import PretrainConfig
    from l2l_peft.pretrain.loop import _param_groups
    from l2l_peft.pretrain.model import MultiTaskModel

    settings = _continued(
        data_dir, tiny_dinov2, objective="both", layer_decay=0.5, head_warmup_steps=2, steps=4, log_every=1
    )
    extractor = build_extractor(PretrainConfig(**settings))
    model = MultiTaskModel(extractor, {"gray_mc": 3}, DinoHead(extractor.feature_dim, hidden_dim=32,
                                                                bottleneck_dim=16, out_dim=64))  # fmt: skip
    scale = {id(p): (g["lr_scale"], g["backbone"]) for g in _param_groups(model, PretrainConfig(**settings))
             for p in g["params"]}  # fmt: skip
    named = dict(model.named_parameters())
    assert scale[id(named["extractor.model.embeddings.cls_token"])] == (0.125, True)
    assert scale[id(named["extractor.model.encoder.layer.0.mlp.fc1.weight"])] == (0.25, True)
    assert scale[id(named["extractor.model.encoder.layer.1.mlp.fc1.weight"])] == (0.5, True)
    assert scale[id(named["extractor.model.layernorm.weight"])] == (1.0, True)
    assert {scale[id(p)] for n, p in named.items() if not n.startswith("extractor.")} == {(1.0, False)}
    assert len(scale) == len(named)  # every parameter in exactly one group

    config, out = tmp_path / "continue.yaml", tmp_path / "out"
    config.write_text(yaml.safe_dump(settings))
    start = Dinov2Model.from_pretrained(tiny_dinov2).state_dict()
    assert main([str(config), "--output", str(out), "--stop-at", "2", "--cpu", "--log-level", "WARNING"]) == 0
    held = Dinov2Model.from_pretrained(out).state_dict()
    assert all(torch.equal(start[k], held[k]) for k in start)
    assert main([str(config), "--output", str(out), "--cpu", "--log-level", "WARNING"]) == 0
    moved = Dinov2Model.from_pretrained(out).state_dict()
    assert not torch.equal(start["encoder.layer.1.mlp.fc1.weight"], moved["encoder.layer.1.mlp.fc1.weight"])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(r["lr"] > 0 for r in log)  # the heads' lr is logged
