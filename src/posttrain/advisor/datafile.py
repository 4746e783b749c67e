"""`--data FILE`: what kind of rows a data file holds, how many, and how long they are.

A small reader of JSONL, JSON (a list of rows) and CSV with the standard library only, so the advisor works
without the data package or torch. Row shapes, by their keys:
  `prompt` + `chosen` + `rejected`                -> preference
  `messages`, or `prompt` + `completion`, or `text` -> sft
  `prompt` (other columns such as `answer` allowed) -> prompts
Lengths are in characters and approximate tokens (characters / 4, the usual rule of thumb for English text
with BPE tokenizers); the advisor uses them for sequence length and token counts. Malformed input raises
`UserError` naming the file and line.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from posttrain.errors import UserError

CHARS_PER_TOKEN = 4.0
SHAPES = ("sft", "preference", "prompts")


@dataclass
class DataSummary:
    file: str
    shape: str  # sft | preference | prompts
    rows: int
    mean_chars: float
    max_chars: int
    mean_tokens: float  # approximate
    p95_tokens: float  # approximate


def row_shape(row: dict) -> str | None:
    """The shape a row's keys imply, or None.

    >>> row_shape({"prompt": "2+2?", "chosen": "4", "rejected": "5"}), row_shape({"prompt": "2+2?", "answer": "4"})
    ('preference', 'prompts')
    """
    keys = set(row)
    if {"prompt", "chosen", "rejected"} <= keys:
        return "preference"
    if "messages" in keys or {"prompt", "completion"} <= keys or "text" in keys:
        return "sft"
    if "prompt" in keys:
        return "prompts"
    return None


def _text_len(value) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):  # messages, or chosen/rejected as message lists
        return sum(_text_len(m.get("content", "")) if isinstance(m, dict) else _text_len(m) for m in value)
    if isinstance(value, dict):
        return _text_len(value.get("content", ""))
    return 0


def _row_chars(row: dict, shape: str) -> int:
    if shape == "preference":
        # The longer of the two sequences a DPO step sees: prompt + chosen, prompt + rejected.
        return _text_len(row["prompt"]) + max(_text_len(row["chosen"]), _text_len(row["rejected"]))
    if shape == "prompts":
        return _text_len(row["prompt"])
    return sum(_text_len(row.get(k)) for k in ("messages", "prompt", "completion", "text"))


def _rows(path: Path):
    """Yield (line number, row) pairs."""
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise UserError(f"{path}: cannot read the data file ({err.strerror})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        for i, row in enumerate(reader, start=2):  # line 1 is the header
            if None in row:
                raise UserError(f"{path}:{i}: more fields than the header has columns")
            yield i, row
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{err.lineno}: not valid JSON: {err.msg}") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise UserError(f"{path}: a JSON data file holds a list of rows (objects)")
        for i, row in enumerate(data, start=1):
            yield i, row  # JSON has no row lines: the number is the row's position
    elif suffix in (".jsonl", ".ndjson"):
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{i}: not valid JSON: {err.msg}") from None
    else:
        raise UserError(f"{path}: unsupported data file type {suffix!r}; use .jsonl, .json or .csv")


def summarise(path: str | Path) -> DataSummary:
    """Read every row of `path`, check all rows share one shape, and measure lengths."""
    p = Path(path)
    shape: str | None = None
    lengths: list[int] = []
    for line, row in _rows(p):
        where = f"{p}:{line}" if p.suffix.lower() != ".json" else f"{p}: row {line}"
        if not isinstance(row, dict):
            raise UserError(f"{where}: a row must be an object with named fields, got {type(row).__name__}")
        this = row_shape(row)
        if this is None:
            raise UserError(
                f"{where}: cannot tell the row's shape from its keys {sorted(row)}; expected messages, "
                "prompt + completion, text (SFT), prompt + chosen + rejected (preference) or prompt (prompts)"
            )
        if shape is not None and this != shape:
            raise UserError(f"{where}: a {this} row in a file whose earlier rows are {shape} rows")
        shape = this
        lengths.append(_row_chars(row, this))
    if shape is None:
        raise UserError(f"{p}: no rows")
    ordered = sorted(lengths)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    mean = sum(lengths) / len(lengths)
    return DataSummary(
        file=str(p),
        shape=shape,
        rows=len(lengths),
        mean_chars=mean,
        max_chars=ordered[-1],
        mean_tokens=mean / CHARS_PER_TOKEN,
        p95_tokens=p95 / CHARS_PER_TOKEN,
    )
