"""Truncated completions: what a completion that hit `max_new_tokens` with no EOS or stop string gets.

A truncated completion is not an answer the policy chose to give: its reward (a verifier finds no final answer; a
reward model would score an unfinished text) says little about its tokens, and treating it as finished teaches
the policy that stopping mid-sentence is an ending. `algorithm.rollout.overlong` picks one of the standard
treatments (`OVERLONG`), each a change to the rewards and to which rows carry loss:

    score    the scored rewards as they are (the default: the behaviour of earlier versions, and the right one
             when truncation is rare or a reward already handles it; rewards see a `truncated` column)
    fixed    the total reward of a truncated completion is replaced by a fixed value (`overlong_reward`,
             default -1): Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO", sec. on the
             EOS trick: completions without an EOS token get a fixed low score instead of the reward model's
    filter   truncated completions carry no loss (their completion mask is zeroed; they count in no loss
             unit); DAPO's overlong filtering, Yu et al. 2025 sec. 3.4. Their rewards stay in GRPO's group mean
             and std, as DAPO masks only the loss: the other completions' advantages are the same as under
             `score`, and `filter` differs from it exactly by the truncated completions' own gradient
    soft     DAPO's soft overlong punishment (Yu et al. 2025, eq. 13) added to every completion's reward
             (`soft_overlong_penalty`): 0 up to L_max - L_cache tokens, then linear down to -1 at L_max =
             `max_new_tokens` (L_cache = `overlong_cache`). A truncated completion has L_max tokens, so it gets
             -1; a finished one inside the last L_cache tokens pays part of it

This module is the math (pure functions of tensors) and the table; the rollout source (`rollout/source.py`)
applies it to the rewards, and each RL method drops the filtered rows from its loss (`drop_from_loss`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch


def fixed_overlong_reward(rewards: torch.Tensor, truncated: torch.Tensor, value: float) -> torch.Tensor:
    """(N,) rewards with every truncated completion's replaced by `value` (Huang et al. 2024).

    >>> fixed_overlong_reward(torch.tensor([0.5, 1.0, 2.0]), torch.tensor([False, True, False]), -1.0)
    tensor([ 0.5000, -1.0000,  2.0000])
    """
    return torch.where(truncated, torch.full_like(rewards, value), rewards)


def soft_overlong_penalty(lengths: torch.Tensor, max_len: int, cache: int) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), (N,) from completion lengths (N,) in tokens.

    R(y) = 0 when |y| <= L_max - L_cache;  (L_max - L_cache - |y|) / L_cache when L_max - L_cache < |y| <= L_max;
    -1 beyond L_max. Here L_max = `max_len`, L_cache = `cache`.

    Worked example (L_max = 20, L_cache = 4, so the penalty starts after 16 tokens): lengths 10, 16 -> 0;
    17 -> (16 - 17) / 4 = -0.25; 19 -> -0.75; 20 (the limit: a truncated completion) -> -1.

    >>> soft_overlong_penalty(torch.tensor([10, 16, 17, 19, 20]), max_len=20, cache=4)
    tensor([ 0.0000,  0.0000, -0.2500, -0.7500, -1.0000])
    """
    if not 0 < cache <= max_len:
        raise ValueError(f"need 0 < cache <= max_len, got cache={cache}, max_len={max_len}")
    return ((max_len - cache - lengths.float()) / cache).clamp(min=-1.0, max=0.0)


def overlong_cache(rollout_cfg) -> int:
    """L_cache of a run: `overlong_cache`, or a fifth of `max_new_tokens` (DAPO's 4096 of 20480), at least 1."""
    if rollout_cfg.overlong_cache is not None:
        return rollout_cfg.overlong_cache
    return max(1, rollout_cfg.max_new_tokens // 5)


class Overlong(NamedTuple):
    """One treatment: how rewards change, and which rows carry loss."""

    rewards: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, object], torch.Tensor]
    """rewards(rewards (N,), truncated (N,) bool, lengths (N,), rollout config) -> rewards (N,)."""
    trains: Callable[[torch.Tensor], torch.Tensor]
    """trains(truncated (N,) bool) -> (N,) bool: the completions whose tokens carry loss."""


def _same(rewards, truncated, lengths, rc):
    return rewards


def _fixed(rewards, truncated, lengths, rc):
    return fixed_overlong_reward(rewards, truncated, rc.overlong_reward)


def _soft(rewards, truncated, lengths, rc):
    return rewards + soft_overlong_penalty(lengths, rc.max_new_tokens, overlong_cache(rc))


def _every_row(truncated):
    return torch.ones_like(truncated, dtype=torch.bool)


def _finished_rows(truncated):
    return ~truncated


OVERLONG: dict[str, Overlong] = {
    "score": Overlong(_same, _every_row),
    "fixed": Overlong(_fixed, _every_row),
    "filter": Overlong(_same, _finished_rows),
    "soft": Overlong(_soft, _every_row),
}


def drop_from_loss(completion_mask: torch.Tensor, trains: torch.Tensor) -> torch.Tensor:
    """`completion_mask` (N, T) with the rows that carry no loss (`trains` (N,) False) zeroed.

    >>> drop_from_loss(torch.tensor([[0, 1, 1], [0, 1, 0]]), torch.tensor([True, False])).tolist()
    [[0, 1, 1], [0, 0, 0]]
    """
    return completion_mask * trains[:, None].to(completion_mask.dtype)
