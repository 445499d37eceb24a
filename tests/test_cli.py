"""The CLI as a subprocess, as users and the challenge run it."""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading

import pytest
import torch
from conftest import CLASSES, make_task, old_layout, write_task
from torchcross.data.task import TaskTarget

from l2l_peft import io
from l2l_peft import task as task_module
from l2l_peft.cli import Output, Stopped, build_parser, main
from l2l_peft.container import fallback
from l2l_peft.task import load_task


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "l2l_peft", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("target", list(CLASSES))
def test_cli_every_target(tmp_path, vit_dir, target):
    task, _ = make_task(target)
    layout = old_layout(task) if target is TaskTarget.ORDINAL_REGRESSION else task
    out = tmp_path / "out.pkl"
    proc = cli(
        str(write_task(layout, tmp_path / "in.pkl")),
        str(out),
        "--model",
        str(vit_dir),
        "--max-steps",
        "5",
        "--cpu",
        "--strict",
    )
    assert proc.returncode == 0, proc.stderr
    with out.open("rb") as f:
        probs = pickle.load(f)
    n_outputs = 1 if target in (TaskTarget.BINARY_CLASSIFICATION, TaskTarget.REGRESSION) else len(CLASSES[target])
    assert isinstance(probs, torch.Tensor) and probs.shape == (9, n_outputs)
    assert "adapted" in proc.stdout and target.name in proc.stdout


def test_cli_unreadable_input_is_one_line_error(tmp_path, vit_dir):
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"\x80\x04garbage")
    proc = cli(str(bad), str(tmp_path / "out.pkl"), "--model", str(vit_dir))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "cannot unpickle" in proc.stderr
    assert not (tmp_path / "out.pkl").exists()


def test_cli_missing_model_strict_fails_clearly(tmp_path):
    task_path = write_task(make_task()[0], tmp_path / "in.pkl")
    proc = cli(
        str(task_path), str(tmp_path / "out.pkl"), "--model", "org/absent", "--cache-dir", str(tmp_path), "--strict"
    )
    assert proc.returncode == 3 and "prefetch.py" in proc.stderr


def test_parser_mirrors_config_fields():
    args = build_parser().parse_args(
        ["a.pkl", "b.pkl", "--max-steps", "7", "--no-augment", "--method", "dora", "--time-budget", "9.5"]
    )
    assert (args.max_steps, args.augment, args.method, args.time_budget) == (7, False, "dora", 9.5)


@pytest.mark.parametrize("via", ["same path", "symlink"])
def test_cli_refuses_output_equal_to_input(tmp_path, via):
    task_path = write_task(make_task()[0], tmp_path / "in.pkl")
    before = task_path.read_bytes()
    out = task_path
    if via == "symlink":
        out = tmp_path / "out.pkl"
        out.symlink_to(task_path)
    proc = cli(str(task_path), str(out), "--model", "/nonexistent")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "is the input task" in proc.stderr
    assert task_path.read_bytes() == before


def test_sigterm_mid_adaptation_leaves_the_prior_and_exits_promptly(tmp_path, vit_dir):
    task = make_task(n_support=6, n_query=5)[0]
    out = tmp_path / "out.pkl"
    command = [sys.executable, "-m", "l2l_peft", str(write_task(task, tmp_path / "in.pkl")), str(out)]
    command += [
        "--model",
        str(vit_dir),
        "--cpu",
        "--max-steps",
        "1000000",
        "--min-steps",
        "1000000",
        "--log-level",
        "DEBUG",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    guard = threading.Timer(60, proc.kill)  # a hang fails here, not at the suite's timeout
    guard.start()
    try:
        log = []
        for line in proc.stdout:
            log.append(line)
            if "training 1000000 steps" in line:
                proc.send_signal(signal.SIGTERM)
                break
        log += proc.stdout.readlines()
        code = proc.wait()
    finally:
        guard.cancel()
        proc.kill()
    text = "".join(log)
    assert code == 128 + signal.SIGTERM, text[-3000:]
    assert "stopped by SIGTERM" in text and "holds the class prior" in text
    with out.open("rb") as f:
        probabilities = pickle.load(f)
    assert torch.equal(probabilities, fallback.class_prior(load_task(task)))


def test_a_signal_during_a_write_waits_until_the_file_is_written(tmp_path, monkeypatch):
    real = io.save_predictions

    def interrupted(probabilities, path):
        os.kill(os.getpid(), signal.SIGTERM)
        real(probabilities, path)

    monkeypatch.setattr(io, "save_predictions", interrupted)
    with Output(tmp_path / "out.pkl") as output, pytest.raises(Stopped):
        output.write(torch.ones(2, 2), "ones")
    assert output.holds == "ones"
    assert torch.equal(pickle.loads((tmp_path / "out.pkl").read_bytes()), torch.ones(2, 2))


@pytest.mark.parametrize("damage", ["truncated-weights", "garbage-preprocessor"])
def test_cli_strict_damaged_model_is_one_line_exit_3(tmp_path, vit_dir, damage):
    model = shutil.copytree(vit_dir, tmp_path / "model")
    if damage == "truncated-weights":
        weights = model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        (model / "preprocessor_config.json").write_bytes(b"\x00garbage{")
    task_path = write_task(make_task()[0], tmp_path / "in.pkl")
    proc = cli(str(task_path), str(tmp_path / "out.pkl"), "--model", str(model), "--strict", "--cpu")
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error:") and str(model) in proc.stderr


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "0"])
def test_time_budget_must_be_finite_and_positive(value, capsys):
    assert main(["in.pkl", "out.pkl", f"--time-budget={value}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --time-budget must be")


def test_time_budget_from_the_environment_is_checked(monkeypatch, capsys):
    monkeypatch.setenv("L2L_PEFT_TIME_BUDGET", "nan")
    assert main(["in.pkl", "out.pkl"]) == 2
    assert "$L2L_PEFT_TIME_BUDGET must be" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--lora-targets", "--method", "--max-steps"])
def test_huge_bad_values_are_not_echoed(flag, capsys):
    try:
        code = main(["in.pkl", "out.pkl", flag, "x" * 1_000_000])
    except SystemExit as exit_:  # argparse's own checks (choices, types)
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and len(err) < 600 and flag in err


@pytest.mark.parametrize("allocate", [lambda: torch.empty(2**50), lambda: bytearray(2**50)], ids=["torch", "python"])
def test_failed_allocation_while_reading_is_one_line_exit_2(tmp_path, monkeypatch, capsys, allocate):
    task_path = write_task(make_task()[0], tmp_path / "in.pkl")
    monkeypatch.setattr(task_module, "load_task", lambda path: allocate())
    assert main([str(task_path), str(tmp_path / "out.pkl")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot read the task" in err
    assert not (tmp_path / "out.pkl").exists()


def test_an_empty_budget_variable_means_the_container_default(tmp_path, vit_dir, monkeypatch):
    """L2L_PEFT_TIME_BUDGET set but empty counts as unset (with_env), so the CLI's 600 s default applies."""
    monkeypatch.setenv("L2L_PEFT_TIME_BUDGET", "")
    task_path = write_task(make_task()[0], tmp_path / "in.pkl")
    options = ["--model", str(vit_dir), "--cpu", "--method", "head", "--max-steps", "1", "--log-level", "WARNING"]
    assert main([str(task_path), str(tmp_path / "out.pkl"), *options]) == 0
    with open(tmp_path / "out.pkl", "rb") as f:
        assert pickle.load(f).shape == (9, 3)
