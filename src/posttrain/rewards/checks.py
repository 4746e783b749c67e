"""What the reward functions need from the data, checked before any model loads.

Otherwise every sample would get the fallback value and the run would learn nothing: a column a built-in reward
reads that a row lacks, a `task` reward with no task to read, a reward-model folder that is not one.
"""

from __future__ import annotations

import inspect
import math

from posttrain.data.schema import RESERVED_PROMPT_COLUMNS
from posttrain.data.tasks import TASKS, answer_problems
from posttrain.errors import ConfigError, DataError, Problem
from posttrain.models.heads import reward_model_problem
from posttrain.rewards.builtin import readable_number

# Built-in rewards that read a column of the prompt rows, and the default name of that column.
_COLUMNS = {"numeric_answer": "answer", "exact_match": "answer", "task": "answer", "code_exec": "tests"}


def check_reward_inputs(specs, rows, source: str) -> None:
    """What a reward will need and the data or a folder cannot give, found before the model loads (otherwise every
    sample would get the fallback, or a constant, and the run would learn nothing): a missing column, a gold
    answer `numeric_answer` cannot read as a number, a `task` reward with no task (or an unknown one) to read, a
    reward-model folder that is not one. Every row's problem is listed (`DataError` shows the first 20)."""
    problems = []
    for spec in specs:
        if not spec.builtin:
            problems.extend(_user_columns(spec, rows, source))
            continue
        if spec.name == "reward_model":
            why = reward_model_problem(spec.args.get("path", ""))
            if why:
                raise ConfigError(f"{spec.where} (reward_model): {why}")
            continue
        reader = f"reward {spec.label!r} ({spec.where}) reads it"
        needed = []
        if spec.name in _COLUMNS:
            needed.append(spec.args.get("column", _COLUMNS[spec.name]))
        if spec.name == "json_schema" and spec.args.get("schema") is None:
            needed.append(spec.args.get("column", "schema"))
        for column in needed:
            for row in rows:
                if column not in row:
                    problems.append(_missing(row, column, source, reader))
                elif spec.name == "numeric_answer" and (why := _not_a_number(row[column])):
                    problems.append(Problem(source, getattr(row, "line", None), column, f"{why}; {reader}"))
        if spec.name == "task" and spec.args.get("task") is None:
            problems.extend(_task_problems(spec, rows, source))
        elif spec.name == "task" and spec.args["task"] in TASKS:
            problems.extend(answer_problems(TASKS[spec.args["task"]], rows, source, f"reward {spec.label!r} ({spec.where})"))
    if problems:
        raise DataError(problems, header=f"{source}: the rewards cannot score these rows:")


def user_reward_columns(fn, args: dict) -> list[str]:
    """The columns a user's reward function takes by name with no default (so it reads them, and a row without one
    gives it None): its named parameters but `prompts`, `completions`, those `args` sets and the ones the rollout
    adds itself (`prompt_messages`, `truncated`).

    >>> def f(prompts, completions, answer, hint=None, *, tests, scale=1, **kwargs): ...
    >>> user_reward_columns(f, {"scale": 2}), user_reward_columns(f, {"tests": []})
    (['answer', 'tests'], ['answer'])
    """
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return []
    skip = {"prompts", "completions", *args, *RESERVED_PROMPT_COLUMNS}
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and p.default is p.empty and p.name not in skip]  # fmt: skip


def _user_columns(spec, rows, source: str) -> list[Problem]:
    """A row without a column the user's function takes by name with no default (`user_reward_columns`): every
    sample of it would be scored with None there (a group all alike, never trained: an audit), or, when no row has
    it, every call would fail."""
    columns = user_reward_columns(spec.fn, spec.args) if spec.fn is not None else []
    return [_missing(row, column, source, f"reward {spec.label!r} ({spec.where}) takes `{column}` with no default, so "
                     f"it reads it", f" (give the column, or a default: `{column}=None`)")
            for column in columns for row in rows if column not in row]  # fmt: skip


def _missing(row, column: str, source: str, reader: str, fix: str = "") -> Problem:
    """A row without `column`, which `reader` (a reward, named) reads: the columns the row has instead."""
    have = ", ".join(sorted(k for k in row if k != "prompt")) or "none"
    return Problem(source, getattr(row, "line", None), column, f"missing: {reader}; this row has: {have}{fix}")


def _not_a_number(value) -> str | None:
    """Why `numeric_answer` could never match `value` as a gold answer (None when it can): not a number or a
    text, a number that is not finite, or a text neither a plain number nor one math-verify reads.

    >>> _not_a_number(42), _not_a_number("1,234"), _not_a_number(r"\\frac{1}{2}")
    (None, None, None)
    >>> _not_a_number(None), _not_a_number(float("nan")), _not_a_number("four")
    ('is null: no number to compare with', 'is nan, not a finite number', "'four' is not a number (neither a plain number nor an expression math-verify reads)")
    """
    if value is None:
        return "is null: no number to compare with"
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return f"must be a number or a text holding one, got {type(value).__name__} {value!r}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"is {value}, not a finite number"
    if not readable_number(str(value)):
        return f"{value!r} is not a number (neither a plain number nor an expression math-verify reads)"
    return None


def _task_problems(spec, rows, source: str) -> list[Problem]:
    """Each row a `task` reward without args.task cannot score: no task named, metadata that is not a mapping, or
    a task that is not built in."""
    out = []
    for row in rows:
        line, metadata = getattr(row, "line", None), row.get("metadata")
        if "task" in row:
            field, name = "task", row["task"]
        elif metadata is not None and not isinstance(metadata, dict):
            out.append(Problem(source, line, "metadata", f"must be a mapping such as {{\"task\": \"arithmetic\"}}, got "
                                                          f"{type(metadata).__name__} {metadata!r}"))  # fmt: skip
            continue
        else:
            field, name = "metadata.task", (metadata or {}).get("task")
        if not name:
            out.append(Problem(source, line, "metadata.task", (
                f"reward {spec.label!r} ({spec.where}) has no args.task, so each row must name its task in a "
                "`task` column or metadata.task; give args: {task: arithmetic} or add the column")))  # fmt: skip
        elif not isinstance(name, str) or name not in TASKS:
            out.append(Problem(source, line, field, f"unknown task {name!r} for reward {spec.label!r} ({spec.where}); "
                                                    f"built-in tasks: {', '.join(sorted(TASKS))}"))  # fmt: skip
        else:  # the task's verifier must be able to read the row's gold answer
            out.extend(answer_problems(TASKS[name], [row], source, f"reward {spec.label!r} ({spec.where}, task {name})"))
    return out
