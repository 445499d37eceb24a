"""The benchmark scripts still run (CPU smoke mode) and build tasks that pickle like the challenge's."""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from common import make_task
from conftest import level_images, save_npz_dataset


def run_script(script: str, *args: str, timeout: int) -> subprocess.CompletedProcess:
    """A benchmark script run from the repository root, as its docstring says; it must succeed."""
    proc = subprocess.run(
        [sys.executable, script, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_bench_task_images_pickle_on_their_own():
    """A view pickles its whole parent tensor: 550 views of one tensor made the CLI rows 180 GB."""
    task = make_task(4, 4, 32)
    raw = 8 * 3 * 32 * 32 * 4
    assert len(pickle.dumps(task)) < 2 * raw


@pytest.mark.timeout(360)  # above its subprocesses' own limits, so theirs report with output
def test_bench_adapt_smoke_writes_every_row(tmp_path):
    run_script(
        "benchmarks/bench_adapt.py",
        "--smoke",
        "--out",
        str(tmp_path),
        "--models",
        str(tmp_path / "models"),
        timeout=300,
    )
    rows = json.loads((tmp_path / "bench_adapt.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["smoke reference", "smoke default", "smoke prefix", "smoke cli"]
    assert rows[-1]["cli_s"] > 0 and all(r["adapt_s"] > 0 for r in rows[:-1])
    table = (tmp_path / "bench_adapt.md").read_text()
    assert "| smoke cli |" in table and "best: startup and imports" in table  # the CLI's own phase split
    assert "adapt" in rows[-1]["note"] and "task read" in rows[-1]["note"]


@pytest.mark.timeout(360)  # above its subprocesses' own limits, so theirs report with output
def test_trace_ops_names_fp32_matmuls_and_their_caller(tmp_path):
    args = ["--arch", "tiny", "--batch", "8", "--steps", "2", "--models", str(tmp_path)]
    proc = run_script("benchmarks/probes/trace_ops.py", *args, timeout=300)
    assert "== graphs False:" in proc.stdout and "== graphs True:" in proc.stdout
    assert "fp32 mm (5, 8)float32 x (8, 64)float32 @ l2l_peft/head.py" in proc.stdout  # on the CPU every matmul is fp32


def test_member_streams_probe_runs_each_case(tmp_path):
    """Sequential and threaded members give well-formed probabilities (on the CPU without streams)."""
    args = ["--arch", "tiny", "--support", "10", "--query", "12", "--steps", "2", "--method", "lora+full"]
    proc = run_script("benchmarks/probes/member_streams_probe.py", *args, "--repeats", "1", "--models", str(tmp_path),
                      timeout=300)  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if "median" in line]
    assert [line.split(":")[0] for line in lines] == [
        "sequential", "threads, capture thread_local", "threads, capture global"
    ]  # fmt: skip
    assert "max |p - sequential| 0.0000" in lines[0] and all("fell back 0x" in line for line in lines)


def test_phases_probe_gives_every_member_its_phases_and_steps(tmp_path):
    """Each member of the ensemble gets its own phases and all of its training steps (on the CPU all eager)."""
    args = ["--arch", "tiny", "--support", "10", "--query", "12", "--steps", "4", "--method", "lora+full"]
    proc = run_script("benchmarks/probes/phases_probe.py", *args, "--repeats", "1", "--models", str(tmp_path),
                      timeout=300)  # fmt: skip
    members = [line.split(":")[0] for line in proc.stdout.splitlines() if line.startswith("member")]
    assert members == ["member 0 (lora)", "member 1 (full)"]
    assert proc.stdout.count("4 eager steps:") == 2 and proc.stdout.count("predict:") == 2


@pytest.mark.parametrize("probe", ["attention_probe", "compile_probe", "profile_step"])
def test_gpu_probes_start_from_the_repository_root(probe):
    """The probes import common.py (and each other) by bare name: each must find them from the root."""
    assert "usage:" in run_script(f"benchmarks/probes/{probe}.py", "--help", timeout=120).stdout


def test_slim_env_holds_the_dependency_closure_only(tmp_path):
    target = tmp_path / "slim"
    run_script("benchmarks/slim_env.py", str(target), timeout=120)
    python = str(target / "bin" / "python")
    check = "import torch, transformers, peft, accelerate, torchcross, safetensors; import l2l_peft.cli"
    done = subprocess.run([python, "-c", check], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    absent = subprocess.run([python, "-c", "import pytest"], capture_output=True, text=True, timeout=60, check=False)
    assert absent.returncode != 0 and "No module named 'pytest'" in absent.stderr  # the test extra is not linked


@pytest.mark.timeout(460)  # above its subprocesses' own limits, so theirs report with output
def test_bench_multi_gpu_smoke_compares_one_and_two_processes(tmp_path):
    """CPU smoke: experiments with 1 and 2 gloo processes give the same rows; both pretraining layouts log."""
    rng = np.random.default_rng(0)
    labels = np.arange(24) % 3
    (tmp_path / "data").mkdir()
    save_npz_dataset(
        tmp_path / "data",
        "levels",
        level_images(labels, (16, 16), 80, rng),
        labels,
        "multiclass",
        np.array([0] * 12 + [2] * 12),
    )
    args = ["--smoke", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out")]
    proc = run_script("benchmarks/bench_multi_gpu.py", *args, timeout=400)
    result = json.loads((tmp_path / "out" / "multi_gpu.json").read_text())
    one, two = result["experiments"]["1 GPU"], result["experiments"]["2 GPUs"]
    assert (
        one["tasks"] == two["tasks"] > 0
        and two["same_rows"]
        and two["metrics_differing"] == 0 < two["metrics_compared"]
    )
    assert [len(r["loss"]) for r in result["pretraining"].values()] == [4, 4]  # 4 steps each, logged every step
    assert "| 2 GPUs x 4 | 8 |" in proc.stdout


def test_bench_pretrain_smoke_measures_each_arm_and_both_phases(tmp_path):
    """CPU smoke: every arm pretrains alone and reports a rate; both_lowres one per phase (16 px, then 32); the
    FLOP count sees DINO's extra crops and the low-resolution phase's fewer patches."""
    rng = np.random.default_rng(0)
    labels = np.arange(24) % 3
    (tmp_path / "data").mkdir()
    save_npz_dataset(tmp_path / "data", "levels", level_images(labels, (16, 16), 80, rng), labels, "multiclass")
    args = ["--smoke", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--steps", "8"]
    proc = run_script("benchmarks/bench_pretrain.py", *args, "--log-every", "1", "--batch", "6", timeout=300)
    results = {r["arm"]: r for r in json.loads((tmp_path / "out" / "bench_pretrain.json").read_text())["results"]}
    assert list(results) == ["supervised", "both", "both_lowres"]
    assert all(r["images_per_s"] > 0 for r in results.values()) and results["both_lowres"]["low_res_images_per_s"] > 0
    assert results["both_lowres"]["config"]["low_res_size"] == 16 and "low_res_size" not in results["both"]["config"]
    assert "| supervised | " in proc.stdout and "| both_lowres (16 px phase) | " in proc.stdout
    run_script("benchmarks/bench_pretrain.py", *args, "--flops", "--batch", "6", timeout=300)
    counted = {r["arm"]: r for r in json.loads((tmp_path / "out" / "flops.json").read_text())["results"]}
    supervised, both = counted["supervised"]["gflops_per_image_full"], counted["both"]["gflops_per_image_full"]
    assert 0 < supervised < both == pytest.approx(counted["both_lowres"]["gflops_per_image_full"])  # DINO's crops
    assert counted["both_lowres"]["gflops_per_image_low"] < both / 2  # half the side: about a quarter the patches


@pytest.mark.timeout(660)  # above its subprocesses' own limits, so theirs report with output
def test_recipe_study_and_analysis_run_end_to_end(tmp_path, vit_dir):
    """The recipe study writes raw predictions that the analysis scores, paired by task (CPU, tiny model)."""
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    labels = np.arange(40) % 2
    save_npz_dataset(data, "spots", level_images(labels, (12, 12), 120, rng), labels, "binary")
    out = tmp_path / "study"
    study = ["--data", str(data), "--datasets", "spots", "--out", str(out), "--model", str(vit_dir)]
    study += ["--shots", "2", "--tasks", "2", "--query-per-class", "3", "--recipes", "lora", "head", "lora_tim"]
    run_script("benchmarks/recipe_study.py", *study, timeout=300)
    analysis = [str(out), "--only", "lora", "head", "prototypes", "lora_tim"]
    proc = run_script("benchmarks/recipe_analysis.py", *analysis, timeout=300)
    assert "2 tasks" in proc.stdout and "| head |" in proc.stdout and "| prototypes |" in proc.stdout
    assert "| lora_tim |" in proc.stdout


def test_recipe_analysis_pairs_passes_only_on_the_same_task(tmp_path):
    """Runs of one task key from two passes merge; a pass whose task has other labels is refused."""
    import torch
    from recipe_analysis import load

    def record(query_labels: list[int], run: str) -> dict:
        runs = {run: {"probs": torch.full((len(query_labels), 2), 0.5)}}
        return {"key": "d/native/1-shot/0", "runs": runs, "support_labels": torch.tensor([0, 1]),
                "query_labels": torch.tensor(query_labels)}  # fmt: skip

    for name, labels, run in (("a", [0, 1], "lora"), ("b", [0, 1], "h_full"), ("c", [1, 0], "h_full_last6")):
        (tmp_path / name).mkdir()
        torch.save([record(labels, run)], tmp_path / name / "study_0000_0001.pt")
    (merged,) = load([tmp_path / "a", tmp_path / "b"])
    assert set(merged["runs"]) == {"lora", "h_full"}
    with pytest.raises(ValueError, match="other query_labels"):
        load([tmp_path / "a", tmp_path / "c"])


def test_layer_features_pairs_every_layer_set_with_the_last_layer(tmp_path, vit_dir):
    """Probes on each layer set of a tiny ViT, per task of a test split, tabled against the last layer."""
    data = tmp_path / "data"
    data.mkdir()
    labels = np.arange(60) % 2
    split = np.array([0, 0, 2] * 20)
    save_npz_dataset(
        data, "spots", level_images(labels, (12, 12), 120, np.random.default_rng(0)), labels, "binary", split
    )
    out = tmp_path / "layers"
    args = ["--data", str(data), "--datasets", "spots", "--model", str(vit_dir), "--out", str(out)]
    run_script(
        "benchmarks/layer_features.py", *args, "--shots", "2", "--tasks", "2", "--query-per-class", "3", timeout=300
    )
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and set(rows[0]["auroc"]) == {"last", "L1", "1+2+last", "2+last", "all"}
    table = (out / "layers.md").read_text()
    assert "Primary (declared before the run): 1+2+last minus last" in table and "| last | " in table


def test_transductive_refinement_ignores_query_order_and_labels():
    """The studied transductive rule sees support labels only, and a query image's output does not depend on order."""
    import torch
    from torchcross.data.task import TaskTarget
    from transductive import TransductiveConfig, refine

    from l2l_peft.targets import build_objective

    torch.manual_seed(0)
    labels = torch.arange(12) % 3
    support = torch.randn(12, 16) + labels[:, None].float()
    query = torch.randn(9, 16) + (torch.arange(9) % 3)[:, None].float()
    objective = build_objective(TaskTarget.MULTICLASS_CLASSIFICATION, {0: "a", 1: "b", 2: "c"}, labels)
    probs = refine(objective, support, labels, query, TransductiveConfig())
    order = torch.randperm(9)
    torch.testing.assert_close(refine(objective, support, labels, query[order], TransductiveConfig()), probs[order])
    torch.testing.assert_close(probs.sum(1), torch.ones(9))


def _study_rows(path: Path, dataset: str, gains: dict[str, float], n_tasks: int = 10) -> None:
    """results.jsonl rows of one dataset: every variant scores adapt_supervised's AUROC plus its gain."""
    rng = np.random.default_rng(0)
    path.mkdir(parents=True)
    with (path / "results.jsonl").open("w") as f:
        for shots in (5, 10):
            for index in range(n_tasks):
                base = 0.6 + 0.2 * rng.random()
                for variant, gain in gains.items():
                    row = {"task": f"{dataset}/native/{shots}-shot/{index}", "dataset": dataset, "shots": shots,
                           "variant": variant, "error": None, "metrics": {"auroc": base + gain}}  # fmt: skip
                    f.write(json.dumps(row) + "\n")


def test_backbone_study_ships_only_a_clear_winner_with_no_dataset_much_worse(tmp_path):
    """The issue's rule: overall gain >= 0.03 at every shot count with CI > 0, no dataset below -0.03."""
    import backbone_study

    arms = ["supervised", "ssl", "both"]
    zero = {f"{p}_{a}": 0.0 for p in ("adapt", "probe") for a in [*arms, "random"]}
    shipped = {"adapt_shipped": -0.2, "probe_shipped": 0.0}  # today's default: only where it never saw the data
    _study_rows(tmp_path / "eval" / "d1", "d1", zero | shipped | {"adapt_both": 0.08, "adapt_ssl": 0.10})
    _study_rows(tmp_path / "eval" / "d2", "d2", zero | {"adapt_both": 0.02, "adapt_ssl": -0.05})
    decision = backbone_study.analyse(tmp_path, arms)
    assert decision["both"]["ships"] and decision["both"]["overall"] == pytest.approx([0.05, 0.05])
    assert not decision["ssl"]["ships"] and decision["ssl"]["worst_dataset"] == pytest.approx(-0.05)
    assert set(decision) == {"ssl", "both"}  # baselines are never shipped
    study = (tmp_path / "study.md").read_text()
    assert "| both | **all** | 0.050 [" in study
    assert "| shipped | random | -0.200 [" in study and "| both | shipped | 0.280 [" in study  # paired on d1 only
    _study_rows(tmp_path / "eval" / "d3", "d3", zero | {"adapt_both": -0.03})  # mean gain 0.023 < 0.03
    assert not backbone_study.analyse(tmp_path, arms)["both"]["ships"]
    few = tmp_path / "few"
    _study_rows(few / "eval" / "d1", "d1", zero | {"adapt_both": 0.08}, n_tasks=3)  # a clear gain, too few tasks
    assert backbone_study.analyse(few, arms)["both"]["too_few_tasks"] == ["d1 10-shot: 3", "d1 5-shot: 3"]
    assert not backbone_study.analyse(few, arms)["both"]["ships"]
    missing = tmp_path / "missing"  # a clear gain where the arm ran; on d2 its backbone failed (no rows)
    _study_rows(missing / "eval" / "d1", "d1", zero | {"adapt_both": 0.08})
    _study_rows(missing / "eval" / "d2", "d2", {k: v for k, v in zero.items() if not k.endswith("_both")})
    verdict = backbone_study.analyse(missing, arms)["both"]
    assert verdict["too_few_tasks"] == ["d2 10-shot: 0", "d2 5-shot: 0"] and not verdict["ships"]


def test_backbone_study_runs_the_home_made_backbone_only_where_it_never_saw_the_data():
    """The reference job adds l2l-vit-tiny-med on datasets missing from its card's Data table."""
    from backbone_study import references

    assert references("supervised", "pbc_blood_cells") == ["supervised", "random", "shipped"]  # not in its card
    assert references("supervised", "brain_tumor_mri") == ["supervised", "random"]  # pretrained on it
    assert references("both", "pbc_blood_cells") == ["both"]


def _study_args(work: Path, data: Path, **changes) -> argparse.Namespace:
    """backbone_study's arguments as the device runs use them (800 steps, three folds), with `changes`."""
    defaults = {"work": work, "data": data, "arms": ["both"], "datasets": None, "folds": "three", "steps": 800,
                "batch": 256, "warmup": 100, "local_crops": 4, "max_minutes": 12.0, "stage_one_steps": 400}  # fmt: skip
    return argparse.Namespace(**defaults | changes)


def test_backbone_study_pre_pretraining_runs_its_first_stage_once_before_every_fold(tmp_path):
    """proc_both: one stage-1 job on generated images, then a fold run per fold that waits for it and starts
    from its backbone with the recipe of `both`."""
    from backbone_study import FOLDS, pretrain_jobs

    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({d: {} for ds in FOLDS.values() for d in ds}))
    args = _study_args(tmp_path / "work", data, arms=["both", "proc_both"])
    jobs = {job.name: job for job in pretrain_jobs(args)}
    assert set(jobs) == {"random", "proc_both-stage1", *(f"{a}-{f}" for a in ("both", "proc_both") for f in FOLDS)}
    stage_one = jobs["proc_both-stage1"].command
    assert stage_one[stage_one.index("--steps") + 1] == "400" and not jobs["proc_both-stage1"].after
    assert yaml.safe_load(Path(stage_one[3]).read_text())["sources"][0]["kind"] == "procedural"
    for fold in FOLDS:
        assert jobs[f"proc_both-{fold}"].after == ["proc_both-stage1"] and not jobs[f"both-{fold}"].after
        config = yaml.safe_load(Path(jobs[f"proc_both-{fold}"].command[3]).read_text())
        assert config["init_from"] == str((args.work / "pretrain" / "proc_both" / "stage1").resolve())
        assert config["objective"] == "both" and "init_from" not in yaml.safe_load(
            Path(jobs[f"both-{fold}"].command[3]).read_text()
        )
        assert "low_res_size" not in config


def test_backbone_study_leave_one_out_holds_out_each_dataset_and_one_source_together(tmp_path):
    """--folds loo: 11 backbones per arm for 12 datasets, each without its own dataset (both BCCD ones: one source);
    every dataset is evaluated on the backbone that never saw it."""
    from backbone_study import FOLDS, folds, pretrain_jobs

    data = tmp_path / "data"
    data.mkdir()
    datasets = [d for ds in FOLDS.values() for d in ds]
    (data / "manifest.json").write_text(json.dumps({d: {} for d in datasets}))
    args = _study_args(tmp_path / "work", data, folds="loo")
    held_out = folds(args)
    assert len(held_out) == 11 and sorted(d for ds in held_out.values() for d in ds) == sorted(datasets)
    assert held_out["bccd_multilabel+wbc_type_bccd"] == ["bccd_multilabel", "wbc_type_bccd"]
    jobs = {job.name: job.command for job in pretrain_jobs(args)}
    assert len(jobs) == 12  # the random init and 11 fold runs
    command = jobs["both-retinamnist"]
    assert command[command.index("--exclude") + 1 : command.index("--steps")] == ["retinamnist"]


def test_backbone_study_compute_matched_reference(tmp_path):
    """supervised_x3 is the supervised recipe at three times --steps (about the GPU work of `both`), supervised_small
    the same recipe on ViT-small at 3/4 of them (about as much work again); the analysis can judge every arm against
    supervised_x3 instead of `supervised`."""
    import backbone_study

    args = _study_args(tmp_path, tmp_path)
    lengths = ("supervised_x3", "both", "supervised_small")
    commands = {arm: backbone_study.pretrain_command(arm, [], tmp_path / arm, args) for arm in lengths}
    assert [c[c.index("--steps") + 1] for c in commands.values()] == ["2400", "800", "600"]
    x3, plain, small = (
        yaml.safe_load(backbone_study.arm_config(arm, args).read_text())
        for arm in ("supervised_x3", "supervised", "supervised_small")
    )
    assert x3 == plain  # the same recipe, only longer
    assert small == plain | {"model_size": "small", "name": "l2l-vit-small-med"}  # ... on ViT-small, 3/4 as long
    both, both_small = (yaml.safe_load(backbone_study.arm_config(a, args).read_text()) for a in ("both", "both_small"))
    assert both_small == both | {"model_size": "small", "name": "l2l-vit-small-med-both"}  # one size knob for both
    arms = ["supervised", "supervised_x3", "both"]
    zero = {f"{p}_{a}": 0.0 for p in ("adapt", "probe") for a in [*arms, "random"]}
    _study_rows(tmp_path / "eval" / "d1", "d1", zero | {"adapt_both": 0.05, "adapt_supervised_x3": 0.04})
    decision = backbone_study.analyse(tmp_path, arms, reference="supervised_x3")
    assert set(decision) == {"supervised", "both"} and decision["both"]["overall"] == pytest.approx([0.01, 0.01])
    assert "## adapt: arm minus adapt_supervised_x3" in (tmp_path / "study.md").read_text()
    rows = tmp_path / "eval" / "d1" / "results.jsonl"  # committed studies keep their rows gzipped
    rows.with_suffix(".jsonl.gz").write_bytes(gzip.compress(rows.read_bytes()))
    rows.unlink()
    later = tmp_path / "later"  # a later study of one new arm, judged with this one's rows
    _study_rows(later / "eval" / "d1", "d1", {"adapt_both_lowres": 0.07, "probe_both_lowres": 0.0})
    decision = backbone_study.analyse(later, [*arms, "both_lowres"], reference="supervised_x3", earlier=[tmp_path])
    assert decision["both_lowres"]["overall"] == pytest.approx([0.03, 0.03])
    assert decision["both"]["overall"] == pytest.approx([0.01, 0.01])


def test_backbone_study_ships_winners_at_their_own_length_never_the_current_recipe(tmp_path, monkeypatch):
    """--ship STEPS: each winning arm once on every dataset for STEPS steps; supervised_x3 (the current recipe,
    longer) is a reference even where it passes the rule."""
    import backbone_study

    launched = []
    monkeypatch.setattr(backbone_study, "run_jobs", lambda jobs, *a, **k: launched.extend(jobs) or {})
    args = _study_args(tmp_path, tmp_path, steps=600, ship=12350)
    decision = {"both": {"ships": True}, "supervised_x3": {"ships": True}, "both_lowres": {"ships": False}}
    backbone_study.ship(args, decision)
    assert [job.name for job in launched] == ["ship-both"]
    command = launched[0].command
    assert command[command.index("--steps") + 1] == "12350"
    assert command[command.index("--exclude") + 1 : command.index("--steps")] == []  # nothing held out


def test_backbone_study_spreads_jobs_over_the_gpus(tmp_path):
    """With several GPUs each child sees one, the least busy when it starts; with one, the environment is left."""
    from backbone_study import Job, run_jobs

    def record(name: str, seconds: float = 0) -> list[str]:
        env = "os.environ.get('CUDA_VISIBLE_DEVICES', '-')"
        code = f"import os, pathlib, time; pathlib.Path(r'{tmp_path}/{name}').write_text({env}); time.sleep({seconds})"
        return [sys.executable, "-c", code]

    jobs = [Job("run0", record("run0")), Job("run1", record("run1", 6)), Job("run2", record("run2", 6))]
    jobs.append(Job("late", record("late"), after=["run0"]))  # starts while run1 (GPU 1) and run2 (GPU 0) run
    assert set(run_jobs(jobs, tmp_path / "logs", parallel=4, gpus=2).values()) == {0}
    seen = [(tmp_path / name).read_text() for name in ("run0", "run1", "run2", "late")]
    assert seen == ["0", "1", "0", "0"]  # GPU 0 was free again when `late` started (round-robin would give 1)
    assert run_jobs([Job("alone", record("alone"))], tmp_path / "logs", parallel=1, gpus=1) == {"alone": 0}
    assert (tmp_path / "alone").read_text() == os.environ.get("CUDA_VISIBLE_DEVICES", "-")


def test_backbone_study_low_resolution_arm_is_both_with_a_cheaper_first_phase(tmp_path):
    """both_lowres: the recipe of `both` with 112-px views for the first 3/4 of the schedule; `both` keeps 224."""
    from backbone_study import arm_config

    from l2l_peft.pretrain.config import load_config

    args = _study_args(tmp_path, tmp_path)
    low, full = (yaml.safe_load(arm_config(arm, args).read_text()) for arm in ("both_lowres", "both"))
    assert {k: v for k, v in low.items() if full.get(k) != v} == {"low_res_size": 112, "low_res_fraction": 0.75}
    assert load_config(arm_config("both_lowres", args)).low_res_size == 112  # a valid PretrainConfig


def test_backbone_study_jobs_wait_for_their_backbones_and_skip_after_a_failure(tmp_path):
    """Evaluation starts only after its pretraining ended well (and once second stages started); a failed backbone
    skips its evaluations."""
    from backbone_study import Job, run_jobs

    def touch(name: str, code: int = 0) -> list[str]:
        return [
            sys.executable,
            "-c",
            f"import pathlib, sys, time; time.sleep(1); pathlib.Path(r'{tmp_path}/{name}').touch(); sys.exit({code})",
        ]

    check = f"import pathlib, sys; sys.exit(0 if pathlib.Path(r'{tmp_path}/good').exists() else 3)"
    started = f"import pathlib, sys; sys.exit(0 if pathlib.Path(r'{tmp_path}/logs/second-stage.log').exists() else 4)"
    jobs = [
        Job("good", touch("good")),
        Job("bad", touch("bad", code=1)),
        Job("eval-good", [sys.executable, "-c", check], after=["good"]),
        Job("eval-bad", touch("eval-bad"), after=["bad"]),
        Job("eval-earlier", touch("eval-earlier"), after=["made-by-an-earlier-run"]),
        Job("second-stage", touch("second-stage"), after=["good"]),
        # starts only once the second stage has (its log exists), without waiting for it to end
        Job("eval-beside", [sys.executable, "-c", started], after_start=["second-stage"]),
    ]
    codes = run_jobs(jobs, tmp_path / "logs", parallel=7)
    assert codes == {"good": 0, "bad": 1, "eval-good": 0, "eval-bad": -1, "eval-earlier": 0, "second-stage": 0,
                     "eval-beside": 0}  # fmt: skip
    assert not (tmp_path / "eval-bad").exists() and (tmp_path / "logs" / "eval-good.log").is_file()


STUB_STUDY = """
import json, pathlib, sys, time
args = sys.argv[1:]
work = pathlib.Path(args[args.index("--work") + 1])
data = pathlib.Path(args[args.index("--data") + 1])
(work / "pretrain" / "x" / "A").mkdir(parents=True)
(work / "pretrain" / "x" / "A" / "log.jsonl").write_text(json.dumps({"step": 2}) + "\\n")
(work / "pretrain" / "x" / "A" / "model.safetensors").write_bytes(b"weights")
ship = work / "ship" / "x"
(ship / "checkpoint").mkdir(parents=True)
(ship / "model.safetensors").write_bytes(b"weights")
(ship / "README.md").write_text("card")
(ship / "checkpoint" / "optimizer.bin").write_bytes(b"state")
(work / "args.json").write_text(json.dumps({"args": args, "data": sorted(p.name for p in data.iterdir())}))
time.sleep(1)
print("stub study done")
"""

STUB_PACK = """
import shutil, sys
_, mode, source, target = sys.argv
shutil.copytree(source, target, dirs_exist_ok=True)
"""


def _stub_wheel(path: Path) -> None:
    """A pure-Python wheel pip installs offline (the device gets torchcross and friends this way)."""
    import zipfile

    files = {
        "stubpkg/__init__.py": "",
        "stubpkg-0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: stubpkg\nVersion: 0.1\n",
        "stubpkg-0.1.dist-info/WHEEL": "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{name},,\n" for name in files) + "stubpkg-0.1.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path / "stubpkg-0.1-py3-none-any.whl", "w") as wheel:
        for name, text in {**files, "stubpkg-0.1.dist-info/RECORD": record}.items():
            wheel.writestr(name, text)


def _device_project(tmp_path: Path, script: str, study: str, stub: str, pack: str) -> tuple[Path, dict[str, str]]:
    """A project with the device script, a stub study, a stub wheel and a stub pack; the environment to run it in
    (python3 = this interpreter, nvidia-smi answering like the device's, OUT and DEVICE_ROOT under tmp_path)."""
    project = tmp_path / "project"
    (project / "benchmarks").mkdir(parents=True)
    shutil.copy(REPO / "benchmarks" / script, project / "benchmarks")
    (project / "benchmarks" / study).write_text(stub)
    (project / ".whl").mkdir()
    _stub_wheel(project / ".whl")
    (project / pack).mkdir(parents=True)
    (project / pack / "pack.py").write_text(STUB_PACK)
    (tmp_path / "out").mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'stub GPU, 1 MiB'\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(tmp_path / "out")}
    return project, os.environ | env | {"DEVICE_ROOT": str(tmp_path / "root")}


DEVICE_TOOLS = ("bash", "setsid", "pgrep", "tar")


@pytest.mark.skipif(not all(map(shutil.which, DEVICE_TOOLS)), reason=f"needs {', '.join(DEVICE_TOOLS)}")
def test_device_script_starts_the_study_detached_and_brings_back_results_without_weights(tmp_path):
    """`start` installs the wheels, copies the tree without .git/.devdata/.whl, unpacks the chosen pack and runs
    the study with its arguments; the poll brings back its log, the study without weights and each shipped
    model without its checkpoint."""
    import tarfile

    project, env = _device_project(
        tmp_path, "backbone_study_device.sh", "backbone_study.py", STUB_STUDY, ".devdata/q85"
    )
    root, out = tmp_path / "root", tmp_path / "out"
    (project / ".devdata" / "q85" / "d1.npz").write_bytes(b"npz")
    (project / ".git").mkdir()
    env |= {"PACK": ".devdata/q85", "POLL_EVERY": "1"}
    command = ["bash", "benchmarks/backbone_study_device.sh", "start", "30", "--arms", "x", "--steps", "2"]
    proc = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "stub GPU" in proc.stdout and "pretrain/x/A/log.jsonl" in proc.stdout
    assert (root / "site" / "stubpkg" / "__init__.py").is_file()
    assert sorted(p.name for p in (root / "repo").iterdir()) == ["benchmarks"]
    assert "stub study done" in (out / "study.log").read_text()
    with tarfile.open(out / "study.tgz") as archive:
        names = archive.getnames()
        study = json.load(archive.extractfile("study/args.json"))
    assert "study/pretrain/x/A/log.jsonl" in names and not any(n.endswith(".safetensors") for n in names)
    assert study == {"args": ["--data", str(root / "data"), "--work", str(root / "study"), "--arms", "x", "--steps",
                              "2"], "data": ["d1.npz", "pack.py"]}  # fmt: skip
    with tarfile.open(out / "ship_x.tgz") as archive:
        assert sorted(archive.getnames()) == [".", "./README.md", "./model.safetensors"]


STUB_RECIPE_STUDY = """
import json, pathlib, sys
UNSEEN = ["d1", "d2"]
if __name__ == "__main__":
    args = sys.argv[1:]
    out = pathlib.Path(args[args.index("--out") + 1])
    out.mkdir(parents=True)
    (out / "args.json").write_text(json.dumps(args))
    print("done 1 of 1 tasks")
"""


@pytest.mark.skipif(not all(map(shutil.which, DEVICE_TOOLS)), reason=f"needs {', '.join(DEVICE_TOOLS)}")
def test_recipe_device_script_sets_up_starts_detached_and_polls(tmp_path):
    """`setup` installs the wheels and unpacks each pack; `start` runs recipe_study.py detached once per dataset
    with the device's backbone and the arguments given; `poll` waits for them and brings back each tag's raw
    predictions and the logs as archives (a call returns at most 8 files)."""
    import tarfile

    project, env = _device_project(
        tmp_path, "recipe_study_device.sh", "recipe_study.py", STUB_RECIPE_STUDY, ".devdata/d"
    )
    (project / ".devdata" / "d" / "pack.py").rename(project / ".devdata" / "d" / "pack224.py")
    root, out = tmp_path / "root", tmp_path / "out"
    env |= {"POLL_EVERY": "1"}
    for args in (["setup", ".devdata/d"], ["start", "tune", "d1 d2", "--shots", "5"], ["poll", "60", "tune"]):
        command = ["bash", "benchmarks/recipe_study_device.sh", *args]
        proc = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (root / "site" / "stubpkg" / "__init__.py").is_file() and (root / "data" / "pack224.py").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["logs.tgz", "tune.tgz"]
    with tarfile.open(out / "tune.tgz") as study, tarfile.open(out / "logs.tgz") as logs:
        for dataset in ("d1", "d2"):
            args = json.load(study.extractfile(f"tune/{dataset}/args.json"))
            assert args == ["--data", str(root / "data"), "--datasets", dataset, "--model", str(root / "model"),
                            "--out", str(root / "study" / "tune" / dataset), "--max-minutes", "60", "--chunk", "2",
                            "--shots", "5"]  # fmt: skip
            assert "done 1 of 1" in logs.extractfile(f"./tune.{dataset}.log").read().decode()


STUB_CONTINUED_STUDY = """
import json, pathlib, sys, time
if __name__ == "__main__":
    args = sys.argv[1:]
    work = pathlib.Path(args[args.index("--work") + 1])
    (work / "pretrain" / "both" / "A" / "checkpoint").mkdir(parents=True)
    (work / "args.json").write_text(json.dumps(args))
    (work / "pretrain" / "both" / "A" / "model.safetensors").write_bytes(b"weights stay on the device")
    (work / "pretrain" / "both" / "A" / "checkpoint" / "progress.json").write_text("{}")
    time.sleep(2)
    print("analysed")
"""


@pytest.mark.skipif(not all(map(shutil.which, DEVICE_TOOLS)), reason=f"needs {', '.join(DEVICE_TOOLS)}")
def test_continued_study_device_mode_starts_detached_and_brings_back_tables_not_weights(tmp_path):
    """`continued` runs continued_study.py detached on the device's model and data; `poll LIMIT continued` waits
    for it and brings back its folder without weights (a returned file is at most 16 MiB), progress kept."""
    import tarfile

    project, env = _device_project(
        tmp_path, "recipe_study_device.sh", "continued_study.py", STUB_CONTINUED_STUDY, ".devdata/d"
    )
    root, out = tmp_path / "root", tmp_path / "out"
    env |= {"POLL_EVERY": "1"}
    for args in (["continued", "--minutes", "1.5"], ["poll", "60", "continued"]):
        command = ["bash", "benchmarks/recipe_study_device.sh", *args]
        proc = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with tarfile.open(out / "continued.tgz") as study, tarfile.open(out / "logs.tgz") as logs:
        args = json.load(study.extractfile("continued/args.json"))
        assert args == ["--data", str(root / "data"), "--model", str(root / "model"),
                        "--work", str(root / "study" / "continued"), "--minutes", "1.5"]  # fmt: skip
        names = study.getnames()
        assert "continued/pretrain/both/A/checkpoint/progress.json" in names
        assert not [n for n in names if n.endswith(".safetensors")]
        assert "analysed" in logs.extractfile("./continued.log").read().decode()


def _continued_args(tmp_path: Path, **changes) -> argparse.Namespace:
    defaults = {"work": tmp_path / "work", "data": tmp_path / "data", "model": tmp_path / "dinov2", "datasets": None,
                "arms": ["both", "ssl", "both_seed1"], "minutes": 1.0, "max_steps": 5000, "batch": 64,
                "concurrent": 2, "jobs": 4, "tasks": 8}  # fmt: skip
    return argparse.Namespace(**defaults | changes)


def test_continued_study_pretrains_without_each_fold_and_evaluates_on_the_fold_that_never_saw_it(tmp_path):
    """Each arm once per fold, its datasets excluded, from the imported model; a run starts when the one
    --concurrent places before it ended; each dataset's reference job (the import adapted and probed, the random
    copy probed) needs nothing, an arm's waits for the fold run that never saw it; absent datasets are skipped."""
    from continued_study import FOLDS, evaluation_jobs, pretrain_jobs

    datasets = [d for ds in FOLDS.values() for d in ds]
    args = _continued_args(tmp_path)
    args.data.mkdir()
    (args.data / "manifest.json").write_text(json.dumps({d: {} for d in datasets[1:]}))  # the first one absent
    jobs = pretrain_jobs(args)
    assert [j.name for j in jobs] == ["both-A", "both-B", "ssl-A", "ssl-B", "both_seed1-A", "both_seed1-B"]
    assert [j.after_end for j in jobs] == [[], [], ["both-A"], ["both-B"], ["ssl-A"], ["ssl-B"]]
    for job in jobs:
        command = job.command
        assert command[command.index("--exclude") + 1 : command.index("--max-minutes")] == FOLDS[job.name[-1]]
        config = yaml.safe_load(Path(command[3]).read_text())
        assert config["init_from"] == str(args.model.resolve()) and config["batch_size"] == 64
        assert config["seed"] == (1 if job.name.startswith("both_seed1") else 0)
    evaluations = {j.name: j for j in evaluation_jobs(args, tmp_path / "random")}
    assert len(evaluations) == 4 * (len(datasets) - 1) and f"eval-{datasets[0]}-imported" not in evaluations
    order = [name.rsplit("-", 1)[1] for name in evaluations]  # arm by arm: a cut-short run leaves whole arms out
    assert order == [arm for arm in ["imported", *args.arms] for _ in datasets[1:]]
    reference = evaluations["eval-wbc_type_bccd-imported"]
    methods = yaml.safe_load(Path(reference.command[3]).read_text())["methods"]
    assert reference.after == [] and {m["name"]: m["kind"] for m in methods} == {
        "adapt_imported": "adapt", "probe_imported": "linear_probe", "probe_random": "linear_probe"
    }  # fmt: skip
    assert evaluations["eval-wbc_type_bccd-ssl"].after == ["ssl-A"] and "wbc_type_bccd" in FOLDS["A"]
    (args.work / "pretrain" / "both" / "A").mkdir(parents=True)
    (args.work / "pretrain" / "both" / "A" / "model.safetensors").touch()  # an exported run is kept
    assert "both-A" not in {j.name for j in pretrain_jobs(args)}
    fold_b = pretrain_jobs(_continued_args(tmp_path, datasets=["covid_ct_ucsd"]))  # only the fold that is studied
    assert [j.name for j in fold_b] == ["both-B", "ssl-B", "both_seed1-B"]
    command = fold_b[0].command
    assert command[command.index("--exclude") + 1 : command.index("--max-minutes")] == FOLDS["B"]  # all of it


def test_continued_study_ships_only_with_every_dataset_evaluated(tmp_path):
    """Issue #28's rule: >= +0.02 over the imported DINOv2 at 5 and 10 shots, interval above zero, no dataset
    below -0.02; a dataset of the study without tasks (its jobs never ran) keeps every arm from shipping."""
    import continued_study

    arms = ["both", "ssl"]
    zero = {f"{p}_{a}": 0.0 for p in ("adapt", "probe") for a in ["imported", *arms]} | {"probe_random": -0.1}
    _study_rows(tmp_path / "eval" / "d1" / "x", "d1", zero | {"adapt_both": 0.03, "adapt_ssl": 0.05})
    _study_rows(tmp_path / "eval" / "d2" / "x", "d2", zero | {"adapt_both": 0.02, "adapt_ssl": -0.03})
    decision = continued_study.analyse(tmp_path, arms, ["d1", "d2"])
    assert decision["both"]["ships"] and decision["both"]["overall"] == pytest.approx([0.025, 0.025])
    assert not decision["ssl"]["ships"] and decision["ssl"]["worst_dataset"] == pytest.approx(-0.03)
    study = (tmp_path / "study.md").read_text()
    assert "| imported | 0.100 [" in study and "Incomplete" not in study  # frozen features minus the random copy
    incomplete = continued_study.analyse(tmp_path, arms, ["d1", "d2", "d3"])["both"]
    assert not incomplete["ships"] and incomplete["too_few_tasks"] == ["d3 10-shot: 0", "d3 5-shot: 0"]
    assert "2 of 3 held-out datasets" in (tmp_path / "study.md").read_text()
    later = tmp_path / "later"  # d3 finished in another session: the tables join both studies' rows
    _study_rows(later / "eval" / "d3" / "x", "d3", zero | {"adapt_both": 0.025})
    joined = continued_study.analyse(later, arms, ["d1", "d2", "d3"], earlier=[tmp_path])["both"]
    assert joined["ships"] and joined["overall"] == pytest.approx([0.025, 0.025])


def test_run_jobs_after_end_waits_for_a_failed_job_and_runs_anyway(tmp_path):
    """after: skipped when the prerequisite failed; after_end: waits for it to end, however it ended."""
    from backbone_study import Job, run_jobs

    fail = Job("fail", [sys.executable, "-c", "import sys, time; time.sleep(1); sys.exit(3)"])
    waits = Job("waits", [sys.executable, "-c", "print('ran')"], after_end=["fail"])
    skipped = Job("skipped", [sys.executable, "-c", "print('ran')"], after=["fail"])
    assert run_jobs([fail, waits, skipped], tmp_path, parallel=3) == {"fail": 3, "waits": 0, "skipped": -1}
    assert (tmp_path / "waits.log").read_text().strip() == "ran"


def test_runs_table_reads_the_log_when_the_progress_file_stayed_on_the_device(tmp_path):
    """A run folder brought back without checkpoint/progress.json still gets its row: steps and seconds from the
    last log line (the final step is always logged), images unknown."""
    from backbone_study import runs

    run = tmp_path / "pretrain" / "both" / "A"
    run.mkdir(parents=True)
    records = [{"step": 25, "loss": 9.9, "images_per_s": 140.0, "seconds": 12.0},
               {"step": 50, "loss": 9.5, "images_per_s": 150.0, "seconds": 24.4}]  # fmt: skip
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert runs(tmp_path)[2:] == ["| pretrain/both/A | 50 | n/a | 24 | 150 | 9.500 |"]
