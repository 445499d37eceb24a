"""adapt() end to end on tiny models: every target, layouts, channels, families, invariants."""

from __future__ import annotations

import pytest
import torch
from conftest import CLASSES, make_task, old_layout, write_task
from torchcross.data.task import TaskTarget
from torchmetrics.functional.classification import binary_auroc, multiclass_auroc

from l2l_peft import AdaptConfig, adapt, run
from l2l_peft.backbone import load_backbone
from l2l_peft.config import CPU_LAST_BLOCKS, Method
from l2l_peft.task import load_task

FAST = dict(cpu=True, max_steps=8, min_steps=1)
PROBABILITY_TARGETS = [t for t in CLASSES if t is not TaskTarget.REGRESSION]


def check_output(out: torch.Tensor, target: TaskTarget, n_query: int) -> None:
    n_outputs = 1 if target in (TaskTarget.BINARY_CLASSIFICATION, TaskTarget.REGRESSION) else len(CLASSES[target])
    assert out.dtype == torch.float32 and out.device.type == "cpu"
    assert out.shape == (n_query, n_outputs)
    assert torch.isfinite(out).all()
    if target is not TaskTarget.REGRESSION:
        assert (out >= 0).all() and (out <= 1).all()
    if target in (TaskTarget.MULTICLASS_CLASSIFICATION, TaskTarget.ORDINAL_REGRESSION):
        torch.testing.assert_close(out.sum(1), torch.ones(n_query))


@pytest.mark.parametrize("target", list(CLASSES))
@pytest.mark.parametrize("layout", ["new", "old"])
def test_every_target_and_layout(vit_dir, tmp_path, target, layout):
    task, _ = make_task(target)
    if layout == "old":
        task = old_layout(task)
    out = adapt(write_task(task, tmp_path / "task.pkl"), model=str(vit_dir), **FAST)
    check_output(out, target, 9)


@pytest.mark.parametrize("target", list(CLASSES))
def test_transductive_term_for_every_target(vit_dir, target, caplog):
    """The query batch joins each step wherever the target has the term; regression says it has none."""
    task, _ = make_task(target)
    with caplog.at_level("INFO", logger="l2l_peft.train"):
        on = adapt(task, model=str(vit_dir), **FAST, method="lora", transductive=1.0)
    check_output(on, target, 9)
    off = adapt(task, model=str(vit_dir), **FAST, method="lora")
    if target is TaskTarget.REGRESSION:
        assert "no information term" in caplog.text
        torch.testing.assert_close(on, off)
    else:
        assert not torch.allclose(on, off)  # the query changed training


def test_transductive_term_says_where_it_does_not_apply(vit_dir, caplog):
    """The frozen-feature methods fit no network on images: the weight is logged as unused, not silently dropped."""
    task, _ = make_task()
    with caplog.at_level("INFO", logger="l2l_peft.api"):
        adapt(task, model=str(vit_dir), cpu=True, method="prototypes", transductive=1.0)
    assert "transductive: prototypes fits its head on the support features alone" in caplog.text


@pytest.mark.parametrize("family", ["vit", "dinov2", "clip", "siglip", "deit", "swin"])
@pytest.mark.parametrize("channels", [1, 3])
def test_families_and_channels(model_dirs, family, channels):
    task, _ = make_task(TaskTarget.MULTICLASS_CLASSIFICATION, channels=channels)
    check_output(adapt(task, model=str(model_dirs[family]), **FAST), TaskTarget.MULTICLASS_CLASSIFICATION, 9)


def test_challenge_size_images_are_resized(vit_dir):
    task, _ = make_task(TaskTarget.BINARY_CLASSIFICATION, n_support=4, n_query=2, size=224, channels=1)
    check_output(adapt(task, model=str(vit_dir), **FAST), TaskTarget.BINARY_CLASSIFICATION, 2)


def test_base_weights_unchanged_and_only_adapters_train(vit_dir):
    before = {k: v.clone() for k, v in load_backbone(str(vit_dir)).state_dict().items()}
    task, _ = make_task()
    result = run(task, model=str(vit_dir), method="lora", cpu=True, max_steps=10, lr_adapter=0.1)
    after = load_backbone(str(vit_dir)).state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    n_base = sum(v.numel() for v in before.values())
    assert 0 < result.trainable_parameters < n_base / 2


def test_base_weights_bit_identical_inside_the_adapted_model(vit_dir, monkeypatch):
    """The adapted model's own frozen tensors stay as loaded (LoRA is never merged)."""
    from l2l_peft import api

    captured = {}
    original = api.predict

    def spy(model, *args, **kwargs):
        captured["state"] = {k: v.detach().clone() for k, v in model.extractor.state_dict().items()}
        return original(model, *args, **kwargs)

    monkeypatch.setattr(api, "predict", spy)
    task, _ = make_task()
    run(task, model=str(vit_dir), method="lora", cpu=True, max_steps=10, lr_adapter=0.1)
    pristine = load_backbone(str(vit_dir)).model.state_dict()
    adapted = {k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in captured["state"].items()}
    for name, tensor in pristine.items():
        assert torch.equal(adapted[f"model.{name}"], tensor), name
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in captured["state"].items())


@pytest.mark.parametrize("target", [TaskTarget.BINARY_CLASSIFICATION, TaskTarget.MULTICLASS_CLASSIFICATION])
def test_learns_an_easy_task(vit_dir, target):
    """Bright vs dark images: query AUROC must exceed 0.9."""
    task, query_labels = make_task(target, n_support=24, n_query=30, seed=1)
    out = adapt(task, model=str(vit_dir), cpu=True, max_steps=40, head_init="zero")
    if target is TaskTarget.BINARY_CLASSIFICATION:
        auroc = binary_auroc(out[:, 0], query_labels[:, 0])
    else:
        auroc = multiclass_auroc(out, query_labels, num_classes=3)
    assert auroc > 0.9


def test_seeded_runs_are_reproducible(vit_dir):
    task, _ = make_task(TaskTarget.ORDINAL_REGRESSION)
    a = adapt(task, model=str(vit_dir), **FAST, seed=3)
    b = adapt(task, model=str(vit_dir), **FAST, seed=3)
    c = adapt(task, model=str(vit_dir), **FAST, seed=4)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_empty_query_gives_empty_output(vit_dir):
    task, _ = make_task(TaskTarget.MULTILABEL_CLASSIFICATION)
    task.query = []
    assert adapt(task, model=str(vit_dir), **FAST).shape == (0, 3)


def test_time_budget_stops_training_early(vit_dir):
    task, _ = make_task()
    result = run(task, model=str(vit_dir), cpu=True, max_steps=100_000, min_steps=1, epochs=1e6, time_budget=2.0)
    assert result.train.stopped_early and result.train.steps < 100_000
    assert result.timings["total"] < 4.0
    check_output(result.probabilities, TaskTarget.MULTICLASS_CLASSIFICATION, 9)


def test_config_and_overrides():
    assert AdaptConfig(max_steps=5).max_steps == 5
    with pytest.raises(TypeError, match="unknown AdaptConfig"):
        adapt(make_task()[0], not_a_field=1)
    with pytest.raises(ValueError, match="precision"):
        AdaptConfig(precision="fp8")
    with pytest.raises(ValueError, match="max_steps"):
        AdaptConfig(max_steps=0)


def test_environment_overrides(vit_dir, monkeypatch):
    monkeypatch.setenv("L2L_PEFT_MODEL", str(vit_dir))
    monkeypatch.setenv("L2L_PEFT_TIME_BUDGET", "30")
    config = AdaptConfig().with_env()
    assert config.model == str(vit_dir) and config.time_budget == 30.0
    check_output(adapt(make_task()[0], **FAST), TaskTarget.MULTICLASS_CLASSIFICATION, 9)


def test_each_call_runs_at_its_own_precision(vit_dir):
    """accelerate's state is global; a later call asking for another precision must get it, not the first's."""
    task, _ = make_task(TaskTarget.BINARY_CLASSIFICATION)
    common = dict(model=str(vit_dir), cpu=True, max_steps=2, min_steps=2)
    assert run(task, precision="bf16", **common).precision == "bf16"
    assert run(task, precision="no", **common).precision == "no"
    assert run(task, precision="bf16", **common).precision == "bf16"


def test_auto_is_the_ensemble_on_a_gpu_and_lora_on_the_last_blocks_on_a_cpu(monkeypatch):
    """method auto resolves per device; an explicit method (or last-block count) is never overridden."""
    assert AdaptConfig().method == "auto"
    cpu = AdaptConfig(cpu=True).concrete()
    assert (cpu.method, cpu.lora_last_blocks, cpu.prefix_views) == ("lora", CPU_LAST_BLOCKS, 4)
    assert AdaptConfig(cpu=True, lora_last_blocks=2).concrete().lora_last_blocks == 2
    assert AdaptConfig(cpu=True, transductive=1.0).concrete().prefix_views == 0  # the query term needs every block
    assert AdaptConfig(cpu=True, method="full").concrete().method == "full"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = AdaptConfig().concrete()
    assert (gpu.methods, gpu.lora_last_blocks) == ((Method.LORA, Method.FULL), None)
    with pytest.raises(ValueError, match="auto stands alone"):
        AdaptConfig(method="auto+lora")


def test_a_cpu_budget_that_allows_it_trains_every_block(vit_dir, monkeypatch, caplog):
    """auto on a CPU: LoRA on every block when the timed forward pass says a whole run fits in SHARE of the budget,
    the last blocks when it does not or when there is no budget (the forward pass is then not timed); a chosen
    depth or method stays."""
    from l2l_peft import budget

    timed = []

    def seconds(extractor, images):  # this machine's speed, as the probe would find it
        timed.append(len(images))
        return speed

    monkeypatch.setattr(budget, "seconds_per_image", seconds)
    task, _ = make_task(n_support=8, n_query=4)
    common = {"model": str(vit_dir), "cpu": True, "max_steps": 2}
    speed = 1e-4  # 2 steps of 8 images x 3 + 4 query images: 0.007 s of 600
    with caplog.at_level("INFO", logger="l2l_peft.budget"):
        fast = run(task, time_budget=600, **common)
    assert (fast.config.method, fast.config.lora_last_blocks, timed) == ("lora", None, [budget.PROBE_IMAGES])
    assert "training every block" in caplog.text and fast.probabilities.shape[0] == 4
    speed = 10.0  # 0.7 min of forward passes per step: 8 min estimated against 0.8 x 60 s
    assert run(task, time_budget=60, **common).config.lora_last_blocks == CPU_LAST_BLOCKS
    timed.clear()
    assert run(task, **common).config.lora_last_blocks == CPU_LAST_BLOCKS and not timed  # no budget: not timed
    speed = 1e-4
    assert run(task, time_budget=600, lora_last_blocks=2, **common).config.lora_last_blocks == 2
    assert run(task, time_budget=600, method="lora", **common).config.lora_last_blocks is None
    assert not timed


def test_full_trains_at_lr_full_with_layer_decay(vit_dir):
    """Under method full, block i of L trains at lr_full * decay ** (L - i); LoRA keeps lr_adapter, no decay."""
    from l2l_peft.api import build_classifier
    from l2l_peft.backbone import load_backbone
    from l2l_peft.targets import build_objective
    from l2l_peft.train import _optimizer

    task, _ = make_task(TaskTarget.BINARY_CLASSIFICATION)
    data = load_task(task)
    objective = build_objective(data.target, data.classes, data.support_labels)
    for method, expected in (("full", [1e-3 * 0.5**k for k in (3, 2, 1, 0)]), ("lora", [1e-2])):
        config = AdaptConfig(method=method, lr_full=1e-3, lr_adapter=1e-2, layer_decay=0.5, lr_head=5.0)
        model = build_classifier(load_backbone(str(vit_dir)), objective, config)
        optimizer, _ = _optimizer(model, config, 10, device=torch.device("cpu"), graphed=False)
        head, *backbone = optimizer.param_groups
        assert head["lr"] == 5.0 and sorted({g["lr"] for g in backbone}) == pytest.approx(expected)
        assert sum(len(g["params"]) for g in backbone) == sum(p.requires_grad for p in model.extractor.parameters())
    with pytest.raises(ValueError, match="layer_decay must be in"):
        AdaptConfig(layer_decay=0.0)


def test_the_ensemble_averages_its_members(vit_dir):
    """lora+full trains LoRA, then full fine-tuning, and returns the mean of their probabilities."""
    task, _ = make_task(TaskTarget.MULTICLASS_CLASSIFICATION)
    both = run(task, model=str(vit_dir), method="lora+full", **FAST)
    lora = adapt(task, model=str(vit_dir), method="lora", **FAST)
    full = adapt(task, model=str(vit_dir), method="full", **FAST)
    assert both.methods == "lora+full" and not torch.allclose(lora, full)
    torch.testing.assert_close(both.probabilities, (lora + full) / 2)
    check_output(both.probabilities, TaskTarget.MULTICLASS_CLASSIFICATION, 9)


def test_the_model_files_are_read_once_per_process(vit_dir, tmp_path, monkeypatch):
    """An ensemble's second member, and fit() after the CPU budget's timing, copy the loaded original instead
    of reading the model directory again; every member still starts from the pristine weights."""
    import shutil

    from l2l_peft import backbone, budget

    reads = []
    load_hf_model = backbone.load_hf_model
    monkeypatch.setattr(backbone, "load_hf_model", lambda source: reads.append(source) or load_hf_model(source))
    monkeypatch.setattr(budget, "seconds_per_image", lambda extractor, images: 1e-4)
    task, _ = make_task(TaskTarget.MULTICLASS_CLASSIFICATION)
    for case, options in (("ensemble", dict(method="lora+full")), ("budget", dict(cpu=True, time_budget=600))):
        source = shutil.copytree(vit_dir, tmp_path / case)  # a source this process has not read yet
        reads.clear()
        result = run(task, model=str(source), **{**FAST, **options})
        assert [r.location for r in reads] == [str(source)], case
        if case == "ensemble":  # as if each member had its own process
            assert result.methods == "lora+full"
            lora = adapt(task, model=str(vit_dir), method="lora", **FAST)
            full = adapt(task, model=str(vit_dir), method="full", **FAST)
            torch.testing.assert_close(result.probabilities, (lora + full) / 2)


def test_ensemble_member_skipped_without_time_for_it(vit_dir, monkeypatch, caplog):
    """With a budget, a further member runs only when the time left covers it: else the first alone."""
    task, _ = make_task(TaskTarget.BINARY_CLASSIFICATION)
    monkeypatch.setattr("l2l_peft.api.ENSEMBLE_HEADROOM", 1e9)
    with caplog.at_level("INFO", logger="l2l_peft.api"):
        result = run(task, model=str(vit_dir), method="lora+full", time_budget=600.0, **FAST)
    assert result.methods == "lora" and "ensemble: full skipped" in caplog.text
    torch.testing.assert_close(result.probabilities, adapt(task, model=str(vit_dir), method="lora", **FAST))


@pytest.mark.parametrize(
    "method, error",
    [("lora+lora", "names a method twice"), ("lora+fulll", "must be one of"), ("", "must be one of")],
)
def test_method_combinations_are_checked(method, error):
    with pytest.raises(ValueError, match=error):
        AdaptConfig(method=method)
    assert AdaptConfig(method=" full + lora ").method == "full+lora"
    assert AdaptConfig(method=Method.DORA).methods == (Method.DORA,)
