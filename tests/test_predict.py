"""Prediction inside the time budget: batches stop at the deadline and the class prior fills the rest."""

from __future__ import annotations

from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
from conftest import make_task
from torch import nn

from l2l_peft import AdaptConfig, run
from l2l_peft import predict as predict_module
from l2l_peft.predict import fill_with_prior, predict
from l2l_peft.targets import build_objective, class_prior
from l2l_peft.task import load_task


class _SlowModel(nn.Module):
    """Confident in class 0 (unlike the uniform prior); each image takes half a tick of `clock`."""

    def __init__(self, clock: SimpleNamespace) -> None:
        super().__init__()
        self.clock = clock

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.clock.now += 0.5 * len(images)
        return torch.tensor([5.0, 0.0, 0.0]).expand(len(images), 3)


def test_prediction_stops_before_a_batch_that_would_pass_the_deadline(monkeypatch):
    data = load_task(make_task(n_support=6, n_query=10)[0])
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(predict_module, "time", SimpleNamespace(monotonic=lambda: clock.now))
    objective = build_objective(data.target, data.classes, data.support_labels)
    accelerator = SimpleNamespace(autocast=nullcontext, device=torch.device("cpu"))
    model = _SlowModel(clock)
    # batch 4 ends at t=2 (0.5 per image); 1.2 left fits 2 images (t=3); 0.2 left fits none
    predicted = predict(model, objective, data.query_images, accelerator=accelerator, batch_size=4, deadline=3.2)
    assert predicted.shape == (6, 3) and clock.now == 3.0
    full = fill_with_prior(predicted, data)
    assert full.shape == (10, 3)
    assert (full[:6].argmax(1) == 0).all()
    assert torch.equal(full[6:], class_prior(data)[6:])
    clock.now = 0.0
    assert predict(model, objective, data.query_images, accelerator=accelerator, batch_size=4).shape == (10, 3)


@pytest.mark.parametrize("predictor", ["adapted", "prototypes"])
def test_a_spent_budget_answers_the_prior_for_every_query(vit_dir, predictor):
    data = load_task(make_task(n_support=6, n_query=40)[0])
    config = AdaptConfig(model=str(vit_dir), cpu=True, max_steps=3, min_steps=1, predict_batch_size=4, time_budget=1e-6)
    result = run(data, config) if predictor == "adapted" else run(data, config, method="prototypes")
    assert result.prior_rows == 40
    assert torch.equal(result.probabilities, class_prior(data))


def test_training_leaves_a_training_steps_time_per_query_image(monkeypatch):
    """A step took 1 s for 10 images: predicting 30 query images needs ~3 s more, so with 3.5 s left training stops."""
    from l2l_peft import train

    monkeypatch.setattr(train.time, "monotonic", lambda: 101.0)
    assert train._out_of_time(start=100.0, done=1, batch=10, predict_images=30, deadline=101.0 + 3.5)
    assert not train._out_of_time(start=100.0, done=1, batch=10, predict_images=30, deadline=101.0 + 4.5)
