"""PPO math: GAE against loops, whitening, KL-penalised rewards, clipped losses, KL controllers."""

import math

import pytest
import torch
from torch.testing import assert_close

from posttrain.algorithms.ppo import (
    AdaptiveKLController,
    FixedKLController,
    explained_variance,
    gae,
    kl_penalty_rewards,
    ppo_policy_loss,
    value_loss,
    whiten,
)


def gae_loop(rewards, values, mask, gamma, lam):
    """Reference: plain Python over each row's real tokens (right-padded), value 0 after the last one."""
    B, T = rewards.shape
    adv = [[0.0] * T for _ in range(B)]
    for b in range(B):
        n = int(mask[b].sum())
        running = 0.0
        for t in reversed(range(n)):
            next_value = float(values[b, t + 1]) if t + 1 < n else 0.0
            delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
            running = delta + gamma * lam * running
            adv[b][t] = running
    adv = torch.tensor(adv)
    return adv, (adv + values) * mask


def test_gae_three_steps_by_hand():
    """gamma = 0.9, lam = 0.8 (gamma lam = 0.72).
    row 0, rewards [1, 0, 2], values [0.5, 1, 1.5]:
        delta_2 = 2 + 0 - 1.5 = 0.5;  delta_1 = 0 + 0.9 * 1.5 - 1 = 0.35;  delta_0 = 1 + 0.9 * 1 - 0.5 = 1.4
        A_2 = 0.5;  A_1 = 0.35 + 0.72 * 0.5 = 0.71;  A_0 = 1.4 + 0.72 * 0.71 = 1.9112
        returns = A + V = [2.4112, 1.71, 2.0]
    row 1, 2 real tokens, rewards [0, 3], values [1, 2] (padding holds 99):
        delta_1 = 3 - 2 = 1;  delta_0 = 0 + 0.9 * 2 - 1 = 0.8;  A = [0.8 + 0.72, 1] = [1.52, 1]
        returns [2.52, 3]; padding 0.
    """
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 99.0]])
    values = torch.tensor([[0.5, 1.0, 1.5], [1.0, 2.0, 99.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert_close(adv, torch.tensor([[1.9112, 0.71, 0.5], [1.52, 1.0, 0.0]]), rtol=0, atol=1e-6)
    assert_close(ret, torch.tensor([[2.4112, 1.71, 2.0], [2.52, 3.0, 0.0]]), rtol=0, atol=1e-6)
    loop_adv, loop_ret = gae_loop(rewards, values, mask, 0.9, 0.8)
    assert_close(adv, loop_adv, rtol=0, atol=1e-6)
    assert_close(ret, loop_ret, rtol=0, atol=1e-6)


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.99, 0.9), (0.9, 0.0), (1.0, 1.0)])
def test_gae_matches_the_loop_on_random_ragged_batches(gamma, lam):
    """Lengths include 0 (fully masked row) and T; padding holds large garbage that must not leak."""
    g = torch.Generator().manual_seed(0)
    B, T = 6, 9
    lengths = torch.tensor([9, 0, 4, 1, 7, 3])
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    rewards = torch.where(mask.bool(), torch.randn(B, T, generator=g), torch.full((B, T), 1e6))
    values = torch.where(mask.bool(), torch.randn(B, T, generator=g), torch.full((B, T), -1e6))
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    loop_adv, loop_ret = gae_loop(rewards, values, mask, gamma, lam)
    assert_close(adv, loop_adv, rtol=1e-6, atol=1e-6)
    assert_close(ret, loop_ret, rtol=1e-6, atol=1e-6)
    assert not adv.requires_grad


def test_gae_with_lambda_one_and_gamma_one_is_return_minus_value():
    """lam = gamma = 1: A_t = sum_{k >= t} r_k - V_t (Monte Carlo); rewards [1, 2, 3], V [1, 1, 1]
    -> returns-to-go [6, 5, 3], A = [5, 4, 2]."""
    adv, ret = gae(torch.tensor([[1.0, 2.0, 3.0]]), torch.ones(1, 3), torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert_close(adv, torch.tensor([[5.0, 4.0, 2.0]]), rtol=0, atol=0)
    assert_close(ret, torch.tensor([[6.0, 5.0, 3.0]]), rtol=0, atol=0)


def test_whiten_by_hand():
    """[1, 2, 3] (+ a masked 100): mean 2, unbiased var (1 + 0 + 1) / 2 = 1 -> [-1, 0, 1], pad 0.
    [2, 4, 6]: mean 4, unbiased var (4 + 0 + 4) / 2 = 4, std 2 -> (x - 4) / 2 + 4 = [3, 4, 5] keeping the mean."""
    mask = torch.tensor([[1, 1, 1, 0]])
    assert_close(whiten(torch.tensor([[1.0, 2.0, 3.0, 100.0]]), mask), torch.tensor([[-1.0, 0.0, 1.0, 0.0]]))
    kept = whiten(torch.tensor([[2.0, 4.0, 6.0, 100.0]]), mask, shift_mean=False)
    assert_close(kept, torch.tensor([[3.0, 4.0, 5.0, 0.0]]), rtol=0, atol=1e-6)


def test_whiten_random_has_zero_mean_unit_variance_over_the_mask():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, generator=g) * 5 + 3
    mask = (torch.arange(6)[None] < torch.tensor([6, 2, 0, 5])[:, None]).long()
    w = whiten(x, mask)[mask.bool()]
    assert_close(w.mean(), torch.tensor(0.0), rtol=0, atol=1e-6)
    assert_close(w.var(), torch.tensor(1.0), rtol=0, atol=1e-6)


def test_whiten_over_processes_is_whiten_over_the_whole_rollout():
    """Each process whitened its own share of a rollout: 2 processes trained other advantages than 1 (an audit).
    With `total` (an all-reduce of each sum), a share is whitened by the whole rollout's mean and variance. Two
    processes are simulated: `total` adds what the other share contributes to each sum."""
    from posttrain.algorithms.common import masked_sum

    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 5, generator=g) * 3 + 1
    mask = (torch.arange(5)[None] < torch.tensor([5, 3, 1, 4, 0, 2])[:, None]).long()
    whole = whiten(x, mask)
    (xa, xb), (ma, mb) = x.split(3), mask.split(3)
    calls = []

    def total(t):  # the other process's part of the same sum: first (sum, count), then the squared deviations
        if not calls:
            calls.append(t + torch.stack([masked_sum(xb, mb), mb.sum().float()]))
            return calls[-1]
        mean = calls[0][0] / calls[0][1]
        return t + masked_sum((xb - mean).square(), mb)[None]

    assert_close(whiten(xa, ma, total=total), whole[:3], rtol=0, atol=1e-6)
    assert not torch.allclose(whiten(xa, ma), whole[:3], atol=1e-3)  # its own share's statistics: other values


def test_kl_penalty_rewards_by_hand():
    """kl_coef = 0.1; per-token -0.1 (policy - ref), the score added at each row's last real token.
    row 0: policy - ref [0.5, -1, 0.2], score 2  -> [-0.05, 0.1, -0.02 + 2] = [-0.05, 0.1, 1.98]
    row 1: 1 real token, policy - ref 0.3, score -1 -> [-0.03 - 1, 0, 0] = [-1.03, 0, 0]
    row 2: no real token -> all 0 (the score 5 has nowhere to go)."""
    ref = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    policy = ref + torch.tensor([[0.5, -1.0, 0.2], [0.3, 9.0, 9.0], [4.0, 4.0, 4.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    out = kl_penalty_rewards(torch.tensor([2.0, -1.0, 5.0]), policy, ref, mask, kl_coef=0.1)
    expected = torch.tensor([[-0.05, 0.1, 1.98], [-1.03, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert_close(out, expected, rtol=0, atol=1e-6)


def test_clipped_policy_loss_by_hand():
    """clip_eps 0.2, r = [1.1, 1.5, 0.5, pad], A = [1, 1, -1, 7]:
    r = 1.1, A = 1 -> -min(1.1, 1.1) = -1.1 (inside the band)
    r = 1.5, A = 1 -> -min(1.5, 1.2) = -1.2 (clipped)
    r = 0.5, A = -1 -> -min(-0.5, -0.8) = 0.8 (clipped)
    clip_fraction 2/3; approx_kl = mean of (r - 1) - ln r = [0.0046898, 0.0945349, 0.1931472] -> 0.0974573.
    Gradient d/d logp = -r A on the unclipped token only: [-1.1, 0, 0, 0]."""
    old = torch.tensor([[-1.0, -2.0, -3.0, 0.0]])
    policy = (old + torch.log(torch.tensor([[1.1, 1.5, 0.5, 1.0]]))).requires_grad_()
    adv = torch.tensor([[1.0, 1.0, -1.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, m = ppo_policy_loss(policy, old, adv, mask, clip_eps=0.2)
    assert_close(loss, torch.tensor([[-1.1, -1.2, 0.8, 0.0]]), rtol=0, atol=1e-6)
    assert_close(m["clip_fraction"], torch.tensor(2 / 3), rtol=0, atol=1e-7)
    assert_close(m["approx_kl"], torch.tensor(0.0974573), rtol=0, atol=1e-6)
    loss.sum().backward()
    assert_close(policy.grad, torch.tensor([[-1.1, 0.0, 0.0, 0.0]]), rtol=0, atol=1e-6)


def test_clipped_value_loss_by_hand():
    """c = 0.2; 0.5 max((v - R)^2, (old + clip(v - old, +-0.2) - R)^2):
    v 0.5, old 0, R 1:  (0.5)^2 = 0.25 vs (0.2 - 1)^2 = 0.64 -> 0.32
    v 0.1, old 0, R 1:  inside the band, (0.9)^2 = 0.81 -> 0.405
    v 0.5, old 1, R 0.3: (0.2)^2 = 0.04 vs (0.8 - 0.3)^2 = 0.25 -> 0.125
    v 0.5, old 0, R -1: (1.5)^2 = 2.25 vs (0.2 + 1)^2 = 1.44 -> the unclipped one, 1.125
    pad -> 0."""
    values = torch.tensor([[0.5, 0.1, 0.5, 0.5, 3.0]])
    old = torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0]])
    returns = torch.tensor([[1.0, 1.0, 0.3, -1.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    out = value_loss(values, old, returns, mask, clip_eps_value=0.2)
    assert_close(out, torch.tensor([[0.32, 0.405, 0.125, 1.125, 0.0]]), rtol=0, atol=1e-6)


def test_explained_variance():
    """Perfect prediction -> 1 (padding ignored); R = [1, 3], v = [1, 2]: Var[R] = 1, Var[R - v] = Var[0, 1]
    = 0.25 -> 0.75; a constant prediction at the mean -> 0; constant returns -> NaN (undefined)."""
    mask = torch.tensor([[1, 1, 0]])
    returns = torch.tensor([[1.0, 3.0, 50.0]])
    assert explained_variance(torch.tensor([[1.0, 3.0, -7.0]]), returns, mask) == pytest.approx(1.0, abs=1e-7)
    assert explained_variance(torch.tensor([[1.0, 2.0, 0.0]]), returns, mask) == pytest.approx(0.75, abs=1e-7)
    assert explained_variance(torch.tensor([[2.0, 2.0, 0.0]]), returns, mask) == pytest.approx(0.0, abs=1e-7)
    assert math.isnan(explained_variance(torch.zeros(1, 3), torch.ones(1, 3), torch.ones(1, 3)))
    # returns that are constant up to float32 rounding (A + V summed in GAE) count as constant, not as -1e13:
    # one ulp of spread around 1 (2^-23) has a variance of ~1e-14
    rounded = torch.tensor([[1.0, 1.0 + 2**-23, 1.0 - 2**-24]])
    assert rounded.var() > 0 and math.isnan(
        explained_variance(torch.full((1, 3), 0.5), rounded, torch.ones(1, 3))
    )


def test_adaptive_kl_controller_by_hand():
    """value 0.1, target 6, horizon 10000; e = clip((KL - 6) / 6, +-0.2), value *= 1 + e n / horizon.
    KL 9,   n 1000: e = 0.5 -> 0.2;    0.1 (1 + 0.02)        = 0.102
    KL 4.5, n 2000: e = -0.25 -> -0.2; 0.102 (1 - 0.04)      = 0.09792
    KL 6.6, n 500:  e = 0.1;           0.09792 (1 + 0.005)   = 0.0984096"""
    ctl = AdaptiveKLController(value=0.1, target=6.0, horizon=10000)
    for kl, n, expected in ((9.0, 1000, 0.102), (4.5, 2000, 0.09792), (6.6, 500, 0.0984096)):
        assert ctl.update(kl, n) == pytest.approx(expected, abs=1e-12)
        assert ctl.value == pytest.approx(expected, abs=1e-12)


def test_fixed_kl_controller_never_moves():
    ctl = FixedKLController(value=0.05)
    assert ctl.update(100.0, 10_000) == 0.05 and ctl.value == 0.05
