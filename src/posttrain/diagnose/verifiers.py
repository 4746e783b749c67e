"""What counts as a right answer in `posttrain diagnose`: a built-in task's verifier, reward functions, or a
trained reward model (a judge). There is no default: the user names one.

A `Verifier` turns (rows, completions) into one bool per completion:

- ``task``: the task's own score is 1 (every part right: ``correct`` for arithmetic, ``exact`` for structured),
  checked against the row's ``answer``;
- ``reward``: the weighted sum of the reward functions is > 0 (the accuracy for 0/1 rewards such as
  ``exact_match``, ``numeric_answer`` or a ``file.py:function`` that returns 0 or 1; `posttrain evaluate`'s
  ``reward_positive``), each function called as in training (`posttrain.evaluation.score_rewards`);
- ``judge``: a trained reward model's score is > a threshold (default 0: a Bradley-Terry score has no natural
  zero, so state the threshold that means "acceptable" for your model).

A sample a reward function cannot score gets the fallback reward 0 (wrong), and the verifier counts it in
`failures`, as `posttrain evaluate` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from posttrain.data import TASKS
from posttrain.errors import UserError
from posttrain.evaluation import score_rewards
from posttrain.rewards import build_reward_functions


@dataclass
class Verifier:
    """Checks completions: `kind` is ``task``, ``reward`` or ``judge``; `name` says which (for reports)."""

    kind: str
    name: str
    task: str | None = None
    rewards: list = field(default_factory=list)  # rewards.NamedReward, for ``reward`` and ``judge``
    threshold: float = 0.0
    failures: int = 0  # samples a reward function could not score (counted wrong), over every call

    @property
    def needs_answer(self) -> bool:
        """Whether a row must have an ``answer`` to be checked (a task's verifier compares with it)."""
        return self.kind == "task"

    def check(self, rows: Sequence[dict], completions: Sequence[str], truncated: Sequence[bool] | None = None
              ) -> list[bool]:  # fmt: skip
        """One bool per completion: right for its row (`rows[i]` with ``prompt`` and the columns the verifier
        reads, e.g. ``answer``). `truncated`, when known, flags the completions cut at the token limit: reward
        functions get it as the ``truncated`` column, as in RL training, and a judge scores those as unfinished
        turns."""
        if len(rows) != len(completions):
            raise ValueError(f"{len(rows)} rows but {len(completions)} completions")
        if not rows:
            return []
        if self.kind == "task":
            task = TASKS[self.task]
            return [task.score(c, r["answer"]) >= 1.0 for r, c in zip(rows, completions)]
        if truncated is not None:
            rows = [{**r, "truncated": bool(t)} for r, t in zip(rows, truncated, strict=True)]
        _, result = score_rewards(self.rewards, completions, rows)
        self.failures += sum(result.failures.values())
        return [t > self.threshold for t in result.total]


def task_verifier(task: str) -> Verifier:
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; built-in tasks: {', '.join(sorted(TASKS))}")
    return Verifier("task", f"task {task}", task=task)


def reward_verifier(rewards: list, names: Sequence[str]) -> Verifier:
    """Reward functions (`rewards.build_reward_functions`) as the verifier: right when their sum is > 0."""
    return Verifier("reward", "reward " + " + ".join(names), rewards=list(rewards))


def judge_verifier(path: str, threshold: float = 0.0) -> Verifier:
    """A trained reward model folder as the verifier: right when its score is > `threshold`."""
    rewards = build_reward_functions([{"name": "reward_model", "args": {"path": path}}])
    return Verifier("judge", f"judge {path} (score > {threshold:g})", rewards=rewards, threshold=threshold)
