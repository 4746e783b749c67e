"""How a dataset's examples are ordered and cut into optimisation steps, epoch by epoch: pure functions of counts.

The order of examples is a pure function of (seed, epoch) (`epoch_order`), so the step number alone fixes which
examples a step sees: that is how a checkpoint records its data position, and why a resumed run sees exactly the
batches the uninterrupted run would have. `plan_batches` cuts an epoch into steps (every example once; the last
step takes the remainder) and says which examples no step uses (`EpochPlan`, `skipped_note`); the rollout batch
source cuts epochs of prompts into rollouts the same way (`rollout.source.plan_rollouts`).

This module holds no data and runs no model.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from posttrain.errors import ConfigError


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """Example indices of one epoch: a permutation that depends only on (seed, epoch); identity without shuffle.

    >>> epoch_order(5, seed=0, epoch=0, shuffle=False)
    [0, 1, 2, 3, 4]
    >>> sorted(epoch_order(5, seed=0, epoch=1)) == [0, 1, 2, 3, 4]
    True
    """
    idx = list(range(n))
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(idx)
    return idx


@dataclass(frozen=True)
class EpochPlan:
    """How each epoch's examples are cut: into `units_per_epoch` chunks of `unit` examples (optimisation steps,
    or rollouts of `steps_per_unit` steps) taken in `epoch_order`; the last chunk may be smaller. The last
    `skipped` examples of each epoch's order are used by no chunk, for the reason in `reason`."""

    examples: int
    unit: int
    units_per_epoch: int
    steps_per_unit: int = 1
    skipped: int = 0
    reason: str = ""

    @property
    def steps_per_epoch(self) -> int:
        return self.units_per_epoch * self.steps_per_unit

    def skipped_indices(self, epoch: int, seed: int, shuffle: bool) -> list[int]:
        """The examples no step uses in `epoch` (0-based)."""
        return epoch_order(self.examples, seed, epoch, shuffle)[self.examples - self.skipped :]


def plan_batches(n: int, batch_size: int, world_size: int, micro_batch_size: int, *,
                 same_micro_batches: bool = False) -> EpochPlan:  # fmt: skip
    """Steps per epoch of `n` examples in steps of `batch_size` over `world_size` processes; refuses what cannot
    run. The remainder makes a smaller last step when every process gets at least one of its examples, and, with
    `same_micro_batches` (a sharded model: every forward is a collective, so every process must run as many), as
    many micro-batches as every other process.

    >>> plan_batches(20, 8, 1, 4).units_per_epoch, plan_batches(17, 8, 2, 4).skipped
    (3, 1)
    >>> plan_batches(19, 8, 2, 1).units_per_epoch, plan_batches(19, 8, 2, 1, same_micro_batches=True).skipped
    (3, 3)
    """
    per_process = batch_size // world_size
    if batch_size % world_size:
        raise ConfigError(
            f"optim.batch_size ({batch_size}) must be a multiple of the number of processes ({world_size})"
        )
    if per_process % micro_batch_size:
        raise ConfigError(
            f"optim.micro_batch_size ({micro_batch_size}) must divide the per-process batch "
            f"({batch_size} / {world_size} processes = {per_process})"
        )
    if n < batch_size:
        raise ConfigError(
            f"the training data has {n} usable examples, fewer than optim.batch_size ({batch_size}); lower the "
            "batch size or add data"
        )
    full, rest = divmod(n, batch_size)
    if rest and rest < world_size:
        why = (
            f"after {full} steps of optim.batch_size={batch_size}, the {rest} left cannot be split over "
            f"{world_size} processes"
        )
        return EpochPlan(n, batch_size, full, skipped=rest, reason=why)
    # process r takes every world_size-th example of the step from the r-th: ceil or floor of rest / world_size
    most, fewest = -(-rest // world_size), rest // world_size
    if same_micro_batches and -(-most // micro_batch_size) != -(-fewest // micro_batch_size):
        why = (
            f"after {full} steps of optim.batch_size={batch_size}, the {rest} left would give the processes "
            f"different numbers of micro-batches of {micro_batch_size}, and a sharded model (run.sharding=fsdp2 "
            "or DeepSpeed ZeRO-3) needs every process to run as many forward passes"
        )
        return EpochPlan(n, batch_size, full, skipped=rest, reason=why)
    return EpochPlan(n, batch_size, full + (rest > 0))


def plan_examples(cfg, n: int, world_size: int, micro_batch_size: int) -> EpochPlan:
    """`plan_batches` for a run config: the plan of `ExampleBatchSource` (SFT, reward, DPO)."""
    return plan_batches(n, cfg.optim.batch_size, world_size, micro_batch_size,
                        same_micro_batches=cfg.run.collective_forwards)  # fmt: skip


def skipped_note(plan: EpochPlan, *, source: str, lines: Sequence[Sequence[int]] | None, seed: int,
                 shuffle: bool, total_steps: int, shown_epochs: int = 3, shown_rows: int = 5,
                 line_noun: str = "line") -> str | None:  # fmt: skip
    """One line for the start of a run: how many examples no step uses in each epoch the run completes, and which
    (the file lines they come from, per epoch; `lines[i]` are example i's lines, several for a packed row).
    None when nothing is skipped."""
    epochs = total_steps // plan.steps_per_epoch  # a run that stops mid-epoch skips nothing of that epoch
    if not plan.skipped or not epochs:
        return None

    def which(epoch: int) -> str:
        picked = plan.skipped_indices(epoch, seed, shuffle)
        if lines is None:
            found, label = sorted(i + 1 for i in picked), "example"
        else:
            found, label = sorted(line for i in picked for line in lines[i]), line_noun
        label += "s" if len(found) > 1 else ""
        more = f" and {len(found) - shown_rows} more" if len(found) > shown_rows else ""
        return f"{label} {', '.join(map(str, found[:shown_rows]))}{more}"

    if shuffle and epochs > 1:
        listed = "; ".join(f"epoch {e + 1}: {which(e)}" for e in range(min(epochs, shown_epochs)))
        if epochs > shown_epochs:
            listed += f"; ... ({epochs} epochs in all, other rows each epoch: data.shuffle is true)"
    else:
        listed = which(0) + (f" (the same in all {epochs} epochs)" if epochs > 1 else "")
    return (
        f"{source}: {plan.skipped} of {plan.examples} examples are not trained in each epoch ({plan.reason}): "
        f"{listed}"
    )


def short_run_note(plan: EpochPlan, *, source: str, total_steps: int, stop: str, seed: int, shuffle: bool,
                   lines: Sequence[Sequence[int]] | None = None, noun: str = "examples",
                   shown_rows: int = 5, line_noun: str = "line") -> str | None:  # fmt: skip
    """One line for the start of a run that ends inside its first epoch (`stop`: the setting that ends it, e.g.
    ``run.max_steps=50``): how many rows it never uses, and which: the file lines they come from (`lines[i]`:
    example i's lines, several for a packed row), else their positions (`noun`: RL's are prompts). None when it
    uses them all. A chunk started is a chunk used (an RL run stopping inside a rollout has sampled all of its
    prompts).

    >>> plan = plan_batches(10, 4, 1, 4)
    >>> short_run_note(plan, source="t.jsonl", total_steps=2, stop="run.max_steps=2", seed=0, shuffle=False,
    ...                lines=[(i + 1,) for i in range(10)])
    't.jsonl: run.max_steps=2 ends the run 2 steps into its first epoch of 3: 2 of its 10 rows are never used (lines 9, 10)'
    >>> short_run_note(plan, source="t.jsonl", total_steps=3, stop="run.max_steps=3", seed=0, shuffle=True) is None
    True
    """
    if total_steps >= plan.steps_per_epoch:
        return None
    used = min(-(-total_steps // plan.steps_per_unit) * plan.unit, plan.examples - plan.skipped)
    if used >= plan.examples:
        return None
    unused = epoch_order(plan.examples, seed, 0, shuffle)[used:]
    if lines is None:
        found, total, label, what = sorted(i + 1 for i in unused), plan.examples, noun.rstrip("s"), noun
    else:
        found, total, label, what = sorted(x for i in unused for x in lines[i]), sum(map(len, lines)), line_noun, "rows"
    more = f" and {len(found) - shown_rows} more" if len(found) > shown_rows else ""
    drawn = ", drawn by data.shuffle" if shuffle else ""
    return (
        f"{source}: {stop} ends the run {total_steps} steps into its first epoch of {plan.steps_per_epoch}: "
        f"{len(found)} of its {total} {what} are never used ({label}{'s' if len(found) > 1 else ''} "
        f"{', '.join(map(str, found[:shown_rows]))}{more}{drawn})"
    )


def total_steps(max_steps: int | None, epochs: float, steps_per_epoch: int) -> int:
    """`max_steps` when given, else `epochs` passes rounded up.

    >>> total_steps(None, 1.5, 10), total_steps(7, 3.0, 10)
    (15, 7)
    """
    # round() first: 0.07 * 100 is 7.000000000000001 in floating point, which must not become 8 steps.
    return max_steps if max_steps is not None else max(1, math.ceil(round(epochs * steps_per_epoch, 9)))
