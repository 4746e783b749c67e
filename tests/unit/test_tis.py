"""Truncated importance sampling (Yao et al. 2025): the weights min(pi_old / pi_sampler, C) by hand, and what they
do to the GRPO, RLOO and PPO policy gradients, worked out by hand on small literal tensors.

The hand-built case used below (one completion of 3 tokens, advantage 1, nothing clipped, cap C = 2):
old - sampler log-probs [0, ln 1.5, ln 4] -> weights w = [1, 1.5, min(4, 2) = 2]; policy - old = [0, ln 1.1, 0]
-> ratios r = [1, 1.1, 1]. Per-token policy-gradient loss -w r A = [-1, -1.65, -2]; its gradient with respect to
each policy log-prob is d(-w e^(policy - old) A) = -w r A, the same numbers."""

import math

import pytest
import torch
from torch.testing import assert_close

from posttrain.algorithms import rl
from posttrain.algorithms.common import tis_weights
from posttrain.algorithms.grpo import grpo_loss
from posttrain.algorithms.ppo import ppo_policy_loss
from posttrain.algorithms.rloo import rloo_loss

OLD = torch.zeros(1, 3)
SAMPLER = -torch.log(torch.tensor([[1.0, 1.5, 4.0]]))  # old - sampler = [0, ln 1.5, ln 4]
POLICY = torch.log(torch.tensor([[1.0, 1.1, 1.0]]))  # ratio r = [1, 1.1, 1], inside the clip band
MASK = torch.ones(1, 3, dtype=torch.long)
W = torch.tensor([[1.0, 1.5, 2.0]])  # min(pi_old / pi_sampler, 2)
PER_TOKEN = torch.tensor([[-1.0, -1.65, -2.0]])  # -w r A with A = 1


def test_weights_by_hand_masked_detached_and_never_overflowing():
    old = OLD.clone().requires_grad_()
    w = tis_weights(old, SAMPLER, MASK, cap=2.0)
    assert_close(w, W, rtol=0, atol=1e-6)
    assert not w.requires_grad  # a constant for the gradient
    assert_close(tis_weights(OLD, SAMPLER, MASK, cap=5.0), torch.tensor([[1.0, 1.5, 4.0]]), rtol=0, atol=1e-6)
    # padding holding garbage gives weight 0; a huge log-ratio gives the cap, not inf
    w = tis_weights(torch.tensor([[1e4, float("nan")]]), torch.zeros(1, 2), torch.tensor([[1, 0]]), cap=2.0)
    assert torch.equal(w, torch.tensor([[2.0, 0.0]]))


def _grad(loss_fn):
    policy = POLICY.clone().requires_grad_()
    loss = loss_fn(policy)
    loss.backward()
    return loss.detach(), policy.grad


def test_grpo_weights_the_policy_gradient_exactly_as_the_formula_says():
    """dapo: loss = sum(-w r A) / 3 tokens = -4.65 / 3 = -1.55; gradient -w r A / 3 = [-1/3, -0.55, -2/3]."""
    loss, grad = _grad(lambda p: grpo_loss(p, OLD, torch.tensor([1.0]), MASK, loss_type="dapo",
                                           is_weights=tis_weights(OLD, SAMPLER, MASK, cap=2.0))[0])  # fmt: skip
    assert_close(loss, torch.tensor(-1.55), rtol=0, atol=1e-6)
    assert_close(grad, PER_TOKEN / 3, rtol=0, atol=1e-6)
    _, unweighted = _grad(lambda p: grpo_loss(p, OLD, torch.tensor([1.0]), MASK, loss_type="dapo")[0])
    assert_close(grad, unweighted * W, rtol=0, atol=1e-7)  # token by token, w times the gradient without TIS


def test_grpo_weights_the_policy_gradient_term_only_not_the_kl_penalty():
    """The KL penalty's share of the loss (beta k3 to the reference) is the same with and without weights. In
    float64: the share is a difference of two losses near -1.5, whose float32 rounding (1.2e-7) would show."""
    ref = torch.tensor([[-0.5, 0.2, 0.1]], dtype=torch.float64)

    def kl_share(weights):
        def loss(beta):
            return grpo_loss(POLICY.double(), OLD.double(), torch.tensor([1.0], dtype=torch.float64), MASK,
                             ref_logps=ref, beta=beta, loss_type="dapo", is_weights=weights)[0]  # fmt: skip

        return loss(0.1) - loss(0.0)

    assert_close(kl_share(W.double()), kl_share(None), rtol=0, atol=1e-12)
    assert kl_share(None).abs() > 1e-3  # there is a penalty to compare


def test_rloo_weights_each_token_of_the_completion():
    """A = 2: per completion sum(-w r A) = -2 (1 + 1.65 + 2) = -9.3; gradient -w r A = [-2, -3.3, -4]."""
    loss, grad = _grad(lambda p: rloo_loss(p, OLD, torch.tensor([2.0]), MASK, is_weights=W)[0].sum())
    assert_close(loss, torch.tensor(-9.3), rtol=0, atol=1e-5)
    assert_close(grad, 2 * PER_TOKEN, rtol=0, atol=1e-6)


def test_ppo_weights_each_tokens_loss_and_zero_on_padding():
    mask = torch.tensor([[1, 1, 0]])
    per_token, _ = ppo_policy_loss(POLICY, OLD, torch.ones(1, 3), mask, is_weights=tis_weights(OLD, SAMPLER, mask, 2.0))
    assert_close(per_token, torch.tensor([[-1.0, -1.65, 0.0]]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("loss", ["grpo", "rloo", "ppo"])
def test_a_no_op_when_the_sampler_agrees_with_the_trainer(loss):
    """Sampler log-probs equal to the trainer's old ones: weights exactly 1, the same loss and gradient bit for
    bit, whatever the cap."""
    old = torch.tensor([[-0.3, -1.2, -2.0]])
    policy0 = torch.tensor([[-0.1, -1.5, -2.4]])
    advantages = torch.tensor([0.7])
    w = tis_weights(old, old.clone(), MASK, cap=1.0)
    assert torch.equal(w, torch.ones(1, 3))
    losses = {
        "grpo": lambda p, w: grpo_loss(p, old, advantages, MASK, loss_type="grpo", is_weights=w)[0],
        "rloo": lambda p, w: rloo_loss(p, old, advantages, MASK, is_weights=w)[0].sum(),
        "ppo": lambda p, w: ppo_policy_loss(p, old, advantages[:, None].expand(1, 3), MASK, is_weights=w)[0].sum(),
    }
    results = []
    for weights in (w, None):
        policy = policy0.clone().requires_grad_()
        value = losses[loss](policy, weights)
        value.backward()
        results.append((value.detach(), policy.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_rl_tis_gives_the_weights_and_their_token_means_or_nothing_when_off():
    """Tokens [w 1, 1.5, 2 (capped)], a padded 4th: weight mean 4.5 / 3 = 1.5, capped fraction 1/3."""
    batch = {"completion_mask": torch.tensor([[1, 1, 1, 0]]),
             "sampling_logps": torch.cat([SAMPLER, torch.zeros(1, 1)], dim=1)}  # fmt: skip
    old = torch.tensor([[0.0, 0.0, 0.0, 5.0]])
    weights, metrics = rl.tis(batch, old, 2.0)
    assert_close(weights, torch.tensor([[1.0, 1.5, 2.0, 0.0]]), rtol=0, atol=1e-6)
    assert_close(metrics["tis_weight_mean"], torch.tensor(1.5), rtol=0, atol=1e-6)
    assert_close(metrics["tis_capped_fraction"], torch.tensor(1 / 3), rtol=0, atol=1e-7)
    # a weight exactly at the cap counts as capped, though exp(log 2) may round below 2 in float32
    _, at_cap = rl.tis({**batch, "sampling_logps": torch.full((1, 4), -math.log(2.0))}, torch.zeros(1, 4), 2.0)
    assert at_cap["tis_capped_fraction"] == 1.0
    assert rl.tis(batch, old, None) == (None, {})
