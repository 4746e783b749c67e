"""GRPO: group-relative advantages and the clipped policy loss, with the three ways to average it.

Group Relative Policy Optimisation (Shao et al. 2024, DeepSeekMath, sec. 4.1) samples G completions per
prompt, scores them, and uses the reward relative to the group as every token's advantage (no value model):
A_i = (r_i - mean(r)) / std(r) (`group_advantages`). The per-token loss is PPO's clipped surrogate (Schulman
et al. 2017) plus an optional k3 KL penalty against the reference policy (Schulman 2020), with DAPO's
asymmetric clip-higher (Yu et al. 2025, sec. 3.1). How per-token terms become one number is the main
difference between the published variants, and it sets a length bias (`AGGREGATIONS`):

    grpo     mean over each sequence's tokens, then mean over sequences (DeepSeekMath eq. 3). Each sequence
             weighs the same, so a token of a long completion weighs less: long wrong answers are penalised
             less per token than short ones, which lets wrong answers grow longer (Liu et al. 2025).
    dapo     sum over all tokens / number of completion tokens (Yu et al. 2025, DAPO, sec. 3.3).
             Every token weighs the same; the normaliser still depends on the batch's lengths.
    dr_grpo  sum over all tokens / (sequences x max_completion_length) (Liu et al. 2025, "Understanding
             R1-Zero-Like Training: A Critical Perspective", Dr. GRPO). A constant normaliser: no length
             bias at all, and the same scale whatever the lengths in the batch.

Liu et al. 2025 also drop the division by the group std (scale="none"): it up-weights prompts that are
nearly always solved or nearly always failed. `grpo_loss_units` gives each aggregation's denominator, so that
micro-batches accumulate to exactly the full-batch loss. This section is the math only: tensors in and out.

Letters: B batch (completions, B = number of prompts x G), G group size, T completion tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, Literal, NamedTuple

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
from posttrain.algorithms.common import LOGP_GAP, kl_estimate, masked_mean, masked_sum
from posttrain.algorithms.ppo import clipped_surrogate
from posttrain.config import SEVERAL_STEPS, RLSection
from posttrain.config_rules import When, is_
from posttrain.errors import ConfigError
from posttrain.models.logprobs import chunked_token_logps
from posttrain.rewards.overlong import drop_from_loss


class Config(RLSection):
    """`algorithm: {name: grpo, ...}`: group-relative policy optimisation (docs/rl.md)."""

    name: Literal["grpo"] = "grpo"
    """GRPO: G completions per prompt, rewards normalised within each group, no value model."""
    num_generations: int = Field(8, ge=2)
    """G: completions per prompt; advantages are normalised within each group of G."""
    loss_type: Literal["grpo", "dapo", "dr_grpo"] = "dapo"
    """Aggregation over tokens (see docs/rl.md on length bias): `grpo` per-sequence mean, `dapo` token mean,
    `dr_grpo` sum / (sequences x max_new_tokens)."""
    scale: Literal["group", "batch", "none"] = "group"
    """Divide advantages by the group std, the batch std, or nothing (Dr. GRPO)."""
    beta: float = Field(0.0, ge=0)
    """KL penalty (k3 estimator) to the reference; at 0 the loss needs no reference (see `log_kl`)."""
    clip_eps: float = Field(0.2, gt=0, lt=1)
    """Lower clip of the importance ratio: 1 - clip_eps."""
    clip_eps_high: float | None = Field(None, gt=0)
    """Upper clip (DAPO clip-higher): 1 + clip_eps_high; default clip_eps."""
    log_kl: bool | None = None
    """Log the KL to the reference (k3) when beta is 0 too, at the cost of one no-grad reference forward per
    rollout. null (default): on under lora/qlora (the reference is the adapter disabled: no extra memory), off
    under full fine-tuning (it would load a second full model only for a log line); true or false forces it.
    With beta > 0 the KL is always computed and logged (the loss needs it)."""
    drop_uniform_groups: bool = False
    """Drop groups whose rewards are all equal from the loss, their tokens from its normaliser too (as DAPO's
    dynamic sampling does, without resampling): the update changes. `skip_zero_advantage` keeps the update."""
    skip_zero_advantage: bool = True
    """At beta 0, run no forward or backward for completions whose advantage is exactly 0 (every completion of
    a group with equal rewards): their gradient is exactly 0, and their tokens still count in the loss's
    normaliser, so the loss and the update are the same as training them, for less compute. The metrics the loss
    forward makes (entropy, ratio_mean, clip fractions, kl, the sampler/trainer gap) then cover the trained
    completions only; `skipped_fraction` says how many were skipped. One process without DeepSpeed only (with
    several, every process must run as many forwards); false trains every completion."""

    run_fields: ClassVar[frozenset[str]] = frozenset({"data.share_prompt"})
    rules: ClassVar[dict[str, When]] = {
        **RLSection.rules,
        "clip_eps": SEVERAL_STEPS,
        "clip_eps_high": SEVERAL_STEPS,
        # only `batch` needs more than one group: `none` and `group` differ from the default over any rollout
        "scale": When(
            lambda cfg: cfg.algorithm.scale != "batch"
            or (cfg.algorithm.rollout.batch_size or cfg.optim.batch_size) > cfg.algorithm.num_generations,
            "algorithm.scale is not batch, or a rollout holds more than one prompt's group "
            "(algorithm.rollout.batch_size, or optim.batch_size without it, above algorithm.num_generations)",
            ("algorithm.rollout.batch_size", "optim.batch_size", "algorithm.num_generations"),
            advice="Over a single group the batch's standard deviation is the group's, so scale=batch is scale=group.",
        ),
        "log_kl": is_("algorithm.beta", 0.0).because(
            "With beta > 0 the KL penalty needs the reference forward, and its KL is always logged."
        ),
        "skip_zero_advantage": is_("algorithm.beta", 0.0).because(
            "With beta > 0 a completion with advantage 0 still has the KL penalty's gradient, so it always trains."
        ),
    }

    def group_size(self) -> int:
        return self.num_generations

    def check_launch(self, world_size: int) -> None:
        if self.drop_uniform_groups and world_size > 1:
            # Dropping leaves processes with different numbers of sequences, and one left with none would skip the
            # gradient all-reduce the others wait in.
            raise ConfigError(
                "algorithm.drop_uniform_groups is not supported with several processes yet; set it to false "
                "(uniform groups then train with zero advantage)"
            )


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) -> (B/G, G), checking that the batch is made of whole groups."""
    if group_size < 1 or rewards.shape[0] % group_size:
        raise ValueError(
            f"batch of {rewards.shape[0]} rewards is not a whole number of groups of {group_size}: "
            "rewards must come prompt by prompt, group_size samples each"
        )
    return rewards.view(-1, group_size)


def uniform_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B/G,) bool: True for the groups whose G rewards are all equal (zero advantage, no learning signal).

    DAPO's dynamic sampling (Yu et al. 2025, sec. 3.2) drops and resamples such groups.

    >>> uniform_groups(torch.tensor([1.0, 1.0, 0.0, 1.0]), group_size=2)
    tensor([ True, False])
    """
    grouped = _grouped(rewards, group_size)  # (B/G, G)
    return (grouped == grouped[:, :1]).all(dim=1)


def _std(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    # Unbiased (Bessel) std, like torch.std's default and the reference GRPO implementations, so that
    # advantages (and hence learning rates) are comparable with theirs; a single sample has std 0, not NaN.
    n = x.numel() if dim is None else x.shape[dim]
    return x.std(dim=dim, correction=1 if n > 1 else 0)


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    *,
    scale: str = "group",
    eps: float = 1e-4,
    batch_rewards: torch.Tensor | None = None,
) -> torch.Tensor:
    """Group-relative advantages (B,): reward minus its group's mean, optionally divided by a std.

    rewards (B,) ordered prompt by prompt, G = group_size contiguous samples each.
    scale: "group" divides by (the group's std + eps) (Shao et al. 2024); "batch" by (the std of all
    rewards of the batch + eps), a scale that is the same for every prompt; "none" does not divide (Liu et al.
    2025). `batch_rewards` is that batch when it is larger than `rewards` (every process's rewards of a rollout
    split over processes); default `rewards`.
    std is the unbiased one (see `_std`). A group of equal rewards gives exactly 0 (no rounding residue of
    r - mean(r), no NaN) for every scale. B not a multiple of G is a ValueError.

    Worked example (G = 2, scale "group"): rewards [1, 0 | 2, 2]: group 1 mean 0.5, std sqrt(0.5) = 0.7071
    -> +-0.5 / 0.7072 = +-0.7070; group 2 -> 0.

    >>> group_advantages(torch.tensor([1.0, 0.0, 2.0, 2.0]), group_size=2)
    tensor([ 0.7070, -0.7070,  0.0000,  0.0000])
    """
    if scale not in _SCALES:
        raise ValueError(f"unknown advantage scale {scale!r}; choose one of {sorted(_SCALES)}")
    grouped = _grouped(rewards, group_size)  # (B/G, G)
    centred = grouped - grouped.mean(dim=1, keepdim=True)  # (B/G, G)
    population = grouped if batch_rewards is None else batch_rewards
    advantages = centred / _SCALES[scale](grouped, population, eps)
    # Equal rewards must give exactly 0: mean() of equal floats can be off by an ulp.
    uniform = uniform_groups(rewards, group_size)[:, None]  # (B/G, 1)
    return torch.where(uniform, torch.zeros_like(advantages), advantages).view(-1)


# scale(grouped rewards (B/G, G), the batch's rewards, eps) -> the divisor
_SCALES: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "group": lambda grouped, batch, eps: _std(grouped, dim=1)[:, None] + eps,  # (B/G, 1)
    "batch": lambda grouped, batch, eps: _std(batch.reshape(-1)) + eps,  # scalar
    "none": lambda grouped, batch, eps: grouped.new_ones(()),
}


class Aggregation(NamedTuple):
    """How per-token losses become one number: total(per_token, mask) / units(mask, max_completion_length)."""

    total: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    """The sum over loss units (a sequence's mean, or a token)."""
    units: Callable[[torch.Tensor, int], torch.Tensor]
    """How many units the batch holds (0-dim tensor)."""


def _sequence_means(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return masked_mean(per_token, mask, dim=1).sum()  # an empty row's mean is 0, not NaN


def _token_sum(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return masked_sum(per_token, mask)


def _sequences(mask: torch.Tensor) -> torch.Tensor:
    # Sequences with at least one completion token: a row whose mask was zeroed (an overlong completion under
    # `rollout.overlong: filter`) carries no loss and is no loss unit.
    return mask.bool().any(dim=1).sum().float()


AGGREGATIONS: dict[str, Aggregation] = {
    "grpo": Aggregation(_sequence_means, lambda mask, L: _sequences(mask)),
    "dapo": Aggregation(_token_sum, lambda mask, L: mask.sum().float()),
    "dr_grpo": Aggregation(_token_sum, lambda mask, L: _sequences(mask) * L),
}


def _aggregation(loss_type: str, completion_mask: torch.Tensor, max_completion_length: int | None):
    if loss_type not in AGGREGATIONS:
        raise ValueError(f"unknown GRPO loss_type {loss_type!r}; choose one of {sorted(AGGREGATIONS)}")
    L = completion_mask.shape[1] if max_completion_length is None else max_completion_length
    if L < 1:
        raise ValueError(f"max_completion_length must be >= 1, got {max_completion_length}")
    return AGGREGATIONS[loss_type], L


def grpo_loss_units(
    completion_mask: torch.Tensor, loss_type: str, max_completion_length: int | None = None
) -> float:
    """The denominator of `loss_type`'s aggregation for this micro-batch: `grpo_loss(...)[0] * units` is a sum.

    grpo: sequences; dapo: completion tokens; dr_grpo: sequences x max_completion_length (default T). Summing
    loss * units over micro-batches and dividing by the units of the whole step gives the full-batch loss.
    For dr_grpo pass max_completion_length (the generation limit) when micro-batches are padded to different T.
    A sequence counts only if its mask has a token: a fully masked row (a filtered overlong completion) is none.

    >>> mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    >>> [grpo_loss_units(mask, k) for k in ("grpo", "dapo", "dr_grpo")]
    [2.0, 3.0, 6.0]
    >>> [grpo_loss_units(torch.tensor([[1, 1, 0], [0, 0, 0]]), k) for k in ("grpo", "dapo", "dr_grpo")]
    [1.0, 2.0, 3.0]
    """
    aggregation, L = _aggregation(loss_type, completion_mask, max_completion_length)
    return float(aggregation.units(completion_mask, L))


def grpo_loss(
    policy_logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss (0-dim) aggregated by `loss_type`, and detached 0-dim metrics.

    policy_logps, old_logps, ref_logps: (B, T) log-probabilities of the completion tokens; advantages (B,);
    completion_mask (B, T). Per token: -w min(r A, clip(r, 1 - clip_eps, 1 + clip_eps_high) A) + beta k3, with
    r = exp(policy - old), k3 = exp(ref - policy) - (ref - policy) - 1; clip_eps_high None means clip_eps;
    w the truncated importance weights `is_weights` (B, T) (`common.tis_weights`; None: 1), on the
    policy-gradient term only, as Yao et al. 2025 weight it (the KL penalty is to the reference, not a sample).
    beta != 0 needs ref_logps. Padding may hold any value (even inf/NaN): it never reaches loss or gradient.

    metrics: clip_fraction (= clip_fraction_low + clip_fraction_high: share of completion tokens whose
    clipped branch is taken, r < 1 - clip_eps with A < 0, or r > 1 + clip_eps_high with A > 0), kl (mean
    k3 over completion tokens, whenever ref_logps is given), ratio_mean.

    Worked example (on-policy, r = 1, "dapo"): A = [1, -1], masks [1, 1 | 1, 0] -> per-token [-1, -1 | 1]
    -> sum -1 over 3 tokens = -0.3333.

    >>> loss, _ = grpo_loss(torch.zeros(2, 2), torch.zeros(2, 2), torch.tensor([1.0, -1.0]),
    ...                     torch.tensor([[1, 1], [1, 0]]), loss_type="dapo")
    >>> loss
    tensor(-0.3333)
    """
    aggregation, L = _aggregation(loss_type, completion_mask, max_completion_length)
    if beta != 0.0 and ref_logps is None:
        raise ValueError("beta != 0 adds a KL penalty to the reference policy: ref_logps is required")
    keep = completion_mask.bool()
    zero = torch.zeros_like(policy_logps)
    # Zero padding first: exp() of garbage log-ratios could overflow, and inf * 0 gradients would be NaN.
    log_ratio = torch.where(keep, policy_logps - old_logps, zero)  # (B, T)
    clip_high = clip_eps if clip_eps_high is None else clip_eps_high
    per_token, clipped_low, clipped_high = clipped_surrogate(
        log_ratio, advantages[:, None], clip_eps, clip_high
    )
    metrics = {
        "clip_fraction_low": masked_mean(clipped_low.float(), completion_mask).detach(),
        "clip_fraction_high": masked_mean(clipped_high.float(), completion_mask).detach(),
        "ratio_mean": masked_mean(torch.exp(log_ratio), completion_mask).detach(),
    }
    metrics["clip_fraction"] = metrics["clip_fraction_low"] + metrics["clip_fraction_high"]
    if is_weights is not None:
        per_token = per_token * is_weights  # (B, T)
    if ref_logps is not None:
        k3 = kl_estimate(torch.where(keep, policy_logps, zero), torch.where(keep, ref_logps, zero), "k3")
        metrics["kl"] = masked_mean(k3, completion_mask).detach()
        if beta != 0.0:
            per_token = per_token + beta * k3  # (B, T)
    loss = aggregation.total(per_token, completion_mask) / aggregation.units(completion_mask, L).clamp(min=1)
    return loss, metrics


# ---------------------------------------------------------------------------------------------------------------
# On the shared loop: prompts -> rollouts (the rollout batch source samples and scores them) -> `process`:
# advantages, old and reference log-probs -> grpo_loss on the policy.


def _process(scored: ScoredRollout, ctx: RolloutContext) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Rewards -> group advantages; old and reference log-probs when the loss needs them."""
    cfg = ctx.cfg
    g, rc = cfg.algorithm, cfg.algorithm.rollout
    G = g.num_generations
    tensors = sequence_tensors(scored.rollout)
    rl.mark_groups(cfg, tensors, G)  # a group's rows share their prompt's forward
    batch_rewards = None
    acc = ctx.accelerator
    if g.scale == "batch" and acc.num_processes > 1:
        # The batch std is over the whole rollout, every process's share (each holds whole groups only). Shares may
        # differ in size (an epoch's last rollout, 3 prompts over 2 processes): gathered as objects, whatever their
        # lengths; a tensor gather of unequal lengths aborted the run in gloo (an audit).
        from accelerate.utils import gather_object

        batch_rewards = torch.tensor(gather_object(scored.rewards.tolist()), dtype=scored.rewards.dtype)
    # Advantages from every reward (overlong: filter keeps truncated completions in the group statistics, as DAPO
    # does); then the rows that carry no loss lose their mask, and with it their loss units.
    tensors["advantages"] = group_advantages(scored.rewards, G, scale=g.scale, batch_rewards=batch_rewards)
    tensors["completion_mask"] = drop_from_loss(tensors["completion_mask"], scored.trains)
    uniform = uniform_groups(scored.rewards, G)  # (N / G,)
    extra = {
        "uniform_group_fraction": float(uniform.float().mean()),
        "reward_std_in_group": float(scored.rewards.view(-1, G).std(-1, unbiased=False).mean()),
    }
    if g.drop_uniform_groups:
        keep = ~uniform.repeat_interleave(G)
        tensors = {k: v[keep] for k, v in tensors.items()}
    if tensors["input_ids"].shape[0] == 0:
        return tensors, extra
    # At beta 0 a row with advantage 0 has a zero gradient: it is not trained, nor are its old or reference
    # log-probs computed (`skip_zero_advantage`); its tokens still count in the loss's normaliser.
    rl.mark_zero_gradient(tensors, ctx, exact=g.beta == 0.0 and g.skip_zero_advantage)
    # A rollout that feeds more than one optimisation step (several passes, or a rollout larger than a step) is
    # off-policy after the first update: the sampler's log-probs must be fixed now, before any update. When it
    # feeds exactly one step the policy *is* the sampler, so the loss uses its own detached log-probs (ratio 1,
    # no extra forward).
    if g.steps_per_rollout(cfg.optim.batch_size) > 1:
        tensors["old_logps"] = rl.trained_rows_logps(
            lambda t: chunked_token_logps(ctx.model, t, "completion_mask", ctx.micro_batch_size,
                                          temperature=rc.temperature), tensors)  # fmt: skip
        # The trainer's log-probs under the sampling weights: the gap is measured here, once per rollout, on the
        # rows that train (the others' are 0); a rollout that trains none logs none.
        if (gap := rl.trained_logp_gap(tensors)) is not None:
            extra[LOGP_GAP] = gap
    if ctx.reference.needed:  # the penalty needs it, or the logged KL (`log_kl`): one no-grad forward
        tensors["ref_logps"] = rl.trained_rows_logps(
            lambda t: ctx.reference.logps(t, "completion_mask", chunk=ctx.micro_batch_size,
                                          temperature=rc.temperature), tensors)  # fmt: skip
    return tensors, extra


def logs_kl(cfg) -> bool:
    """Whether a run at beta 0 still computes the KL to the reference for the log (`log_kl`; null: only when the
    reference costs no second model, i.e. the adapter disabled under lora/qlora)."""
    log_kl = cfg.algorithm.log_kl
    return log_kl if log_kl is not None else cfg.technique.name in ("lora", "qlora")


def loss_units(batch, cfg) -> float:
    return grpo_loss_units(
        batch["completion_mask"], cfg.algorithm.loss_type, cfg.algorithm.rollout.max_new_tokens
    )


def loss_fn(model, batch, cfg) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """grpo_loss on one micro-batch, returned as a sum over its loss units (the loop divides once per step)."""
    g, rc = cfg.algorithm, cfg.algorithm.rollout
    logps, entropy, old = rl.policy_logps(model, batch, rc.temperature)
    weights, tis_metrics = rl.tis(batch, old, rc.tis_cap)
    loss, metrics = grpo_loss(
        logps,
        old,
        batch["advantages"],
        batch["completion_mask"],  # (B, T), full width: 0 over the prompt
        ref_logps=batch.get("ref_logps"),
        beta=g.beta,
        clip_eps=g.clip_eps,
        clip_eps_high=g.clip_eps_high,
        loss_type=g.loss_type,
        max_completion_length=rc.max_new_tokens,
        is_weights=weights,
    )
    # Every metric here is a mean over completion tokens: logged as a token mean over the whole step, not
    # weighted by the loss units, which are sequences under loss_type grpo.
    return loss * loss_units(batch, cfg), rl.step_token_means({**metrics, **tis_metrics}, batch, logps, entropy)


ALGORITHM = Algorithm(
    name="grpo",
    config=Config,
    prepare=rl.prepare,
    loss_fn=loss_fn,
    loss_units=loss_units,
    reference=lambda cfg: rl.reference_mode(cfg, cfg.algorithm.beta > 0 or logs_kl(cfg)),
    rollouts=Rollouts(process=_process),
    evaluates=False,
    key_metric="reward/total_mean",
)
