"""The experiments runner: sampling protocol, metrics, methods, and a tiny suite end to end (1 and 2 processes,
resume)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import GLOO_ENV, gloo_launch, level_images, make_task, save_npz_dataset, write_task
from torchcross.data.task import TaskTarget

from l2l_peft.config import AdaptConfig, Method, make_config
from l2l_peft.data.sampling import sample_task
from l2l_peft.data.sources import medimeta_source
from l2l_peft.experiments.config import SuiteConfig, load_config, parse_config
from l2l_peft.experiments.methods import Kind, MethodSpec, build_variants, expand
from l2l_peft.experiments.metrics import task_metrics
from l2l_peft.experiments.results import RESULTS, bootstrap, paired_differences, read_rows
from l2l_peft.experiments.runner import run_experiment
from l2l_peft.experiments.suites import Suite

REPO = Path(__file__).resolve().parent.parent
PLOTS = ["auroc_vs_shots.png", "auroc_per_dataset.png", "time_per_task.png", "auroc_vs_cost.png"]


@pytest.fixture(scope="module")
def npz_dir(tmp_path_factory) -> Path:
    """Two tiny datasets in the development-data layout: multiclass grayscale, multilabel RGB."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    labels = np.arange(60) % 3
    save_npz_dataset(
        root,
        "shapes",
        level_images(labels, (12, 12), 100, rng),
        labels,
        "multiclass",
        np.where(np.arange(60) < 45, 0, 2),
    )
    multi = rng.integers(0, 2, (60, 3))
    rgb = (multi[:, None, None, :] * 150 + rng.integers(0, 40, (60, 12, 12, 3))).astype(np.uint8)
    save_npz_dataset(root, "cells", rgb, multi, "multilabel")
    return root


def _config(npz_dir: Path, vit_dir: Path) -> dict:
    """2 datasets x 2 targets x 3 methods, 2 tasks each at 2 shots."""
    return {
        "model": str(vit_dir),
        "defaults": {
            "max_steps": 3,
            "min_steps": 1,
            "cpu": True,
        },  # on a GPU machine too: the 2-process run is CPU-only
        "bootstrap": 200,
        "suite": {
            "shots": [2],
            "tasks": 2,
            "query_per_class": 3,
            "image_size": 32,
            "sources": [
                {
                    "kind": "npz",
                    "path": str(npz_dir),
                    "targets": {"shapes": ["native", "binary:b"], "cells": ["native", "binary:y"]},
                }
            ],
        },
        "methods": [
            {"name": "lora", "params": {"method": "lora"}},
            {"name": "probe", "kind": "linear_probe"},
            {"name": "prototypes", "kind": "prototypes"},
        ],
    }


def _by_key(rows: list[dict]) -> dict[tuple[str, str], dict]:
    return {(r["task"], r["variant"]): r for r in rows}


@pytest.fixture(scope="module")
def one_process_run(npz_dir, vit_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "one"
    run_experiment(parse_config(_config(npz_dir, vit_dir)), out)
    return out


def test_tiny_suite_end_to_end(one_process_run):
    rows = read_rows(one_process_run / RESULTS)
    assert len(rows) == 2 * 2 * 2 * 3  # datasets x targets x tasks x methods
    assert not [r["error"] for r in rows if r["error"]]
    assert {(r["dataset"], r["target"]) for r in rows} == {
        ("shapes", "native"),
        ("shapes", "b-vs-rest"),
        ("cells", "native"),
        ("cells", "y-vs-rest"),
    }
    assert all(0 <= r["metrics"]["auroc"] <= 1 and r["adapt_s"] > 0 for r in rows)
    assert {r["target_type"] for r in rows} == {
        "multiclass_classification",
        "binary_classification",
        "multilabel_classification",
    }
    summary = (one_process_run / "summary.md").read_text()
    assert "### shapes / b-vs-rest" in summary and "| lora |" in summary
    assert "## Cost" in summary and "trainable parameters (mean)" in summary
    assert "lora minus each method, paired by task" in summary and "| probe | " in summary.split("paired by task")[1]
    for name in PLOTS:
        assert (one_process_run / name).read_bytes()[:4] == b"\x89PNG"
    resolved = json.loads((one_process_run / "config.resolved.json").read_text())
    assert resolved["versions"]["torch"] == metadata.version("torch") and resolved["num_processes"] == 1
    assert resolved["variants"]["lora"]["max_steps"] == 3 and "git_commit" in resolved
    assert len(resolved["source_sha256"]) == 64


def test_rows_read_the_same_compressed(tmp_path):
    """Committed studies keep results.jsonl gzipped: the last row of each (task, variant) wins either way, and a
    torn last line (a killed run) is skipped."""
    import gzip

    failed = {"task": "t0", "variant": "a", "error": "x"}
    other, retried = {"task": "t1", "variant": "a"}, {"task": "t0", "variant": "a"}
    rows = [failed, other, retried]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"task": "t2", "vari'
    (tmp_path / RESULTS).write_text(text)
    (tmp_path / f"{RESULTS}.gz").write_bytes(gzip.compress(text.encode()))
    plain = read_rows(tmp_path / RESULTS)
    assert plain == [other, retried] and read_rows(tmp_path / f"{RESULTS}.gz") == plain


def test_paired_differences_pair_by_task():
    def row(task: str, variant: str, auroc: float, error: str | None = None) -> dict:
        return {"task": task, "variant": variant, "shots": 5, "error": error, "metrics": {"auroc": auroc}}

    rows = [row("t0", "ours", 0.9), row("t0", "probe", 0.7), row("t1", "ours", 0.6), row("t1", "probe", 0.5)]
    rows += [row("t2", "ours", 0.8), row("t3", "probe", 0.1), row("t4", "ours", 0.9), row("t4", "probe", 0.0, "boom")]
    diffs = paired_differences(rows, "auroc", "ours", resamples=200)
    assert list(diffs) == [("probe", 5)]  # t2, t3: unpaired; t4: failed row
    assert diffs[("probe", 5)].n == 2 and math.isclose(diffs[("probe", 5)].mean, 0.15)


def test_dataset_placeholder_picks_a_backbone_per_dataset(npz_dir, vit_dir, tmp_path):
    """Leave-one-dataset-out: `{dataset}` in a param names each task's own backbone."""
    models = tmp_path / "loo"
    models.mkdir()
    (models / "shapes").symlink_to(vit_dir, target_is_directory=True)  # no backbone for `cells`
    probe = {"name": "probe", "kind": "linear_probe", "params": {"model": str(models / "{dataset}")}}
    raw = _config(npz_dir, vit_dir) | {
        "model": str(models / "{dataset}"),
        "methods": [probe, {"name": "prototypes", "kind": "prototypes"}],
    }
    raw["suite"] = raw["suite"] | {"tasks": 1}
    rows = read_rows(run_experiment(parse_config(raw), tmp_path / "run"))
    errors = {(r["dataset"], r["variant"]): r["error"] for r in rows}  # probe: from params; prototypes: from `model:`
    assert errors[("shapes", "probe")] is None and errors[("shapes", "prototypes")] is None
    assert all(
        "loo/cells" in errors[("cells", v)] and "{dataset}" not in errors[("cells", v)] for v in ("probe", "prototypes")
    )
    assert next(r for r in rows if r["variant"] == "probe")["params"]["model"].endswith(
        "{dataset}"
    )  # rows keep the config's words


def test_variant_precision_is_honoured(npz_dir, vit_dir, tmp_path):
    """A variant's own precision (the speed-work before/after rows) must not inherit the run's."""
    fp32 = {"name": "fp32", "params": {"precision": "no", "max_steps": 2, "min_steps": 2}}
    bf16 = {"name": "bf16", "params": {"precision": "bf16", "max_steps": 2, "min_steps": 2}}
    raw = _config(npz_dir, vit_dir) | {"methods": [bf16, fp32]}
    raw["suite"] = raw["suite"] | {"tasks": 1}
    rows = read_rows(run_experiment(parse_config(raw), tmp_path / "run"))
    assert {r["variant"]: r["precision"] for r in rows} == {"bf16": "bf16", "fp32": "no"}


def test_unknown_reference_is_refused(npz_dir, vit_dir, tmp_path):
    with pytest.raises(ValueError, match="reference 'nope' is not a variant"):
        run_experiment(parse_config(_config(npz_dir, vit_dir) | {"reference": "nope"}), tmp_path)


def test_resume_skips_finished_rows(one_process_run, npz_dir, vit_dir, tmp_path):
    out = tmp_path / "resume"
    shutil.copytree(one_process_run, out)
    lines = (out / RESULTS).read_text().splitlines()
    failed = json.loads(lines[0]) | {"error": "RuntimeError: simulated", "metrics": None}
    (out / RESULTS).write_text("\n".join(lines[1:-2] + [json.dumps(failed)]) + "\n")  # 2 rows missing, 1 failed
    run_experiment(parse_config(_config(npz_dir, vit_dir)), out)
    after = (out / RESULTS).read_text().splitlines()
    assert len(after) == len(lines) - 2 + 3  # only the missing and the failed rows ran again
    new = [json.loads(line) for line in after[-3:]]
    history = [json.loads(line) for line in (out / "config.history.jsonl").read_text().splitlines()]
    assert [h["tasks_to_run"] for h in history] == [8, len({r["task"] for r in new})]  # first run, then this resume
    assert {(r["task"], r["variant"]) for r in new} == {
        (json.loads(line)["task"], json.loads(line)["variant"]) for line in [lines[0]] + lines[-2:]
    }
    assert not any(r["error"] for r in read_rows(out / RESULTS))
    # the retried first row now comes last in the file: the reference is still the config's first method
    assert "lora minus each method, paired by task" in (out / "summary.md").read_text()


def test_two_processes_match_one(one_process_run, npz_dir, vit_dir, tmp_path):
    """accelerate launch with 2 CPU processes (gloo) gives the rows of 1 process, from both ranks."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(_config(npz_dir, vit_dir)))
    out = tmp_path / "two"
    launch = [*gloo_launch(), "-m", "l2l_peft.experiments", str(config)]
    launch += ["--output", str(out)]
    proc = subprocess.run(launch, cwd=REPO, env=GLOO_ENV, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        "ran 8 tasks in " in proc.stderr and " on 2 process(es): " in proc.stderr
    )  # the throughput line benchmarks read
    one, two = _by_key(read_rows(one_process_run / RESULTS)), _by_key(read_rows(out / RESULTS))
    assert list(one) == list(two)  # same rows, same order
    assert {r["rank"] for r in two.values()} == {0, 1}
    for key, row in one.items():
        for name, value in row["metrics"].items():
            assert two[key]["metrics"][name] == pytest.approx(value, abs=1e-4), (key, name)


def test_sampling_follows_the_protocol():
    labels = torch.arange(100) % 4
    pool = torch.arange(100)
    support, query = sample_task(
        labels, TaskTarget.MULTICLASS_CLASSIFICATION, pool, shots=5, query_per_class=10, seed=3
    )
    assert torch.bincount(labels[support]).tolist() == [5] * 4 and torch.bincount(labels[query]).tolist() == [10] * 4
    assert not set(support.tolist()) & set(query.tolist())
    again = sample_task(labels, TaskTarget.MULTICLASS_CLASSIFICATION, pool, shots=5, query_per_class=10, seed=3)
    assert torch.equal(again[0], support) and torch.equal(again[1], query)
    hot = torch.randint(0, 2, (200, 3), generator=torch.Generator().manual_seed(0))
    support, query = sample_task(
        hot, TaskTarget.MULTILABEL_CLASSIFICATION, torch.arange(200), shots=4, query_per_class=5, seed=0
    )
    assert (hot[support].sum(0) >= 4).all() and ((1 - hot[support]).sum(0) >= 4).all()
    assert (hot[query].sum(0) >= 5).all() and not set(support.tolist()) & set(query.tolist())
    with pytest.raises(ValueError, match="REGRESSION"):
        sample_task(torch.rand(10), TaskTarget.REGRESSION, torch.arange(10), shots=1, query_per_class=1, seed=0)


def test_suite_split_and_task_seeds_do_not_depend_on_order(npz_dir):
    source = {"kind": "npz", "path": str(npz_dir), "include": ["shapes"]}
    suite = Suite(SuiteConfig(sources=[source], shots=[1, 2], tasks=2, split="test", image_size=32))
    reordered = Suite(SuiteConfig(sources=[source], shots=[2, 1], tasks=2, split="test", image_size=32))
    spec = suite.specs[-1]
    data, labels = suite.build(spec)
    same, same_labels = reordered.build(next(s for s in reordered.specs if s.key == spec.key))
    torch.testing.assert_close(data.support_images, same.support_images)
    assert torch.equal(labels, same_labels)
    assert (
        data.support_images.shape[1:] == (1, 32, 32)
        and -1 <= data.support_images.min()
        and data.support_images.max() <= 1
    )
    assert (
        len(data.support_labels) == 6 and len(labels) == 9
    )  # 2 shots / 3 queries x 3 classes, from the 15 test images


def test_pickle_source_labels_inside_or_in_side_file(tmp_path):
    inside, inside_labels = make_task(TaskTarget.MULTICLASS_CLASSIFICATION, seed=1)
    write_task(inside, tmp_path / "a.pkl")
    side, side_labels = make_task(TaskTarget.BINARY_CLASSIFICATION, seed=2)
    side.query = [image for image, _ in side.query]  # challenge form: no labels in the query
    write_task(side, tmp_path / "b.pkl")
    (tmp_path / "labels.json").write_text(json.dumps({"b": side_labels.tolist()}))
    entry = {"kind": "pickles", "path": str(tmp_path), "labels": str(tmp_path / "labels.json")}
    suite = Suite(SuiteConfig(sources=[entry]))
    assert [s.key for s in suite.specs] == [f"{tmp_path.name}/a", f"{tmp_path.name}/b"]
    assert torch.equal(suite.build(suite.specs[0])[1], inside_labels)
    assert torch.equal(suite.build(suite.specs[1])[1], side_labels.reshape(-1))


def test_medimeta_source_skips_cleanly(tmp_path, caplog):
    assert medimeta_source(str(tmp_path / "absent")) == []
    assert "medimeta source skipped" in caplog.text


def test_metrics_definitions():
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    perfect = task_metrics(TaskTarget.ORDINAL_REGRESSION, torch.nn.functional.one_hot(y, 3).float(), y)
    assert perfect == {"auroc": 1.0, "accuracy": 1.0, "balanced_accuracy": 1.0, "mae": 0.0, "qwk": 1.0}
    single_class = task_metrics(TaskTarget.BINARY_CLASSIFICATION, torch.rand(4, 1), torch.ones(4, dtype=torch.long))
    assert math.isnan(single_class["auroc"]) and not math.isnan(single_class["accuracy"])
    imbalanced = task_metrics(TaskTarget.BINARY_CLASSIFICATION, torch.zeros(4, 1), torch.tensor([0, 0, 0, 1]))
    assert imbalanced["accuracy"] == 0.75 and imbalanced["balanced_accuracy"] == 0.5
    assert set(task_metrics(TaskTarget.REGRESSION, torch.rand(5, 1), torch.rand(5))) == {"mae", "mse"}


def test_methods_grid_and_seed_recipe():
    grid = MethodSpec("lora", params={"lora_rank": 8}, grid={"lr_adapter": [1e-3, 3e-3], "lora_dropout": [0.0]})
    assert [v.name for v in expand(grid)] == [
        "lora[lora_dropout=0.0,lr_adapter=0.001]",
        "lora[lora_dropout=0.0,lr_adapter=0.003]",
    ]
    base = AdaptConfig(max_steps=5)
    (seed,) = build_variants([MethodSpec("seed", kind="seed_recipe")], base)
    config = seed.config(base, seed=7)
    assert (config.method, config.lr_head, config.lr_adapter, config.weight_decay) == (Method.FULL, 1e-3, 1e-3, 0.0)
    assert (config.epochs, config.batch_size, config.augment, config.head_init, config.seed) == (
        100.0,
        64,
        False,
        "zero",
        7,
    )
    assert seed.kind is Kind.SEED_RECIPE
    with pytest.raises(ValueError, match="unknown AdaptConfig field"):
        build_variants([MethodSpec("bad", params={"lora_rnak": 4})], base)


def test_a_method_named_like_an_adaptation_method_must_run_it():
    """`{name: lora}` alone runs the default recipe (auto): refused, not a results file labelled lora."""
    base = AdaptConfig()
    with pytest.raises(ValueError, match="named like the adaptation method 'lora' but runs 'auto'"):
        build_variants([MethodSpec("lora")], base)
    with pytest.raises(ValueError, match="named like the adaptation method 'head'"):
        build_variants([MethodSpec("head", grid={"lr_head": [1e-3]})], base)  # grid points too
    variants = build_variants(
        [MethodSpec("lora", params={"method": "lora"}), MethodSpec("default"), MethodSpec("auto")], base
    )
    assert [v.config(base, seed=0).method for v in variants] == ["lora", "auto", "auto"]
    assert build_variants([MethodSpec("lora")], make_config(base, method="lora"))  # the YAML's defaults say lora


EXPERIMENT_CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs" / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("path", EXPERIMENT_CONFIGS, ids=lambda p: p.stem)
def test_experiment_configs_build_their_variants(path):
    """Every shipped experiment config parses and each variant's AdaptConfig is valid and honestly named."""
    config = load_config(path)
    base = make_config(AdaptConfig(precision=config.precision), **config.defaults)
    assert build_variants(config.methods, base)


def test_bootstrap_interval_and_config_errors():
    agg = bootstrap([0.5, 0.7, math.nan, 0.9], resamples=500)
    assert agg.n == 3 and agg.mean == pytest.approx(0.7) and agg.low < agg.mean < agg.high
    assert bootstrap([math.nan], resamples=10).n == 0
    with pytest.raises(ValueError, match="unknown key"):
        parse_config({"suite": {"sources": [{"kind": "npz"}], "shot": [1]}, "methods": [{"name": "lora"}]})
    with pytest.raises(ValueError, match="bootstrap must be >= 1"):
        parse_config({"suite": {"sources": [{"kind": "npz"}]}, "methods": [{"name": "lora"}], "bootstrap": 0})
