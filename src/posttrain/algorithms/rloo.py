"""RLOO: REINFORCE with a leave-one-out baseline, k samples per prompt, no value model.

Ahmadian et al. 2024 ("Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback
in LLMs", sec. 3.3) treat a whole completion as one action. Each prompt gets k completions; completion i's
baseline is the mean reward of the other k - 1 (`leave_one_out_advantages`), an unbiased estimate of the
prompt's expected reward that does not include the sample itself:

    A_i = r_i - 1/(k-1) sum_{j != i} r_j  =  k/(k-1) (r_i - mean(r))

The reward of a completion is its score minus beta times its KL to the reference, summed over its tokens
(`kl_penalised_scores`: the sequence-level KL penalty of RLHF, Ziegler et al. 2019; in RLOO the penalty enters
the reward, not the loss). The loss is REINFORCE on the sequence log-probability, -A_i log pi(y_i | x), with
PPO's clipped ratio per token (Schulman et al. 2017, eq. 7; PPO's own `ppo_policy_loss`) so that a rollout may feed several optimisation
steps (`rloo_loss`); on-policy the ratio is 1 and it is the plain REINFORCE gradient. Each completion weighs
the same whatever its length: the per-token terms are summed over the completion, and the loss units are
completions.

How it differs from GRPO (`algorithms/grpo.py`): no division by the group std, a leave-one-out rather than an
including mean, the KL in the reward rather than a k3 term in the loss, and a sum over a completion's tokens
rather than a mean.

The math is pure functions of tensors at the top; below, the glue to the shared loop. Letters: B completions
(prompts x k), k samples per prompt, T tokens.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from posttrain.algorithms import rl
from posttrain.algorithms.base import (
    Algorithm,
    RolloutContext,
    Rollouts,
    ScoredRollout,
    sequence_tensors,
)
from posttrain.algorithms.common import LOGP_GAP, masked_mean, masked_sum
from posttrain.algorithms.grpo import uniform_groups
from posttrain.algorithms.ppo import ppo_policy_loss
from posttrain.config import DROPOUT_KEPT, SEVERAL_STEPS, RLSection
from posttrain.config_rules import When, is_, is_not
from posttrain.models.logprobs import chunked_token_logps
from posttrain.rewards.overlong import drop_from_loss


class Config(RLSection):
    """`algorithm: {name: rloo, ...}`: REINFORCE with a leave-one-out baseline (docs/rl.md)."""

    name: Literal["rloo"] = "rloo"
    """RLOO: k completions per prompt, each one's baseline the mean reward of the other k - 1."""
    num_generations: int = Field(4, ge=2)
    """k: completions per prompt (Ahmadian et al. 2024 used k = 2 and 4)."""
    beta: float = Field(0.05, ge=0)
    """KL penalty: beta x the completion's log pi/pi_ref (summed over its tokens) is taken off its reward. 0 needs
    no reference."""
    clip_eps: float = Field(0.2, gt=0, lt=1)
    """Clip of the per-token importance ratio, for rollouts that feed several optimisation steps (on-policy the
    ratio is 1 and nothing is clipped)."""

    skip_zero_advantage: bool = True
    """At beta 0, run no forward or backward for completions whose advantage is exactly 0 (every completion of
    a prompt whose k rewards are equal): their gradient is exactly 0 and they still count as loss units, so the
    loss and the update are the same, for less compute. The loss forward's metrics (entropy, ratio_mean, clip
    fraction, the sampler/trainer gap) then cover the trained completions only (`skipped_fraction`: how many were
    skipped). One process without DeepSpeed only; false trains every completion."""

    run_fields: ClassVar[frozenset[str]] = frozenset({"data.share_prompt"})
    rules: ClassVar[dict[str, When]] = {
        **RLSection.rules,
        # at beta > 0 the old log-probs come from a forward of their own (the KL term's), where kept dropout differs
        "clip_eps": (SEVERAL_STEPS | (is_not("algorithm.beta", 0.0) & DROPOUT_KEPT)).because(SEVERAL_STEPS.advice),
        "skip_zero_advantage": is_("algorithm.beta", 0.0).because(
            "With beta > 0 the KL penalty is in every completion's reward, so no advantage is exactly 0 by design."
        ),
    }

    def group_size(self) -> int:
        return self.num_generations


# ---------------------------------------------------------------------------------------------------------------
# The math.


def leave_one_out_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """Each completion's reward minus the mean reward of the other k - 1 completions of its prompt. (B,) -> (B,)

    rewards come prompt by prompt, k contiguous samples each. Equal rewards within a prompt give exactly 0.

    Worked example (k = 3): rewards [3, 0, 0]: A_0 = 3 - (0 + 0)/2 = 3, A_1 = 0 - (3 + 0)/2 = -1.5, A_2 = -1.5
    (= 3/2 x (r - 1)); k = 2, rewards [1, 0]: [1, -1].

    >>> leave_one_out_advantages(torch.tensor([3.0, 0.0, 0.0, 1.0, 0.0, 0.5]), k=3)
    tensor([ 3.0000, -1.5000, -1.5000,  0.7500, -0.7500,  0.0000])
    """
    if k < 2 or rewards.shape[0] % k:
        raise ValueError(f"{rewards.shape[0]} rewards are not whole groups of k = {k} >= 2 samples")
    grouped = rewards.view(-1, k)  # (B/k, k)
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / (k - 1)  # (B/k, k): the mean of the other k - 1
    advantages = grouped - others
    # A prompt whose k rewards are all equal carries no signal: 0 exactly, not the float rounding of r - r.
    tied = grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)  # (B/k, 1)
    return advantages.masked_fill(tied, 0.0).view(-1)


def kl_penalised_scores(
    scores: torch.Tensor,
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float,
) -> torch.Tensor:
    """(B,) rewards: score - beta x sum over the completion of (log pi - log pi_ref), the sequence's log-ratio.

    Worked example (beta = 0.1): score 1, log-ratios [0.5, 1.5] on two real tokens and one padded -> 1 - 0.2 = 0.8.

    >>> kl_penalised_scores(torch.tensor([1.0]), torch.tensor([[0.5, 1.5, 9.0]]), torch.zeros(1, 3),
    ...                     torch.tensor([[1, 1, 0]]), beta=0.1)
    tensor([0.8000])
    """
    return scores - beta * masked_sum(policy_logps - ref_logps, mask, dim=1)


def rloo_loss(
    policy_logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float = 0.2,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-completion loss (B,): PPO's clipped policy loss (`ppo.ppo_policy_loss`) of every token with its
    completion's advantage, times its truncated importance weight when `is_weights` (B, T) is given
    (`common.tis_weights`), summed over the completion's tokens; and its detached token-mean metrics
    (clip_fraction, approx_kl) with ratio_mean.

    On-policy (policy == old) each completion's loss is -A_i x (its number of tokens), and its gradient is
    -A_i grad log pi(y_i | x): REINFORCE with the baseline inside A_i.

    Worked example (on-policy): A = [2, -1], masks [1, 1 | 1, 0] -> [-2 - 2, 1] = [-4, 1].

    >>> loss, m = rloo_loss(torch.zeros(2, 2), torch.zeros(2, 2), torch.tensor([2.0, -1.0]),
    ...                     torch.tensor([[1, 1], [1, 0]]))
    >>> loss, m["ratio_mean"]
    (tensor([-4.,  1.]), tensor(1.))
    """
    per_token, metrics = ppo_policy_loss(policy_logps, old_logps, advantages[:, None].expand_as(policy_logps), mask,
                                         clip_eps=clip_eps, is_weights=is_weights)  # fmt: skip
    log_ratio = torch.where(mask.bool(), policy_logps - old_logps, torch.zeros_like(policy_logps))  # (B, T)
    metrics["ratio_mean"] = masked_mean(torch.exp(log_ratio), mask).detach()
    return per_token.sum(dim=1), metrics


# ---------------------------------------------------------------------------------------------------------------
# On the shared loop: prompts -> rollouts (k completions per prompt) -> `_process`: the KL-penalised rewards and
# leave-one-out advantages, old log-probs -> rloo_loss on the policy.


def _process(scored: ScoredRollout, ctx: RolloutContext) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Scores -> KL-penalised rewards -> leave-one-out advantages; the old log-probs the loss and the KL need."""
    cfg = ctx.cfg
    a, rc = cfg.algorithm, cfg.algorithm.rollout
    tensors = sequence_tensors(scored.rollout)
    rl.mark_groups(cfg, tensors, a.num_generations)  # a group's rows share their prompt's forward
    mask = tensors["completion_mask"]
    extra: dict[str, float] = {}
    rewards = scored.rewards
    # The old log-probs (the policy that sampled, before any update): the KL penalty needs them, and so does a
    # rollout that feeds several steps. A one-step rollout without penalty takes them from its loss forward.
    def old_logps(t):
        return chunked_token_logps(ctx.model, t, "completion_mask", ctx.micro_batch_size, temperature=rc.temperature)

    if a.beta > 0:  # every completion's old and reference log-probs: the penalty is in every reward
        tensors["old_logps"] = old = old_logps(tensors)
        ref = ctx.reference.logps(tensors, "completion_mask", chunk=ctx.micro_batch_size,
                                  temperature=rc.temperature)  # fmt: skip
        rewards = kl_penalised_scores(rewards, old, ref, mask, beta=a.beta)
        extra["kl"] = float(masked_sum(old - ref, mask, dim=1).mean())  # nats per completion
    tensors["advantages"] = leave_one_out_advantages(rewards, a.num_generations)
    tensors["completion_mask"] = drop_from_loss(mask, scored.trains)  # overlong: filter
    # At beta 0 a completion with advantage 0 has a zero gradient: not trained, its old log-probs not computed.
    rl.mark_zero_gradient(tensors, ctx, exact=a.beta == 0.0 and a.skip_zero_advantage)
    if a.beta == 0 and a.steps_per_rollout(cfg.optim.batch_size) > 1:
        tensors["old_logps"] = rl.trained_rows_logps(old_logps, tensors)
    # the gap over the tokens that carry loss, of the rows that train; none when no row trains
    if "old_logps" in tensors and (gap := rl.trained_logp_gap(tensors)) is not None:
        extra[LOGP_GAP] = gap
    extra["penalised_reward_mean"] = float(rewards.mean())
    # groups whose rewards (before any KL penalty) are all equal: no reward signal, as GRPO logs it
    extra["uniform_group_fraction"] = float(uniform_groups(scored.rewards, a.num_generations).float().mean())
    return tensors, extra


def loss_units(batch, cfg) -> float:
    """Completions that carry loss: each one weighs the same, whatever its length."""
    return float((batch["completion_mask"].sum(-1) > 0).sum())


def loss_fn(model, batch, cfg) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """rloo_loss summed over the micro-batch's completions (the loop divides by the step's completions)."""
    rc = cfg.algorithm.rollout
    logps, entropy, old = rl.policy_logps(model, batch, rc.temperature)
    weights, tis_metrics = rl.tis(batch, old, rc.tis_cap)
    losses, metrics = rloo_loss(logps, old, batch["advantages"], batch["completion_mask"],
                                clip_eps=cfg.algorithm.clip_eps, is_weights=weights)  # fmt: skip
    return losses.sum(), rl.step_token_means({**metrics, **tis_metrics}, batch, logps, entropy)


ALGORITHM = Algorithm(
    name="rloo",
    config=Config,
    prepare=rl.prepare,
    loss_fn=loss_fn,
    loss_units=loss_units,
    reference=lambda cfg: rl.reference_mode(cfg, cfg.algorithm.beta > 0),
    rollouts=Rollouts(process=_process),
    evaluates=False,
    key_metric="reward/total_mean",
)
