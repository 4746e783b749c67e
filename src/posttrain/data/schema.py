"""Row shapes, their JSON schemas, and the checks that turn a data file into normalised rows (or one clear error).

Three kinds of file, each a few row shapes (one JSON schema per shape, validated with `jsonschema`):

- ``sft``: ``messages`` (a chat), ``prompt`` + ``completion`` (each a string or a message list), or ``text``
  (plain text, every token trained). Optional extra keys: ``id``, ``answer``, ``metadata``.
- ``preference``: ``prompt`` + ``chosen`` + ``rejected``, or ``chosen`` + ``rejected`` as whole conversations
  (the shared leading messages become the prompt). Optional extra key: ``rejected_kind`` (a string).
- ``prompts``: ``prompt`` plus any other columns (kept: later they feed reward functions).

`load_rows` checks every row, collects *all* problems, and raises one `DataError` whose lines read
``FILE:LINE: field: what is wrong``; otherwise it returns normalised rows:

- sft chat rows: ``{"messages": [...], "completion_only": True, **extras}``; a prompt/completion row becomes
  ``messages = prompt + completion`` with ``n_prompt`` = the number of prompt messages (never trained);
- sft text rows: ``{"text": str, "completion_only": False, **extras}``;
- preference rows: ``{"prompt": [...], "chosen": [...], "rejected": [...], **extras}`` (message lists);
- prompts rows: ``{"prompt": [...], **other columns}``.

This module does not tokenize (see `render.py`).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections import Counter
from pathlib import Path

from jsonschema import Draft202012Validator

from posttrain.config import DATA_FIELDS
from posttrain.config_rules import show
from posttrain.data.columns import (
    Columns,
    guess_columns,
    guess_messages,
    guess_turns,
    shown,
    sources,
    split_turns,
    turns_setting,
)
from posttrain.data.readers import _json_type, read_records_lenient
from posttrain.errors import DataError, Problem, problem_lines

KINDS = ("sft", "preference", "prompts")
ROLES = ("system", "user", "assistant")

MESSAGE = {
    "type": "object",
    "properties": {"role": {"enum": list(ROLES)}, "content": {"type": "string"}},
    "required": ["role", "content"],
    "additionalProperties": False,
}
MESSAGES = {"type": "array", "items": MESSAGE, "minItems": 1}
TEXT_OR_MESSAGES = {"anyOf": [{"type": "string"}, MESSAGES]}
MARGIN = {"type": "number", "minimum": 0}
EXTRAS = {"id": {"type": ["string", "integer"]}, "answer": {}, "metadata": {"type": "object"}}
SYSTEM = {"type": ["string", "null"]}  # a system prompt in a column of its own (orca's): the prompt's first message


def _row_schema(fields: dict, required: list[str], *, extra_ok: bool = False) -> dict:
    return {
        "type": "object",
        "properties": {**fields, **({} if extra_ok else EXTRAS)},
        "required": required,
        "additionalProperties": extra_ok,
    }


# One schema per row shape; the shape is chosen from the keys a row has (see `_shape`).
SCHEMAS: dict[str, dict[str, dict]] = {
    "sft": {
        "messages": _row_schema({"messages": MESSAGES}, ["messages"]),
        "prompt/completion": _row_schema(
            {"prompt": TEXT_OR_MESSAGES, "completion": TEXT_OR_MESSAGES, "system": SYSTEM}, ["prompt", "completion"]
        ),
        "text": _row_schema({"text": {"type": "string"}}, ["text"]),
    },
    # ``rejected_kind`` (optional) says how a built-in pair's rejected side is worse (see `tasks.make_pairs`);
    # ``margin`` (optional, >= 0) is how clearly chosen wins, used by reward models with algorithm.margin.
    "preference": {
        "prompt/chosen/rejected": _row_schema(
            {
                "prompt": TEXT_OR_MESSAGES,
                "chosen": TEXT_OR_MESSAGES,
                "rejected": TEXT_OR_MESSAGES,
                "system": SYSTEM,
                "rejected_kind": {"type": "string"},
                "margin": MARGIN,
            },
            ["prompt", "chosen", "rejected"],
        ),
        "chosen/rejected": _row_schema(
            {"chosen": MESSAGES, "rejected": MESSAGES, "rejected_kind": {"type": "string"}, "margin": MARGIN},
            ["chosen", "rejected"],
        ),
    },
    # A chat (an SFT messages row) read as a prompt: the messages before its last assistant turn, which is kept as
    # the `completion` column (the reference a reward may read), see `_normalise_prompts`.
    "prompts": {"prompt": _row_schema({"prompt": TEXT_OR_MESSAGES, "system": SYSTEM}, ["prompt"], extra_ok=True),
                "messages": _row_schema({"messages": MESSAGES}, ["messages"], extra_ok=True)},  # fmt: skip
}
_VALIDATORS = {kind: {s: Draft202012Validator(v) for s, v in d.items()} for kind, d in SCHEMAS.items()}

_SHAPE_KEYS = {
    "sft": {"messages": ("messages",), "prompt/completion": ("prompt", "completion"), "text": ("text",)},
    "preference": {"prompt/chosen/rejected": ("prompt",), "chosen/rejected": ("chosen", "rejected")},
    "prompts": {"prompt": ("prompt",), "messages": ("messages",)},
}


def load_rows(path: str | Path, kind: str, columns: Columns | None = None, *, skip_bad: bool = False) -> list[dict]:
    """Read and check every row of `path` as `kind` ("sft", "preference", "prompts"); return normalised rows.
    `columns`: the file's own column names (`data.columns`, `data.ignore_columns`; see `data.columns`).

    All problems in the file are collected and raised together as one `DataError`; with `skip_bad`
    (`data.skip_bad_rows`) the rows that have one are left out instead, with a warning that names them, where
    every problem is a row's and some row is usable.
    """
    rows, _ = _load(path, kind, columns, skip_bad=skip_bad)
    return rows


def validate_file(path: str | Path, kind: str, columns: Columns | None = None) -> str:
    """A one-line summary when every row is usable, e.g. ``data.jsonl: 200 sft rows OK (messages: 200)``."""
    return shapes_summary(path, kind, row_shapes(path, kind, columns))


def shapes_summary(path: str | Path, kind: str, shapes: dict[str, int]) -> str:
    """
    >>> shapes_summary("data.jsonl", "sft", {"messages": 2, "prompt/completion": 1})
    'data.jsonl: 3 sft rows OK (messages: 2, prompt/completion: 1)'
    """
    detail = ", ".join(f"{s}: {n}" for s, n in shapes.items())
    return f"{path}: {sum(shapes.values())} {kind} rows OK ({detail})"


def row_shapes(path: str | Path, kind: str, columns: Columns | None = None) -> dict[str, int]:
    """How many rows of each shape (e.g. ``messages``, ``prompt/completion``) `path` holds, most common first,
    when every row is usable; else the `DataError` listing every problem."""
    return rows_and_shapes(path, kind, columns)[1]


def rows_and_shapes(path: str | Path, kind: str, columns: Columns | None = None) -> tuple[list[dict], dict[str, int]]:
    """`load_rows` and `row_shapes` from one read of the file (`data validate --model` renders the rows it counts)."""
    rows, shapes = _load(path, kind, columns)
    return rows, dict(sorted(shapes.items(), key=lambda kv: -kv[1]))


def unused_in_files(columns: Columns, paths: list[str | Path]) -> list[str]:
    """`Columns.unused` over several files read with the same settings (`posttrain diagnose`'s prompts, SFT data
    and pairs): a name only some of them have is fine, one none of them has is not. Unreadable rows are skipped
    here (loading the files reports them)."""
    held: list[set[str]] = [set(), set(), set(), set()]  # columns, message keys, roles, turn roles
    for path in paths:
        for names, more in zip(held, _names_held(columns, read_records_lenient(path)[0])):
            names |= more
    return columns.unused(*held)


def _names_held(columns: Columns, records, *, messages: bool = True,
                turns: bool = True) -> tuple[set[str], set[str], set[str], set[str]]:  # fmt: skip
    """What the rows of a file hold, as `Columns.unused` and the columns hint read it: its columns, its messages'
    keys and role names (`messages`), and the roles whose marker opens a turn in its text (`turns`; its reading
    stops once every marker was found)."""
    seen: set[str] = set()
    keys: set[str] = set()
    roles: set[str] = set()
    opened: set[str] = set()
    for rec in records:
        seen.update(rec.data)
        if messages:
            k, r = columns.message_parts(rec.data)
            keys.update(k)
            roles.update(r)
        if turns and len(opened) < len(columns.turns):
            opened.update(columns.turn_roles(rec.data))
    return seen, keys, roles, opened


def plain_messages(messages: list[dict] | str, role: str) -> list[dict] | str:
    """A single message of `role` as its text, anything else as it is: how a normalised row's prompt (role
    ``user``) or response (``assistant``) is shown in output files.

    >>> plain_messages([{"role": "user", "content": "hi"}], "user")
    'hi'
    >>> plain_messages([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}], "user")[0]
    {'role': 'system', 'content': 'be brief'}
    """
    if isinstance(messages, list) and len(messages) == 1 and messages[0].get("role") == role:
        return messages[0]["content"]
    return messages


def _load(path: str | Path, kind: str, columns: Columns | None = None, *,
          skip_bad: bool = False) -> tuple[list[dict], Counter]:  # fmt: skip
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    name = str(path)
    columns = columns or Columns()
    records, problems = read_records_lenient(path)
    n_unreadable = len(problems)
    rows: list[dict] = []
    shapes: Counter = Counter()
    n_bad = n_unreadable
    for rec in records:
        found: list[Problem] = []

        def report(field, msg, line=rec.line, row=rec.row, found=found):
            found.append(Problem(name, line, columns.file_field(field), msg, row))

        data, clashes = columns.apply(rec.data) if columns else (rec.data, [])
        for field, msg in clashes:
            found.append(Problem(name, rec.line, field, msg, rec.row))
        shape, row = check_row(data, kind, report) if not clashes else (None, None)
        if found:
            problems.extend(found)
            n_bad += 1
        else:
            rows.append(Row(row, line=rec.line, row=rec.row, file_field=columns.file_field if columns else None))
            shapes[shape] += 1
    if not records and not problems:
        problems.append(Problem(name, None, None, f"no rows: nothing to use as {kind} data"))
    # the keys and role names of every message are read by the check of the message settings and by the hint, so
    # gathered only where one of them will read them (not for a good file read without such settings)
    seen, seen_keys, seen_roles, seen_turns = _names_held(
        columns, records, messages=bool(problems) or columns.names_messages, turns=columns.strict)
    if records and columns.strict:
        problems.extend(Problem(name, None, None, msg)
                        for msg in columns.unused(seen, seen_keys, seen_roles, seen_turns))  # fmt: skip
    if not problems:
        return rows, shapes
    problems.sort(key=lambda p: (p.line or 0, p.row or 0))
    total = len(records) + n_unreadable
    if skip_bad and rows and all(p.line is not None for p in problems):
        shown = problem_lines(problems, max_shown=5)
        warnings.warn(f"{name}: {n_bad} of {total} rows left out (data.skip_bad_rows): {'; '.join(shown)}",
                      stacklevel=3)  # fmt: skip
        return rows, shapes
    where = f" in {n_bad} of {total} rows" if n_bad else ""
    header = f"{name}: {len(problems)} problem(s){where}; no {kind} data loaded"
    raise DataError(problems, header=header if total else None,
                    footer=_columns_hint(problems, kind, columns, seen, (seen_keys, seen_roles)))  # fmt: skip
    return rows, shapes


def _columns_hint(problems: list[Problem], kind: str, columns: Columns, seen: set[str],
                  message_parts: tuple[set[str], set[str]] = (set(), set())) -> str | None:  # fmt: skip
    """How to read a file in its own names, said once under the problems where a row had unknown columns, none of
    the fields of `kind`, or messages in another layout: the renames its column names suggest (`guess_columns`),
    the columns left over, and the message keys and role names its messages suggest (`guess_messages`:
    `message_parts`, the keys and roles of every message of the file); else an example.

    >>> print(_columns_hint([Problem("f", 1, None, "no sft fields: ...")], "sft", Columns(),
    ...                     {"instruction", "output", "source"}))
    Rename the file's columns to the fields posttrain reads and leave the others out: data.columns: {prompt: instruction, completion: output} and data.ignore_columns: [source] in the run's config, or --column prompt=instruction --column completion=output --ignore-column source on the command line; see docs/data.md.
    >>> print(_columns_hint([Problem("f", 1, "notes", "unknown field (allowed here: ...)")], "sft", Columns(),
    ...                     {"messages", "notes"}))
    Leave out the columns posttrain does not read: data.ignore_columns: [notes] in the run's config, or --ignore-column notes on the command line (or rename one to a field with data.columns); see docs/data.md.
    >>> print(_columns_hint([Problem("f", 1, None, "no sft fields: ...")], "sft", Columns(), {"conversations", "id"},
    ...                     ({"from", "value"}, {"human", "gpt"})))
    Read the file in its own names: data.columns: {messages: conversations} and data.message_keys: {role: from, content: value} and data.roles: {user: human, assistant: gpt} in the run's config, or --column messages=conversations --message-key role=from --message-key content=value --role user=human --role assistant=gpt on the command line; see docs/data.md.
    """
    unknown = {p.field for p in problems if p.field and p.message.startswith("unknown field")
               and "[" not in p.field and "." not in p.field}  # fmt: skip
    no_fields = any(p.message.startswith(f"no {kind} fields") for p in problems)
    in_messages = any(p.field and "]." in p.field and (p.message.startswith(("unknown field", "missing required"))
                      or p.message.startswith("must be one of system, user, assistant")) for p in problems)  # fmt: skip
    if not unknown and not no_fields and not in_messages:
        return None
    def named(*fields):  # under the file's names where renamed
        return {theirs for f in fields for theirs in sources(columns.rename.get(f, f))}

    own = named("completion", "messages", "text") if kind == "sft" else named("prompt", "messages")
    if kind != "preference" and named("chosen", "rejected") <= seen and not own & seen:
        # an HH file checked as SFT rows: renaming its sides to a prompt and a completion would be the wrong advice
        return ("The rows hold chosen and rejected: they are preference pairs, which DPO and reward models train on "
                "(algorithm.name=dpo or reward); check them with `posttrain data validate FILE --kind preference`.")
    guess = guess_columns(kind, seen) if not columns.rename else {}
    used = {c for v in guess.values() for c in sources(v)}
    left = (unknown | (seen - used if guess and kind != "prompts" else set())) - used  # prompts keep them all
    # a column that is a field of another shape (the `text` beside Alpaca's columns) must go too once renamed
    left -= set(DATA_FIELDS[kind]) - ({"text", "messages"} - set(guess) if guess else set())
    keys, roles = guess_messages(*message_parts) if in_messages or "messages" in guess else ({}, {})
    keys = {} if columns.message_keys else keys
    roles = {} if columns.roles else roles
    # a message's own extra keys (ShareGPT's `weight`, OpenAI's `name`): COLUMN.KEY, the key read by no setting
    mapped = {*keys.values(), *columns.message_keys.values(), "role", "content"}
    left |= {f"{p.field.split('[', 1)[0]}.{p.field.rsplit('.', 1)[1]}" for p in problems
             if p.field and "]." in p.field and p.message.startswith("unknown field")
             and p.field.rsplit(".", 1)[1] not in mapped}  # fmt: skip
    if "messages" in guess:  # the key found under the column's own name, as the file has it
        left |= {f"{guess['messages']}.{k}" for k in message_parts[0] - mapped}
    left = sorted(left)[:8]
    parts, flags = [], []  # the run's settings and the command line's options, whichever gave the file
    for name, mapping, flag in (("data.columns", guess, "--column"), ("data.message_keys", keys, "--message-key"),
                                ("data.roles", roles, "--role")):  # fmt: skip
        if mapping:
            parts.append(f"{name}: {show(mapping)}")
            flags += [f"{flag} {k}={shown(v)}" for k, v in mapping.items()]
    if left:
        parts.append(f"data.ignore_columns: {show(left)}")
        flags += [f"--ignore-column {c}" for c in left]
    if not parts:  # nothing to go on: an example
        if in_messages and not unknown and not no_fields:
            return ("Messages in another layout read with data.message_keys: {role: KEY, content: KEY} and data.roles: "
                    "{user: NAME, assistant: NAME} (--message-key role=KEY, --role user=NAME on the command line); "
                    "see docs/data.md.")  # fmt: skip
        return ("Rename the file's columns to the fields posttrain reads with data.columns: {FIELD: COLUMN} (e.g. "
                "{prompt: question, completion: answer}; --column prompt=question on the command line); see "
                "docs/data.md.")  # fmt: skip
    if keys or roles:
        head, tail = "Read the file in its own names", ""
    elif guess:
        head, tail = "Rename the file's columns to the fields posttrain reads" + (" and leave the others out" if left else ""), ""
    else:
        head, tail = "Leave out the columns posttrain does not read", " (or rename one to a field with data.columns)"
    kto = (" A `label` column of true and false marks KTO's desirable rows, and posttrain has no KTO: left out, "
           "every row trains, the undesirable ones too; keep only the rows labelled true.") if "label" in left and kind == "sft" else ""  # fmt: skip
    return (f"{head}: {' and '.join(parts)} in the run's config, or {' '.join(flags)} on the command line{tail}; "
            f"see docs/data.md.{kto}")


def normalise_row(data: dict, kind: str = "sft", *, source: str = "data", line: int | None = None) -> Row:
    """Check and normalise one in-memory row (e.g. straight from a task's ``make``); raise `DataError` if bad.

    >>> normalise_row({"prompt": "q", "completion": "a"})["messages"][1]
    {'role': 'assistant', 'content': 'a'}
    """
    found: list[Problem] = []
    _, row = check_row(data, kind, lambda field, msg: found.append(Problem(source, line, field, msg)))
    if found:
        raise DataError(found)
    return Row(row, line=line)


class Row(dict):
    """A normalised row: a plain dict that also remembers the file `line` it came from, its `row` number where
    several rows share the line, and `file_field` (the file's own name of a field, `Columns.file_field`), so that
    problems found later (while rendering) are located as the file's are (`problem_at`)."""

    def __init__(self, data: dict, *, line: int | None = None, row: int | None = None, file_field=None):
        super().__init__(data)
        self.line, self.row, self.file_field = line, row, file_field


def places(rows: list) -> tuple[list[int], str]:
    """How notes name the `rows` of one file (truncated, never used, too long): their lines (``"line"``), or where
    rows share a line, as a one-line JSON array's do, their row numbers (``"row"``), which a line would not tell
    apart. A row without a line (made in memory) by its position, the line it would have in a JSON Lines file.

    >>> places([Row({}, line=2), Row({}, line=5)]), places([Row({}, line=1, row=1), Row({}, line=1, row=2)])
    (([2, 5], 'line'), ([1, 2], 'row'))
    """
    if any(getattr(r, "row", None) is not None for r in rows):
        return list(range(1, len(rows) + 1)), "row"
    return [getattr(r, "line", None) or i + 1 for i, r in enumerate(rows)], "line"


def problem_at(source: str, row: dict, field: str | None, message: str) -> Problem:
    """A problem of `row` found after loading, named as a problem found while loading it would be: its line (and
    row number), and the field under the file's own name.

    >>> str(problem_at("q.jsonl", Row({}, line=3, file_field=lambda f: {"prompt": "question"}.get(f, f)), "prompt", "x"))
    'q.jsonl:3: question: x'
    """
    names = getattr(row, "file_field", None)
    return Problem(source, getattr(row, "line", None), names(field) if names else field, message, getattr(row, "row", None))


def check_row(data: dict, kind: str, report) -> tuple[str | None, dict | None]:
    """Check one row and normalise it. `report(field, message)` is called once per problem.

    >>> check_row({"prompt": "2+2?", "completion": "4"}, "sft", print)
    ('prompt/completion', {'messages': [{'role': 'user', 'content': '2+2?'}, {'role': 'assistant', 'content': '4'}], 'completion_only': True, 'n_prompt': 1})
    >>> check_row({"messages": [{"role": "user", "content": "hi"}]}, "sft", print)
    messages no assistant turn: nothing to train on
    ('messages', None)
    """
    if kind == "preference" and {"completion", "messages"} & data.keys() and not {"chosen", "rejected"} & data.keys():
        sft = "prompt/completion" if "completion" in data else "messages"
        report(None, f"a {sft} row is SFT data, not a preference pair: a pair needs a prompt, a chosen and a "
                     "rejected response (`posttrain data make TASK --kind preference` writes them)")  # fmt: skip
        return None, None
    shape = _shape(data, kind, report)
    if shape is None:
        return None, None
    if shape == "chosen/rejected" and (sides := [s for s in ("chosen", "rejected") if isinstance(data.get(s), str)]):
        prompt = guess_columns("preference", set(data)).get("prompt")  # orca's question, ...
        turns = guess_turns(data[s] for s in sides)  # HH's transcripts
        report(sides[0], "is a string and the row has no prompt: without a prompt column, chosen and rejected are "
                         "whole conversations, lists of messages that begin alike; "
                         + (f"this row's are transcripts, read as their turns with {turns_setting(turns)}" if turns
                            else "strings need the prompt in its own column: "
                            + (f"this row's {prompt} may be it (data.columns: {{prompt: {prompt}}}; --column "
                               f"prompt={prompt})" if isinstance(prompt, str) else
                               "prompt, chosen, rejected; or transcripts read as their turns with data.turns "
                               "(docs/data.md)")))  # fmt: skip
        return shape, None
    if isinstance(data.get("prompt"), str) and (turns := guess_turns([data["prompt"]])):
        cue = (split_turns(data["prompt"], turns)[0] or [{}])[-1]
        if cue == {"role": "assistant", "content": ""}:  # a transcript that waits for the answer: HH's prompts
            report("prompt", "is a transcript that ends with the assistant's cue; as one user message its turns would "
                             f"be wrapped in a single turn of the chat template. Read its turns with {turns_setting(turns)} "
                             '(or, to keep it one message, write it as [{"role": "user", "content": ...}])')  # fmt: skip
            return shape, None
    counted = _Count(report)
    said = set()
    for err in _VALIDATORS[kind][shape].iter_errors(data):
        for field, msg in _explain(err):
            if (field, msg) not in said:  # a field the schema requires in two places is missing once
                said.add((field, msg))
                counted(field, msg)
    if counted.n:
        return shape, None
    return shape, _NORMALISE[kind](data, counted)


class _Count:
    """Wraps `report` to count the problems reported through it."""

    def __init__(self, report):
        self.report, self.n = report, 0

    def __call__(self, field, msg):
        self.n += 1
        self.report(field, msg)


def _shape(data: dict, kind: str, report) -> str | None:
    present = [s for s, keys in _SHAPE_KEYS[kind].items() if any(k in data for k in keys)]
    if kind == "preference" and "prompt/chosen/rejected" in present:
        return "prompt/chosen/rejected"
    if kind == "prompts" and "prompt" in present:  # a messages column beside a prompt is one more column
        return "prompt"
    if len(present) == 1:
        return present[0]
    options = " or ".join("+".join(keys) for keys in _SHAPE_KEYS[kind].values())
    if not present:
        keys = ", ".join(sorted(data)) or "none"
        report(None, f"no {kind} fields: expected {options} (this row has: {keys})")
    else:
        report(None, f"mixes row shapes ({' and '.join(present)}): use exactly one of {options}")
    return None


_TYPE_NAMES = {"string": "a string", "array": "a list", "object": "an object", "integer": "an integer",
               "boolean": "true or false", "number": "a number", "null": "null"}  # fmt: skip


def _path(parts) -> str | None:
    """Render a jsonschema error path as a field name.

    >>> _path(["messages", 1, "content"])
    'messages[1].content'
    """
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or None


def _explain(err) -> list[tuple[str | None, str]]:
    """Turn one jsonschema error into (field, message) pairs a person can act on."""
    path = list(err.absolute_path)
    field = _path(path)
    v = err.validator
    if v == "required":
        missing = [k for k in err.validator_value if k not in err.instance]
        return [(_path([*path, k]), "missing required field") for k in missing]
    if v == "additionalProperties":
        allowed = ", ".join(err.schema.get("properties", {}))
        extra = [k for k in err.instance if k not in err.schema.get("properties", {})]
        return [(_path([*path, k]), f"unknown field (allowed here: {allowed})") for k in extra]
    if v == "type":
        want = err.validator_value if isinstance(err.validator_value, list) else [err.validator_value]
        return [
            (field, f"must be {' or '.join(_TYPE_NAMES[t] for t in want)}, got {_json_type(err.instance)}")
        ]
    if v == "enum":
        options = ", ".join(map(str, err.validator_value))
        return [(field, f"must be one of {options}; got {err.instance!r}")]
    if v == "minimum":
        return [(field, f"must be at least {err.validator_value}, got {err.instance!r}")]
    if v in ("minItems", "minLength"):
        return [(field, "must not be empty")]
    if v == "anyOf":
        # A string-or-messages field: explain the branch whose type matches the value, not both.
        for i, branch in enumerate(err.validator_value):
            if branch.get("type") == _json_type(err.instance):
                subs = [e for e in err.context if e.relative_schema_path[0] == i]
                return [pair for e in subs for pair in _explain(e)]
        return [(field, f"must be a string or a list of messages, got {_json_type(err.instance)}")]
    return [(field, err.message)]


def _as_messages(value: str | list, role: str) -> list[dict]:
    return [{"role": role, "content": value}] if isinstance(value, str) else copy.deepcopy(value)


def _extras(data: dict, keys: tuple[str, ...]) -> dict:
    return {k: v for k, v in data.items() if k not in keys}


def _check_chat(messages: list[dict], field: str, report, *, offset: int = 0) -> None:
    """Every assistant turn has content, and there is at least one."""
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistants:
        report(field, "no assistant turn: nothing to train on")
    for i in assistants:
        if not messages[i]["content"].strip():
            report(f"{field}[{i + offset}].content", "assistant content is empty")


def _normalise_sft(data: dict, report) -> dict | None:
    n = report.n
    if "text" in data:
        if not data["text"].strip():
            report("text", "empty text")
        return (
            None
            if report.n > n
            else {"text": data["text"], "completion_only": False, **_extras(data, ("text",))}
        )
    if "messages" in data:
        _check_chat(data["messages"], "messages", report)
        row = {"messages": copy.deepcopy(data["messages"]), "completion_only": True}
        return None if report.n > n else {**row, **_extras(data, ("messages",))}
    _check_prompt(data["prompt"], report, "; text with no prompt trains as a `text` row (every token)")
    prompt = _with_system(data, _as_messages(data["prompt"], "user"), report)
    completion = data["completion"]
    if isinstance(completion, str):
        if not completion.strip():
            report("completion", "empty completion")
    else:
        _check_chat(completion, "completion", report)
    if report.n > n:
        return None
    messages = prompt + _as_messages(completion, "assistant")
    return {"messages": messages, "completion_only": True, "n_prompt": len(prompt),
            **_extras(data, ("prompt", "completion", "system"))}  # fmt: skip


def _with_system(data: dict, prompt: list[dict], report) -> list[dict]:
    """`prompt` led by the row's `system` column as a system message (orca's layout); a blank one is none.

    >>> _with_system({"system": "Be brief."}, [{"role": "user", "content": "hi"}], print)[0]
    {'role': 'system', 'content': 'Be brief.'}
    >>> _with_system({"system": "x"}, [{"role": "system", "content": "y"}], print) and None
    system the prompt begins with a system message already: give one of the two
    """
    system = data.get("system")
    if not isinstance(system, str) or not system.strip():
        return prompt
    if prompt and prompt[0].get("role") == "system":
        report("system", "the prompt begins with a system message already: give one of the two")
        return prompt
    return [{"role": "system", "content": system}, *prompt]


def _check_prompt(prompt: str | list, report, way: str = "") -> None:
    """A prompt with no text: a row that trains an answer to nothing (a prompts row refuses it the same way).
    `way`: what to do instead, said after the problem."""
    if isinstance(prompt, str) and not prompt.strip():
        report("prompt", f"empty prompt{way}")
    elif isinstance(prompt, list) and all(not m["content"].strip() for m in prompt):
        report("prompt", f"empty prompt: every message's content is blank{way}")


def _response_empty(messages: list[dict]) -> bool:
    return not any(m["role"] == "assistant" and m["content"].strip() for m in messages)


def _normalise_preference(data: dict, report) -> dict | None:
    n = report.n
    if "prompt" in data:
        _check_prompt(data["prompt"], report)
        prompt = _with_system(data, _as_messages(data["prompt"], "user"), report)
        chosen, rejected = (
            _as_messages(data["chosen"], "assistant"),
            _as_messages(data["rejected"], "assistant"),
        )
        repeated = [s for s, msgs in (("chosen", chosen), ("rejected", rejected))
                    if len(msgs) > len(prompt) and msgs[: len(prompt)] == prompt]  # fmt: skip
        if repeated:  # UltraFeedback's layout: the conversation whole on each side, and its prompt again
            report(repeated[0], f"begins with the prompt's {len(prompt)} message(s), so the prompt would be rendered "
                                "twice. Sides that are whole conversations need no prompt column: leave it out "
                                "(data.ignore_columns: [prompt]; --ignore-column prompt) and the messages both sides "
                                "begin with become the prompt")  # fmt: skip
            return None
    else:
        # Whole conversations: the shared leading messages are the prompt (leave at least one message each).
        k = 0
        while (
            k < min(len(data["chosen"]), len(data["rejected"])) - 1
            and data["chosen"][k] == data["rejected"][k]
        ):
            k += 1
        prompt = copy.deepcopy(data["chosen"][:k])
        chosen, rejected = copy.deepcopy(data["chosen"][k:]), copy.deepcopy(data["rejected"][k:])
        for side, msgs in (("chosen", chosen), ("rejected", rejected)):
            if msgs and msgs[0].get("role") != "assistant":  # a pair compares two replies to one prompt
                report(side, f"message {k + 1} is a {msgs[0].get('role')!r} message that differs from the other "
                             "side's: a pair is two replies to one prompt, so every message before the assistant's "
                             "reply must be the same on both sides")  # fmt: skip
                return None
    for side, msgs in (("chosen", chosen), ("rejected", rejected)):
        if _response_empty(msgs):
            report(side, "empty response (no assistant content)")
            continue
        offset = 0 if "prompt" in data else len(prompt)  # a whole conversation's messages count from its start
        for i, m in enumerate(msgs):  # every assistant turn is scored: an empty one cannot be located in the text
            if m["role"] == "assistant" and not m["content"].strip():
                report(f"{side}[{i + offset}].content", "assistant content is empty")
        if msgs[-1]["role"] != "assistant":  # scored through its last assistant turn: what follows never is
            report(side, f"ends with a {msgs[-1]['role']!r} message after the reply: a response is scored through "
                         "its last assistant turn, so nothing after it is compared; end the response with the "
                         "assistant's turn")  # fmt: skip
    margin = data.get("margin")
    if isinstance(margin, float) and not math.isfinite(margin):  # JSON's NaN and Infinity, 1e999, a Parquet NaN
        report("margin", f"must be a finite number, got {margin}")
    if report.n == n and chosen == rejected:
        report("rejected", "identical to chosen: the pair carries no preference")
    if report.n > n:
        return None
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected,
            **_extras(data, ("prompt", "chosen", "rejected", "system"))}  # fmt: skip


RESERVED_PROMPT_COLUMNS = ("prompt_messages", "truncated")
"""Columns the rollout adds for the reward functions (docs/rewards.md); a prompts file may not use these names."""


def _normalise_prompts(data: dict, report) -> dict | None:
    if "messages" in data and "prompt" not in data:  # a chat: its prompt is what comes before its last assistant turn
        msgs = data["messages"]
        ends = msgs[-1]["role"] == "assistant"
        if ends and "completion" in data:
            report("completion", "a messages row read as a prompt keeps its last assistant turn as its completion "
                                 "column, and this row has one already; rename or leave one out")  # fmt: skip
            return None
        rest = {k: v for k, v in data.items() if k != "messages"}
        data = {**rest, "prompt": msgs[:-1] if ends else msgs, **({"completion": msgs[-1]["content"]} if ends else {})}
        if not data["prompt"]:
            report("messages", "holds only an assistant turn: no prompt to sample from")
            return None
    prompt = data["prompt"]
    if isinstance(prompt, str) and not prompt.strip():
        report("prompt", "empty prompt")
        return None
    if isinstance(prompt, list) and all(isinstance(m.get("content"), str) and not m["content"].strip() for m in prompt):
        report("prompt", "empty prompt: every message's content is blank")
        return None
    reserved = [k for k in RESERVED_PROMPT_COLUMNS if k in data]
    if reserved:
        report(reserved[0], "this column name is reserved: the rollout passes its own to the reward functions "
                            "(docs/rewards.md); rename it")  # fmt: skip
        return None
    n = report.n  # (`_Count`)
    prompt = _with_system(data, _as_messages(data["prompt"], "user"), report)
    if report.n > n:
        return None
    return {**data, "prompt": prompt}  # (a `system` column stays one too, for a reward that reads it)


_NORMALISE = {"sft": _normalise_sft, "preference": _normalise_preference, "prompts": _normalise_prompts}
