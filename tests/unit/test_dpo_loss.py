"""DPO-family and SimPO losses, worked out by hand on tiny tensors."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from posttrain.algorithms.dpo import LOSSES, dpo_loss, simpo_loss

# Three pairs. h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected):
#   pair 0: (-1 - -2) - (-3 - -2.5) = 1 - (-0.5) = 1.5
#   pair 1: (-3 - -2) - (-1 - -2)   = -1 - 1     = -2
#   pair 2: (-1 - -11) - (-12 - -2) = 10 - (-10) = 20
POLICY_CHOSEN = torch.tensor([-1.0, -3.0, -1.0])
POLICY_REJECTED = torch.tensor([-3.0, -1.0, -12.0])
REF_CHOSEN = torch.tensor([-2.0, -2.0, -11.0])
REF_REJECTED = torch.tensor([-2.5, -2.0, -2.0])
ARGS = (POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED)


def softplus_neg(x: float) -> float:
    """-log sigma(x) = log(1 + e^-x)."""
    return math.log1p(math.exp(-x))


def test_sigmoid_loss_by_hand():
    """beta = 0.1 -> beta h = [0.15, -0.2, 2.0].

    -log sigma(0.15) = log(1 + e^-0.15) = log(1.860708) = 0.6209570
    -log sigma(-0.2) = log(1 + e^0.2)  = log(2.221403) = 0.7981389
    -log sigma(2.0)  = log(1 + e^-2)   = log(1.135335) = 0.1269280
    """
    out = dpo_loss(*ARGS, beta=0.1)
    assert_close(out.losses, torch.tensor([0.6209570, 0.7981389, 0.1269280]), rtol=0, atol=1e-6)


def test_rewards_are_beta_times_logratio_and_detached():
    """chosen: 0.1 * [1, -1, 10] = [0.1, -0.1, 1.0]; rejected: 0.1 * [-0.5, 1, -10] = [-0.05, 0.1, -1.0]."""
    policy_chosen = POLICY_CHOSEN.clone().requires_grad_()
    out = dpo_loss(policy_chosen, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.1)
    assert_close(out.chosen_rewards, torch.tensor([0.1, -0.1, 1.0]), rtol=0, atol=1e-6)
    assert_close(out.rejected_rewards, torch.tensor([-0.05, 0.1, -1.0]), rtol=0, atol=1e-6)
    assert not out.chosen_rewards.requires_grad and out.losses.requires_grad


def test_ipo_loss_by_hand():
    """beta = 0.1 -> target margin 1 / (2 beta) = 5: (1.5 - 5)^2 = 12.25, (-2 - 5)^2 = 49, (20 - 5)^2 = 225."""
    out = dpo_loss(*ARGS, beta=0.1, loss_type="ipo")
    assert_close(out.losses, torch.tensor([12.25, 49.0, 225.0]), rtol=0, atol=1e-4)


def test_hinge_loss_by_hand():
    """beta = 0.1: relu(1 - 0.15) = 0.85, relu(1 + 0.2) = 1.2, relu(1 - 2) = 0."""
    out = dpo_loss(*ARGS, beta=0.1, loss_type="hinge")
    assert_close(out.losses, torch.tensor([0.85, 1.2, 0.0]), rtol=0, atol=1e-6)


def test_at_initialisation_sigmoid_loss_is_log2_and_rewards_zero():
    """policy == reference -> h = 0 -> -log sigma(0) = log 2 for every pair; rewards beta * 0 = 0."""
    logps = torch.tensor([-7.0, -3.5])
    other = torch.tensor([-2.0, -9.0])
    out = dpo_loss(logps, other, logps, other, beta=0.3)
    assert_close(out.losses, torch.full((2,), math.log(2.0)), rtol=0, atol=1e-7)
    assert torch.equal(out.chosen_rewards, torch.zeros(2))
    assert torch.equal(out.rejected_rewards, torch.zeros(2))


def test_label_smoothing_zero_is_plain_dpo_and_positive_by_hand():
    """ls = 0 gives exactly -log sigma(beta h). ls = 0.1 at beta h = 0.15:
    0.9 (-log sigma(0.15)) + 0.1 (-log sigma(-0.15)); since -log sigma(-x) = -log sigma(x) + x,
    this is 0.6209570 + 0.1 * 0.15 = 0.6359570.
    """
    h = torch.tensor([1.5, -2.0, 20.0])
    plain = -F.logsigmoid(0.1 * h)
    assert_close(dpo_loss(*ARGS, beta=0.1, label_smoothing=0.0).losses, plain, rtol=0, atol=1e-7)
    smoothed = dpo_loss(*ARGS, beta=0.1, label_smoothing=0.1).losses
    assert_close(smoothed[0], torch.tensor(0.6359570), rtol=0, atol=1e-6)


def test_simpo_by_hand():
    """beta = 2, gamma = 0.5 (eq. 6: gamma is the margin itself).

    pair 0: chosen -4 over 4 tokens -> r_w = 2 * -1 = -2; rejected -6 over 3 -> r_l = 2 * -2 = -4;
            loss = -log sigma(-2 + 4 - 0.5) = -log sigma(1.5) = log(1 + e^-1.5) = 0.2014133
    pair 1: chosen -3 over 6 -> r_w = -1; rejected -3 over 4 -> r_l = -1.5;
            loss = -log sigma(-1 + 1.5 - 0.5) = log 2 = 0.6931472
    """
    out = simpo_loss(
        torch.tensor([-4.0, -3.0]), torch.tensor([-6.0, -3.0]), torch.tensor([4, 6]), torch.tensor([3, 4])
    )
    assert_close(out.losses, torch.tensor([0.2014133, 0.6931472]), rtol=0, atol=1e-6)
    assert_close(out.chosen_rewards, torch.tensor([-2.0, -1.0]), rtol=0, atol=1e-7)
    assert_close(out.rejected_rewards, torch.tensor([-4.0, -1.5]), rtol=0, atol=1e-7)


def test_unknown_loss_type_lists_the_options():
    with pytest.raises(ValueError, match="hinge.*ipo.*sigmoid"):
        dpo_loss(*ARGS, loss_type="kto")


def test_label_smoothing_with_other_loss_types_is_an_error():
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*ARGS, loss_type="ipo", label_smoothing=0.1)


def test_sigmoid_gradient_raises_chosen_and_lowers_rejected():
    """d loss / d policy_chosen = -beta sigma(-beta h) < 0: a gradient step raises the chosen log-prob
    (and lowers the rejected one), and the loss falls when the chosen log-prob rises.
    At h = 0, beta = 0.1: d/d chosen = -0.1 * 0.5 = -0.05, d/d rejected = +0.05.
    """
    chosen = torch.tensor([-5.0], requires_grad=True)
    rejected = torch.tensor([-5.0], requires_grad=True)
    loss = dpo_loss(chosen, rejected, torch.tensor([-5.0]), torch.tensor([-5.0])).losses.sum()
    loss.backward()
    assert_close(chosen.grad, torch.tensor([-0.05]), rtol=0, atol=1e-7)
    assert_close(rejected.grad, torch.tensor([0.05]), rtol=0, atol=1e-7)
    higher = dpo_loss(chosen.detach() + 0.5, rejected.detach(), torch.tensor([-5.0]), torch.tensor([-5.0]))
    assert higher.losses.item() < loss.item()


def test_every_loss_in_the_table_is_finite_on_extreme_margins():
    """logsigmoid keeps the sigmoid loss finite where log(sigmoid(x)) would give inf."""
    big = torch.tensor([-1e4, 0.0])
    for name in LOSSES:
        out = dpo_loss(big, big.flip(0), torch.zeros(2), torch.zeros(2), beta=1.0, loss_type=name)
        assert torch.isfinite(out.losses).all(), name
