"""The single door for Hugging Face vision models: offline loading, input adaptation, features.

Where a model's files are is cache.py's job (resolve_model); this module loads them strictly offline.
Feature rule (one for every family): concat(global token, mean of patch tokens) from the last
layer. The global token is the model's trained pooled output where it has one (CLIP, SigLIP,
Swin, DINOv2's normed CLS), else the CLS token (ViT, DeiT); models without prefix tokens use the
token mean. Feature size is therefore 2 x hidden_size.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .cache import BackboneError, ModelSource, Probe, resolve_model
from .speed.attention import use_flash_attention

logger = logging.getLogger(__name__)

# Families whose vision tower lives inside a two-tower checkpoint, or has its own class.
_VISION_CLASSES = {
    "clip": "CLIPVisionModel",
    "clip_vision_model": "CLIPVisionModel",
    "siglip": "SiglipVisionModel",
    "siglip_vision_model": "SiglipVisionModel",
    "siglip2": "Siglip2VisionModel",
    "siglip2_vision_model": "Siglip2VisionModel",
}
# Families whose HF pooler is a fresh, untrained layer: load without it.
_NO_POOLER = {"vit", "deit"}


def _model_class(model_type: str) -> Any:
    import transformers

    name = _VISION_CLASSES.get(model_type)
    return getattr(transformers, name) if name else transformers.AutoModel


def load_hf_model(source: ModelSource) -> tuple[nn.Module, dict[str, Any]]:
    """Load weights and preprocessing config strictly offline."""
    from transformers import AutoConfig
    from transformers.utils import cached_file

    kwargs = dict(cache_dir=source.cache_dir, local_files_only=True)
    try:
        config = AutoConfig.from_pretrained(source.location, **kwargs)
        extra = {"add_pooling_layer": False} if config.model_type in _NO_POOLER else {}
        model = _model_class(config.model_type).from_pretrained(source.location, **kwargs, **extra)
    except Exception as err:  # a damaged directory fails with many types (safetensors' own among them)
        hint = (
            f"`{source.location}` is not a model directory, or a damaged one (config.json and weights must load)"
            if Path(source.location).is_dir()
            else f"model `{source.name}` is not in the cache {source.cache_dir or 'HF default'}; "
            f"run `python prefetch.py --model {source.name}` on a machine with internet"
        )
        raise BackboneError(f"{hint} ({_describe(err)})") from err
    preprocessor = cached_file(
        source.location, "preprocessor_config.json", **kwargs, _raise_exceptions_for_missing_entries=False
    )
    try:
        prep = json.loads(Path(preprocessor).read_text()) if preprocessor else {}
    except (OSError, ValueError) as err:
        raise BackboneError(f"{preprocessor} is not readable JSON ({_describe(err)})") from err
    if not isinstance(prep, dict):
        raise BackboneError(f"{preprocessor} is not a JSON object")
    return model, prep


def _describe(err: BaseException) -> str:
    """`Type: first line of the message`, at most 200 characters of it."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:200] if lines else '(no message)'}"


def _input_size(prep: dict[str, Any], config: Any) -> int:
    for key in ("crop_size", "size"):
        size = prep.get(key)
        if isinstance(size, int):
            return size
        if isinstance(size, dict):
            value = size.get("height") or size.get("shortest_edge")
            if value:
                return int(value)
    image_size = getattr(config, "image_size", 224)
    return int(image_size[0] if isinstance(image_size, (list, tuple)) else image_size)


class FeatureExtractor(nn.Module):
    """Challenge images ([-1, 1], 1 or 3 channels, any size) -> one feature vector per image."""

    def __init__(self, model: nn.Module, prep: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.input_size = _input_size(prep, model.config)
        mean = prep.get("image_mean", [0.5, 0.5, 0.5])
        std = prep.get("image_std", [0.5, 0.5, 0.5])
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.hidden_size = int(model.config.hidden_size)
        self.stored_parameters = sum(p.numel() for p in model.parameters())  # the checkpoint's (the manifest's)
        self.feature_dim = 2 * self.hidden_size
        self.num_prefix_tokens = self._count_prefix_tokens()

    def preprocess(self, images: torch.Tensor, *, resize: bool = True) -> torch.Tensor:
        """[-1, 1] challenge pixels -> the normalisation and (with `resize`) size the backbone was trained with."""
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if resize and images.shape[-2:] != (self.input_size, self.input_size):
            images = F.interpolate(
                images, size=(self.input_size, self.input_size), mode="bilinear", antialias=True, align_corners=False
            )
        return ((images + 1) / 2 - self.mean) / self.std

    def tokens(self, pixels: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.model(pixel_values=pixels, **kwargs)
        return out.last_hidden_state, getattr(out, "pooler_output", None)

    @torch.no_grad()
    def _count_prefix_tokens(self) -> int:
        """CLS/distillation/register tokens = sequence length - patch count (0 for hierarchical models)."""
        patch = getattr(self.model.config, "patch_size", None)
        if not isinstance(patch, int):
            return 0
        probe = torch.zeros(1, 3, self.input_size, self.input_size, device=self.mean.device)
        was_training = self.model.training
        self.model.eval()
        seq_len = self.tokens(probe)[0].shape[1]
        self.model.train(was_training)
        prefix = seq_len - (self.input_size // patch) ** 2
        return prefix if 0 <= prefix <= 16 else 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pool(*self.tokens(self.preprocess(images)))

    def native_size_features(self, images: torch.Tensor) -> torch.Tensor:
        """Features at the images' own side (a multiple of the patch), position embeddings interpolated (HF ViT).

        Multi-crop self-distillation feeds small local crops this way: resizing them to the input
        size would cost as much as a global crop.
        """
        return self.pool(*self.tokens(self.preprocess(images, resize=False), interpolate_pos_encoding=True))

    def pool(self, hidden: torch.Tensor, pooled: torch.Tensor | None) -> torch.Tensor:
        """The feature rule: concat(global token, mean of patch tokens)."""
        patches = hidden[:, self.num_prefix_tokens :].mean(1)
        if pooled is None or pooled.dim() != 2:
            pooled = hidden[:, 0] if self.num_prefix_tokens else patches
        return torch.cat([pooled, patches], dim=-1)


def _load(source: ModelSource) -> FeatureExtractor:
    model, prep = load_hf_model(source)
    use_flash_attention(model)
    try:
        with _resampled_position_tables(model) as tables:  # the prefix-token probe's forward pass fills it
            extractor = FeatureExtractor(model, prep)
    except (TypeError, ValueError, RuntimeError) as err:
        message = f"model `{source.name}` does not run with its preprocessor_config.json ({_describe(err)})"
        raise BackboneError(message) from err
    _store_at_input_size(tables)
    extractor.requires_grad_(False)
    return extractor


@contextmanager
def _resampled_position_tables(model: nn.Module) -> Iterator[dict[nn.Module, tuple[torch.Tensor, int, int]]]:
    """Records what each embeddings module's `interpolate_pos_encoding` returns, with the image height and width."""
    tables: dict[nn.Module, tuple[torch.Tensor, int, int]] = {}
    modules = [
        m
        for m in model.modules()
        if isinstance(getattr(m, "position_embeddings", None), nn.Parameter) and hasattr(m, "interpolate_pos_encoding")
    ]
    for module in modules:

        def record(embeddings: torch.Tensor, height: int, width: int, _module: nn.Module = module) -> torch.Tensor:
            table = type(_module).interpolate_pos_encoding(_module, embeddings, height, width)
            tables[_module] = (table, height, width)
            return table

        module.interpolate_pos_encoding = record  # an instance attribute over the class's method
    try:
        yield tables
    finally:
        for module in modules:
            del module.interpolate_pos_encoding


def _store_at_input_size(tables: dict[nn.Module, tuple[torch.Tensor, int, int]]) -> None:
    """Keeps a position table at the input size where the family resamples it on every forward pass.

    DINOv2 stores 37 x 37 positions (518 px) and, run at 224 px, resamples them bicubically to 16 x 16 in every
    forward pass: 6 % of a full fine-tuning step's GPU time and 2.5 % more for its backward (one H100,
    `benchmarks/probes/profile_step.py`, 2026-12-07). Stored as the family's own resampling of it, the table takes
    the family's no-resampling path instead (same size, square input), with the same values: a frozen table gives the
    same features, and method full trains the positions the model uses. Adaptation always runs at the input size.
    """
    for module, (table, height, width) in tables.items():
        if height == width and table.shape != module.position_embeddings.shape:
            module.position_embeddings = nn.Parameter(table.detach().clone(), requires_grad=False)


_load_pristine = lru_cache(maxsize=2)(_load)
_requested: set[ModelSource] = set()


def load_backbone(model: str | None = None, cache_dir: str | None = None, *, again: bool = False) -> FeatureExtractor:
    """A fresh, frozen backbone that the caller may modify (adapters are injected in place).

    Requests after a source's first get copies of its cached original (the two most recent sources). The
    first request gets the loaded model itself, so one task per process (the CLI, one member) pays no copy
    (ViT-B: 1 s on 2 CPU cores), unless `again` says this process will ask once more (an ensemble's next
    member, fit() after the CPU budget's timing): then it is a copy too and the next request reads nothing
    (DINOv2-S on 2 CPU cores: 0.05-0.07 s instead of 0.24-0.38 s). A task loop without `again` reads twice.
    """
    source = resolve_model(model, cache_dir)
    first = source not in _requested
    _requested.add(source)
    if first and not again:
        return _load(source)
    return copy.deepcopy(_load_pristine(source))


def probe(directory: str | Path) -> Probe:
    """Load a stored model the way adaptation does and run one image through it."""
    extractor = load_backbone(str(directory))
    features = extractor(torch.zeros(1, 3, extractor.input_size, extractor.input_size))
    if features.shape != (1, extractor.feature_dim) or not bool(torch.isfinite(features).all()):
        raise BackboneError(f"{directory}: features of shape {tuple(features.shape)} are not finite vectors")
    return Probe(extractor.stored_parameters, extractor.feature_dim)
