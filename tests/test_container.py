"""Container mode: the degradation chain (each step reached by injecting the failure it handles),
and CLI runs in an emulation of the evaluation sandbox (no HOME, no network, read-only code,
cwd /) that audit every write and connection the process makes.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CLASSES, make_task, python_path, save_tiny_model, write_task

from l2l_peft import api
from l2l_peft.config import AdaptConfig, Precision
from l2l_peft.container import fallback
from l2l_peft.targets import output_size
from l2l_peft.task import load_task


@pytest.fixture
def data():
    return load_task(make_task(n_support=6, n_query=5)[0])


@pytest.fixture
def config(vit_dir):
    return AdaptConfig(model=str(vit_dir), max_steps=4, min_steps=2, batch_size=4, augment=False, time_budget=60)


def _failing_train(times: int, error: Exception):
    """api.train that raises `error` on its first `times` calls, recording each call's config."""
    real, calls = api.train, []

    def train(*args, config, **kwargs):
        calls.append(config)
        if len(calls) <= times:
            raise error
        return real(*args, config=config, **kwargs)

    return train, calls


def test_full_recipe_when_nothing_fails(data, config):
    result, how = fallback.run_with_fallbacks(data, config)
    assert how == "adapted"
    assert result.train.steps >= 1


def test_oom_retries_with_half_batch_and_steps(data, config, monkeypatch):
    train, calls = _failing_train(1, torch.OutOfMemoryError("CUDA out of memory"))
    monkeypatch.setattr(api, "train", train)
    result, how = fallback.run_with_fallbacks(data, config)
    assert how == "adapted (smaller retry)"
    assert (calls[1].batch_size, calls[1].max_steps) == (2, 2)
    assert calls[1].precision is config.precision  # OOM keeps the precision
    assert result.probabilities.shape == (5, 3)


def test_nan_loss_retries_in_fp32_then_prototypes(data, config, monkeypatch, caplog):
    real = api.build_objective

    def nan_objective(*args, **kwargs):
        objective = real(*args, **kwargs)
        loss = objective.loss
        objective.loss = lambda logits, labels: loss(logits, labels) * float("nan")
        return objective

    monkeypatch.setattr(api, "build_objective", nan_objective)
    calls = []
    real_run = fallback.run
    monkeypatch.setattr(fallback, "run", lambda d, c: calls.append(c) or real_run(d, c))
    with caplog.at_level(logging.WARNING, logger="l2l_peft.container.fallback"):
        result, how = fallback.run_with_fallbacks(data, config)
    assert how == "prototypes on frozen features"
    assert calls[1].precision is Precision.FP32
    assert calls[2].method == "prototypes"  # the last predictor is a method of api.run too
    assert caplog.text.count("TrainingError") == 2
    assert torch.allclose(result.probabilities.sum(1), torch.ones(5))


def test_missing_backbone_goes_straight_to_prior(data, monkeypatch):
    calls = []
    real_run = fallback.run
    monkeypatch.setattr(fallback, "run", lambda d, c: calls.append("run") or real_run(d, c))
    result, how = fallback.run_with_fallbacks(data, AdaptConfig(model="/nonexistent/model", time_budget=60))
    assert how == "class prior of the support labels"
    assert calls == ["run"]  # neither a retry nor prototypes without a backbone
    assert torch.allclose(result.probabilities, torch.full((5, 3), 1 / 3))  # 2 support images per class


def test_exhausted_budget_skips_retry(data, config, monkeypatch, caplog):
    train, calls = _failing_train(9, RuntimeError("boom"))
    monkeypatch.setattr(api, "train", train)
    monkeypatch.setattr(fallback, "RETRY_MIN_BUDGET_FRACTION", 1.0)
    with caplog.at_level(logging.WARNING, logger="l2l_peft.container.fallback"):
        _, how = fallback.run_with_fallbacks(data, config)
    assert how == "prototypes on frozen features"
    assert len(calls) == 1
    assert "skipping adapted (smaller retry)" in caplog.text


def test_non_finite_predictions_count_as_failure(data, config, monkeypatch):
    bad = fallback.AdaptResult(torch.full((5, 3), float("nan")), config)
    monkeypatch.setattr(fallback, "run", lambda d, c: bad)
    result, how = fallback.run_with_fallbacks(data, config)
    assert how == "class prior of the support labels"
    assert torch.isfinite(result.probabilities).all()


@pytest.mark.parametrize("target", list(CLASSES))
def test_class_prior_has_the_output_shape(target):
    data = load_task(make_task(target, n_support=6, n_query=4)[0])
    prior = fallback.class_prior(data)
    assert prior.shape == (4, output_size(data.target, data.classes))
    assert torch.isfinite(prior).all()


def test_smaller_config_is_valid():
    small = fallback.smaller(AdaptConfig(batch_size=1, max_steps=1, min_steps=1), diverged=True)
    assert (small.batch_size, small.max_steps, small.min_steps, small.precision) == (1, 1, 1, Precision.FP32)


# --- CLI in the emulated sandbox -------------------------------------------------------------

# Runs `python -m l2l_peft ARGS` under a Python audit hook that records every write outside the
# allowed roots and every network connection, then prints them as one AUDIT line at exit.
# INJECT=oom makes every training call raise a CUDA OOM.
_AUDITED = r"""
import atexit, json, os, runpy, socket, sys
allowed = tuple(os.environ["AUDIT_ALLOWED"].split(os.pathsep))
seen = {"writes": [], "connects": []}
written = {"os.mkdir": 0, "os.remove": 0, "os.rmdir": 0, "os.chmod": 0, "os.truncate": 0, "os.symlink": 1, "os.link": 1,
           "shutil.rmtree": 0}  # event -> index of the path it writes
write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

def outside(path):
    if isinstance(path, int) or path is None:
        return False
    path = os.path.abspath(os.fsdecode(path))
    return not (path.startswith(allowed) or path.startswith("/dev/"))

def hook(event, args):
    if event == "open":
        path, mode, flags = args
        if ((mode and any(c in mode for c in "wax+")) or (flags or 0) & write_flags) and outside(path):
            seen["writes"].append(str(path))
    elif event in written:
        with_fd = event != "os.truncate" and isinstance(args[-1], int) and args[-1] >= 0
        if not with_fd and outside(args[written[event]]):  # with a dir_fd the path is relative to an audited dir
            seen["writes"].append(f"{event} {args[written[event]]}")
    elif event == "os.rename":  # also raised by os.replace
        if outside(args[0]) or outside(args[1]):
            seen["writes"].append(f"{event} {args[0]} -> {args[1]}")
    elif event == "socket.connect" and args[0].family != socket.AF_UNIX:
        seen["connects"].append(repr(args[1]))

atexit.register(lambda: print("AUDIT " + json.dumps(seen | {"package": sys.modules["l2l_peft"].__file__})))
sys.addaudithook(hook)
if os.environ.get("INJECT") == "oom":
    import torch, l2l_peft.api
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")
    l2l_peft.api.train = oom
sys.argv = ["l2l_peft", *sys.argv[1:]]
runpy.run_module("l2l_peft", run_name="__main__", alter_sys=True)
"""


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tree(root: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> dict[str, Path]:
    """Read-only package + hf_cache (tiny default model), read-only input, tmp and out dirs."""
    root = tmp_path_factory.mktemp("sandbox")
    app, inp = root / "app", root / "in"
    shutil.copytree(
        Path(__file__).parent.parent / "l2l_peft", app / "l2l_peft", ignore=shutil.ignore_patterns("__pycache__")
    )
    save_tiny_model("vit", app / "hf_cache" / "tiny-vit")
    manifest = {"default": "tiny/vit", "models": {"tiny/vit": {"path": "tiny-vit", "revision": "local"}}}
    (app / "hf_cache" / "manifest.json").write_text(json.dumps(manifest))
    inp.mkdir()
    write_task(make_task(n_support=6, n_query=5)[0], inp / "task.pkl")
    for path in [*app.rglob("*"), inp / "task.pkl", inp, app]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    return {"root": root, "app": app, "in": inp}


def _run(sandbox: dict[str, Path], name: str, *extra: str, env: dict[str, str] | None = None):
    tmp, out = sandbox["root"] / f"tmp-{name}", sandbox["root"] / f"out-{name}"
    tmp.mkdir()
    out.mkdir()
    proxy = f"http://127.0.0.1:{_closed_port()}"
    environ = {
        "PATH": os.environ["PATH"], "PYTHONPATH": python_path(sandbox["app"]), "PYTHONDONTWRITEBYTECODE": "1",
        "TMPDIR": str(tmp), "HF_HUB_OFFLINE": "1", "HTTP_PROXY": proxy, "HTTPS_PROXY": proxy, "ALL_PROXY": proxy,
        "AUDIT_ALLOWED": os.pathsep.join([str(tmp), str(out)]), **(env or {}),
    }  # fmt: skip
    args = [str(sandbox["in"] / "task.pkl"), str(out / "result.pkl"), "--max-steps", "3", "--min-steps", "1", *extra]
    before = _tree(sandbox["root"] / "app"), _tree(sandbox["in"])
    done = subprocess.run(
        [sys.executable, "-c", _AUDITED, *args],
        env=environ,
        cwd="/",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert (_tree(sandbox["root"] / "app"), _tree(sandbox["in"])) == before
    audit = [json.loads(line[6:]) for line in done.stdout.splitlines() if line.startswith("AUDIT ")]
    return done, (audit[0] if audit else None), out


def _assert_clean(done, audit, out: Path, app: Path) -> torch.Tensor:
    assert done.returncode == 0, done.stderr[-3000:]
    assert audit["package"].startswith(str(app))  # the read-only copy, not the editable install
    assert audit["writes"] == [], audit["writes"]
    assert audit["connects"] == [], audit["connects"]
    assert [p.name for p in out.iterdir()] == ["result.pkl"]
    probabilities = pickle.loads((out / "result.pkl").read_bytes())
    assert probabilities.shape == (5, 3) and torch.isfinite(probabilities).all()
    return probabilities


def test_cli_in_sandbox_adapts_offline_and_writes_only_output(sandbox):
    done, audit, out = _run(sandbox, "plain")
    probabilities = _assert_clean(done, audit, out, sandbox["app"])
    assert torch.allclose(probabilities.sum(1), torch.ones(5))
    assert "adapted: model tiny/vit, target MULTICLASS_CLASSIFICATION, support 6, query 5" in done.stdout
    assert "no writable HOME" in done.stdout
    assert not list((sandbox["root"] / "tmp-plain").glob("l2l_peft-*"))  # atexit cleanup ran despite the fast exit


def test_cli_in_sandbox_degrades_on_injected_oom(sandbox):
    done, audit, out = _run(sandbox, "oom", env={"INJECT": "oom"})
    _assert_clean(done, audit, out, sandbox["app"])
    assert done.stdout.count("OutOfMemoryError") == 2  # the recipe and its smaller retry
    assert "prototypes on frozen features: model tiny/vit" in done.stdout


def test_cli_in_sandbox_without_model_writes_prior(sandbox):
    done, audit, out = _run(sandbox, "nomodel", "--model", "org/not-prefetched")
    _assert_clean(done, audit, out, sandbox["app"])
    assert "prefetch.py --model org/not-prefetched" in done.stdout
    assert "class prior of the support labels" in done.stdout


def test_cli_in_sandbox_rejects_unreadable_input(sandbox, tmp_path):
    bad = tmp_path / "in"
    bad.mkdir()
    (bad / "task.pkl").write_bytes(b"not a pickle")
    done, _, out = _run({**sandbox, "in": bad}, "bad")
    assert done.returncode == 2
    assert "error:" in done.stderr
    assert list(out.iterdir()) == []
