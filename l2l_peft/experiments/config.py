"""The experiment YAML as dataclasses: which tasks (suite), which methods, which backbone.

    model: google/vit-base-patch16-224     # hub id in the cache, or a model directory
    cache_dir: hf_cache
    suite:
      shots: [1, 5, 10, 20]
      tasks: 10                            # per dataset x target x shots
      sources:
        - {kind: npz, path: ../shared/data}
    methods:
      - {name: default}                    # kind adapt, AdaptConfig defaults (the default recipe)
      - {name: head, params: {method: head}}
      - {name: probe, kind: linear_probe, grid: {l2: [1.0e-4, 1.0e-2]}}

Relative paths are relative to the working directory, as on the command line.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .methods import MethodSpec


@dataclass
class SuiteConfig:
    """Which few-shot tasks to run; sampled tasks follow the MedIMeta protocol (see data/sampling.py)."""

    sources: list[dict[str, Any]] = field(default_factory=list)  # one dict per source, `kind` + its loader's arguments
    shots: list[int] = field(default_factory=lambda: [1, 5, 10, 20])  # n per class (binary: n pos + n neg)
    tasks: int = 10  # sampled tasks per dataset x target x shots
    query_per_class: int = 10  # query images per class (multilabel: per label, positive and negative)
    seed: int = 0  # suite seed; each task's seed derives from it and the task's identity
    split: str | None = None  # sample only from this split (train, val, test); None: every image
    image_size: int = 224  # challenge form: float C x size x size in [-1, 1]

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("suite.sources is empty: name at least one source (npz, folder, medimeta or pickles)")
        if any(n < 1 for n in self.shots) or self.tasks < 1 or self.query_per_class < 1:
            raise ValueError(
                "suite.shots, suite.tasks and suite.query_per_class must be >= 1, "
                f"got {self.shots}, {self.tasks}, {self.query_per_class}"
            )
        if self.split not in (None, "train", "val", "test"):
            raise ValueError(f"suite.split must be train, val, test or null, got {self.split!r}")


@dataclass
class ExperimentConfig:
    suite: SuiteConfig
    methods: list[MethodSpec]
    model: str | None = None  # backbone for every method (AdaptConfig.model); `{dataset}` is filled per task
    cache_dir: str | None = None  # AdaptConfig.cache_dir
    precision: str = "auto"  # mixed precision of the one Accelerator (auto: bf16/fp16 on GPU, fp32 on CPU)
    cpu: bool = False  # force the CPU even with GPUs present
    defaults: dict[str, Any] = field(default_factory=dict)  # AdaptConfig overrides under every method's own
    bootstrap: int = 1000  # resamples for the 95% confidence intervals
    metric: str = "auroc"  # the headline metric of summary.md and the plots
    reference: str | None = None  # variant that summary.md's paired differences compare against (None: the first)

    def __post_init__(self) -> None:
        if not self.methods:
            raise ValueError(
                "methods is empty: list at least one method, e.g. `- {name: default}` (the default recipe)"
            )
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names):
            raise ValueError(f"method names must be unique, got {names}")
        if self.bootstrap < 1:  # else the summary fails only after every task has run
            raise ValueError(f"bootstrap must be >= 1 resamples, got {self.bootstrap!r}")


def _build(kind: type, values: dict[str, Any], where: str) -> Any:
    known = {f.name for f in fields(kind)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(known)}")
    return kind(**values)


def parse_config(raw: dict[str, Any]) -> ExperimentConfig:
    raw = dict(raw)
    suite = _build(SuiteConfig, raw.pop("suite", None) or {}, "suite")
    methods = [_build(MethodSpec, m, f"methods[{i}]") for i, m in enumerate(raw.pop("methods", None) or [])]
    return _build(ExperimentConfig, {**raw, "suite": suite, "methods": methods}, "config")


def load_config(path: str | Path) -> ExperimentConfig:
    raw = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")  # noqa: TRY004 - a bad file, like every config error
    return parse_config(raw)
