"""Named methods of the YAML, their hyperparameter grids, and how each variant adapts a task.

Every method uses the same backbone and runs through l2l_peft.api.run. Kinds:
  adapt         AdaptConfig overrides (the default recipe; method: lora, head, full, dora, bitfit,
                vpt-deep, ... select the others)
  seed_recipe   the challenge's seed: full fine-tuning, Adam lr 1e-3, 100 epochs, batch 64, no
                augmentation, zero-initialised head (the loop's cosine decay stays)
  linear_probe  method linear-probe: L2-regularised regression of the target's loss on frozen
                features (frozen.py); its params l2 and max_iter set probe_l2 and probe_max_iter
  prototypes    method prototypes: nearest class mean on frozen features (frozen.py)
Config precedence: YAML defaults < the kind's preset < params < grid values. A string setting
(the YAML's `model:` or a param) may name `{dataset}`, replaced by the task's dataset:
`model: runs/loo/{dataset}` gives each dataset the backbone pretrained without it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any

from ..api import AdaptResult, run
from ..config import AdaptConfig, HeadInit, Method, make_config
from ..task import TaskData


class Kind(str, Enum):
    ADAPT = "adapt"
    SEED_RECIPE = "seed_recipe"
    LINEAR_PROBE = "linear_probe"
    PROTOTYPES = "prototypes"


SEED_RECIPE: dict[str, Any] = dict(
    method=Method.FULL,
    lr_head=1e-3,
    lr_adapter=1e-3,
    lr_full=1e-3,
    layer_decay=1.0,
    weight_decay=0.0,
    epochs=100.0,
    batch_size=64,
    max_steps=100_000,
    min_steps=1,
    warmup_frac=0.0,
    augment=False,
    head_init=HeadInit.ZERO,
)  # fmt: skip  -- weight_decay 0 makes AdamW plain Adam; max_steps so high that epochs decide
PRESETS: dict[Kind, dict[str, Any]] = {
    Kind.SEED_RECIPE: SEED_RECIPE,
    Kind.LINEAR_PROBE: {"method": Method.LINEAR_PROBE},
    Kind.PROTOTYPES: {"method": Method.PROTOTYPES},
}
PROBE_PARAMS = {"l2": "probe_l2", "max_iter": "probe_max_iter"}  # linear_probe's own names in the YAML
DATASET = "{dataset}"  # placeholder in string settings, replaced per task


@dataclass
class MethodSpec:
    """One `methods:` entry of the YAML."""

    name: str
    kind: Kind = Kind.ADAPT
    params: dict[str, Any] = field(default_factory=dict)  # AdaptConfig fields (linear_probe: also l2, max_iter)
    grid: dict[str, list[Any]] = field(default_factory=dict)  # field -> values; the product gives variants

    def __post_init__(self) -> None:
        try:
            self.kind = Kind(self.kind)
        except ValueError:
            raise ValueError(
                f"method {self.name!r}: kind must be one of {[k.value for k in Kind]}, got {self.kind!r}"
            ) from None
        bad = [k for k, v in self.grid.items() if not isinstance(v, list) or not v]
        if bad:
            raise ValueError(f"method {self.name!r}: grid values must be non-empty lists, not for {bad}")


@dataclass(frozen=True)
class Variant:
    """One point of a method's grid: what a results row names and how it adapts."""

    name: str  # method name, plus [key=value,...] for grid points
    method: str
    kind: Kind
    params: dict[str, Any]  # params and grid values merged

    def config(self, base: AdaptConfig, seed: int, dataset: str = DATASET) -> AdaptConfig:
        """base < preset < params; the seed adds the task's."""
        names = PROBE_PARAMS if self.kind is Kind.LINEAR_PROBE else {}
        overrides = {names.get(k, k): v for k, v in self.params.items()}
        config = make_config(make_config(base, **PRESETS.get(self.kind, {})), **overrides)
        filled = {
            f.name: v.replace(DATASET, dataset)
            for f in fields(config)
            if isinstance(v := getattr(config, f.name), str) and DATASET in v
        }
        return make_config(config, seed=seed + config.seed, **filled)

    def run(self, data: TaskData, base: AdaptConfig, *, seed: int, dataset: str) -> AdaptResult:
        return run(data, self.config(base, seed, dataset))


def expand(spec: MethodSpec) -> list[Variant]:
    """The grid's product; a method without a grid is one variant named like the method."""
    if not spec.grid:
        return [Variant(spec.name, spec.name, spec.kind, dict(spec.params))]
    keys = sorted(spec.grid)
    variants = []
    for values in itertools.product(*(spec.grid[k] for k in keys)):
        point = dict(zip(keys, values))
        label = ",".join(f"{k}={v}" for k, v in point.items())
        variants.append(Variant(f"{spec.name}[{label}]", spec.name, spec.kind, {**spec.params, **point}))
    return variants


def build_variants(specs: list[MethodSpec], base: AdaptConfig) -> list[Variant]:
    """Expand every method and check its configs now, not hours into a run.

    A method named like an adaptation method must run that method: `{name: lora}` alone would run the
    default recipe (an ensemble) under the label `lora`, results mislabelled for good.
    """
    variants = [v for spec in specs for v in expand(spec)]
    for variant in variants:
        try:
            config = variant.config(base, seed=0)
        except (TypeError, ValueError) as err:
            raise ValueError(f"method {variant.name!r}: {err}") from err
        try:
            named = make_config(config, method=variant.method).method
        except ValueError:
            continue  # the name is no method: a free label
        if named != config.method:
            raise ValueError(
                f"method {variant.name!r} is named like the adaptation method {named!r} but runs {config.method!r}; "
                f"set `params: {{method: {named}}}` or give it another name"
            )
    return variants
