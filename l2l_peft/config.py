"""AdaptConfig: every knob of adapt(), with documented defaults.

Field names double as CLI flags (`max_steps` -> `--max-steps`) and as keyword overrides of
`adapt(task, **overrides)`, so one definition serves the API, the CLI and the experiment YAML.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Precision(str, Enum):
    AUTO = "auto"  # bf16 on GPUs that support it, fp16 (with loss scaling) on older GPUs, fp32 on CPU
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "no"


class Method(str, Enum):
    """How the backbone is adapted; the head is always trained."""

    AUTO = "auto"  # the default recipe for the device: AdaptConfig.concrete()
    LORA = "lora"
    DORA = "dora"
    LOHA = "loha"
    LOKR = "lokr"
    IA3 = "ia3"
    VERA = "vera"
    BITFIT = "bitfit"  # biases + norm parameters
    VPT_SHALLOW = "vpt-shallow"
    VPT_DEEP = "vpt-deep"
    HEAD = "head"  # frozen backbone, head only
    FULL = "full"  # every backbone weight trained
    PROTOTYPES = "prototypes"  # frozen backbone, head set to the support's class means, no training
    LINEAR_PROBE = "linear-probe"  # frozen backbone, head fitted by L2-regularised LBFGS on the support features


class LoraTargets(str, Enum):
    """Which projections of each block get adapters (adapters.find_target_modules)."""

    QV = "qv"
    QKV = "qkv"
    ATTN = "attn"  # q, k, v and the attention output
    ALL = "all"  # attn + the MLP


class HeadInit(str, Enum):
    PROTOTYPE = "prototype"  # class means of the support features: training starts from the nearest-mean rule
    ZERO = "zero"


GPU_METHOD = "lora+full"  # what method auto means on a GPU
CPU_LAST_BLOCKS = 4  # and on a CPU: LoRA on this many last blocks

ENV_MODEL = "L2L_PEFT_MODEL"
ENV_CACHE = "L2L_PEFT_CACHE"
ENV_TIME_BUDGET = "L2L_PEFT_TIME_BUDGET"


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class AdaptConfig:
    """Settings of one adaptation run; defaults are the recommended few-shot recipe."""

    model: str | None = _help(
        "hub id or local directory of the backbone; default: $L2L_PEFT_MODEL, else the default "
        "entry of the cache's manifest.json",
        default=None,
    )
    cache_dir: str | None = _help(
        "HF cache to load from (never the network); default: $L2L_PEFT_CACHE, else the repository's "
        "hf_cache/ when it exists, else the standard HF cache",
        default=None,
    )
    max_steps: int = _help("upper bound on optimisation steps", default=100)
    time_budget: float | None = _help(
        "wall-clock seconds for the whole adapt() call; training stops early to leave time for "
        "prediction; default: $L2L_PEFT_TIME_BUDGET, else unlimited (the CLI: 600 s for the whole process)",
        default=None,
    )
    seed: int = _help("seed for head/adapter init, batch order and augmentation", default=0)
    cpu: bool = _help("run on the CPU even when a GPU is present", default=False)
    precision: Precision = _help("mixed precision: auto, bf16, fp16 or no", default=Precision.AUTO)
    method: str = _help(
        "adaptation method (lora, dora, loha, lokr, ia3, vera, bitfit, vpt-shallow, vpt-deep, head, full; "
        "prototypes and linear-probe fit only the head on frozen features); "
        "several joined by '+' are trained one after the other and their query probabilities averaged, a "
        "later one only when the time budget leaves room for it; auto: lora+full on a GPU, lora on the last "
        "4 blocks on a CPU, on every block where the time budget allows it (docs/recipe_foundation.md)",
        default=Method.AUTO.value,
    )
    lora_rank: int = _help("rank of LoRA-family adapters", default=16)
    lora_alpha: float = _help("LoRA scaling numerator (scale = alpha / rank)", default=32.0)
    lora_dropout: float = _help("dropout on the LoRA input; regularises tiny supports", default=0.1)
    lora_targets: LoraTargets = _help(
        "which projections get adapters: qv, qkv, attn (q, k, v, out) or all (attn + MLP)", default=LoraTargets.QV
    )
    lora_last_blocks: int | None = _help(
        "adapt only the last k transformer blocks (None: all); the frozen blocks before them "
        "then run once, not every step",
        default=None,
    )
    prefix_views: int = _help(
        "with lora_last_blocks or full_last_blocks: augmented views per support image whose frozen-block output "
        "is cached once (training then samples among them); 0 runs the frozen blocks every step",
        default=4,
    )
    cuda_graphs: bool = _help(
        "capture the training step as a CUDA graph on GPUs (not with fp16 loss scaling); cuts the "
        "per-step launch overhead that dominates at few-shot batch sizes",
        default=True,
    )
    vpt_tokens: int = _help("prompt tokens per layer for visual prompt tuning", default=8)
    lr_head: float = _help("AdamW learning rate of the head", default=5e-3)
    lr_adapter: float = _help("AdamW learning rate of the adapter parameters", default=1e-3)
    lr_full: float = _help(
        "AdamW learning rate of the backbone's own weights under method full (a foundation backbone's "
        "features are lost at the adapters' rate: docs/recipe_foundation.md)",
        default=1e-4,
    )
    layer_decay: float = _help(
        "layer-wise learning-rate decay under method full: block i of L trains at lr_full * layer_decay ** (L - i), "
        "the embeddings one factor lower still, the final norm at lr_full; 1 gives every layer the same rate",
        default=0.7,
    )
    full_last_blocks: int | None = _help(
        "under method full, train only the last k transformer blocks (None: every weight); the embeddings, the "
        "blocks before them and the final norm stay frozen, so, as with lora_last_blocks, the frozen blocks run "
        "once per cached view (prefix_views), not every step",
        default=None,
    )
    weight_decay: float = _help("AdamW weight decay (adapters and head)", default=1e-4)
    warmup_frac: float = _help("fraction of steps with linear warm-up before the cosine decay", default=0.1)
    batch_size: int = _help("support images per step (the whole support when smaller)", default=32)
    epochs: float = _help(
        "passes over the support; steps = epochs * n_support / batch_size, raised to min_steps, then capped "
        "at max_steps",
        default=50.0,
    )
    min_steps: int = _help("lower bound on optimisation steps (max_steps wins when it is smaller)", default=20)
    augment: bool = _help("random flips, small affine jitter and contrast/brightness jitter", default=True)
    transductive: float = _help(
        "weight of an information term on the query images added to the support loss: mean prediction "
        "entropy minus the entropy of the mean prediction (TIM, Boudiaf et al. 2020); each step then also "
        "runs a batch of query images; 0 turns it off; regression has no such term",
        default=0.0,
    )
    head_init: HeadInit = _help(
        "head initialisation: prototype (class means of the support features) or zero", default=HeadInit.PROTOTYPE
    )
    predict_batch_size: int = _help("query images per inference batch", default=256)
    probe_l2: float = _help("linear-probe: weight of the squared L2 norm of the probe weights", default=1e-3)
    probe_max_iter: int = _help("linear-probe: LBFGS iterations (full batch; convex, converges fast)", default=200)

    def __post_init__(self) -> None:
        self.precision = _enum(Precision, self.precision, "precision")
        self.lora_targets = _enum(LoraTargets, self.lora_targets, "lora_targets")
        self.head_init = _enum(HeadInit, self.head_init, "head_init")
        self.method = "+".join(_enum(Method, m, "method").value for m in _split_methods(self.method))
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"AdaptConfig.method names a method twice: {self.method!r}")
        if Method.AUTO in self.methods and len(self.methods) > 1:
            raise ValueError(f"AdaptConfig.method auto stands alone, got {self.method!r}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):  # nan passes every comparison below
                raise ValueError(f"AdaptConfig.{f.name} must be a finite number, got {value}")
        for name, low in _AT_LEAST.items():
            if getattr(self, name) < low:
                raise ValueError(f"AdaptConfig.{name} must be >= {low}, got {_short(getattr(self, name))}")
        if self.time_budget is not None and self.time_budget <= 0:
            raise ValueError(f"AdaptConfig.time_budget must be > 0 seconds, got {_short(self.time_budget)}")
        if self.lora_last_blocks is not None and self.lora_last_blocks < 1:
            raise ValueError(f"AdaptConfig.lora_last_blocks must be >= 1 or None, got {_short(self.lora_last_blocks)}")
        if self.full_last_blocks is not None and self.full_last_blocks < 1:
            raise ValueError(f"AdaptConfig.full_last_blocks must be >= 1 or None, got {_short(self.full_last_blocks)}")
        if self.transductive and (self.lora_last_blocks or self.full_last_blocks) and self.prefix_views:
            raise ValueError(
                "AdaptConfig.transductive needs the query images every step: with lora_last_blocks or "
                "full_last_blocks set prefix_views=0"
            )
        if self.lora_alpha <= 0:
            raise ValueError(f"AdaptConfig.lora_alpha must be > 0, got {_short(self.lora_alpha)}")
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"AdaptConfig.layer_decay must be in (0, 1], got {_short(self.layer_decay)}")
        for name in ("lora_dropout", "warmup_frac"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"AdaptConfig.{name} must be in [0, 1), got {_short(getattr(self, name))}")

    @property
    def methods(self) -> tuple[Method, ...]:
        """The ensemble's members in training order (one for a single method)."""
        return tuple(Method(m) for m in self.method.split("+"))

    @property
    def on_cpu(self) -> bool:
        """Whether this config trains on the CPU: asked for (`cpu`), or no GPU is present."""
        import torch

        return self.cpu or not torch.cuda.is_available()

    def concrete(self, *, full_depth: bool = False) -> AdaptConfig:
        """`method="auto"` made the recipe for the device this config runs on: the lora+full ensemble on a GPU;
        on a CPU, where that ensemble on a ViT-S takes minutes, LoRA alone on the last CPU_LAST_BLOCKS blocks
        over cached frozen-prefix outputs, or on every block with `full_depth` (budget.full_depth_fits: the
        time budget allows it); docs/recipe_foundation.md has the figures."""
        if self.methods != (Method.AUTO,):
            return self
        if self.on_cpu:
            if full_depth and self.lora_last_blocks is None:
                return dataclasses.replace(self, method=Method.LORA.value)
            blocks = self.lora_last_blocks or CPU_LAST_BLOCKS
            views = 0 if self.transductive else self.prefix_views  # the query term needs every block each step
            return dataclasses.replace(self, method=Method.LORA.value, lora_last_blocks=blocks, prefix_views=views)
        return dataclasses.replace(self, method=GPU_METHOD)

    def members(self) -> list[AdaptConfig]:
        """One config per method of the ensemble, everything else shared."""
        return [dataclasses.replace(self, method=m.value) for m in self.methods]

    def with_env(self) -> AdaptConfig:
        """Fill unset fields from the container's environment variables."""
        budget = self.time_budget
        if budget is None and os.environ.get(ENV_TIME_BUDGET):
            budget = _env_seconds(ENV_TIME_BUDGET)
        return dataclasses.replace(
            self,
            model=self.model or os.environ.get(ENV_MODEL) or None,
            cache_dir=self.cache_dir or os.environ.get(ENV_CACHE) or None,
            time_budget=budget,
        )

    def to_dict(self) -> dict[str, Any]:
        return {k: (v.value if isinstance(v, Enum) else v) for k, v in dataclasses.asdict(self).items()}


# lower bounds of numeric fields; anything below is an error, never clamped into range
_AT_LEAST = {
    "max_steps": 1, "min_steps": 0, "lora_rank": 1, "batch_size": 1, "predict_batch_size": 1, "vpt_tokens": 1,
    "prefix_views": 0, "lr_head": 0, "transductive": 0, "lr_adapter": 0, "lr_full": 0, "weight_decay": 0, "epochs": 0,
    "probe_l2": 0, "probe_max_iter": 1,
}  # fmt: skip


def _env_seconds(name: str) -> float:
    raw = os.environ[name]
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"${name} must be a finite number of seconds > 0, got {_short(raw)}")
    return seconds


def _short(value: Any, limit: int = 200) -> str:
    """repr(value), cut to `limit` characters: an error message must not echo a 10 MB argument."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _split_methods(value: Any) -> list[Any]:
    """'lora+full' -> ['lora', 'full']; a Method member stays one item."""
    return [value] if isinstance(value, Enum) else [part.strip() for part in str(value).split("+")]


def _enum(kind: type[Enum], value: Any, name: str) -> Any:
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(m.value for m in kind)
        raise ValueError(f"AdaptConfig.{name} must be one of {choices}; got {_short(value)}") from None


def make_config(config: AdaptConfig | None = None, **overrides: Any) -> AdaptConfig:
    """Merge keyword overrides into a config, rejecting unknown names."""
    config = config or AdaptConfig()
    known = {f.name for f in dataclasses.fields(AdaptConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown AdaptConfig field(s): {', '.join(unknown)}")
    return dataclasses.replace(config, **overrides)
