"""Errors that are the user's to fix, and how they are shown.

A `UserError` is a mistake in input the user controls (a file, a field, a setting, a missing model). The CLI
prints its message as one paragraph and exits with status 2, never with a traceback. Anything else that
escapes is a bug in posttrain (exit 1).

`Problem` is one located defect in a data file, printed as ``FILE:LINE: field: what is wrong`` so editors and
`grep` can jump to it (``FILE:LINE (row N): ...`` where several rows start on that line). `DataError` carries a
list of them.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from dataclasses import dataclass

EXIT_OK = 0
EXIT_BUG = 1
EXIT_USER = 2


class UserError(Exception):
    """A mistake the user can fix; `str(err)` is the whole message shown to them."""


class ConfigError(UserError):
    """A run configuration that is malformed, has unknown keys, wrong types or impossible values."""


class ModelNotFoundError(UserError):
    """A model name or path that cannot be resolved to weights on this machine."""


class NoRewardSignal(UserError):
    """Every reward function failed on every sample for several rollouts in a row: an RL run cannot learn, so it
    stops (exit 2). The training loop adds which checkpoint is kept."""


class CollectiveRewardFailed(UserError):
    """A reward function whose forward is a collective (a trained reward model sharded by FSDP2 or partitioned by
    ZeRO-3) raised on this process: out of memory, or its files missing on this machine. The other processes wait
    in that collective, so the run stops (exit 2; the launcher then stops them) instead of hanging. The training
    loop adds which checkpoint is kept."""


class OutOfMemory(UserError):
    """A training step (its sampling, forward, backward or evaluation) could not allocate memory on this process:
    the message says where, how much was asked for, and which settings need less. The training loop adds which
    checkpoint is kept. Under several processes this one exits and the launcher stops the others, which would
    otherwise wait for it in their next collective."""


class PeerStopped(UserError):
    """Another process of a run of several stopped (its own error, e.g. `OutOfMemory`, is the cause) while this one
    waited for it in a collective: said in one line, without a traceback that would bury the cause."""


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass(frozen=True)
class Problem:
    """One defect in one row of a data file. `row` (1-based) is set only where the line does not tell the row:
    several rows start on it (a JSON array written on one line).

    >>> str(Problem("data.jsonl", 3, "messages[1].content", "must be a string, got int"))
    'data.jsonl:3: messages[1].content: must be a string, got int'
    >>> str(Problem("big.json", 1, "completion", "empty completion", row=504))
    'big.json:1 (row 504): completion: empty completion'
    """

    file: str
    line: int | None
    field: str | None
    message: str
    row: int | None = None

    def __str__(self) -> str:
        where = place(self.file, self.line, self.row)
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


def place(file: str, line: int | None, row: int | None = None) -> str:
    """Where a row of a data file is: ``FILE:LINE``, ``FILE`` alone without a line, ``FILE:LINE (row N)`` where
    several rows start on the line.

    >>> place("d.jsonl", 3), place("d.jsonl", None), place("big.json", 1, 504)
    ('d.jsonl:3', 'd.jsonl', 'big.json:1 (row 504)')
    """
    where = f"{file}:{line}" if line is not None else file
    return where if row is None else f"{where} (row {row})"


def problem_lines(problems: list[Problem], *, same: int = 5, max_shown: int | None = None) -> list[str]:
    """`problems` one per line, in order, each distinct problem (field and message) on at most `same` rows, then
    one line counting the rows it was left out on: a file whose 200 rows all lack a field says so in 6 lines, not
    200. `max_shown` caps the listed lines; the rest is counted.

    >>> ps = [Problem("d.jsonl", i, "completion", "missing required field") for i in (1, 2, 3)]
    >>> problem_lines([*ps, Problem("d.jsonl", 4, "text", "empty text")], same=2)
    ['d.jsonl:1: completion: missing required field', 'd.jsonl:2: completion: missing required field', 'd.jsonl:4: text: empty text', 'd.jsonl: ... and 1 more row with the same problem (completion: missing required field)']
    """
    seen: dict[tuple, int] = {}
    shown: dict[tuple, set] = {}  # the rows (line, row) a problem was listed on
    hidden: dict[tuple, set] = {}  # ... and left out on: one row may hold it twice (two messages)
    lines: list[str] = []
    for p in problems:
        key = (p.file, p.field, p.message)
        seen[key] = seen.get(key, 0) + 1
        if seen[key] <= same:
            lines.append(str(p))
            shown.setdefault(key, set()).add((p.line, p.row))
        elif (p.line, p.row) not in shown[key]:
            hidden.setdefault(key, set()).add((p.line, p.row))
    if max_shown is not None and len(lines) > max_shown:
        lines = [*lines[:max_shown], f"... and {len(lines) - max_shown} more problems"]
    for (file, field, message), where in hidden.items():
        rows = f"{len(where)} more row{'s' if len(where) > 1 else ''}"
        lines.append(f"{file}: ... and {rows} with the same problem ({f'{field}: ' if field else ''}{message})")
    return lines


class DataError(UserError):
    """Problems found in a data file; the message lists up to `max_shown` of them, one per line (`problem_lines`:
    a problem repeated on many rows is listed on its first five, then counted)."""

    def __init__(self, problems: list[Problem], *, header: str | None = None, max_shown: int = 20,
                 footer: str | None = None):  # fmt: skip
        self.problems = list(problems)
        self.header, self.footer = header, footer
        lines = problem_lines(self.problems, max_shown=max_shown)
        if header:
            lines.insert(0, header)
        if footer:
            lines.append(footer)
        super().__init__("\n".join(lines))


@contextlib.contextmanager
def term_as_interrupt():
    """SIGTERM (what SLURM, Kubernetes and `timeout` send before killing a job) stops the command as Ctrl-C does:
    its `finally` blocks run (a half-written merge or checkpoint folder is removed, a run folder's lock released)
    and it says it was interrupted (exit 130; `--json`, a document); it ended the process silently. Only the main
    thread can set a signal handler: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)
