"""A virtual environment holding only what the container installs, linked from this one.

The CLI's start-up is mostly imports, and transformers' imports grow with the environment: it
imports scikit-learn when present and checks versions against every installed distribution. A
development image full of other packages therefore measures a slower CLI than the container
ships. This builds a venv whose site-packages links, from the current environment, only the
distributions in the dependency closure of pyproject.toml's `dependencies` (what singularity.def
installs), so the benchmark can time the CLI as the container would run it:

    python benchmarks/slim_env.py /tmp/slim
    python benchmarks/bench_adapt.py --only cli --cli-python /tmp/slim/bin/python
"""

from __future__ import annotations

import argparse
import sysconfig
import venv
from importlib import metadata
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def closure(requirements: list[str]) -> tuple[dict[str, metadata.Distribution], list[str]]:
    """Installed distributions that `requirements` pull in (markers evaluated, extras not followed),
    and the required names not installed here (the container would have them; the CLI runs without)."""
    found: dict[str, metadata.Distribution] = {}
    missing: list[str] = []
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = req.name.lower().replace("_", "-")
        if name in found or name in missing or (req.marker and not req.marker.evaluate({"extra": ""})):
            continue
        try:
            found[name] = dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            missing.append(name)
            continue
        todo += [Requirement(r) for r in dist.requires or []]
    return found, missing


def top_level(dist: metadata.Distribution) -> set[str]:
    """First path components of a distribution's files inside site-packages (packages, modules, dist-info)."""
    return {f.parts[0] for f in dist.files or [] if f.parts and f.parts[0] != ".."}


def build(target: Path) -> tuple[list[str], list[str]]:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    dists, missing = closure(dependencies)
    venv.EnvBuilder(with_pip=False, symlinks=True, clear=True).create(target)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(target), "platbase": str(target)}))
    for dist in dists.values():
        for entry in top_level(dist):
            source, link = Path(dist.locate_file(entry)), site / entry
            if source.exists() and not link.exists():
                link.symlink_to(source)
    return sorted(dists), missing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", type=Path, help="directory of the new venv (replaced if it exists)")
    args = parser.parse_args()
    names, missing = build(args.target)
    print(f"{args.target / 'bin' / 'python'}: {len(names)} distributions: {', '.join(names)}")
    if missing:
        print(f"required but not installed here (left out): {', '.join(missing)}")


if __name__ == "__main__":
    main()
