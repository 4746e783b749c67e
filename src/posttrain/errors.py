"""Errors that are the user's to fix, and how they are shown.

A `UserError` is a mistake in input the user controls (a file, a field, a setting, a missing model). The CLI
prints its message as one paragraph and exits with status 2, never with a traceback. Anything else that
escapes is a bug in posttrain (exit 1).

`Problem` is one located defect in a data file, printed as ``FILE:LINE: field: what is wrong`` so editors and
`grep` can jump to it. `DataError` carries a list of them.
"""

from __future__ import annotations

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
    """One defect in one row of a data file.

    >>> str(Problem("data.jsonl", 3, "messages[1].content", "must be a string, got int"))
    'data.jsonl:3: messages[1].content: must be a string, got int'
    """

    file: str
    line: int | None
    field: str | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class DataError(UserError):
    """Problems found in a data file; the message lists up to `max_shown` of them, one per line."""

    def __init__(self, problems: list[Problem], *, header: str | None = None, max_shown: int = 20,
                 footer: str | None = None):  # fmt: skip
        self.problems = list(problems)
        self.footer = footer
        lines = [str(p) for p in self.problems[:max_shown]]
        if len(self.problems) > max_shown:
            lines.append(f"... and {len(self.problems) - max_shown} more problems")
        if header:
            lines.insert(0, header)
        if footer:
            lines.append(footer)
        super().__init__("\n".join(lines))
