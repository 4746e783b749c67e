"""RLOO math on tiny literal tensors, the arithmetic worked out by hand (Ahmadian et al. 2024, sec. 3.3)."""

import pytest
import torch
from torch.testing import assert_close

from posttrain.algorithms.rloo import kl_penalised_scores, leave_one_out_advantages, rloo_loss


def test_leave_one_out_by_hand():
    """k = 4, rewards [1, 0, 0, 1]: the others' means are [1/3, 2/3, 2/3, 1/3] -> A = [2/3, -2/3, -2/3, 2/3]."""
    adv = leave_one_out_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), k=4)
    assert_close(adv, torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3]), rtol=0, atol=1e-6)


def test_leave_one_out_is_k_over_k_minus_1_times_the_centred_reward():
    torch.manual_seed(0)
    rewards = torch.randn(12)
    for k in (2, 3, 4, 6):
        grouped = rewards.view(-1, k)
        want = (k / (k - 1) * (grouped - grouped.mean(dim=1, keepdim=True))).view(-1)
        assert_close(leave_one_out_advantages(rewards, k), want, rtol=0, atol=1e-6)


def test_the_baseline_excludes_the_sample_itself():
    """A completion's own reward never enters its baseline: raising r_0 moves A_0 by exactly the same amount."""
    low = leave_one_out_advantages(torch.tensor([0.0, 1.0, 2.0]), k=3)
    high = leave_one_out_advantages(torch.tensor([5.0, 1.0, 2.0]), k=3)
    assert high[0] - low[0] == pytest.approx(5.0, abs=1e-6)
    assert (high[1:] - low[1:]).tolist() == pytest.approx(
        [-2.5, -2.5], abs=1e-6
    )  # the others' baselines move


def test_equal_rewards_give_zero_and_bad_groups_are_refused():
    assert torch.equal(leave_one_out_advantages(torch.full((6,), 0.7), k=3), torch.zeros(6))
    with pytest.raises(ValueError, match="whole groups"):
        leave_one_out_advantages(torch.zeros(5), k=2)
    with pytest.raises(ValueError, match="k = 1"):
        leave_one_out_advantages(torch.zeros(4), k=1)


def test_kl_penalty_is_the_sequence_log_ratio_and_ignores_padding():
    """beta 0.5: row 0 log-ratios [1, -0.5] -> 1 - 0.5 x 0.5 = 0.75; row 1 one token of 2 (the NaN is padding)."""
    policy = torch.tensor([[1.0, -0.5], [2.0, float("nan")]])
    out = kl_penalised_scores(torch.tensor([1.0, 0.0]), policy, torch.zeros(2, 2), torch.tensor([[1, 1], [1, 0]]),
                              beta=0.5)  # fmt: skip
    assert_close(out, torch.tensor([0.75, -1.0]), rtol=0, atol=1e-6)


def test_loss_by_hand_with_clipping():
    """clip 0.2, A = [1, -1]; ratios row 0 [1.5, 1.1] -> per token -min(r, 1.2) = [-1.2, -1.1], sum -2.3;
    row 1 [0.5, 1.0] with A < 0 -> -min(-r, -max(r, 0.8)) = [0.8, 1.0], sum 1.8. Clipped: tokens 0 and 2 of 4."""
    policy = torch.log(torch.tensor([[1.5, 1.1], [0.5, 1.0]]))
    losses, m = rloo_loss(
        policy, torch.zeros(2, 2), torch.tensor([1.0, -1.0]), torch.ones(2, 2), clip_eps=0.2
    )
    assert_close(losses, torch.tensor([-2.3, 1.8]), rtol=0, atol=1e-6)
    assert m["clip_fraction"].item() == pytest.approx(0.5)


def test_on_policy_gradient_is_reinforce_with_the_leave_one_out_baseline():
    """With old == policy the gradient of the loss w.r.t. a completion's token log-probs is -A_i on each token:
    the REINFORCE estimator -A_i grad log pi(y_i | x) of the whole sequence."""
    logps = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], requires_grad=True)
    adv = torch.tensor([0.4, -0.4])
    losses, _ = rloo_loss(logps, logps.detach(), adv, torch.tensor([[1, 1], [1, 0]]))
    losses.sum().backward()
    assert_close(logps.grad, torch.tensor([[-0.4, -0.4], [0.4, 0.0]]), rtol=0, atol=1e-6)


def test_each_completion_weighs_the_same_whatever_its_length():
    """The loss is summed over a completion's tokens and the loop divides by completions: splitting a batch into
    micro-batches gives the same step loss."""
    from posttrain.algorithms.rloo import loss_units

    torch.manual_seed(1)
    logps, mask = torch.randn(4, 5), (torch.rand(4, 5) > 0.3).long()
    adv = torch.randn(4)
    whole, _ = rloo_loss(logps, logps, adv, mask)
    parts = [
        rloo_loss(logps[i : i + 2], logps[i : i + 2], adv[i : i + 2], mask[i : i + 2])[0] for i in (0, 2)
    ]
    units = sum(loss_units({"completion_mask": mask[i : i + 2]}, None) for i in (0, 2))
    assert units == loss_units({"completion_mask": mask}, None)
    assert_close(torch.cat(parts).sum() / units, whole.sum() / units, rtol=0, atol=1e-6)
    # the loop's divisor counts completions, not tokens: lengths 5, 1, 3 and an empty row are 3 units (a token
    # count, 9, would weigh the 5-token completion five times the 1-token one)
    ragged = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
    assert loss_units({"completion_mask": ragged}, None) == 3.0
    # on-policy, each completion's loss is -A x its token count and each of its tokens' gradient is -A
    on = torch.zeros(4, 5, requires_grad=True)
    loss, _ = rloo_loss(on, on.detach(), torch.tensor([2.0, -1.0, 0.5, 3.0]), ragged)
    assert loss.tolist() == [-10.0, 1.0, -1.5, 0.0]
    loss.sum().backward()
    assert on.grad.tolist() == (torch.tensor([-2.0, 1.0, -0.5, 0.0])[:, None] * ragged).tolist()
