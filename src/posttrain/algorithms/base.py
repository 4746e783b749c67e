"""What a training method declares, and the types it shares with the machinery that runs it.

A method is one module in `algorithms/` that defines `Config` (its `algorithm:` section) and `ALGORITHM`, an
`Algorithm`: how its data is prepared, its loss function and loss units, and what else it needs, declared as
fields rather than as code elsewhere that names it:

- `head`: the model it trains is a causal LM with a scalar head (`"reward"`: a reward model's score, `"value"`: PPO's
  value function) instead of a plain causal LM;
- `reference`: how it holds the frozen reference policy its loss compares with (DPO's three ways, none for SFT);
- `rollouts`: an RL method's part in the rollout batch source (what it makes of a scored rollout), None for the
  methods that learn from a fixed dataset.

`train` builds the batch source, the reference and the model from these; the one training loop
(`trainer.loop`) then takes `Step`s from the `BatchSource` and calls `loss_fn`. This module also holds the types
rollouts travel in (`Rollout`, `ScoredRollout`, `RolloutContext`), so that an RL method's `process` and the
rollout engine share them without importing each other.

Letters: N sequences (prompts x samples), P prompt tokens (left-padded), C completion tokens (right-padded).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Protocol

import torch

from posttrain.config import AlgorithmSection

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


@dataclass
class Step:
    """One optimisation step's work for this process: its micro-batches, and the metrics that describe the step
    as a whole (a rollout's reward means, its generation time), which the loop logs as they are instead of
    summing and dividing them by the loss units like `loss_fn`'s metrics. A step may have no micro-batch (every
    sequence of a rollout dropped): it trains nothing and only logs."""

    micro_batches: list[Batch]
    metrics: dict[str, float] = field(default_factory=dict)
    skipped_units: float = 0.0
    """Loss units of this step's rows that were left untrained because their gradient is exactly 0
    (`ZERO_GRADIENT`): the loop adds them to the step's normaliser, so the update is the one training them would
    give."""
    skipped_rows: int = 0
    """How many rows were left untrained so. A step with no micro-batch but skipped rows (even rows with no loss
    units: completions an `overlong: filter` took out of the loss) is a zero-gradient step: the optimiser still
    steps, as it would have after training them."""


class BatchSource(Protocol):
    """Where the loop's steps come from: a dataset (`trainer.batches.ExampleBatchSource`) or rollouts
    (`rollout.source.RolloutSource`)."""

    steps_per_epoch: int
    """Optimisation steps in one pass over the data: the step number is the data position."""

    def steps(self, start_step: int = 0) -> Iterator[Step]:
        """Every step from `start_step` (0-based) on, the same ones whether the run started there or resumed."""
        ...

    def state_dict(self) -> dict:
        """What a checkpoint must keep besides the weights and the step (JSON-able; {} for none)."""
        ...

    def load_state_dict(self, state: dict) -> None: ...

    def process_state(self, step: int) -> dict:
        """What this process alone holds that a checkpoint taken after `step` must keep to go on exactly (tensors
        and objects, pickled by every process beside its random state; {} for none): a rollout in progress."""
        ...

    def load_process_state(self, state: dict) -> None: ...


# ---------------------------------------------------------------------------------------------------------------
# Rollouts: what the engine samples, what the rewards make of it, what an RL method's `process` receives.


@dataclass
class Rollout:
    """N sampled completions, `n` contiguous ones per prompt (prompt 0's samples first)."""

    prompt_ids: torch.Tensor  # (N, P) left-padded
    prompt_mask: torch.Tensor  # (N, P) 1 on real prompt tokens
    completion_ids: torch.Tensor  # (N, C) right-padded
    completion_mask: torch.Tensor  # (N, C) 1 up to and including the EOS token or the end of a stop string
    sampling_logps: torch.Tensor  # (N, C) log-prob of each sampled token under the sampler (temperature-scaled)
    texts: list[str]  # decoded completions (no special tokens, cut before a stop string)
    truncated: torch.Tensor  # (N,) bool: hit max_new_tokens without an EOS or a stop string

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)


@dataclass
class ScoredRollout:
    """A rollout with its rewards, as the rollout source hands it to an RL method's `process`."""

    rollout: Rollout
    examples: list[Any]  # `data.prompts.PromptExample`, one per sequence (repeated G times)
    rewards: torch.Tensor  # (N,) weighted total, after the `rollout.overlong` treatment
    metrics: dict[str, float]
    trains: torch.Tensor  # (N,) bool: the sequences that carry loss (`overlong: filter` drops truncated ones)


ZERO_GRADIENT = "zero_gradient"
"""The rollout column (N,) bool that an RL method's `process` sets on the rows whose gradient is exactly 0 (their
advantage is 0 and the loss has no other term, or no token of theirs carries loss; `algorithms.rl.mark_zero_gradient`).
The rollout source runs no forward or backward for them and counts their loss units in the step's normaliser
(`Step.skipped_units`): the loss and the update are those of training every row."""


@dataclass
class RolloutContext:
    """What an RL method's `process` may use besides the scored rollout (built once by `posttrain.train`)."""

    cfg: Any
    model: torch.nn.Module  # the trained module (the policy, or the policy with PPO's value head), unwrapped
    accelerator: Any
    micro_batch_size: int
    reference: Any  # `models.reference.Reference`: the frozen policy's log-probs
    state: Any = None  # the method's own state across rollouts (`Rollouts.state`), e.g. PPO's KL controller
    skips_zero_gradient: bool = False  # the source can leave `ZERO_GRADIENT` rows untrained (one process, no DeepSpeed)


def sequence_tensors(r: Rollout) -> dict[str, torch.Tensor]:
    """Prompt and completion side by side, (N, P + C), with the positions `generate` used.

    `completion_mask` here is full width (0 over the prompt), aligned with `input_ids`: 1 on the tokens the
    policy generated, the ones the RL losses score. `sampling_logps` too (0 over the prompt): the sampler's
    log-probs, for the sampler/trainer gap (`common.logp_gap`).
    """
    input_ids = torch.cat([r.prompt_ids, r.completion_ids], dim=1)
    attention_mask = torch.cat([r.prompt_mask, r.completion_mask], dim=1)
    # Left-padded prompts: positions count real tokens only, as generate computed them for the KV cache.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    completion_mask = torch.cat([torch.zeros_like(r.prompt_mask), r.completion_mask], dim=1)
    prompt_zeros = torch.zeros_like(r.prompt_mask, dtype=torch.float32)
    sampling_logps = torch.cat([prompt_zeros, r.sampling_logps], dim=1)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "completion_mask": completion_mask,
        "sampling_logps": sampling_logps,
    }


# process(scored, ctx) -> (tensors with a leading N dimension, extra step metrics)
Process = Callable[[ScoredRollout, RolloutContext], tuple[dict[str, torch.Tensor], dict[str, float]]]


class Stateful(Protocol):
    """State a method keeps across rollouts, checkpointed with the batch source (PPO's KL coefficient)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass(frozen=True)
class Rollouts:
    """An RL method's part in the rollout batch source."""

    process: Process
    """Turns a scored rollout into training tensors with a leading N dimension (GRPO: group advantages and old
    log-probs; PPO: values, KL-shaped rewards, GAE), and extra step metrics."""
    state: Callable[[Any], Stateful | None] = lambda cfg: None
    """state(cfg): the method's state across rollouts, handed to `process` as `ctx.state` and checkpointed."""


# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Algorithm:
    name: str
    config: type[AlgorithmSection]
    """The method's `algorithm:` section (`name` fixed to `name`): its settings, their rules and its checks."""
    prepare: Callable[[Any, Any], Any]
    """prepare(cfg, tokenizer) -> `data.prepared.PreparedData`: read, validate and render the data (user errors
    surface here, before any model loads)."""
    loss_fn: LossFn
    """Returns a *sum* over loss units; the loop divides by the units of the whole step (see common.normalise_loss)."""
    loss_units: Callable[[Batch, Any], int | float]
    """loss_units(batch, cfg): loss units in a micro-batch (target tokens for SFT, pairs for DPO)."""
    head: Literal["reward", "value"] | None = None
    """The trained model carries a scalar head (`models.heads.ScalarHeadModel` of this kind), saved beside it."""
    reference: Callable[[Any], str] = lambda cfg: "none"
    """reference(cfg): how the frozen reference is held, `models.reference.MODES` ("none": the loss needs none)."""
    rollouts: Rollouts | None = None
    """An RL method's part in the rollout batch source; None: the batches come from `PreparedData.train`."""
    evaluates: bool = True
    """Whether `loss_fn` on `PreparedData.eval` batches is meaningful (false for RL: no fixed eval batches)."""
    key_metric: str | None = None
    """The metric that says how training goes, beside the loss: in the progress bar and the end-of-run summary
    (DPO's reward accuracy, a reward model's accuracy, GRPO/PPO's mean total reward)."""

