"""What a training method gives the loop: prepared data, a loss function, and how to count its loss units.

Adding a method means one module in `algorithms/` that builds an `Algorithm`, registered in
`posttrain.algorithms.ALGORITHMS`; never a new trainer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

Batch = dict[str, Any]
# loss_fn(model, batch, cfg) -> (summed loss over the batch's loss units, metrics summed the same way)
LossFn = Callable[[torch.nn.Module, Batch, Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class PreparedData:
    """Training (and optional evaluation) examples, rendered and checked before any model loads."""

    train: Sequence[Any]
    collate: Callable[[list[Any]], Batch]
    eval: Sequence[Any] | None = None
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Algorithm:
    name: str
    prepare: Callable[[Any, Any], PreparedData]
    """prepare(cfg, tokenizer) -> PreparedData: read, validate and render the data (user errors surface here)."""
    loss_fn: LossFn
    """Returns a *sum* over loss units; the loop divides by the units of the whole step (see common.normalise_loss)."""
    loss_units: Callable[[Batch], int]
    """Number of loss units in a micro-batch (target tokens for SFT, pairs for DPO)."""
