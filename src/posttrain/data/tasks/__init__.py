"""Built-in tasks: seeded row generators, each with the verifier that later issues reuse as a reward.

A task makes rows ``{"id", "prompt", "completion", "answer", "metadata"}`` (a valid SFT prompt/completion row;
``answer`` is what the verifier checks against) with ``make(n, seed, split)``; equal arguments give equal rows.
``split="heldout"`` rows use only wordings that ``split="train"`` never uses (and other random values), so
evaluation on them measures generalisation, not memorisation. ``verify(completion, answer)`` returns named
metrics (booleans or floats); ``score(completion, answer)`` is one float in [0, 1] (a reward).

Other data from the same rows: `make_pairs` writes preference rows whose chosen side is the task's own
completion and whose rejected side is written by ``rejected(row, kind, rng)``, one of `REJECTED_KINDS`
(``wrong``, ``off_format``, ``rambling``), always scored strictly lower by ``score``; `make_prompts` writes
``{"id", "prompt", "answer"}`` rows for RL and on-policy pairs; `make_perturbed` writes variants of rows for the
robustness probe of `posttrain diagnose` (tasks that are `Perturbable`: ``arithmetic``), each naming the row it
perturbs, its ``kind`` and its answer.

- ``arithmetic``: word problems with a numeric answer (`tasks/arithmetic.py`).
- ``structured``: extract a JSON object matching a schema from a short text, with normalisation rules learned
  from the demonstrations (`tasks/structured.py`); the quickstart demo.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from posttrain.data.tasks.arithmetic import Arithmetic
from posttrain.data.tasks.base import REJECTED_KINDS, SPLITS, task_rng
from posttrain.data.tasks.structured import Structured
from posttrain.files import write_whole


class Task(Protocol):
    """What every built-in task provides."""

    name: str
    metrics: tuple[str, ...]  # the keys of `verify`'s result

    def make(self, n: int, seed: int = 0, split: str = "train") -> list[dict]: ...

    def verify(self, completion: str, answer: Any) -> dict[str, bool | float]: ...

    def answer_problem(self, answer: Any) -> str | None: ...

    def score(self, completion: str, answer: Any) -> float: ...

    def rejected(self, row: dict, kind: str, rng: random.Random) -> str: ...


@runtime_checkable
class Perturbable(Protocol):
    """A task that writes variants of its own rows: ``perturb(row, kind, rng)`` -> a row ``{"id", "perturbs",
    "kind", "prompt", "answer", ...}`` (None for a row it cannot read), for each kind in `perturbations`."""

    perturbations: tuple[str, ...]

    def perturb(self, row: dict, kind: str, rng: random.Random) -> dict | None: ...


TASKS: dict[str, Task] = {"arithmetic": Arithmetic(), "structured": Structured()}


def answer_problems(task: Task, rows: list[dict], source: str, reader: str) -> list:
    """A `Problem` for each row whose `answer` the task's verifier cannot compare with (rows without one are the
    caller's to name); `reader` says what compares (e.g. "--task arithmetic")."""
    from posttrain.errors import Problem

    return [Problem(source, getattr(row, "line", None), "answer", f"{why}; {reader} compares answers with it")
            for row in rows if "answer" in row and (why := task.answer_problem(row["answer"]))]  # fmt: skip


def _task(task: str | Task) -> Task:
    if isinstance(task, str):
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; built-in tasks: {', '.join(sorted(TASKS))}")
        return TASKS[task]
    return task


def make_pairs(task: str | Task, n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """`n` preference rows ``{"id", "prompt", "chosen", "rejected", "answer", "rejected_kind", "metadata"}``.

    The prompts are those of ``make(n, seed, split)``; chosen is the task's correct, well-formatted completion;
    the rejected kinds are mixed evenly (a third each, shuffled by `seed`). `task` is a name in `TASKS` or a
    task object (e.g. ``Arithmetic(max_ops=5)``).

    >>> rows = make_pairs("arithmetic", 3)
    >>> sorted(r["rejected_kind"] for r in rows)
    ['off_format', 'rambling', 'wrong']
    """
    t = _task(task)
    rows = t.make(n, seed=seed, split=split)
    rng = task_rng(f"{t.name}-pairs", seed, split)  # its own stream: the prompts stay those of make()
    kinds = [REJECTED_KINDS[i % len(REJECTED_KINDS)] for i in range(n)]
    rng.shuffle(kinds)
    return [
        {"id": r["id"], "prompt": r["prompt"], "chosen": r["completion"], "rejected": t.rejected(r, kind, rng),
         "answer": r["answer"], "rejected_kind": kind, "metadata": r["metadata"]}
        for r, kind in zip(rows, kinds)
    ]  # fmt: skip


def make_prompts(task: str | Task, n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """`n` prompt rows ``{"id", "prompt", "answer", "metadata"}`` (the prompts of ``make(n, seed, split)``), for
    RL. ``metadata["task"]`` names the task, so the ``task`` reward needs no arguments.

    >>> row = make_prompts("structured", 1)[0]
    >>> sorted(row), row["metadata"]["task"]
    (['answer', 'id', 'metadata', 'prompt'], 'structured')
    """
    return [
        {"id": r["id"], "prompt": r["prompt"], "answer": r["answer"], "metadata": r["metadata"]}
        for r in _task(task).make(n, seed, split)
    ]


def make_perturbed(task: str | Task, rows: list[dict], seed: int = 0, kinds: tuple[str, ...] | None = None
                   ) -> list[dict]:  # fmt: skip
    """Every variant of each row (`kinds`, default all the task's), row by row; each variant's draws depend only
    on (task, `seed`, the row's id, the kind), so a variant stays the same whatever rows or kinds come with it.
    Rows whose prompt the task cannot read (not written by its ``make``) get no variant.

    >>> rows = TASKS["arithmetic"].make(2, seed=0, split="heldout")
    >>> [(v["perturbs"], v["kind"]) for v in make_perturbed("arithmetic", rows, kinds=("names", "noop"))][:3]
    [('arithmetic-heldout-0-0', 'names'), ('arithmetic-heldout-0-0', 'noop'), ('arithmetic-heldout-0-1', 'names')]
    """
    t = _task(task)
    if not isinstance(t, Perturbable):
        raise ValueError(f"task {t.name!r} makes no perturbed variants of its rows")
    unknown = sorted(set(kinds or ()) - set(t.perturbations))
    if unknown:
        raise ValueError(f"unknown perturbation {unknown[0]!r}; {t.name} makes: {', '.join(t.perturbations)}")
    out = []
    for row in rows:
        for kind in kinds or t.perturbations:
            variant = t.perturb(row, kind, random.Random(f"{t.name}:perturb:{seed}:{row['id']}:{kind}"))
            if variant is not None:
                out.append(variant)
    return out


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    """Write rows as JSON Lines (UTF-8, one object per line), creating parent folders, whole or not at all (a full
    disk left an empty or half file: `files.write_whole`); returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)

    def lines(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    write_whole(p, lines)
    return p


__all__ = [
    "REJECTED_KINDS",
    "SPLITS",
    "TASKS",
    "Arithmetic",
    "Perturbable",
    "Structured",
    "Task",
    "make_pairs",
    "make_perturbed",
    "make_prompts",
    "task_rng",
    "write_jsonl",
]
