"""What a training method gives the loop: prepared data, a batch source, a loss function, and its loss units.

Adding a method means one module in `algorithms/` that builds an `Algorithm`, registered in
`posttrain.algorithms.ALGORITHMS`; never a new trainer. Dataset methods (SFT, reward models, DPO) use the
default batch source, `trainer.batches.ExampleBatchSource`; RL methods (GRPO, PPO) give a `make_source` that
returns a rollout generator with the same signature. Methods that train something other than a plain causal LM
(a reward model's scalar head, PPO's value head) give `load_model` and `save_final`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch

from posttrain.config import AlgorithmSection
from posttrain.trainer.batches import EpochPlan, plan_examples

Batch = dict[str, Any]


class Mean(NamedTuple):
    """A metric that is a mean over its own units (e.g. a token mean of the entropy), not over the loss units.

    `loss_fn` returns the micro-batch's `total` (the sum over its units) and `count` (how many units); the loop
    sums both over every micro-batch and process of the step and logs total / count. So the logged value is the
    mean over the whole step, whatever the micro-batch size (a per-micro-batch mean weighted by loss units would
    not be: e.g. a token mean weighted by pairs)."""

    total: torch.Tensor | float
    count: torch.Tensor | float


# loss_fn(model, batch, cfg) -> (summed loss over the batch's loss units, metrics): a metric is either a tensor
# summed the same way as the loss (the loop divides it by the step's loss units) or a `Mean` with its own count.
LossFn = Callable[[torch.nn.Module, Batch, Any], tuple[torch.Tensor, dict[str, torch.Tensor | Mean]]]

STEP_METRICS = "step_metrics"
"""Batch key for metrics that describe a whole step (reward means, generation time): a dict of floats that the
loop logs as they are, instead of summing and dividing them by the loss units like `loss_fn`'s metrics."""


@dataclass
class PreparedData:
    """Training (and optional evaluation) examples, rendered and checked before any model loads."""

    train: Sequence[Any]
    collate: Callable[[list[Any]], Batch]
    eval: Sequence[Any] | None = None
    notes: list[str] = field(default_factory=list)
    train_lines: Sequence[Sequence[int]] | None = None
    """For each training example, the lines of `data.train` it comes from (several for a packed row): how a run
    names the rows it does not train (`trainer.batches.skipped_note`). None: examples are named by position."""


@dataclass
class SourceContext:
    """What a batch source may need once the model has loaded (all of it built by `posttrain.train`)."""

    cfg: Any
    data: PreparedData
    model: torch.nn.Module
    tokenizer: Any
    accelerator: Any
    run_dir: Path
    micro_batch_size: int


class BatchSource(Protocol):
    """For every optimisation step from `start_step` on, the list of micro-batches this process runs."""

    steps_per_epoch: int

    def __call__(self, start_step: int = 0) -> Iterator[list[Batch]]: ...


@dataclass(frozen=True)
class Algorithm:
    name: str
    config: type[AlgorithmSection]
    """The method's `algorithm:` section (`name` fixed to `name`): its settings, their rules and its checks."""
    prepare: Callable[[Any, Any], PreparedData]
    """prepare(cfg, tokenizer) -> PreparedData: read, validate and render the data (user errors surface here)."""
    loss_fn: LossFn
    """Returns a *sum* over loss units; the loop divides by the units of the whole step (see common.normalise_loss)."""
    loss_units: Callable[[Batch, Any], int | float]
    """loss_units(batch, cfg): loss units in a micro-batch (target tokens for SFT, pairs for DPO)."""
    plan: Callable[[Any, int, int, int], EpochPlan] = plan_examples
    """plan(cfg, n_examples, world_size, micro_batch_size) -> how each epoch is cut into steps, and which examples
    no step uses; raises `ConfigError` for what cannot run. Called before anything is written to the run folder,
    and must agree with the batch source's `steps_per_epoch`. Default: `ExampleBatchSource`'s."""
    make_source: Callable[[SourceContext], BatchSource] | None = None
    """Builds the batch source after the model loads (rollouts; DPO's reference log-probs). None: the default
    `ExampleBatchSource` over `PreparedData.train`, built before the model loads."""
    load_model: Callable[[Any, Any], torch.nn.Module] | None = None
    """load_model(cfg, device) -> the trainable module; None: `posttrain.models.load_model` (a causal LM)."""
    save_final: Callable[[torch.nn.Module, Any, Path, Any], None] | None = None
    """save_final(model, tokenizer, out_dir, cfg): write the final model; None: `posttrain.models.save_model`."""
    evaluates: bool = True
    """Whether `loss_fn` on `PreparedData.eval` batches is meaningful (false for RL: no fixed eval batches)."""
    key_metric: str | None = None
    """The metrics.jsonl key that says how training goes besides the loss (DPO: `reward_accuracy`; RL: the mean
    reward), shown in the progress bar and the end-of-run summary. None: the loss says it."""
