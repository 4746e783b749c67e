"""Truncated completions (`rollout.overlong`): the fixed reward and DAPO's soft overlong punishment worked out by
hand, what each treatment does to a small rollout, and that a filtered row leaves the GRPO loss of the others
exactly as it was."""

from types import SimpleNamespace

import pytest
import torch

from posttrain.algorithms.grpo import grpo_loss, grpo_loss_units
from posttrain.rewards.overlong import (
    OVERLONG,
    drop_from_loss,
    fixed_overlong_reward,
    overlong_cache,
    soft_overlong_penalty,
)


def test_soft_overlong_penalty_by_hand():
    """DAPO eq. 13 with L_max = 10, L_cache = 5: free up to 5 tokens, then -1/5 per token, -1 at 10 and beyond."""
    got = soft_overlong_penalty(torch.arange(13), max_len=10, cache=5)
    expected = torch.tensor([0, 0, 0, 0, 0, 0, -0.2, -0.4, -0.6, -0.8, -1, -1, -1])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # L_cache = L_max: the penalty runs over the whole length, -|y| / L_max
    torch.testing.assert_close(
        soft_overlong_penalty(torch.tensor([0, 5, 10]), max_len=10, cache=10), torch.tensor([0.0, -0.5, -1.0])
    )
    for bad in (0, 11):
        with pytest.raises(ValueError, match="cache"):
            soft_overlong_penalty(torch.tensor([1]), max_len=10, cache=bad)


def test_fixed_overlong_reward_replaces_only_truncated_ones():
    got = fixed_overlong_reward(torch.tensor([0.3, 2.0, -4.0]), torch.tensor([True, False, True]), -0.5)
    torch.testing.assert_close(got, torch.tensor([-0.5, 2.0, -0.5]), rtol=0, atol=0)


def test_the_four_treatments_on_a_small_rollout():
    """Four completions, max_new_tokens 8, L_cache 4 (the penalty starts after 4 tokens): lengths 3 (finished),
    8 (truncated), 6 (finished), 8 (truncated); rewards 1, 1, 0, 0.
    fixed (-0.5): [1, -0.5, 0, -0.5]. soft: penalties 0, -1, (4 - 6) / 4 = -0.5, -1 -> [1, 0, -0.5, -1].
    filter: the rewards as scored; rows 1 and 3 carry no loss."""
    truncated, lengths = torch.tensor([False, True, False, True]), torch.tensor([3, 8, 6, 8])
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0])
    rc = SimpleNamespace(max_new_tokens=8, overlong_cache=4, overlong_reward=-0.5)
    expected = {
        "score": ([1.0, 1.0, 0.0, 0.0], [True] * 4),
        "fixed": ([1.0, -0.5, 0.0, -0.5], [True] * 4),
        "filter": ([1.0, 1.0, 0.0, 0.0], [True, False, True, False]),
        "soft": ([1.0, 0.0, -0.5, -1.0], [True] * 4),
    }
    assert sorted(OVERLONG) == sorted(expected)
    for name, (want_rewards, want_trains) in expected.items():
        got = OVERLONG[name].rewards(rewards, truncated, lengths, rc)
        torch.testing.assert_close(got, torch.tensor(want_rewards), rtol=0, atol=1e-6, msg=name)
        assert OVERLONG[name].trains(truncated).tolist() == want_trains, name


def test_overlong_cache_defaults_to_a_fifth_of_the_limit():
    # DAPO's setting: 4096 of 20480
    assert overlong_cache(SimpleNamespace(overlong_cache=None, max_new_tokens=20480)) == 4096
    assert overlong_cache(SimpleNamespace(overlong_cache=None, max_new_tokens=3)) == 1
    assert overlong_cache(SimpleNamespace(overlong_cache=7, max_new_tokens=64)) == 7


def test_overlong_cache_longer_than_the_limit_is_a_config_error():
    from posttrain.algorithms import load_config
    from posttrain.errors import ConfigError

    base = ["algorithm.name=grpo", "algorithm.rewards=[task]", "algorithm.rollout.max_new_tokens=32",
            "algorithm.rollout.overlong=soft"]
    cfg = load_config(None, [*base, "algorithm.rollout.overlong_cache=32"])
    assert cfg.algorithm.rollout.overlong_cache == 32
    with pytest.raises(ConfigError, match=r"overlong_cache \(33\) must be at most .*max_new_tokens \(32\)"):
        load_config(None, [*base, "algorithm.rollout.overlong_cache=33"])


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_a_filtered_row_is_no_loss_unit_and_leaves_the_others_loss_unchanged(loss_type):
    """Zeroing row 1's mask (overlong: filter) gives the loss of rows 0 and 2 alone, for every aggregation: the
    row adds no term and no unit (before, `grpo` and `dr_grpo` still counted it as a sequence)."""
    g = torch.Generator().manual_seed(0)
    policy, old = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    advantages = torch.tensor([1.0, -2.0, 0.5])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    filtered = drop_from_loss(mask, torch.tensor([True, False, True]))
    assert filtered.tolist() == [[1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 0, 0]]
    kept = [0, 2]
    got, _ = grpo_loss(policy, old, advantages, filtered, loss_type=loss_type, max_completion_length=4)
    want, _ = grpo_loss(
        policy[kept], old[kept], advantages[kept], mask[kept], loss_type=loss_type, max_completion_length=4
    )
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert grpo_loss_units(filtered, loss_type, 4) == grpo_loss_units(mask[kept], loss_type, 4)
