"""The batch source for dataset-driven methods (SFT, reward models, DPO): examples -> per-step micro-batches.

`ExampleBatchSource.steps(start_step)` yields, for every optimisation step from `start_step` on, the `Step` this
process runs (its micro-batches). The cut of each epoch into steps is `data.order.plan_batches`: every example is
used once per epoch, the last step takes the remainder and is smaller. The loop divides each step's loss by that
step's own loss units, so a smaller step is still an exact mean over its examples. Because the order is a pure
function of (seed, epoch), a resumed run sees exactly the batches the uninterrupted run would have seen.

`WithReference` adds the frozen reference's per-token log-probs to every micro-batch of a source (DPO).

RL methods plug a rollout source into the same loop instead (`rollout.source.RolloutSource`), with the same
interface (`algorithms.base.BatchSource`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from posttrain.algorithms.base import BatchSource, Step
from posttrain.data.order import epoch_order, plan_batches
from posttrain.models.reference import Reference


@dataclass
class ExampleBatchSource:
    """Shuffled, sharded, micro-batched examples.

    Every step takes `batch_size` examples (over all processes); process `rank` takes every `world_size`-th of
    them and splits its share into micro-batches of `micro_batch_size`. The last step of an epoch takes what is
    left and is smaller (see `data.order.plan_batches` for the one case where a remainder is skipped).
    """

    examples: Sequence[Any]
    collate: Callable[[list[Any]], dict[str, Any]]
    batch_size: int
    micro_batch_size: int
    seed: int = 0
    shuffle: bool = True
    rank: int = 0
    world_size: int = 1
    same_micro_batches: bool = False  # a sharded model's run (`plan_batches`)

    def __post_init__(self) -> None:
        self.plan = plan_batches(len(self.examples), self.batch_size, self.world_size, self.micro_batch_size,
                                 same_micro_batches=self.same_micro_batches)  # fmt: skip

    @property
    def steps_per_epoch(self) -> int:
        return self.plan.steps_per_epoch

    def order(self, epoch: int) -> list[int]:
        """Example indices of one epoch: a permutation that depends only on (seed, epoch)."""
        return epoch_order(len(self.examples), self.seed, epoch, self.shuffle)

    def step_indices(self, step: int) -> list[int]:
        """Indices of the examples this process uses at `step` (0-based)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        order = self.order(epoch)
        chunk = order[within * self.batch_size : (within + 1) * self.batch_size]  # the last one may be shorter
        return chunk[self.rank :: self.world_size]

    def steps(self, start_step: int = 0) -> Iterator[Step]:
        step = start_step
        while True:
            mine = self.step_indices(step)
            yield Step([
                self.collate([self.examples[i] for i in mine[j : j + self.micro_batch_size]])
                for j in range(0, len(mine), self.micro_batch_size)
            ])  # fmt: skip
            step += 1

    def state_dict(self) -> dict:
        return {}  # the step is the data position

    def load_state_dict(self, state: dict) -> None:
        pass

    def process_state(self, step: int) -> dict:
        return {}

    def load_process_state(self, state: dict) -> None:
        pass


@dataclass
class WithReference:
    """Another batch source's steps, each micro-batch with the reference's log-probs of its `target_key`
    positions as `ref_logps` (B, T): computed (the adapter disabled, or the frozen copy) or looked up
    (precomputed), before the step's policy forward."""

    inner: BatchSource
    reference: Reference
    target_key: str
    chunk: int

    @property
    def steps_per_epoch(self) -> int:
        return self.inner.steps_per_epoch

    def add(self, batch: dict[str, Any]) -> dict[str, Any]:
        batch["ref_logps"] = self.reference.logps(batch, self.target_key, chunk=self.chunk)
        return batch

    def steps(self, start_step: int = 0) -> Iterator[Step]:
        for step in self.inner.steps(start_step):
            yield Step([self.add(b) for b in step.micro_batches], step.metrics, step.skipped_units, step.skipped_rows)

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)

    def process_state(self, step: int) -> dict:
        return self.inner.process_state(step)

    def load_process_state(self, state: dict) -> None:
        self.inner.load_process_state(state)
