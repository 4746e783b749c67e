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
    train_noun: str = "line"
    """What `train_lines` number: file lines, or ``"row"`` numbers where rows share a line (`schema.places`)."""

    def longest_rows(self, limit: int, new_tokens: int = 0, *, evaluation: bool = False) -> list[int]:
        """The file lines (by position when unknown, as for the evaluation examples) of the training examples, or
        with `evaluation` the evaluation examples, whose sequence is longer than `limit` tokens: a row's tokens
        (each example of a packed row: positions restart per example), a pair's prompt and longer response, a
        prompt and the `new_tokens` sampled after it."""
        over, items = [], (self.eval or []) if evaluation else self.train
        known = self.train_lines is not None and not evaluation
        for i, item in enumerate(items):
            examples = item if isinstance(item, list | tuple) else [item]  # a packed row holds several
            lines = self.train_lines[i] if known else (i + 1,) * len(examples)
            over += [line for line, example in zip(lines, examples, strict=True) if _tokens(example, new_tokens) > limit]
        return over


def _tokens(example: Any, new_tokens: int) -> int:
    """The most tokens `example` puts in one sequence (`Rendered`, `RenderedPair` or `PromptExample`)."""
    if hasattr(example, "chosen_ids"):
        return len(example.prompt_ids) + max(len(example.chosen_ids), len(example.rejected_ids))
    if hasattr(example, "prompt_ids"):
        return len(example.prompt_ids) + new_tokens
    return len(example.input_ids)
