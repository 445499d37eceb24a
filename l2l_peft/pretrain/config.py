"""PretrainConfig: every knob of a pretraining run, read from YAML, with documented defaults.

Paths in the YAML are taken relative to the working directory. Unknown keys are errors, so a
typo cannot silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from ..config import Precision

# name -> (hidden size, attention heads); 12 layers, MLP 4x hidden, as DeiT/ViT tiny/small/base
VIT_SIZES = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}


class PretrainObjective(str, Enum):
    """What the backbone learns from: the per-dataset heads, DINO self-distillation, or their sum."""

    SUPERVISED = "supervised"
    SSL = "ssl"
    BOTH = "both"

    @property
    def supervised(self) -> bool:
        return self is not PretrainObjective.SSL

    @property
    def ssl(self) -> bool:
        return self is not PretrainObjective.SUPERVISED


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class PretrainConfig:
    """One pretraining run: multi-task supervised, self-supervised (DINO) or both."""

    # data
    sources: list[dict[str, Any]] = _help(
        "data sources in the experiments' suite format: {kind: npz, path: DIR}"
        " | {kind: folder, csv: PATH, task: T, name: N} | {kind: medimeta, path: DIR, datasets: [...], tasks: {...}}"
        " (MedIMeta is skipped when absent) | {kind: procedural, generator: dead_leaves, images: N, size: PX}",
        default_factory=list,
    )
    include: list[str] | None = _help("dataset names to use (None: all found)", default=None)
    exclude: list[str] = _help("dataset names to leave out, e.g. the evaluation datasets", default_factory=list)
    # model
    model_size: str = _help(f"ViT size built from scratch: {', '.join(VIT_SIZES)}", default="tiny")
    init_from: str | None = _help(
        "continue from this HF checkpoint (hub id in the cache, or directory) instead", default=None
    )
    cache_dir: str | None = _help("HF cache for init_from (default: the repository's hf_cache/)", default=None)
    image_size: int = _help("model input side (the challenge form is 224)", default=224)
    low_res_size: int | None = _help(
        "side of the views in the first low_res_fraction of the schedule, a multiple of patch_size below image_size "
        "(position embeddings interpolated; local crops shrink in proportion): 112 feeds a ViT/16 49 patches "
        "instead of 196. None: image_size throughout",
        default=None,
    )
    low_res_fraction: float = _help(
        "part of the schedule (its progress, as the learning rate's) trained at low_res_size; the rest at image_size",
        default=0.75,
    )
    patch_size: int = _help("ViT patch side", default=16)
    vit_overrides: dict[str, Any] = _help("extra ViTConfig fields (tests use tiny widths)", default_factory=dict)
    # optimisation
    steps: int = _help("optimisation steps (the cosine schedule's length)", default=20000)
    max_minutes: float | None = _help(
        "training time budget over all resumes; the schedule then follows whichever of steps or time ends first",
        default=None,
    )
    batch_size: int = _help(
        "images per step and process, split evenly across datasets (balanced sampling)", default=512
    )
    lr: float = _help("AdamW peak learning rate (of the heads and of the backbone's last layers)", default=1e-3)
    layer_decay: float = _help(
        "layer-wise learning-rate decay of the backbone: block i of L trains at lr * layer_decay ** (L - i), the "
        "embeddings at lr * layer_decay ** (L + 1), the heads at lr. Below 1 when continuing from a pretrained "
        "model (init_from), so its early, general layers move least",
        default=1.0,
    )
    head_warmup_steps: int = _help(
        "first steps in which only the heads learn (the backbone's learning rate is 0): new heads start random, "
        "and their first gradients would otherwise reach a pretrained backbone (init_from) as noise",
        default=0,
    )
    min_lr_frac: float = _help("final learning rate as a fraction of lr", default=0.01)
    weight_decay: float = _help("AdamW weight decay on matrices (not on biases and norms)", default=0.05)
    warmup_steps: int = _help("linear warm-up steps", default=300)
    grad_clip: float = _help("gradient norm clip", default=1.0)
    precision: Precision = _help(
        "mixed precision: auto (bf16 on GPU, fp32 on CPU), bf16, fp16 or no", default=Precision.AUTO
    )
    cpu: bool = _help("train on the CPU even when a GPU is present", default=False)
    compile: bool = _help(
        "torch.compile the model: fewer, fused kernels per step after about 40 s of compilation (tiny recipe "
        "on one H200: 1.08x images/s at 512 images per step; more where each GPU's batch is small)",
        default=False,
    )
    seed: int = _help("seed of the initialisation, sampling and augmentation", default=0)
    # augmentation (pixels in [0, 1] units where it matters)
    crop_scale: tuple[float, float] = _help("random resized crop: area fraction range", default=(0.35, 1.0))
    max_rotation: float = _help("random rotation range in degrees (+-)", default=30.0)
    vflip: float = _help("probability of a vertical flip (horizontal flips: 0.5)", default=0.5)
    jitter: float = _help("brightness (+-jitter/2), contrast and saturation (1+-jitter) strength", default=0.4)
    grayscale: float = _help("probability that an RGB image is turned gray", default=0.2)
    # objective; the ssl_* and crop fields below only matter for ssl and both (docs/pretraining.md)
    objective: PretrainObjective = _help(
        "supervised: one head per dataset (labels needed); ssl: DINO self-distillation with multi-crop "
        "(labels ignored); both: supervised + ssl_weight * ssl on the same images (the heads read the "
        "first global crop)",
        default=PretrainObjective.SUPERVISED,
    )
    ssl_weight: float = _help("weight of the DINO loss added to the mean supervised loss (objective both)", default=1.0)
    ssl_hidden_dim: int = _help("DINO projection head: hidden width of its 3-layer MLP", default=2048)
    ssl_bottleneck_dim: int = _help("DINO projection head: L2-normalised bottleneck width", default=256)
    ssl_out_dim: int = _help("DINO head: prototypes (softmax width) of the weight-normalised last layer", default=8192)
    teacher_momentum: tuple[float, float] = _help(
        "EMA momentum of the teacher, cosine from the first value to the second over the schedule", default=(0.996, 1.0)
    )
    teacher_temp: float = _help("softmax temperature of the centred teacher outputs (sharpening)", default=0.04)
    student_temp: float = _help("softmax temperature of the student outputs", default=0.1)
    center_momentum: float = _help("EMA momentum of the center subtracted from teacher outputs", default=0.9)
    global_crop_scale: tuple[float, float] = _help(
        "the two global crops (image_size, seen by teacher and student): area fraction range", default=(0.32, 1.0)
    )
    local_crops: int = _help("small crops per image, seen by the student only (0: two global crops only)", default=6)
    local_crop_size: int = _help(
        "local crops' side, a multiple of patch_size (position embeddings interpolated)", default=96
    )
    local_crop_scale: tuple[float, float] = _help("local crops: area fraction range", default=(0.05, 0.32))
    # bookkeeping
    name: str = _help("model name written into the card", default="l2l-vit-tiny-med")
    checkpoint_every: int = _help("steps between checkpoints (always one at the end)", default=1000)
    log_every: int = _help("steps between loss/throughput log lines", default=50)
    save_dtype: str = _help("dtype of the exported weights: bf16 (half the size) or fp32", default="bf16")

    def __post_init__(self) -> None:
        self.precision = Precision(self.precision)
        self.crop_scale = tuple(self.crop_scale)
        try:
            self.objective = PretrainObjective(self.objective)
        except ValueError:
            choices = ", ".join(o.value for o in PretrainObjective)
            raise ValueError(f"PretrainConfig.objective must be one of {choices}, got {self.objective!r}") from None
        if self.model_size not in VIT_SIZES and self.init_from is None:
            raise ValueError(
                f"PretrainConfig.model_size must be one of {', '.join(VIT_SIZES)}, got {self.model_size!r}"
            )
        if not self.sources:
            raise ValueError(
                "PretrainConfig.sources is empty: name at least one, e.g. `- {kind: npz, path: ../shared/data}`"
            )
        for name in ("batch_size", "image_size", "patch_size", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"PretrainConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("steps", "warmup_steps", "head_warmup_steps", "weight_decay", "max_rotation"):
            if getattr(self, name) < 0:
                raise ValueError(f"PretrainConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("lr", "grad_clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"PretrainConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.max_minutes is not None and not self.max_minutes > 0:  # 0 would silently mean "no budget"
            raise ValueError(f"PretrainConfig.max_minutes must be > 0 or null, got {self.max_minutes!r}")
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"PretrainConfig.layer_decay must be in (0, 1], got {self.layer_decay!r}")
        for name in ("min_lr_frac", "vflip", "jitter", "grayscale"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"PretrainConfig.{name} must be in [0, 1], got {getattr(self, name)!r}")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"PretrainConfig.crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale!r}")
        low = self.low_res_size
        if low is not None and (low < self.patch_size or low % self.patch_size or low >= self.image_size):
            raise ValueError(
                f"PretrainConfig.low_res_size must be a multiple of patch_size ({self.patch_size}) below image_size "
                f"({self.image_size}) or null, got {low!r}"
            )
        if not 0 < self.low_res_fraction <= 1:
            raise ValueError(f"PretrainConfig.low_res_fraction must be in (0, 1], got {self.low_res_fraction!r}")
        if self.save_dtype not in ("bf16", "fp32"):
            raise ValueError(f"PretrainConfig.save_dtype must be bf16 or fp32, got {self.save_dtype!r}")
        self._validate_ssl()

    def _validate_ssl(self) -> None:
        for name in ("teacher_momentum", "global_crop_scale", "local_crop_scale"):
            setattr(self, name, tuple(getattr(self, name)))
        for name in ("ssl_hidden_dim", "ssl_bottleneck_dim", "ssl_out_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"PretrainConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("ssl_weight", "teacher_temp", "student_temp"):
            if not getattr(self, name) > 0:
                raise ValueError(f"PretrainConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if len(self.teacher_momentum) != 2 or not 0 <= self.teacher_momentum[0] <= self.teacher_momentum[1] <= 1:
            raise ValueError(
                "PretrainConfig.teacher_momentum must be (start, end) with 0 <= start <= end <= 1, "
                f"got {self.teacher_momentum!r}"
            )
        if not 0 <= self.center_momentum < 1:
            raise ValueError(f"PretrainConfig.center_momentum must be in [0, 1), got {self.center_momentum!r}")
        for name in ("global_crop_scale", "local_crop_scale"):
            scale = getattr(self, name)
            if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
                raise ValueError(f"PretrainConfig.{name} must be (low, high) with 0 < low <= high <= 1, got {scale!r}")
        if self.local_crops < 0:
            raise ValueError(f"PretrainConfig.local_crops must be >= 0, got {self.local_crops!r}")
        size = self.local_crop_size
        if self.objective.ssl and self.local_crops and (size < 1 or size % self.patch_size or size > self.image_size):
            raise ValueError(
                f"PretrainConfig.local_crop_size must be a multiple of patch_size ({self.patch_size}) and at most "
                f"image_size ({self.image_size}), got {self.local_crop_size!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["precision"] = self.precision.value
        out["objective"] = self.objective.value
        for name in ("crop_scale", "teacher_momentum", "global_crop_scale", "local_crop_scale"):
            out[name] = list(getattr(self, name))
        return out


def load_config(path: str | Path | None, **overrides: Any) -> PretrainConfig:
    """YAML file (optional) + keyword overrides (None values are ignored) -> validated config."""
    import yaml

    values = yaml.safe_load(Path(path).read_text()) if path else {}
    values = dict(values or {})
    npz_dir = overrides.pop("npz_dir", None)
    values.update({k: v for k, v in overrides.items() if v is not None})
    if npz_dir:
        values["sources"] = [{**s, "path": npz_dir} if s.get("kind") == "npz" else s for s in values.get("sources", [])]
    known = {f.name for f in dataclasses.fields(PretrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"unknown pretraining setting(s) {', '.join(unknown)} in {path}; known: {', '.join(sorted(known))}"
        )
    return PretrainConfig(**values)
