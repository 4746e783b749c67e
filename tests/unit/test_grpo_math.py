"""GRPO math: group advantages, the clipped loss under each aggregation, k3, and micro-batch invariance."""

import math

import pytest
import torch
from torch.testing import assert_close

from posttrain.algorithms.common import kl_estimate
from posttrain.algorithms.grpo import (
    AGGREGATIONS,
    group_advantages,
    grpo_loss,
    grpo_loss_units,
    uniform_groups,
)

LN = math.log

# ---------------------------------------------------------------- group advantages

# G = 2, three prompts: [0, 2 | 5, 5 | 2, 0]; group means 1, 5, 1 -> centred [-1, 1, 0, 0, 1, -1].
REWARDS = torch.tensor([0.0, 2.0, 5.0, 5.0, 2.0, 0.0])


def test_group_scale_by_hand():
    """Unbiased group std of [0, 2] = sqrt(((-1)^2 + 1^2) / 1) = sqrt 2 -> +-1 / sqrt 2 = +-0.7071068;
    the equal group [5, 5] -> exactly 0."""
    adv = group_advantages(REWARDS, 2, scale="group", eps=0.0)
    s = 1 / math.sqrt(2)
    assert_close(adv, torch.tensor([-s, s, 0.0, 0.0, s, -s]), rtol=0, atol=1e-7)
    assert adv[2].item() == 0.0 and adv[3].item() == 0.0


def test_group_scale_default_eps():
    """eps = 1e-4 is added to the std: 1 / (1.4142136 + 0.0001) = 0.7070568."""
    adv = group_advantages(REWARDS, 2)
    assert_close(adv[:2], torch.tensor([-0.7070568, 0.7070568]), rtol=0, atol=1e-7)


def test_batch_scale_by_hand():
    """Batch mean 14/6 = 7/3; deviations of [0, 2, 5, 5, 2, 0]: [-7/3, -1/3, 8/3, 8/3, -1/3, -7/3];
    squares sum to (49 + 1 + 64 + 64 + 1 + 49) / 9 = 228/9; unbiased var = 228/45 = 5.0666667,
    std = 2.2509257 -> centred [-1, 1, 0, 0, 1, -1] / 2.2509257 = +-0.4442617."""
    adv = group_advantages(REWARDS, 2, scale="batch", eps=0.0)
    a = 0.4442617
    assert_close(adv, torch.tensor([-a, a, 0.0, 0.0, a, -a]), rtol=0, atol=1e-6)


def test_no_scale_is_the_centred_reward():
    """Dr. GRPO: r - mean(group) only -> [-1, 1, 0, 0, 1, -1]."""
    adv = group_advantages(REWARDS, 2, scale="none")
    assert_close(adv, torch.tensor([-1.0, 1.0, 0.0, 0.0, 1.0, -1.0]), rtol=0, atol=0)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("eps", [0.0, 1e-4])
def test_equal_rewards_give_exact_zeros_never_nan(scale, eps):
    """[0.1] * 3 has mean 0.1 only up to rounding, and std 0: even with eps = 0 (0 / 0) the advantages are 0."""
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7])
    adv = group_advantages(rewards, 3, scale=scale, eps=eps)
    assert torch.equal(adv, torch.zeros(6))


def test_group_size_one_gives_zero_not_nan():
    """A single sample is its own baseline: advantage 0 (std of one sample is taken as 0, not NaN)."""
    assert torch.equal(group_advantages(torch.tensor([1.0, 3.0]), 1, eps=0.0), torch.zeros(2))


def test_batch_not_a_multiple_of_group_size_is_an_error():
    with pytest.raises(ValueError, match="whole number of groups"):
        group_advantages(torch.zeros(5), 2)


def test_unknown_scale_is_an_error():
    with pytest.raises(ValueError, match="batch.*group.*none"):
        group_advantages(torch.zeros(4), 2, scale="rank")


def test_uniform_groups():
    """[0, 2] varies; [5, 5] is uniform; [2, 0] varies."""
    assert uniform_groups(REWARDS, 2).tolist() == [False, True, False]


# ---------------------------------------------------------------- the loss

# Two completions, T = 3, the second one 2 tokens long. Advantages [1, -1]. Ratios r = exp(policy - old):
#   row 0 (A = +1): r = [1.0, 1.1, 1.5]   -> -min(r, clip(r, 0.8, 1.2)) = [-1.0, -1.1, -1.2]  (1.5 clipped high)
#   row 1 (A = -1): r = [0.9, 0.5, pad]   -> max(r, clip(r, 0.8, 1.2))  = [0.9, 0.8, 0]       (0.5 clipped low)
# Sums: row 0 = -3.3, row 1 = 1.7; total -1.6 over 5 tokens.
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
OLD = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.7, -3.0]])
RATIOS = torch.tensor([[1.0, 1.1, 1.5], [0.9, 0.5, 1.0]])
POLICY = OLD + torch.log(RATIOS)
ADV = torch.tensor([1.0, -1.0])


@pytest.mark.parametrize(
    "loss_type, max_len, expected",
    [
        ("grpo", None, (-3.3 / 3 + 1.7 / 2) / 2),  # row means -1.1 and 0.85 -> -0.125
        ("dapo", None, -1.6 / 5),  # -0.32
        ("dr_grpo", None, -1.6 / (2 * 3)),  # -0.2666667
        ("dr_grpo", 4, -1.6 / (2 * 4)),  # -0.2
    ],
)
def test_each_loss_type_by_hand(loss_type, max_len, expected):
    loss, _ = grpo_loss(POLICY, OLD, ADV, MASK, loss_type=loss_type, max_completion_length=max_len)
    assert_close(loss, torch.tensor(expected), rtol=0, atol=1e-6)


def test_metrics_by_hand():
    """clip_fraction_high: 1.5 with A > 0 -> 1/5; clip_fraction_low: 0.5 with A < 0 -> 1/5; total 2/5.
    ratio_mean over real tokens: (1 + 1.1 + 1.5 + 0.9 + 0.5) / 5 = 1.0. No ref -> no kl."""
    _, m = grpo_loss(POLICY, OLD, ADV, MASK)
    assert_close(m["clip_fraction_high"], torch.tensor(0.2), rtol=0, atol=1e-7)
    assert_close(m["clip_fraction_low"], torch.tensor(0.2), rtol=0, atol=1e-7)
    assert_close(m["clip_fraction"], torch.tensor(0.4), rtol=0, atol=1e-7)
    assert_close(m["ratio_mean"], torch.tensor(1.0), rtol=0, atol=1e-6)
    assert "kl" not in m and not any(v.requires_grad for v in m.values())


def test_gradient_is_zero_only_where_the_clipped_branch_is_taken():
    """d(-r A)/d logp = -r A where unclipped, 0 where clipped; "dapo" over 6 tokens divides by 6.
    row 0 (A = +1), r = [1.1, 1.5, 0.5]: 1.5 is clipped (high); 0.5 is below the band but with A > 0 the
        unclipped branch is the smaller one, so it keeps its gradient: [-1.1/6, 0, -0.5/6].
    row 1 (A = -1), r = [0.9, 0.5, 1.5]: 0.5 is clipped (low); 1.5 keeps its gradient: [0.9/6, 0, 1.5/6].
    """
    ratios = torch.tensor([[1.1, 1.5, 0.5], [0.9, 0.5, 1.5]])
    policy = torch.log(ratios).requires_grad_()
    loss, m = grpo_loss(policy, torch.zeros(2, 3), ADV, torch.ones(2, 3), loss_type="dapo")
    loss.backward()
    expected = torch.tensor([[-1.1, 0.0, -0.5], [0.9, 0.0, 1.5]]) / 6
    assert_close(policy.grad, expected, rtol=0, atol=1e-7)
    assert_close(m["clip_fraction"], torch.tensor(2 / 6), rtol=0, atol=1e-7)


def test_clip_higher_widens_only_the_upper_bound():
    """DAPO clip-higher: r = 1.25, A = 1. clip_eps 0.2 -> clipped to 1.2, loss -1.2;
    clip_eps_high 0.28 -> inside the band, loss -1.25. r = 0.75, A = -1 is clipped at 0.8 in both."""
    policy = torch.log(torch.tensor([[1.25], [0.75]]))
    for high, expected in ((None, (-1.2 + 0.8) / 2), (0.28, (-1.25 + 0.8) / 2)):
        loss, _ = grpo_loss(policy, torch.zeros(2, 1), ADV, torch.ones(2, 1), clip_eps_high=high)
        assert_close(loss, torch.tensor(expected), rtol=0, atol=1e-6)


def test_kl_penalty_by_hand():
    """On-policy (r = 1) with A = 0, so only beta k3 remains. ref - policy = [ln 2, -ln 2, 0]:
    k3 = [2 - ln 2 - 1, 1/2 + ln 2 - 1, 0] = [0.3068528, 0.1931472, 0], summing to exactly 0.5.
    kl metric = 0.5 / 3 = 0.1666667; "dapo" loss = beta * 0.5 / 3 = 0.0166667 for beta = 0.1."""
    policy = torch.tensor([[-1.0, -2.0, -3.0]])
    ref = policy + torch.tensor([[LN(2), -LN(2), 0.0]])
    loss, m = grpo_loss(
        policy, policy, torch.zeros(1), torch.ones(1, 3), ref_logps=ref, beta=0.1, loss_type="dapo"
    )
    assert_close(kl_estimate(policy, ref), torch.tensor([[0.3068528, 0.1931472, 0.0]]), rtol=0, atol=1e-6)
    assert_close(m["kl"], torch.tensor(0.5 / 3), rtol=0, atol=1e-6)
    assert_close(loss, torch.tensor(0.05 / 3), rtol=0, atol=1e-7)


def test_k3_is_nonnegative_and_exactly_zero_when_policy_equals_reference():
    g = torch.Generator().manual_seed(0)
    policy, ref = torch.randn(64, 16, generator=g) * 3, torch.randn(64, 16, generator=g) * 3
    assert (kl_estimate(policy, ref, "k3") >= 0).all()
    assert torch.equal(kl_estimate(policy, policy, "k3"), torch.zeros(64, 16))
    _, m = grpo_loss(policy, policy, torch.ones(64), torch.ones(64, 16), ref_logps=policy, beta=0.1)
    assert m["kl"].item() == 0.0


def test_beta_without_reference_and_unknown_type_are_errors():
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(POLICY, OLD, ADV, MASK, beta=0.1)
    with pytest.raises(ValueError, match="dapo.*dr_grpo.*grpo"):
        grpo_loss(POLICY, OLD, ADV, MASK, loss_type="gspo")


@pytest.mark.parametrize("loss_type", sorted(AGGREGATIONS))
def test_fully_masked_row_and_garbage_padding_give_no_nan(loss_type):
    """Row 1 has no completion token and its log-probs are inf/NaN; the loss and every gradient stay
    finite, the row's gradient is exactly 0, and an all-masked batch gives loss 0."""
    policy = torch.tensor([[-1.0, -2.0], [float("inf"), float("nan")]], requires_grad=True)
    old = torch.tensor([[-1.2, -1.9], [float("-inf"), 5.0]])
    ref = torch.tensor([[-1.1, -2.1], [float("nan"), float("inf")]])
    mask = torch.tensor([[1, 1], [0, 0]])
    loss, m = grpo_loss(policy, old, ADV, mask, ref_logps=ref, beta=0.1, loss_type=loss_type)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in m.values())
    assert torch.isfinite(policy.grad).all() and torch.equal(policy.grad[1], torch.zeros(2))
    empty, _ = grpo_loss(policy, old, ADV, torch.zeros(2, 2), ref_logps=ref, beta=0.1, loss_type=loss_type)
    assert empty.item() == 0.0


def test_loss_units_by_hand():
    """MASK has 2 sequences, 5 tokens, T = 3: grpo 2, dapo 5, dr_grpo 2 * 3 = 6 (2 * 10 = 20 with L = 10)."""
    assert grpo_loss_units(MASK, "grpo") == 2.0
    assert grpo_loss_units(MASK, "dapo") == 5.0
    assert grpo_loss_units(MASK, "dr_grpo") == 6.0
    assert grpo_loss_units(MASK, "dr_grpo", max_completion_length=10) == 20.0


@pytest.mark.parametrize("loss_type", sorted(AGGREGATIONS))
def test_micro_batches_times_units_reproduce_the_full_batch(loss_type):
    """Split 4 ragged completions (lengths 5, 1, 3, 0) into halves; sum(loss_h * units_h) / sum(units_h)
    equals the full-batch loss, value and gradient: the accumulation invariance the trainer relies on."""
    g = torch.Generator().manual_seed(1)
    B, T = 4, 5
    policy = (torch.randn(B, T, generator=g) * 0.3 - 2).requires_grad_()
    old = policy.detach() + torch.randn(B, T, generator=g) * 0.3
    ref = policy.detach() + torch.randn(B, T, generator=g) * 0.3
    adv = torch.tensor([1.0, -0.5, 2.0, -1.0])
    mask = (torch.arange(T)[None] < torch.tensor([5, 1, 3, 0])[:, None]).long()
    kw = dict(ref_logps=ref, beta=0.05, loss_type=loss_type)

    full, _ = grpo_loss(policy, old, adv, mask, **kw)
    (full_grad,) = torch.autograd.grad(full, policy)

    halves = [slice(0, 2), slice(2, 4)]
    units = [grpo_loss_units(mask[h], loss_type) for h in halves]
    summed = sum(
        grpo_loss(policy[h], old[h], adv[h], mask[h], ref_logps=ref[h], beta=0.05, loss_type=loss_type)[0] * u
        for h, u in zip(halves, units)
    )
    accumulated = summed / sum(units)
    (acc_grad,) = torch.autograd.grad(accumulated, policy)
    assert sum(units) == grpo_loss_units(mask, loss_type)
    assert_close(accumulated, full, rtol=0, atol=1e-6)
    assert_close(acc_grad, full_grad, rtol=0, atol=1e-7)
