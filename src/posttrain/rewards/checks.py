"""What the reward functions need from the data, checked before any model loads.

Otherwise every sample would get the fallback value and the run would learn nothing: a column a built-in reward
reads that a row lacks, a `task` reward with no task to read, a reward-model folder that is not one.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import shlex

import yaml

from posttrain.data.schema import RESERVED_PROMPT_COLUMNS
from posttrain.data.tasks import TASKS, answer_problems
from posttrain.errors import ConfigError, DataError, Problem
from posttrain.models.heads import reward_model_problem
from posttrain.rewards.builtin import _marked_gold, readable_number, schema_problem
from posttrain.rewards.sandbox import tests_problem, uncalled_check

# Built-in rewards that read a column of the prompt rows, and the default name of that column.
_COLUMNS = {"numeric_answer": "answer", "exact_match": "answer", "task": "answer", "code_exec": "tests"}
# Those whose column is a reference answer, which another column of a file may hold (an SFT file's completion)
_REFERENCE = ("numeric_answer", "exact_match", "task")


@dataclasses.dataclass(frozen=True)
class Options:
    """How the user of the command that checks the rows writes the fixes its problems advise: in a training run's
    config (algorithm.rewards, data.columns), or with flags (`flags`: `--reward`, and `--column` where
    `column_flag`: evaluate has it, diagnose does not).

    >>> RUN.rewards("numeric_answer"), EVALUATE.rewards("numeric_answer")
    ('algorithm.rewards=[numeric_answer]', '--reward numeric_answer')
    >>> RUN.spec({"name": "task", "args": {"task": "arithmetic"}})
    '{name: task, args: {task: arithmetic}} in algorithm.rewards'
    >>> EVALUATE.spec({"name": "task", "args": {"task": "arithmetic"}})
    '--reward \\'{"name": "task", "args": {"task": "arithmetic"}}\\''
    >>> RUN.rename("answer", "completion"), EVALUATE.rename("answer", "completion"), DIAGNOSE.rename("answer", "x")
    ('data.columns.answer=completion', '--column answer=completion', None)
    """

    flags: bool = False
    column_flag: bool = False

    def rewards(self, name: str) -> str:
        """The rewards set to the one built-in `name`."""
        return f"--reward {name}" if self.flags else f"algorithm.rewards=[{name}]"

    def spec(self, spec: dict) -> str:
        """One reward written as a mapping: a `--reward` JSON object, or the entry of algorithm.rewards."""
        if self.flags:
            return f"--reward {shlex.quote(json.dumps(spec))}"
        flow = yaml.safe_dump(spec, default_flow_style=True, sort_keys=False, width=2**31).strip()
        return f"{flow} in algorithm.rewards"

    def rename(self, field: str, column: str) -> str | None:
        """A file's `column` read as `field` (None where the command cannot rename)."""
        if self.flags:
            return f"--column {field}={column}" if self.column_flag else None
        return f"data.columns.{field}={column}"


RUN, EVALUATE, DIAGNOSE = Options(), Options(flags=True, column_flag=True), Options(flags=True)


def check_reward_inputs(specs, rows, source: str, options: Options = RUN) -> None:
    """What a reward will need and the data or a folder cannot give, found before the model loads (otherwise every
    sample would get the fallback, or a constant, and the run would learn nothing): a missing column, a gold
    answer `numeric_answer` cannot read as a number, a `task` reward with no task (or an unknown one) to read, a
    reward-model folder that is not one. Every row's problem is listed (`DataError` shows the first 20). `options`:
    how the command's user writes the fixes (`Options`)."""
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
                    fix = _reference_fix(spec, row, column, options) if spec.name in _REFERENCE else ""
                    problems.append(_missing(row, column, source, reader, fix))
                elif spec.name == "numeric_answer" and (why := _not_a_number(row[column])):
                    problems.append(Problem(source, getattr(row, "line", None), column, f"{why}; {reader}"))
                elif spec.name == "exact_match" and (row[column] is None or not str(row[column]).strip()):
                    # str(None) is "None": a completion "None" (or an empty one, for "") would score 1.0
                    what = "null" if row[column] is None else "empty"
                    problems.append(Problem(source, getattr(row, "line", None), column,
                                            f"is {what}: no completion should match it; {reader}"))  # fmt: skip
                elif spec.name == "json_schema" and spec.args.get("schema") is None and (why := schema_problem(row[column])):
                    problems.append(Problem(source, getattr(row, "line", None), column, f"{why}; {reader}"))
        if spec.name == "code_exec":  # HumanEval's tests: a check() nobody calls passes every program that runs
            column = spec.args.get("column", "tests")
            problems += [Problem(source, getattr(row, "line", None), column, (
                f"defines check(candidate) and never calls it, so every program that runs would pass; {reader}. "
                "Give the tested function's name in an `entry_point` column (HumanEval's) and check(entry_point) is "
                "called, or end the tests with the call")) for row in rows
                if uncalled_check(row.get(column)) and not str(row.get("entry_point") or "").isidentifier()]  # fmt: skip
            problems += [Problem(source, getattr(row, "line", None), column, f"{why}; {reader}") for row in rows
                         if column in row and (why := tests_problem(row[column]))]  # fmt: skip
        if spec.name == "task" and spec.args.get("task") is None:
            problems.extend(_task_problems(spec, rows, source, options))
        elif spec.name == "task" and spec.args["task"] in TASKS:
            reader = f"reward {spec.label!r} ({spec.where})"
            problems.extend(_task_answers(TASKS[spec.args["task"]], rows, source, reader, options))
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


def _reference_fix(spec, row, column: str, options: Options) -> str:
    """What reads a row's other column as the reference answer a built-in reward compares with (an SFT file's
    `completion`): the column renamed, or the reward's `column` arg; "" when the row has no other column."""
    others = [k for k in row if k not in ("prompt", "id", "metadata", *RESERVED_PROMPT_COLUMNS)]
    if len(others) != 1:  # none to read, or several: which one holds the reference is the user's to say
        return ""
    other = others[0]
    # the reward as it was given (weight, label, other args kept), reading the other column
    written = {"name": spec.name, **({"weight": spec.weight} if spec.weight != 1 else {}),
               **({"label": spec.label} if spec.label != spec.name else {}),
               "args": {**spec.args, "column": other}}  # fmt: skip
    # A chat read as a prompt holds a `completion` its file does not (its last assistant turn, made after the
    # renames), so only the reward's own column arg reads it in every file
    rename = options.rename(column, other) if other != "completion" else None
    ways = ([f"{rename} reads the {other} as it"] if rename else []) + [f"{options.spec(written)} reads the {other}"]
    return f". The reference is read from column {column}: here {', or '.join(ways)}"


def _not_a_number(value) -> str | None:
    """Why `numeric_answer` could never match `value` as a gold answer (None when it can): not a number or a
    text, a number that is not finite, or a text neither a plain number nor one math-verify reads.

    >>> _not_a_number(42), _not_a_number("1,234"), _not_a_number(r"\\frac{1}{2}")
    (None, None, None)
    >>> _not_a_number(None), _not_a_number(float("nan")), _not_a_number("four")
    ('is null: no number to compare with', 'is nan, not a finite number', "'four' is not a number (neither a plain number nor an expression math-verify reads; a text answer compares with the exact_match reward)")
    """
    if value is None:
        return "is null: no number to compare with"
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return f"must be a number or a text holding one, got {type(value).__name__} {value!r}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"is {value}, not a finite number"
    if not readable_number(_marked_gold(str(value))):  # what scoring reads of a worked solution
        return (f"{value!r} is not a number (neither a plain number nor an expression math-verify reads; a text "
                "answer compares with the exact_match reward)")
    return None


def _task_problems(spec, rows, source: str, options: Options) -> list[Problem]:
    """Each row a `task` reward without args.task cannot score: no task named, metadata that is not a mapping, or
    a task that is not built in."""
    out, column = [], spec.args.get("column", "answer")
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
        if not name and column in row:  # likely a file of the user's own (GSM8K), which `task` does not score
            out.append(Problem(source, line, "metadata.task", _own_answers(spec, column, options)))
        elif not name:
            give = (f"write it as {options.spec({'name': spec.name, 'args': {**spec.args, 'task': 'arithmetic'}})}"
                    if options.flags else "give args: {task: arithmetic}")  # fmt: skip
            out.append(Problem(source, line, "metadata.task", (
                f"reward {spec.label!r} ({spec.where}) has no args.task, so each row must name its task in a "
                f"`task` column or metadata.task; {give} or add the column")))  # fmt: skip
        elif not isinstance(name, str) or name not in TASKS:
            out.append(Problem(source, line, field, f"unknown task {name!r} for reward {spec.label!r} ({spec.where}); "
                                                    f"built-in tasks: {', '.join(sorted(TASKS))}"))  # fmt: skip
        else:  # the task's verifier must be able to read the row's gold answer
            out.extend(_task_answers(TASKS[name], [row], source, f"reward {spec.label!r} ({spec.where}, task {name})",
                                     options))  # fmt: skip
    return out


def _task_answers(task, rows, source: str, reader: str, options: Options) -> list[Problem]:
    """The rows whose answer `task`'s verifier cannot read (`answer_problems`); where `numeric_answer` reads it (a
    GSM8K answer, `... #### 72`, which the arithmetic task's plain-number gold refuses), that is said too."""
    fix = f"; the numeric_answer reward reads it (its last number): {options.rewards('numeric_answer')}"
    return [dataclasses.replace(p, message=p.message + fix) if _not_a_number(row["answer"]) is None else p
            for row in rows for p in answer_problems(task, [row], source, reader)]  # fmt: skip


def _own_answers(spec, column: str, options: Options) -> str:
    """A row with a reference answer and no task for a `task` reward to read: `task` scores the built-in tasks'
    rows only, and `numeric_answer` compares a numeric answer (a text's last number: GSM8K's `#### 72`, checked
    in tests/unit/test_reward_checks.py)."""
    task = {"name": spec.name, "args": {**spec.args, "task": "arithmetic"}}
    return (f"reward {spec.label!r} ({spec.where}) scores the rows of posttrain's built-in tasks, each naming its "
            "task in a `task` column or metadata.task (as `posttrain data make arithmetic --kind prompts` writes "
            "them), and this row names none. For a file of your own with numeric answers, "
            f"{options.rewards('numeric_answer')} compares the completion's final answer with the number in "
            f"`{column}` (in a text, its last: GSM8K's `#### 72`); for a built-in task's rows without their "
            f"metadata, name the task: {options.spec(task)}")  # fmt: skip
