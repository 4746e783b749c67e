"""`--data FILE`: what kind of rows a data file holds, how many, and how long they are.

The file is read and checked by `posttrain.data` (`readers.read_records`, `schema.load_rows`), the same code
`posttrain data validate` and `posttrain train` use, so every format they read works here too: JSONL, JSON,
CSV, Parquet and `datasets` folders (`save_to_disk`), and a file they reject is rejected here with the same
``FILE:LINE: field: what is wrong`` lines. What this module adds is the kind of file, told from each row's keys:
  `chosen` and/or `rejected` (with or without `prompt`)       -> preference
  `messages`, or `prompt` + `completion`, or `text`          -> sft
  `prompt` (other columns such as `answer` allowed)          -> prompts
and lengths in characters and approximate tokens (characters / 4, the usual rule of thumb for English text with
BPE tokenizers), which the advisor uses for sequence length and token counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from posttrain.config import column_problems
from posttrain.data.columns import Columns, guess_columns
from posttrain.data.readers import Record, read_records
from posttrain.data.schema import load_rows
from posttrain.errors import UserError

CHARS_PER_TOKEN = 4.0
SHAPES = ("sft", "preference", "prompts")
# The methods that train on each shape of file: `estimate --data` refuses the others, `advise --data` gives the file
# to the stages listed here.
SHAPE_METHODS = {"sft": ("sft",), "preference": ("dpo", "reward"), "prompts": ("grpo", "rloo", "ppo")}


@dataclass
class DataSummary:
    file: str
    shape: str  # sft | preference | prompts: the `kind` of `posttrain data validate --kind`
    rows: int
    mean_chars: float
    max_chars: int
    mean_tokens: float  # approximate
    p95_tokens: float  # approximate
    columns: dict[str, str] = field(default_factory=dict)  # --column: the file's own names (data.columns)
    ignore_columns: list[str] = field(default_factory=list)  # --ignore-column (data.ignore_columns)
    message_keys: dict[str, str] = field(default_factory=dict)  # --message-key (data.message_keys)
    roles: dict[str, str] = field(default_factory=dict)  # --role (data.roles)
    turns: dict[str, str] = field(default_factory=dict)  # --turn (data.turns)


def seq_len_for(summary: DataSummary, completion_len: int | None = None) -> int:
    """The sequence length a file's rows need: 1.5 x the 95th percentile of their approximate tokens (room for the
    chat template and a tokenizer that splits finer), up to the next power of two, within [256, 8192]. A prompts
    file's rows are prompts only: the completion an RL method samples comes on top, `completion_len` tokens, or as
    many as the prompts' room (half the sequence, the estimator's own split) when not given.

    >>> s = DataSummary("f", "sft", 10, 800.0, 1200, 200.0, 300.0)
    >>> seq_len_for(s), seq_len_for(replace(s, shape="prompts")), seq_len_for(replace(s, shape="prompts"), 100)
    (512, 1024, 612)
    """
    room = min(8192, max(256, 1 << int(summary.p95_tokens * 1.5).bit_length()))
    if summary.shape != "prompts":
        return room
    return room + (completion_len if completion_len is not None else room)


def tokens_per_row(shape: str, mean_tokens: float, seq_len: int, samples: int) -> tuple[float, str]:
    """The tokens one row of a `shape` file puts through the model in an epoch, and the count in words: a
    demonstration its own tokens; a preference pair chosen and rejected (each with its prompt); a prompt its
    `samples` completions (GRPO's group, RLOO's; PPO samples one) of `seq_len` tokens, prompt included. What
    `estimate --data` and `advise` both count a file's tokens by.

    >>> tokens_per_row("preference", 300.0, 1024, 1)
    (600.0, '2 x 300 tokens (chosen and rejected)')
    >>> tokens_per_row("prompts", 300.0, 1024, 8)
    (8192, '8 sample(s) x 1024 tokens')
    """
    if shape == "sft":
        return mean_tokens, f"{mean_tokens:,.0f} tokens"
    if shape == "preference":
        return 2 * mean_tokens, f"2 x {mean_tokens:,.0f} tokens (chosen and rejected)"
    return samples * seq_len, f"{samples} sample(s) x {seq_len} tokens"


def row_shape(row: dict) -> str | None:
    """The shape a row's keys imply, or None.

    >>> row_shape({"prompt": "2+2?", "chosen": "4", "rejected": "5"}), row_shape({"prompt": "2+2?", "answer": "4"})
    ('preference', 'prompts')
    """
    keys = set(row)
    if keys & {"chosen", "rejected"}:  # a missing side is then reported as the preference check words it
        return "preference"
    if "messages" in keys or {"prompt", "completion"} <= keys or "text" in keys:
        return "sft"
    if "prompt" in keys:
        return "prompts"
    return None


def _text_len(value) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):  # a message list
        return sum(_text_len(m.get("content", "")) if isinstance(m, dict) else _text_len(m) for m in value)
    return 0


def _row_chars(row: dict, shape: str) -> int:
    """Characters of one normalised row (`schema.load_rows`: prompts, chosen, rejected are message lists)."""
    if shape == "preference":
        # The longer of the two sequences a DPO step sees: prompt + chosen, prompt + rejected.
        return _text_len(row["prompt"]) + max(_text_len(row["chosen"]), _text_len(row["rejected"]))
    if shape == "prompts":
        return _text_len(row["prompt"])
    return _text_len(row.get("messages")) + _text_len(row.get("text"))


def _kind(records: list[Record], name: str) -> str:
    """The one kind every row's keys imply; a row of another kind, or of none, is an error naming its line."""
    shape: str | None = None
    for rec in records:
        this = row_shape(rec.data)
        if this is None:
            keys = set(rec.data)
            guess = next((g for k in SHAPES if (g := guess_columns(k, keys))), {})
            hint = (f"; in the file's own column names, read them with {' '.join(f'--column {f}={c}' for f, c in guess.items())}"
                    if guess else "; a file in its own column names reads with --column FIELD=COLUMN")  # fmt: skip
            raise UserError(
                f"{rec.where(name)}: cannot tell the row's shape from its keys {sorted(rec.data)}; expected "
                "messages, prompt + completion, text (SFT), prompt + chosen + rejected (preference) or prompt "
                f"(prompts){hint} (docs/data.md)"
            )
        if shape is not None and this != shape:
            raise UserError(f"{rec.where(name)}: a {this} row in a file whose earlier rows are {shape} rows")
        shape = this
    if shape is None:
        raise UserError(f"{name}: no rows")
    return shape


def summarise(path: str | Path, columns: Columns | None = None) -> DataSummary:
    """Read every row of `path` with posttrain's data readers, check it as `posttrain data validate` does for the
    kind its keys imply, and measure lengths. `columns`: the file's own column names (`--column`,
    `--ignore-column`), applied before the kind is told; the stage configs then carry them."""
    name = str(path)
    columns = columns or Columns()
    kind = _kind([replace(r, data=columns.apply(r.data)[0]) for r in read_records(path)], name)
    if problems := column_problems(columns.rename, columns.ignore, kind, source=columns.source):
        raise UserError(f"{name} holds {kind} rows: " + "; ".join(problems))
    lengths = [_row_chars(row, kind) for row in load_rows(path, kind, columns)]
    ordered = sorted(lengths)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    mean = sum(lengths) / len(lengths)
    return DataSummary(
        file=name,
        shape=kind,
        rows=len(lengths),
        mean_chars=mean,
        max_chars=ordered[-1],
        mean_tokens=mean / CHARS_PER_TOKEN,
        p95_tokens=p95 / CHARS_PER_TOKEN,
        columns=dict(columns.rename),
        ignore_columns=list(columns.ignore),
        message_keys=dict(columns.message_keys),
        roles=dict(columns.roles),
        turns=dict(columns.turns),
    )
