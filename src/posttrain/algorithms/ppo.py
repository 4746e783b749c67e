"""PPO for language models: per-token rewards with a KL penalty, GAE, the clipped policy and value losses.

The RLHF recipe of Ziegler et al. 2019 and Ouyang et al. 2022 (InstructGPT): each completion token is an
action; the reward model's scalar score arrives at the last token and every token pays a KL penalty against
the reference policy (`kl_penalty_rewards`); advantages come from generalised advantage estimation
(Schulman et al. 2016, `gae`); the policy minimises the clipped surrogate (Schulman et al. 2017, eq. 7,
`ppo_policy_loss`) and the value head a clipped regression to the returns (`value_loss`); the KL coefficient
may adapt to a target (Ziegler et al. 2019 sec. 2.2, `AdaptiveKLController`).

All per-token tensors are (B, T) over completion tokens, right-padded, with `mask` 1 on real tokens; terms
come back unreduced and 0 where masked, for the caller to reduce with `common.masked_sum`/`masked_mean`.
This section is the math only: no model, rollout, config or I/O.

Letters: B batch (completions), T completion tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import Field

from posttrain.algorithms import rl
from posttrain.algorithms.base import (
    Algorithm,
    Mean,
    RolloutContext,
    Rollouts,
    ScoredRollout,
    sequence_tensors,
)
from posttrain.algorithms.common import LOGP_GAP, kl_estimate, masked_mean, masked_sum
from posttrain.config import SEVERAL_STEPS_OR_DROPOUT, RLSection
from posttrain.config_rules import When, is_, is_not
from posttrain.models.heads import language_model
from posttrain.models.logprobs import (
    gather_logps,
    head_logps,
    no_grad_chunks,
    scatter,
    target_positions,
    unwrap_parallel,
)
from posttrain.models.sharding import gathers_in_forward
from posttrain.rewards.overlong import drop_from_loss


class Config(RLSection):
    """`algorithm: {name: ppo, ...}`: PPO with a value head, GAE and a KL penalty (docs/rl.md)."""

    name: Literal["ppo"] = "ppo"
    """PPO: one completion per prompt, per-token KL-shaped rewards, GAE advantages from a value head."""
    kl_coef: float = Field(0.05, ge=0)
    """Initial per-token KL penalty coefficient folded into the rewards."""
    adaptive_kl: bool = False
    """Adapt kl_coef towards `target_kl` (Ziegler et al. 2019)."""
    target_kl: float = Field(6.0, gt=0)
    """Target KL (nats per sequence) of the adaptive controller."""
    kl_horizon: int = Field(10000, gt=0)
    """Horizon of the adaptive controller, in samples."""
    gamma: float = Field(1.0, gt=0, le=1)
    """Discount."""
    lam: float = Field(0.95, ge=0, le=1)
    """GAE lambda."""
    clip_eps: float = Field(0.2, gt=0, lt=1)
    """Policy ratio clip."""
    clip_eps_value: float = Field(0.2, gt=0)
    """Value clip around the rollout's values. Finite (.inf is refused): 1e9 turns the clip off."""
    vf_coef: float = Field(0.1, ge=0)
    """Weight of the value loss."""
    whiten_advantages: bool = True
    """Normalise advantages over the rollout batch."""

    run_fields: ClassVar[frozenset[str]] = frozenset({"optim.head_lr"})
    # At vf_coef 0 the value head gets no gradient: it keeps its zero start, and its learning rate moves nothing.
    run_rules: ClassVar[dict[str, When]] = {"optim.head_lr": is_not("algorithm.vf_coef", 0.0)}
    rules: ClassVar[dict[str, When]] = {
        **RLSection.rules,
        "clip_eps": SEVERAL_STEPS_OR_DROPOUT,
        "clip_eps_value": (SEVERAL_STEPS_OR_DROPOUT & is_not("algorithm.vf_coef", 0.0)).because(
            "The values are clipped around the rollout's own, which only a second step on the same rollout moves "
            "away from, and only while vf_coef trains the value head."
        ),
        "target_kl": is_("algorithm.adaptive_kl", True),
        "kl_horizon": is_("algorithm.adaptive_kl", True),
    }

    def check(self, run) -> None:
        super().check(run)
        if self.adaptive_kl and self.kl_coef == 0:
            raise ValueError(
                "algorithm.adaptive_kl multiplies algorithm.kl_coef by a factor near 1 each rollout, so a "
                "coefficient that starts at 0 stays 0 and the controller never acts; set algorithm.kl_coef > 0 "
                "(e.g. 0.05) or algorithm.adaptive_kl=false"
            )


def _zero_masked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # torch.where, not values * mask: padding may hold inf/NaN (e.g. log-probs of pad tokens), and
    # where's backward sends exactly 0 (never 0 * inf = NaN) to masked entries.
    return torch.where(mask.bool(), values, torch.zeros_like(values))


@torch.no_grad()
def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16): (advantages, returns), both (B, T).

    delta_t = r_t + gamma V_{t+1} - V_t;  A_t = delta_t + gamma lam A_{t+1};  returns R_t = A_t + V_t.
    The value after a row's last real token is 0 (the episode ends there). Masked positions are 0 in both
    outputs. A 0 inside a row is treated as an episode boundary, so pass right-padded masks. Computed without
    gradient: advantages and returns are targets, never differentiated through.

    Worked example (gamma = 1, lam = 0.5; rewards [0, 0, 1], values [0.5, 0.5, 0.5]):
    deltas [0, 0, 0.5]; A_2 = 0.5, A_1 = 0 + 0.5 * 0.5 = 0.25, A_0 = 0 + 0.5 * 0.25 = 0.125;
    returns = A + V = [0.625, 0.75, 1.0].

    >>> adv, ret = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.full((1, 3), 0.5), torch.ones(1, 3), lam=0.5)
    >>> adv, ret
    (tensor([[0.1250, 0.2500, 0.5000]]), tensor([[0.6250, 0.7500, 1.0000]]))
    """
    rewards, values = _zero_masked(rewards, mask), _zero_masked(values, mask)
    keep = mask.bool()
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)  # (B, T)
    next_value = rewards.new_zeros(B)  # (B,) V_{t+1}; 0 after the last real token
    next_advantage = rewards.new_zeros(B)  # (B,) A_{t+1}
    for t in reversed(range(T)):  # a loop over time is inherent to the recursion; it is vectorised over B
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        # A masked step ends the episode: what lies after it must not leak into the real token before it.
        next_advantage = torch.where(keep[:, t], advantage, torch.zeros_like(advantage))
        next_value = values[:, t]  # already 0 where masked
        advantages[:, t] = next_advantage
    returns = _zero_masked(advantages + values, mask)
    return advantages, returns


def whiten(
    values: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8,
    total: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Normalise `values` to zero mean and unit variance over the masked entries (B, T) -> (B, T), 0 where masked.

    The variance is the unbiased one (Bessel, divide by n - 1), as in the InstructGPT-era implementations.
    `shift_mean=False` only rescales, keeping the mean (used for rewards, whose sign carries meaning). `total`
    sums a tensor over every process (an all-reduce): the mean and variance are then those of the whole rollout,
    every process's entries, as one process computes them (each process whitened its own share: an audit).

    Worked example: [1, 2, 3] (a 4th entry masked) -> mean 2, unbiased var (1 + 0 + 1) / 2 = 1 -> [-1, 0, 1];
    [2, 4, 6] -> mean 4, var 4, std 2 -> [-1, 0, 1], or (x - 4) / 2 + 4 = [3, 4, 5] without shifting the mean.

    >>> whiten(torch.tensor([[1.0, 2.0, 3.0, 9.0]]), torch.tensor([[1, 1, 1, 0]]))
    tensor([[-1.,  0.,  1.,  0.]])
    """
    add = total or (lambda t: t)
    sums = add(torch.stack([masked_sum(values, mask), mask.sum().to(values.dtype)]))
    n = sums[1]
    mean = sums[0] / n.clamp(min=1)
    var = add(masked_sum((values - mean).square(), mask)[None])[0] / (n - 1).clamp(min=1)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _zero_masked(whitened, mask)


def kl_penalty_rewards(
    scores: torch.Tensor,
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_coef: float,
) -> torch.Tensor:
    """Per-token rewards (B, T): -kl_coef * (policy - ref) on every token, plus the score at the last real token.

    Ziegler et al. 2019 sec. 2, Ouyang et al. 2022 eq. 2: R(x, y) = r(x, y) - beta log(pi(y|x) / pi_ref(y|x)),
    spread over tokens with the k1 estimator (its sum over a sequence is exactly the sequence log-ratio).
    scores (B,) from the reward model; a fully masked row gets no score (it has no token to carry it).

    Worked example (kl_coef = 0.1, score 2, policy - ref = [0.5, -1.0] on 2 real tokens, 1 pad):
    [-0.05, 0.1 + 2, 0] = [-0.05, 2.1, 0].

    >>> kl_penalty_rewards(torch.tensor([2.0]), torch.tensor([[0.5, -1.0, 7.0]]), torch.zeros(1, 3),
    ...                    torch.tensor([[1, 1, 0]]), kl_coef=0.1)
    tensor([[-0.0500,  2.1000,  0.0000]])
    """
    keep = mask.bool()
    rewards = -kl_coef * _zero_masked(kl_estimate(policy_logps, ref_logps, "k1"), mask)  # (B, T)
    # The last real token: the one where the running count of real tokens reaches the row's total.
    count = keep.long().cumsum(dim=1)  # (B, T)
    last = keep & (count == count[:, -1:])  # (B, T), one True per non-empty row
    return rewards + torch.where(last, scores[:, None].to(rewards.dtype), torch.zeros_like(rewards))


def clipped_surrogate(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float,
    clip_high: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7) as a per-token loss, and where each clip binds.

    loss = -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A), r = exp(log_ratio); all (B, T).
    The clipped branch is the smaller one (so it is taken, with zero gradient) exactly when r > 1 + clip_high
    with A > 0 (`clipped_high`) or r < 1 - clip_low with A < 0 (`clipped_low`). Shared by PPO and GRPO.

    >>> loss, low, high = clipped_surrogate(torch.log(torch.tensor([1.5, 0.5])), torch.tensor([1.0, 1.0]), 0.2, 0.2)
    >>> loss, low, high
    (tensor([-1.2000, -0.5000]), tensor([False, False]), tensor([ True, False]))
    """
    ratio = torch.exp(log_ratio)
    clipped_ratio = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = -torch.minimum(ratio * advantages, clipped_ratio * advantages)
    clipped_low = (ratio < 1.0 - clip_low) & (advantages < 0)
    clipped_high = (ratio > 1.0 + clip_high) & (advantages > 0)
    return loss, clipped_low, clipped_high


def ppo_policy_loss(
    policy_logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float = 0.2,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token clipped policy loss (B, T), 0 where masked, and detached diagnostics; each token's loss times its
    truncated importance weight when `is_weights` (B, T) is given (`common.tis_weights`, Yao et al. 2025).

    metrics: `clip_fraction`, the share of real tokens whose clipped branch is taken (zero gradient);
    `approx_kl`, the mean over real tokens of the k3 estimate of KL(pi_old || pi): the tokens were sampled
    from pi_old, so k3 = (r - 1) - log r with r = pi / pi_old (Schulman 2020; the estimator cleanrl logs).
    Both are 0-dim tensors (no host sync in the step).

    Worked example (clip_eps = 0.2, A = 1): r = 1.1 -> loss -1.1 (inside the band); r = 1.5 -> loss -1.2
    (clipped); clip_fraction 1/2.

    >>> loss, m = ppo_policy_loss(torch.log(torch.tensor([[1.1, 1.5]])), torch.zeros(1, 2),
    ...                           torch.ones(1, 2), torch.ones(1, 2))
    >>> loss, m["clip_fraction"]
    (tensor([[-1.1000, -1.2000]]), tensor(0.5000))
    """
    log_ratio = _zero_masked(policy_logps - old_logps, mask)  # 0 on padding: exp() cannot overflow there
    loss, clipped_low, clipped_high = clipped_surrogate(log_ratio, advantages, clip_eps, clip_eps)
    if is_weights is not None:
        loss = loss * is_weights
    metrics = {
        "clip_fraction": masked_mean((clipped_low | clipped_high).float(), mask).detach(),
        "approx_kl": masked_mean(kl_estimate(old_logps, policy_logps, "k3"), mask).detach(),
    }
    return _zero_masked(loss, mask), metrics


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps_value: float = 0.2,
) -> torch.Tensor:
    """Per-token clipped value loss (B, T), 0 where masked: 0.5 max((v - R)^2, (v_clip - R)^2).

    v_clip = old + clip(v - old, -c, c) keeps the new value within c of the one used for the advantages
    (the PPO2 value clipping of the OpenAI baselines, used by Ziegler et al. 2019).

    Worked example (c = 0.2, old 0, R 1): v = 0.5 -> clipped v 0.2 -> 0.5 max(0.25, 0.64) = 0.32;
    v = 0.1 (inside) -> 0.5 * 0.81 = 0.405.

    >>> value_loss(torch.tensor([[0.5, 0.1]]), torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2))
    tensor([[0.3200, 0.4050]])
    """
    clipped = old_values + (values - old_values).clamp(-clip_eps_value, clip_eps_value)
    loss = 0.5 * torch.maximum((values - returns).square(), (clipped - returns).square())
    return _zero_masked(loss, mask)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var[R - v] / Var[R] over real tokens: 1 is a perfect value function, <= 0 no better than a constant.

    Population variances (the ratio does not depend on the choice). NaN when the returns are constant: the
    quantity is undefined there, and 0 or 1 would read as a real diagnostic. "Constant" means a spread below a
    millionth of their scale (Var[R] <= 1e-12 E[R^2]): returns computed as A + V carry float rounding, and a
    variance of rounding noise would otherwise give values like -1e13.

    Worked example (third token masked): R = [1, 3], Var[R] = 1; R - v = [0, 1], Var = 0.25 -> 0.75.

    >>> explained_variance(torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([[1.0, 3.0, 5.0]]), torch.tensor([[1, 1, 0]]))
    0.75
    """

    def var(x: torch.Tensor) -> torch.Tensor:
        return masked_mean((x - masked_mean(x, mask)).square(), mask)

    var_returns = var(returns).item()
    if var_returns <= 1e-12 * masked_mean(returns.square(), mask).item():
        return float("nan")
    return 1.0 - var(returns - values).item() / var_returns


@dataclass
class AdaptiveKLController:
    """Adapts the KL coefficient towards a target KL (Ziegler et al. 2019, sec. 2.2).

    e = clip((KL - target) / target, -0.2, 0.2);  beta <- beta * (1 + e * n_steps / horizon),
    the paper's K_beta = n_steps / horizon: the correction per step is proportional to the batch size.

    Worked example (value 0.1, target 6, horizon 10000): KL 9 over 1000 steps -> e = 0.5 clipped to 0.2 ->
    0.1 * (1 + 0.2 * 0.1) = 0.102.

    >>> ctl = AdaptiveKLController(value=0.1, target=6.0, horizon=10000)
    >>> round(ctl.update(current_kl=9.0, n_steps=1000), 6)
    0.102
    """

    value: float
    target: float
    horizon: float

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max((current_kl - self.target) / self.target, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict:
        """The coefficient reached: checkpointed, so a resumed run goes on from it, not from `ppo.kl_coef`."""
        return {"kl_coef": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["kl_coef"])


@dataclass
class FixedKLController:
    """A constant KL coefficient, with the same interface as `AdaptiveKLController`."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict:
        return {}  # nothing changes, so nothing to keep

    def load_state_dict(self, state: dict) -> None:
        pass


# ---------------------------------------------------------------------------------------------------------------
# On the shared loop: the policy carries a value head (`models.heads.ScalarHeadModel`, kind "value"); the rollout
# source samples, scores the completions with the reward functions (or a reward model), and turns scores into
# KL-shaped per-token rewards, GAE advantages and returns; `loss_fn` is the clipped policy loss plus the clipped
# value loss, averaged over completion tokens.


def _values_and_logps(model, batch: dict[str, torch.Tensor], temperature: float, with_entropy: bool = False):
    """One backbone pass: values (B, T) and completion-token log-probs (B, T), both aligned with input_ids; with
    `with_entropy`, also the policy's entropy (B, T) at those tokens (no gradient), as GRPO and RLOO log it.

    The value of the state before token t, V(s_t), is read at position t - 1, where token t is predicted.
    """
    target, keep = target_positions(batch["completion_mask"])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    targets = batch["input_ids"][target]  # (N,)
    policy = language_model(unwrap_parallel(model))  # the LM under the value head (and any DDP)
    if gathers_in_forward(policy):
        # FSDP2 and DeepSpeed ZeRO-3 gather the output layer only inside the LM's forward (`models.sharding`):
        # its logits come from that forward, all N rows at once, rather than from `head_logps` afterwards.
        values_sel, _, logits = model(**inputs, keep=keep, with_logits=True)  # (N,), (N, H), (N, V)
        picked, entropy = gather_logps(logits, targets, temperature=temperature, with_entropy=with_entropy)
    else:
        values_sel, hidden = model(**inputs, keep=keep)  # (N,), (N, H)
        picked, entropy = head_logps(policy, hidden, targets, temperature=temperature, with_entropy=with_entropy)
    out = scatter(values_sel, target), scatter(picked, target)
    return (*out, scatter(entropy, target)) if with_entropy else out


def _rollout_values_and_logps(ctx: RolloutContext, tensors: dict[str, torch.Tensor], temperature: float):
    """Values and log-probs (N, T) of a whole rollout under the current model, a micro-batch at a time, in eval
    mode (no dropout): the old values and old log-probs every later step is measured against."""
    return no_grad_chunks(lambda part: _values_and_logps(ctx.model, part, temperature), ctx.model, tensors,
                          ctx.micro_batch_size)  # fmt: skip


@torch.no_grad()
def _process(scored: ScoredRollout, ctx: RolloutContext) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Scores -> KL-shaped per-token rewards -> GAE advantages and returns, with the old values and log-probs."""
    p, rc, acc, controller = ctx.cfg.algorithm, ctx.cfg.algorithm.rollout, ctx.accelerator, ctx.state
    tensors = sequence_tensors(scored.rollout)
    values, old = _rollout_values_and_logps(ctx, tensors, rc.temperature)
    ref = (ctx.reference.logps(tensors, "completion_mask", chunk=ctx.micro_batch_size, temperature=rc.temperature)
           if ctx.reference.needed else old)  # fmt: skip
    mask = tensors["completion_mask"]
    # Per-token rewards and GAE over the completion columns only (the prompt is context, not actions).
    P = scored.rollout.prompt_ids.shape[1]
    cm = mask[:, P:]
    kl_coef = controller.value
    rewards = kl_penalty_rewards(scored.rewards, old[:, P:], ref[:, P:], cm, kl_coef=kl_coef)
    adv, returns = gae(rewards, values[:, P:], cm, gamma=p.gamma, lam=p.lam)
    if p.whiten_advantages:  # over the whole rollout: every process's completion tokens
        everywhere = (lambda t: acc.reduce(t.to(acc.device), reduction="sum").to(t.device)) \
            if acc.num_processes > 1 else None  # fmt: skip
        adv = whiten(adv, cm, total=everywhere)
    seq_kl = masked_sum(old[:, P:] - ref[:, P:], cm, dim=1)  # (N,) log pi/pi_ref of each completion
    # Every process must keep the same coefficient: update it from the KL over all of them. Sum and count, not a
    # mean of means: the last rollout of an epoch may give the processes different numbers of sequences.
    kl_and_count = torch.stack([seq_kl.sum(), seq_kl.new_tensor(float(seq_kl.shape[0]))]).to(acc.device)
    if acc.num_processes > 1:
        kl_and_count = acc.reduce(kl_and_count, reduction="sum")
    total_kl, count = (float(v) for v in kl_and_count)
    controller.update(total_kl / count, n_steps=int(count))
    pad = torch.zeros_like(mask[:, :P], dtype=torch.float32)
    tensors.update(
        old_logps=old,
        old_values=values,
        advantages=torch.cat([pad, adv], dim=1),
        returns=torch.cat([pad, returns], dim=1),
        # overlong: filter: truncated completions carry no loss (after GAE, whitening and the KL controller, which
        # see the whole rollout)
        completion_mask=drop_from_loss(mask, scored.trains),
    )
    extra = {
        "kl_coef": kl_coef,
        "kl": float(seq_kl.mean()),
        "score_mean": float(scored.rewards.mean()),
        "explained_variance": explained_variance(values[:, P:], returns, cm),
        "returns_mean": float(masked_mean(returns, cm)),
    }
    # old: the trainer's log-probs under the sampling weights (docs/rl.md); none logged when no token trains
    # (overlong: filter with every completion cut), where a gap of 0 would read as a perfect match
    if (gap := rl.trained_logp_gap(tensors)) is not None:
        extra[LOGP_GAP] = gap
    return tensors, extra


def kl_controller(cfg) -> AdaptiveKLController | FixedKLController:
    """The KL coefficient's controller of a run: its state across rollouts (`ctx.state`)."""
    p = cfg.algorithm
    if p.adaptive_kl:
        return AdaptiveKLController(value=p.kl_coef, target=p.target_kl, horizon=p.kl_horizon)
    return FixedKLController(value=p.kl_coef)


def loss_units(batch, cfg) -> float:
    """Completion tokens: PPO's losses are token means over the step."""
    return float(batch["completion_mask"].sum())


def loss_fn(model, batch, cfg) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    p, rc = cfg.algorithm, cfg.algorithm.rollout
    mask = batch["completion_mask"]
    values, logps, entropy = _values_and_logps(model, batch, rc.temperature, with_entropy=True)
    weights, tis_metrics = rl.tis(batch, batch["old_logps"], rc.tis_cap)
    pg, metrics = ppo_policy_loss(logps, batch["old_logps"], batch["advantages"], mask, clip_eps=p.clip_eps,
                                  is_weights=weights)  # fmt: skip
    vl = value_loss(values, batch["old_values"], batch["returns"], mask, clip_eps_value=p.clip_eps_value)
    units = mask.sum()
    pg_sum, vl_sum = masked_sum(pg, mask), masked_sum(vl, mask)
    # Token means over the step (`Mean`): a step with no token in the loss logs none of them, not a 0 that reads
    # as no clipping, no KL and a collapsed entropy.
    means = {"clip_fraction": metrics["clip_fraction"], "approx_kl": metrics["approx_kl"],
             "entropy": masked_mean(entropy, mask), **tis_metrics}  # fmt: skip
    return pg_sum + p.vf_coef * vl_sum, {
        "policy_loss": pg_sum.detach(),
        "value_loss": vl_sum.detach(),
        **{k: Mean(v.detach() * units, units) for k, v in means.items()},
    }


ALGORITHM = Algorithm(
    name="ppo",
    config=Config,
    prepare=rl.prepare,
    loss_fn=loss_fn,
    loss_units=loss_units,
    head="value",
    reference=lambda cfg: rl.reference_mode(cfg, cfg.algorithm.kl_coef > 0 or cfg.algorithm.adaptive_kl),
    rollouts=Rollouts(process=_process, state=kl_controller),
    evaluates=False,
    key_metric="reward/total_mean",
)
