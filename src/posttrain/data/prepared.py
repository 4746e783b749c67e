"""`PreparedData`: a run's examples, read, validated and rendered before any model loads."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class PreparedData:
    """Training (and optional evaluation) examples, rendered and checked before any model loads."""

    train: Sequence[Any]
    collate: Callable[[list[Any]], dict[str, Any]]
    eval: Sequence[Any] | None = None
    notes: list[str] = field(default_factory=list)
    """Warnings for the start of the run (rows truncated to `data.max_length`, margins the run does not use)."""
    train_lines: Sequence[Sequence[int]] | None = None
    """For each training example, the lines of `data.train` it comes from (several for a packed row): how a run
    names the rows it does not train (`data.order.skipped_note`). None: examples are named by position."""
