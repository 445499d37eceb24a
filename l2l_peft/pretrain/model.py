"""The pretraining model: the adaptation FeatureExtractor + one Head per dataset (+ DINO head); export of the backbone.

Pretraining and adaptation share FeatureExtractor, so the backbone learns on exactly the
features adapt() later reads (concat(CLS, patch mean) of [-1, 1] challenge inputs).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..backbone import FeatureExtractor, load_hf_model
from ..cache import resolve_model
from ..head import Head
from .config import VIT_SIZES, PretrainConfig

# challenge pixels are already [-1, 1]: mean = std = 0.5 makes the model's normalisation the identity
CHALLENGE_MEAN_STD = [0.5, 0.5, 0.5]


def preprocessor_config(size: int, mean: list[float] | None = None, std: list[float] | None = None) -> dict:
    """The image processor config written beside a backbone; mean and std default to the challenge's identity."""
    return {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": size, "width": size},
        "resample": 2,  # bilinear
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": mean or CHALLENGE_MEAN_STD,
        "image_std": std or CHALLENGE_MEAN_STD,
    }


def build_extractor(config: PretrainConfig) -> FeatureExtractor:
    """A ViT of the named size from scratch, or the backbone of an existing checkpoint, which keeps the input
    normalisation it was trained with (DINOv2: ImageNet statistics; those trained here: the identity)."""
    if config.init_from:
        model, prep = load_hf_model(resolve_model(config.init_from, config.cache_dir))
        if getattr(model.config, "patch_size", config.patch_size) != config.patch_size:
            raise ValueError(  # crop sides are checked against config.patch_size: it must be the model's
                f"PretrainConfig.patch_size is {config.patch_size} but {config.init_from} has patches of "
                f"{model.config.patch_size} px: set patch_size: {model.config.patch_size}"
            )
        prep = preprocessor_config(config.image_size, prep.get("image_mean"), prep.get("image_std"))
        return FeatureExtractor(model.float(), prep)
    from transformers import ViTConfig, ViTModel

    hidden, heads = VIT_SIZES[config.model_size]
    vit = dict(
        hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=12, intermediate_size=4 * hidden,
        image_size=config.image_size, patch_size=config.patch_size, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, layer_norm_eps=1e-6,
    )  # fmt: skip
    vit.update(config.vit_overrides)
    model = ViTModel(ViTConfig(**vit), add_pooling_layer=False)
    return FeatureExtractor(model, preprocessor_config(config.image_size))


def view_features(extractor: FeatureExtractor, views: torch.Tensor) -> torch.Tensor:
    """Features of augmented views: at the model's side as adapt() sees images, or at their own smaller side
    (the low-resolution phase, low_res_size) with interpolated position embeddings instead of upsampled."""
    if views.shape[-1] == extractor.input_size:
        return extractor(views)
    return extractor.native_size_features(views)


class MultiTaskModel(nn.Module):
    """Shared backbone, one head per dataset and, for self-distillation, the student's projection head.

    One forward computes every output (DDP synchronises gradients of what one forward call used).
    """

    def __init__(self, extractor: FeatureExtractor, n_logits: dict[str, int], ssl_head: nn.Module | None = None):
        super().__init__()
        self.extractor = extractor
        self.heads = nn.ModuleDict({name: Head(extractor.feature_dim, n) for name, n in n_logits.items()})
        self.ssl_head = ssl_head

    def forward(
        self, images: torch.Tensor, counts: list[int], local_crops: torch.Tensor | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """(logits per dataset chunk of the first sum(counts) images, ssl_head outputs of all views or None)."""
        features = view_features(self.extractor, images)
        logits = [head(f) for head, f in zip(self.heads.values(), features[: sum(counts)].split(counts))]
        if self.ssl_head is None:
            return logits, None
        if local_crops is not None:
            features = torch.cat([features, self.extractor.native_size_features(local_crops)])
        return logits, self.ssl_head(features)


def export_backbone(extractor: FeatureExtractor, directory: Path, *, save_dtype: str) -> None:
    """save_pretrained of the backbone alone (safetensors) + the preprocessor config it was trained with.

    Weights may be stored in bf16 to halve the size; config.json still says float32, so every
    transformers version loads them into float32 like any other checkpoint.
    """
    import copy

    model = copy.deepcopy(extractor.model).cpu()
    model.to(torch.bfloat16 if save_dtype == "bf16" else torch.float32)
    model.save_pretrained(directory, safe_serialization=True)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = "float32"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    mean, std = (v.flatten().tolist() for v in (extractor.mean, extractor.std))
    (directory / "preprocessor_config.json").write_text(
        json.dumps(preprocessor_config(extractor.input_size, mean, std), indent=2) + "\n"
    )
