"""Built-in tasks: seeded row generators, each with the verifier that later issues reuse as a reward.

A task makes rows ``{"id", "prompt", "completion", "answer", "metadata"}`` (a valid SFT prompt/completion row;
``answer`` is what the verifier checks against) with ``make(n, seed, split)``; equal arguments give equal rows.
``split="heldout"`` rows use only wordings that ``split="train"`` never uses (and other random values), so
evaluation on them measures generalisation, not memorisation. ``verify(completion, answer)`` returns named
metrics (booleans or floats); ``score(completion, answer)`` is one float in [0, 1] (a reward).

- ``arithmetic``: word problems with a numeric answer (`tasks/arithmetic.py`).
- ``structured``: extract a JSON object matching a schema from a short text, with normalisation rules learned
  from the demonstrations (`tasks/structured.py`); the quickstart demo.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from posttrain.data.tasks.arithmetic import Arithmetic
from posttrain.data.tasks.base import SPLITS, task_rng
from posttrain.data.tasks.structured import Structured


class Task(Protocol):
    """What every built-in task provides."""

    name: str

    def make(self, n: int, seed: int = 0, split: str = "train") -> list[dict]: ...

    def verify(self, completion: str, answer: Any) -> dict[str, bool | float]: ...

    def score(self, completion: str, answer: Any) -> float: ...


TASKS: dict[str, Task] = {"arithmetic": Arithmetic(), "structured": Structured()}


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    """Write rows as JSON Lines (UTF-8, one object per line), creating parent folders; returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return p


__all__ = ["SPLITS", "TASKS", "Arithmetic", "Structured", "Task", "task_rng", "write_jsonl"]
