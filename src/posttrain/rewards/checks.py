"""What the reward functions need from the data, checked before any model loads.

Otherwise every sample would get the fallback value and the run would learn nothing: a column a built-in reward
reads that a row lacks, a `task` reward with no task to read, a reward-model folder that is not one.
"""

from __future__ import annotations

from posttrain.errors import ConfigError, DataError, Problem
from posttrain.models.heads import reward_model_problem

# Built-in rewards that read a column of the prompt rows, and the default name of that column.
_COLUMNS = {"numeric_answer": "answer", "exact_match": "answer", "task": "answer", "code_exec": "tests"}


def check_reward_inputs(specs, rows, source: str) -> None:
    """What a reward will need and the data or a folder cannot give, found before the model loads (otherwise every
    sample would get the fallback and the run would learn nothing): a missing column, a `task` reward with no
    task to read, a reward-model folder that is not one."""
    problems = []
    for spec in specs:
        if not spec.builtin:
            continue
        if spec.name == "reward_model":
            why = reward_model_problem(spec.args.get("path", ""))
            if why:
                raise ConfigError(f"{spec.where} (reward_model): {why}")
            continue
        needed = []
        if spec.name in _COLUMNS:
            needed.append(spec.args.get("column", _COLUMNS[spec.name]))
        if spec.name == "json_schema" and spec.args.get("schema") is None:
            needed.append(spec.args.get("column", "schema"))
        for column in needed:
            missing = next((r for r in rows if column not in r), None)
            if missing is not None:
                have = ", ".join(sorted(k for k in missing if k != "prompt")) or "none"
                problems.append(Problem(source, getattr(missing, "line", None), column,
                                        f"missing: reward {spec.label!r} ({spec.where}) reads it; this row has: {have}"))  # fmt: skip
        if spec.name == "task" and spec.args.get("task") is None:
            bad = next(
                (r for r in rows if "task" not in r and not (r.get("metadata") or {}).get("task")), None
            )
            if bad is not None:
                problems.append(Problem(source, getattr(bad, "line", None), "metadata.task", (
                    f"reward {spec.label!r} ({spec.where}) has no args.task, so each row must name its task in a "
                    "`task` column or metadata.task; give args: {task: arithmetic} or add the column")))  # fmt: skip
    if problems:
        raise DataError(problems, header=f"{source}: the rewards cannot score these rows:")
