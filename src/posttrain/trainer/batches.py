"""The batch source for dataset-driven methods (SFT, reward models, DPO): examples -> per-step micro-batches.

A batch source is a function of the step it starts at, yielding for every optimisation step the list of
micro-batches this process must run. Because the order of examples is a pure function of (seed, epoch), a
resumed run asks for `source(start_step)` and sees exactly the batches the uninterrupted run would have seen:
that is how a checkpoint records its data position (the step number alone).

RL methods plug a rollout generator into the same loop instead; it has the same signature.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from posttrain.errors import ConfigError

StepBatches = list[dict[str, Any]]


@dataclass
class ExampleBatchSource:
    """Shuffled, sharded, micro-batched examples.

    Every step takes `batch_size` examples (over all processes); process `rank` takes every `world_size`-th of
    them and splits its share into micro-batches of `micro_batch_size`. The last incomplete batch of an epoch
    is dropped so that every step has the same size (and the same loss normaliser).
    """

    examples: Sequence[Any]
    collate: Callable[[list[Any]], dict[str, Any]]
    batch_size: int
    micro_batch_size: int
    seed: int = 0
    shuffle: bool = True
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        per_process = self.batch_size // self.world_size
        if self.batch_size % self.world_size:
            raise ConfigError(
                f"optim.batch_size ({self.batch_size}) must be a multiple of the number of processes "
                f"({self.world_size})"
            )
        if per_process % self.micro_batch_size:
            raise ConfigError(
                f"optim.micro_batch_size ({self.micro_batch_size}) must divide the per-process batch "
                f"({self.batch_size} / {self.world_size} processes = {per_process})"
            )
        if len(self.examples) < self.batch_size:
            raise ConfigError(
                f"the training data has {len(self.examples)} usable examples, fewer than optim.batch_size "
                f"({self.batch_size}); lower the batch size or add data"
            )

    @property
    def steps_per_epoch(self) -> int:
        return len(self.examples) // self.batch_size

    @property
    def accumulation_steps(self) -> int:
        return self.batch_size // (self.world_size * self.micro_batch_size)

    def order(self, epoch: int) -> list[int]:
        """Example indices of one epoch: a permutation that depends only on (seed, epoch)."""
        idx = list(range(len(self.examples)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(idx)
        return idx

    def step_indices(self, step: int) -> list[int]:
        """Indices of the examples this process uses at `step` (0-based)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        order = self.order(epoch)
        chunk = order[within * self.batch_size : (within + 1) * self.batch_size]
        return chunk[self.rank :: self.world_size]

    def __call__(self, start_step: int = 0) -> Iterator[StepBatches]:
        step = start_step
        while True:
            mine = self.step_indices(step)
            yield [
                self.collate([self.examples[i] for i in mine[j : j + self.micro_batch_size]])
                for j in range(0, len(mine), self.micro_batch_size)
            ]
            step += 1


def total_steps(max_steps: int | None, epochs: float, steps_per_epoch: int) -> int:
    """`max_steps` when given, else `epochs` passes rounded up.

    >>> total_steps(None, 1.5, 10), total_steps(7, 3.0, 10)
    (15, 7)
    """
    # round() first: 0.07 * 100 is 7.000000000000001 in floating point, which must not become 8 steps.
    return max_steps if max_steps is not None else max(1, math.ceil(round(epochs * steps_per_epoch, 9)))
