"""The speed paths give the same training as the plain path: prefix cache, bf16 weight storage, CUDA graphs."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import make_task
from torchcross.data.task import TaskTarget

from l2l_peft import api, run
from l2l_peft.adapters import blocks
from l2l_peft.api import build_classifier
from l2l_peft.backbone import load_backbone
from l2l_peft.config import AdaptConfig
from l2l_peft.speed.graphs import GRAPH_MAX_BATCH, use_graphs
from l2l_peft.speed.precision import cast_frozen
from l2l_peft.speed.prefix import frozen_prefix
from l2l_peft.targets import build_objective
from l2l_peft.task import load_task

EXACT = dict(method="lora", cpu=True, max_steps=6, min_steps=6, augment=False, lora_dropout=0.0, lora_last_blocks=1)


@pytest.mark.parametrize("family", ["vit", "dinov2", "clip", "siglip", "swin"])
def test_prefix_cache_trains_like_the_full_model(model_dirs, family):
    task, _ = make_task(TaskTarget.MULTICLASS_CLASSIFICATION)
    cached = run(task, model=str(model_dirs[family]), **EXACT)
    plain = run(task, model=str(model_dirs[family]), prefix_views=0, **EXACT)
    assert cached.train.steps == plain.train.steps == 6
    assert cached.train.final_loss == pytest.approx(plain.train.final_loss, rel=1e-4, abs=1e-5)
    torch.testing.assert_close(cached.probabilities, plain.probabilities, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["vit", "dinov2"])
def test_full_member_on_the_last_blocks_trains_only_them_and_caches_the_rest(model_dirs, family):
    """method full with full_last_blocks: only the last block's weights train (the embeddings, earlier blocks and
    final norm stay as loaded), and training over the cached prefix matches running every block each step."""
    extractor = _extractor(model_dirs[family], method="full", full_last_blocks=1)
    last = blocks(extractor.model)[-1]
    trainable = [n for n, p in extractor.model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith(last + ".") for n in trainable)
    task, _ = make_task(TaskTarget.MULTICLASS_CLASSIFICATION)
    exact = {**EXACT, "method": "full", "lora_last_blocks": None, "full_last_blocks": 1}
    cached = run(task, model=str(model_dirs[family]), **exact)
    plain = run(task, model=str(model_dirs[family]), prefix_views=0, **exact)
    assert cached.train.steps == plain.train.steps == 6
    assert cached.train.final_loss == pytest.approx(plain.train.final_loss, rel=1e-4, abs=1e-5)
    torch.testing.assert_close(cached.probabilities, plain.probabilities, rtol=1e-4, atol=1e-5)


def test_prefix_cache_with_augmented_views_trains(vit_dir):
    task, _ = make_task(TaskTarget.BINARY_CLASSIFICATION)
    result = run(task, model=str(vit_dir), method="lora", cpu=True, max_steps=8, lora_last_blocks=1, prefix_views=3)
    assert result.train.steps == 8 and torch.isfinite(result.probabilities).all()


def _extractor(vit_dir, **overrides):
    config = AdaptConfig(model=str(vit_dir), **{"method": "lora", **overrides})  # the speed paths are LoRA's
    data = load_task(make_task()[0])
    objective = build_objective(data.target, data.classes, data.support_labels)
    return build_classifier(load_backbone(config.model), objective, config).extractor


@pytest.mark.parametrize(
    ("overrides", "n_frozen"),
    [
        (dict(lora_last_blocks=1), 1),
        (dict(), 0),  # every block adapted
        (dict(lora_last_blocks=2), 0),  # the tiny model has 2 blocks
        (dict(method="bitfit", lora_last_blocks=1), 0),  # BitFit trains every block's biases
        (dict(method="vpt-deep", lora_last_blocks=1), 0),  # prompts live outside the blocks
        (dict(method="full", full_last_blocks=1), 1),
        (dict(method="full"), 0),  # every weight trains, the embeddings too
    ],
)
def test_frozen_prefix_only_when_nothing_before_it_trains(vit_dir, overrides, n_frozen):
    assert len(frozen_prefix(_extractor(vit_dir, **overrides))) == n_frozen


def test_bf16_weight_storage_matches_autocast(vit_dir):
    extractor = _extractor(vit_dir)
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = extractor(images)
        assert cast_frozen(extractor, torch.bfloat16, stream=False) > 0
        after = extractor(images)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert all(p.dtype == torch.float32 for p in extractor.parameters() if p.requires_grad)


@pytest.mark.parametrize("family", ["vit", "dinov2", "clip", "siglip", "swin"])
def test_bf16_stream_stays_bf16_and_close_to_autocast(model_dirs, family):
    """With the norms cast too, hidden states stay bf16 end to end; features move only by bf16 rounding."""
    extractor = _extractor(model_dirs[family])
    images = torch.rand(3, 3, extractor.input_size, extractor.input_size) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        before = extractor(images).float()
        cast_frozen(extractor, torch.bfloat16)
        hidden = extractor.tokens(extractor.preprocess(images))[0]
        after = extractor(images).float()
    assert hidden.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in extractor.parameters() if p.requires_grad)
    assert (after - before).norm() / before.norm() < 0.05


def test_bf16_stream_trains_every_method(vit_dir):
    """BitFit trains the norms (they stay float32), VPT concatenates float32 prompts, LoRA runs bf16."""
    task, _ = make_task(TaskTarget.MULTICLASS_CLASSIFICATION)
    for method in ("lora", "bitfit", "vpt-deep", "dora"):
        result = run(task, model=str(vit_dir), cpu=True, precision="bf16", max_steps=3, min_steps=3, method=method)
        probs = result.probabilities
        assert result.train.steps == 3 and torch.isfinite(probs).all(), method
        torch.testing.assert_close(probs.sum(1), torch.ones(len(probs)), atol=1e-3, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("target", [TaskTarget.MULTICLASS_CLASSIFICATION, TaskTarget.BINARY_CLASSIFICATION])
@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("last_blocks", [None, 1])
def test_cuda_graph_trains_like_eager(vit_dir, target, method, last_blocks):
    task, _ = make_task(target)
    common = dict(
        method=method,
        max_steps=12,
        min_steps=12,
        augment=False,
        lora_dropout=0.0,
        precision="bf16",
        **{f"{method}_last_blocks": last_blocks},
    )
    graphed = run(task, model=str(vit_dir), cuda_graphs=True, **common)
    eager = run(task, model=str(vit_dir), cuda_graphs=False, **common)
    assert graphed.train.final_loss == pytest.approx(eager.train.final_loss, rel=2e-2, abs=1e-3)
    torch.testing.assert_close(graphed.probabilities, eager.probabilities, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_an_ensemble_copies_the_task_images_to_the_gpu_once(vit_dir, monkeypatch):
    """The members of an ensemble train and predict on images already on the GPU, with the same answer."""
    task, _ = make_task(TaskTarget.MULTICLASS_CLASSIFICATION)
    options = dict(method="lora+full", max_steps=6, min_steps=6, augment=False, lora_dropout=0.0, cuda_graphs=False)
    placed = []
    resident = api.resident
    monkeypatch.setattr(api, "resident", lambda data, device: placed.append(resident(data, device)) or placed[-1])
    on_gpu = run(task, model=str(vit_dir), **options)
    assert placed[0].support_images.is_cuda and placed[0].query_images.is_cuda
    monkeypatch.setattr(api, "resident", lambda data, device: data)
    on_host = run(task, model=str(vit_dir), **options)
    torch.testing.assert_close(on_gpu.probabilities, on_host.probabilities, rtol=1e-3, atol=1e-3)


def test_task_images_stay_on_the_host_where_they_would_crowd_the_gpu(monkeypatch):
    data = load_task(make_task(TaskTarget.BINARY_CLASSIFICATION)[0])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (data.query_images.numel(), 10**12))
    assert api.resident(data, torch.device("cuda")) is data
    assert api.resident(data, torch.device("cpu")) is data


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_failed_capture_falls_back_to_eager_steps_with_dropout():
    """A step that cannot be captured (here: a host sync) trains on eagerly, dropout's RNG included."""
    from l2l_peft.speed.graphs import WARMUP_STEPS, GraphedStep

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1)).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-3, device="cuda"), capturable=True)
    calls = {"n": 0}

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        loss = torch.nn.functional.mse_loss(model(x)[:, 0], y)
        if calls["n"] == WARMUP_STEPS + 1:  # the capture: a host sync is not allowed there
            loss.item()
        loss.backward()
        optimizer.step()
        return loss.detach()

    runner = GraphedStep(step, optimizer)
    x, y = torch.randn(16, 8, device="cuda"), torch.randn(16, device="cuda")
    losses = [float(runner(x, y)) for _ in range(8)]
    assert runner.failed and runner.graph is None and calls["n"] == 9  # the failed capture's call ran again eagerly
    assert all(map(math.isfinite, losses))


@pytest.mark.parametrize("family", ["vit", "dinov2", "clip", "siglip", "swin"])
def test_attention_routing_keeps_every_family_output(model_dirs, family):
    """load_backbone routes SDPA models through attention.flash_or_sdpa; off the GPU it must be SDPA exactly."""
    from l2l_peft.backbone import load_hf_model
    from l2l_peft.cache import resolve_model

    extractor = load_backbone(str(model_dirs[family])).eval()
    plain, _ = load_hf_model(resolve_model(str(model_dirs[family]), None))
    images = torch.rand(2, 3, extractor.input_size, extractor.input_size) * 2 - 1
    with torch.no_grad():
        routed = extractor.tokens(extractor.preprocess(images))[0]
        reference = plain.eval()(pixel_values=extractor.preprocess(images)).last_hidden_state
    torch.testing.assert_close(routed, reference)
    assert plain.config._attn_implementation == "sdpa" and extractor.model.config._attn_implementation == "l2l_sdpa"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash attention needs a GPU")
def test_flash_attention_matches_sdpa_and_is_captured():
    """The direct flash call gives SDPA's numbers, and forward + backward can be captured in a CUDA graph."""
    from l2l_peft.speed.attention import flash_or_sdpa

    module = torch.nn.Module()
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(2, 4, 50, 64, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_() for _ in range(3)
    )
    with torch.no_grad():  # an autograd graph built here, on the default stream, would break the capture below
        out, weights = flash_or_sdpa(module, q, k, v, None, scaling=0.125)
        reference = torch.nn.functional.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), scale=0.125
        ).transpose(1, 2)
    assert weights is None and out.shape == (2, 50, 4, 64)
    torch.testing.assert_close(out.float(), reference, atol=2e-2, rtol=2e-2)

    def step() -> None:
        flash_or_sdpa(module, q, k, v, None, scaling=0.125)[0].float().square().sum().backward()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the graph, as GraphedStep does
    torch.cuda.current_stream().wait_stream(side)
    for t in (q, k, v):
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    torch.cuda.synchronize()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


def test_training_keeps_attention_off_cudnn(vit_dir, sdpa_calls):
    """Every SDPA call of a training step runs with cuDNN's kernel disabled (attention.TRAINING_BACKENDS);
    prediction keeps SDPA's own choice."""
    task, _ = make_task(n_support=6, n_query=4)
    run(task, model=str(vit_dir), cpu=True, max_steps=2, min_steps=2)
    training = [cudnn for grad, cudnn in sdpa_calls if grad]
    assert training and not any(training)
    assert all(cudnn for grad, cudnn in sdpa_calls if not grad)


@pytest.mark.parametrize(
    ("enabled", "device", "precision", "batch", "expected"),
    [
        (True, "cuda", "bf16", GRAPH_MAX_BATCH, True),
        (True, "cuda", "no", 8, True),
        (True, "cuda", "bf16", GRAPH_MAX_BATCH + 1, False),  # replays ran slower than eager at large batches
        (True, "cuda", "fp16", 8, False),  # loss scaling
        (True, "cpu", "no", 8, False),
        (False, "cuda", "bf16", 8, False),
    ],
)
def test_when_training_steps_are_graphed(enabled, device, precision, batch, expected):
    accelerator = SimpleNamespace(device=torch.device(device), mixed_precision=precision)
    assert use_graphs(enabled, accelerator, batch) is expected


def test_full_training_with_the_position_table_at_the_input_size_matches_resampling_it(
    dinov2_trained_larger, monkeypatch
):
    """DINOv2 run below its trained size: method full trains the stored table at the input size instead of
    resampling the trained one in every pass; the answers agree (the embeddings train at lr_full * decay^(L+1))."""
    from l2l_peft import backbone

    task, _ = make_task(TaskTarget.MULTICLASS_CLASSIFICATION)
    options = dict(method="full", cpu=True, max_steps=10, min_steps=10)
    stored = run(task, model=str(dinov2_trained_larger), **options)
    monkeypatch.setattr(backbone, "_store_at_input_size", lambda tables: None)
    resampled = run(task, model=str(dinov2_trained_larger), **options)
    assert stored.trainable_parameters < resampled.trainable_parameters  # 1 + 4 * 4 positions instead of 1 + 8 * 8
    torch.testing.assert_close(stored.probabilities, resampled.probabilities, rtol=0, atol=1e-3)
