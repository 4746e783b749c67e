"""Masked reductions shared by every loss: the one place where per-token terms become a number.

Every loss in `posttrain.algorithms` returns per-token or per-sequence terms unreduced; these functions reduce
them. Reduction is where the classic bugs live (gradient-accumulation scaling, length bias), so the trainer
never averages per micro-batch: a loss function returns a *sum* over its loss units (tokens for SFT) and the
loop divides once by the number of units in the whole accumulated, all-process batch (`normalise_loss`).

Letters: B batch, T tokens.
"""

from __future__ import annotations

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


def normalise_loss(loss_sum: torch.Tensor, total_units: int | float, world_size: int = 1) -> torch.Tensor:
    """Scale one micro-batch's summed loss so that accumulated, all-process gradients equal the full-batch mean.

    Gradients of the micro-batches are summed by accumulation and then *averaged* over processes by DDP, so
    each process multiplies by `world_size`: sum_p sum_m (world * s_pm / N) / world = (sum of all terms) / N.

    >>> normalise_loss(torch.tensor(6.0), total_units=12, world_size=2)
    tensor(1.)
    """
    return loss_sum * (world_size / max(float(total_units), 1.0))
