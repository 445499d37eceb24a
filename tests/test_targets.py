"""Per-target heads: losses, probability maps and label conventions."""

from __future__ import annotations

import math

import pytest
import torch
from torchcross.data.task import TaskTarget

from l2l_peft.head import Head
from l2l_peft.targets import Corn, Regression, Sigmoid, Softmax, build_objective


def test_corn_probabilities_are_a_distribution_and_ordered():
    corn = Corn(5)
    probs = corn.probabilities(torch.randn(100, 4) * 5)
    assert (probs >= 0).all()
    torch.testing.assert_close(probs.sum(1), torch.ones(100))
    confident_high = corn.probabilities(torch.full((1, 4), 20.0))
    assert confident_high.argmax() == 4


def test_corn_loss_prefers_correct_grades():
    corn = Corn(3)
    labels = torch.tensor([0, 1, 2])
    good = torch.tensor([[-9.0, -9.0], [9.0, -9.0], [9.0, 9.0]])
    assert corn.loss(good, labels) < corn.loss(-good, labels)


def test_pos_weight_balances_rare_positives():
    labels = torch.tensor([[1, 0], [0, 0], [0, 0], [0, 1]])
    objective = Sigmoid(labels)
    torch.testing.assert_close(objective.pos_weight, torch.tensor([3.0, 3.0]))
    assert Sigmoid(torch.zeros(4, 1)).pos_weight.item() == 1.0  # no positives: neutral


def test_regression_round_trips_units():
    labels = torch.tensor([10.0, 20.0, 30.0])
    reg = Regression(labels)
    standardised = ((labels - reg.mean) / reg.std)[:, None]
    torch.testing.assert_close(reg.probabilities(standardised)[:, 0], labels)


def test_output_sizes():
    classes = {0: "a", 1: "b", 2: "c"}
    assert build_objective(TaskTarget.MULTICLASS_CLASSIFICATION, classes, torch.tensor([0, 1])).n_outputs == 3
    assert build_objective(TaskTarget.BINARY_CLASSIFICATION, {0: "n", 1: "p"}, torch.tensor([0, 1])).n_outputs == 1
    ordinal = build_objective(TaskTarget.ORDINAL_REGRESSION, classes, torch.tensor([0, 2]))
    assert (ordinal.n_logits, ordinal.n_outputs) == (2, 3)


def test_prototype_head_init_separates_support_classes():
    torch.manual_seed(0)
    centers = torch.randn(3, 16) * 3
    labels = torch.arange(30) % 3
    features = centers[labels] + 0.1 * torch.randn(30, 16)
    head = Head(16, 3)
    head.init_from_prototypes(features, torch.nn.functional.one_hot(labels, 3).bool())
    assert (head(features).argmax(1) == labels).all()


@pytest.mark.parametrize(
    "objective, varied, collapsed",
    [
        (Softmax(2), [[9.0, -9.0], [-9.0, 9.0]], [[9.0, -9.0]]),
        (Sigmoid(torch.tensor([[0.0], [1.0]])), [[9.0], [-9.0]], [[9.0]]),
    ],
)
def test_information_rewards_confident_answers_spread_over_the_classes(objective, varied, collapsed):
    """TIM's term: lowest for confident, varied predictions; collapse onto one class is no better than chance."""
    varied, collapsed = torch.tensor(varied * 4), torch.tensor(collapsed * 8)
    torch.testing.assert_close(objective.information(varied), torch.tensor(-math.log(2)), atol=5e-3, rtol=0)
    torch.testing.assert_close(objective.information(collapsed), torch.tensor(0.0), atol=5e-3, rtol=0)
    unsure = torch.zeros_like(collapsed)
    torch.testing.assert_close(objective.information(unsure), torch.tensor(0.0), atol=1e-6, rtol=0)


def test_information_of_ordinal_grades_and_none_for_regression():
    corn = Corn(3)
    varied = torch.tensor([[-9.0, -9.0], [9.0, -9.0], [9.0, 9.0]])  # one image per grade
    torch.testing.assert_close(corn.information(varied), torch.tensor(-math.log(3)), atol=5e-3, rtol=0)
    logits = torch.randn(6, 2, requires_grad=True)
    corn.information(logits).backward()
    assert torch.isfinite(logits.grad).all()
    assert Regression(torch.tensor([1.0, 2.0])).information(torch.zeros(2, 1)) is None
