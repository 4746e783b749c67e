"""Masked reductions shared by every loss: the one place where per-token terms become a number.

Every loss in `posttrain.algorithms` returns per-token or per-sequence terms unreduced; these functions reduce
them, and `kl_estimate` gives the per-token KL estimators that PPO, GRPO and diagnostics share.
Reduction is where the classic bugs live (gradient-accumulation scaling, length bias), so the trainer
never averages per micro-batch: a loss function returns a *sum* over its loss units (tokens for SFT) and the
loop divides once by the number of units in the whole accumulated, all-process batch (`normalise_loss`).

Letters: B batch, T tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `values` where `mask` is 1. Masked-out entries contribute exactly 0, even if they are inf/NaN.

    >>> masked_sum(torch.tensor([[1.0, 2.0], [float("nan"), 4.0]]), torch.tensor([[1, 1], [0, 1]]))
    tensor(7.)
    """
    # torch.where (not values * mask) so that a NaN or inf under a 0 mask cannot leak into the sum.
    zeroed = torch.where(mask.bool(), values, torch.zeros_like(values))
    return zeroed.sum() if dim is None else zeroed.sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` over `mask`; an all-masked row (or tensor) gives 0, not NaN.

    >>> masked_mean(torch.tensor([[1.0, 3.0], [5.0, 7.0]]), torch.tensor([[1, 1], [0, 0]]), dim=1)
    tensor([2., 0.])
    """
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


LOGP_GAP = "logp_gap_sampler_trainer"
"""The metric name under which GRPO and PPO log `logp_gap` every step (docs/rl.md)."""


def logp_gap(sampling_logps: torch.Tensor, trainer_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean |log pi_sampler(y_t) - log pi_trainer(y_t)| over the masked tokens (0-dim): the sampler/trainer gap.

    The sampler's log-probs of the tokens it drew, against the trainer's log-probs of the same tokens under the
    same weights and temperature. It is 0 up to float rounding (~1e-7 in float32; more in bf16 or with a
    different attention kernel) when both score the same distribution; a logits processor in the sampler, a
    dtype or kernel mismatch, or top-p < 1 shows here first. verl and OpenRLHF log the same diagnostic.

    >>> logp_gap(torch.tensor([[-1.0, -2.0, 5.0]]), torch.tensor([[-1.5, -1.0, 0.0]]), torch.tensor([[1, 1, 0]]))
    tensor(0.7500)
    """
    return masked_mean((sampling_logps - trainer_logps).abs(), mask)


def tis_weights(old_logps: torch.Tensor, sampling_logps: torch.Tensor, mask: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance weights (B, T), detached: min(pi_old(y_t) / pi_sampler(y_t), cap), 0 where masked.

    Yao et al. 2025 ("Your Efficient RL Framework Secretly Brings You Off-Policy RL Training", truncated importance
    sampling): when the engine that samples (vLLM) gives the tokens other probabilities than the trainer under the
    same weights, the samples come from pi_sampler, not from pi_old, and the policy gradient is off-policy. Each
    token's policy-gradient term is multiplied by this weight, the importance ratio of the trainer's old policy to
    the sampler, truncated at `cap` so that a token the sampler found far less likely than the trainer cannot blow
    up the gradient (bias traded for bounded variance). Constant for the gradient (detached); 1 where the two
    agree. old_logps: the trainer's log-probs under the sampling weights; sampling_logps: the engine's; (B, T).

    Worked example (cap 2): old - sampler = [0, ln 1.5, ln 4] on real tokens, a masked one -> [1, 1.5, 2, 0].

    >>> tis_weights(torch.log(torch.tensor([[1.0, 1.5, 4.0, 9.0]])), torch.zeros(1, 4), torch.tensor([[1, 1, 1, 0]]),
    ...             cap=2.0)
    tensor([[1.0000, 1.5000, 2.0000, 0.0000]])
    """
    keep = mask.bool()
    zero = torch.zeros_like(old_logps)
    # The log-ratio is zeroed on padding first and clamped at log(cap) before exp(): nothing can overflow.
    log_ratio = torch.where(keep, old_logps - sampling_logps, zero).clamp(max=math.log(cap))  # (B, T)
    return torch.where(keep, torch.exp(log_ratio), zero).detach()


def normalise_loss(loss_sum: torch.Tensor, total_units: int | float, world_size: int = 1) -> torch.Tensor:
    """Scale one micro-batch's summed loss so that accumulated, all-process gradients equal the full-batch mean.

    Gradients of the micro-batches are summed by accumulation and then *averaged* over processes by DDP, so
    each process multiplies by `world_size`: sum_p sum_m (world * s_pm / N) / world = (sum of all terms) / N.

    >>> normalise_loss(torch.tensor(6.0), total_units=12, world_size=2)
    tensor(1.)
    """
    return loss_sum * (world_size / max(float(total_units), 1.0))


# Per-token estimators of KL(pi || pi_ref) from tokens sampled from pi (Schulman 2020, "Approximating KL
# divergence", http://joschu.net/blog/kl-approx.html). Each is a function of log r = ref_logps - policy_logps:
#   k1 = -log r            unbiased, high variance, negative on many tokens
#   k2 = (log r)^2 / 2     biased (low bias when the policies are close), always >= 0
#   k3 = (r - 1) - log r   unbiased and always >= 0 (r - 1 is a control variate with mean 0)
def _k1(log_r: torch.Tensor) -> torch.Tensor:
    return -log_r


def _k2(log_r: torch.Tensor) -> torch.Tensor:
    return 0.5 * log_r.square()


def _k3(log_r: torch.Tensor) -> torch.Tensor:
    # expm1(x) - x rather than exp(x) - 1 - x: no cancellation when the policies are close (x ~ 0),
    # which is exactly where the estimate is used; exactly 0 when x == 0.
    return torch.expm1(log_r) - log_r


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"k1": _k1, "k2": _k2, "k3": _k3}


def kl_estimate(policy_logps: torch.Tensor, ref_logps: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) on tokens sampled from pi; same shape as the inputs, unreduced.

    policy_logps, ref_logps: log-probabilities of the sampled tokens, e.g. (B, T). With log r = ref - policy:
    k1 = policy - ref, k2 = (policy - ref)^2 / 2, k3 = exp(ref - policy) - (ref - policy) - 1 (Schulman 2020).

    Worked example (policy - ref = ln 2, so log r = -ln 2, r = 1/2):
    k1 = 0.6931, k2 = 0.2402, k3 = 1/2 - 1 + ln 2 = 0.1931.

    >>> pol, ref = torch.tensor([0.0]), torch.tensor([-0.6931472])
    >>> [round(kl_estimate(pol, ref, k).item(), 4) for k in ("k1", "k2", "k3")]
    [0.6931, 0.2402, 0.1931]
    """
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kind!r}; choose one of {sorted(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[kind](ref_logps - policy_logps)
