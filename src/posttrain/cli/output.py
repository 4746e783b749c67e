"""What a command reports and how it reaches the terminal: `Output`, its `--json` document, quiet libraries.

Commands that print results return an `Output`: its text is what they print, and with `--json` its document is
printed instead, as the only thing on stdout (`posttrain.cli.main` sends everything else the command prints to
stderr while it runs); a failure is a document too. The documents are described in docs/cli-json.md
(`SCHEMA_VERSION`).
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.data.columns import typed
from posttrain.errors import EXIT_OK, EXIT_USER, UserError

SCHEMA_VERSION = 1
"""Version of the `--json` documents (docs/cli-json.md): raised when a key is removed or changes meaning; new
keys may appear without it."""


@dataclass
class Output:
    """What a command reports: `text` (printed without --json), `doc` (the JSON document's own keys; None: no
    document, as on the other processes of a multi-process launch, where rank 0 reports), the exit `code`, and
    for a failure `error` (``{"kind", "message"}``)."""

    doc: dict | None = field(default_factory=dict)
    text: str = ""
    code: int = EXIT_OK
    error: dict | None = None


def add_json(parser: argparse.ArgumentParser) -> None:
    """Give a command `--json`: `main` then prints its `Output` as a document (`json_document`), a usage mistake
    included (`fails_as_document`, which `estimate` and `advise`, printing their own JSON, set alone)."""
    parser.add_argument(
        "--json", action="store_true",
        help="print one JSON document on stdout instead (docs/cli-json.md); progress and messages go to stderr",
    )  # fmt: skip
    parser.set_defaults(prints_document=True, fails_as_document=True)


def print_failure(command: str, args: argparse.Namespace, err: Exception) -> int:
    """A user error of a command that prints its own JSON (`estimate`, `advise`): the paragraph on stderr, and
    with --json the failure document on stdout, as every command's (docs/cli-json.md). Returns the exit code."""
    print(f"error: {err}", file=sys.stderr)
    if getattr(args, "json", False):
        print(json_document(command, Output(code=EXIT_USER, error={"kind": "user", "message": str(err)})))
    return EXIT_USER


_PLACE_ERRORS = {
    errno.ENOSPC: "free some space",
    errno.EDQUOT: "free some space (the disk quota is reached)",
    errno.EROFS: "choose a place you can write to",
    errno.EACCES: "choose files and folders this user can read and write",
}


def place_error(err: OSError, again: str) -> str | None:
    """The user's message for an error of the place written to (a full disk, a read-only file system, a denied
    permission): what happened, the file, what to do, then `again`; None for any other `OSError` (a bug of ours).

    >>> place_error(OSError(errno.ENOSPC, "No space left on device", "/out/a.jsonl"), "run the command again")
    'No space left on device: /out/a.jsonl; free some space, and run the command again'
    >>> place_error(OSError(errno.EBADF, "Bad file descriptor"), "run the command again") is None
    True
    """
    if err.errno not in _PLACE_ERRORS:
        return None
    where = f": {err.filename}" if err.filename else ""
    return f"{err.strerror}{where}; {_PLACE_ERRORS[err.errno]}, and {again}"


def settings(args: argparse.Namespace, *names: str) -> dict:
    """The named command-line settings, for a document's `settings` key."""
    return {name: getattr(args, name) for name in names}


def json_document(command: str, out: Output) -> str:
    """The `--json` document of a command's `Output` (docs/cli-json.md): the envelope (`schema_version`,
    `command`, `ok`, and `error` for a failure) around the command's own keys. Numbers that are not finite
    (NaN, inf) are written as null, so the document is strict JSON.

    >>> print(json_document("generate", Output(doc={"loss": float("nan")}, code=0)))
    {
      "schema_version": 1,
      "command": "generate",
      "ok": true,
      "loss": null
    }
    """
    doc = {"schema_version": SCHEMA_VERSION, "command": command, "ok": out.code == EXIT_OK}
    if out.error is not None:
        doc["error"] = out.error
    doc.update(out.doc or {})
    return json.dumps(_finite(doc), indent=2, ensure_ascii=False, default=str)


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def quiet_libraries() -> None:
    """Our progress bar and messages only: no per-tensor loading bars or deprecation notices from libraries, no
    hub retries when the hub cannot be reached (`models.hub`; before transformers is first imported)."""
    import warnings

    from posttrain.models.hub import prepare_hub_libraries

    prepare_hub_libraries()  # first: it sets the hub's environment, which transformers reads when imported
    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


class Once(argparse.Action):
    """An option that may be given once: a second value replaced the first silently (`evaluate --model A --model B`
    evaluated B alone, in a table whose layout suggests one column per model)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, f"_{self.dest}_given", False):
            parser.error(f"{option_string} was given twice ({getattr(namespace, self.dest)!r}, then {values!r}); it "
                         "takes one value: run the command once for each")  # fmt: skip
        setattr(namespace, f"_{self.dest}_given", True)
        setattr(namespace, self.dest, values)


def positive_int(text: str) -> int:
    """argparse type: a whole number > 0 (token counts, batch sizes); argparse words the refusal with the flag.

    >>> positive_int("3")
    3
    >>> positive_int("0")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: must be a whole number > 0, got 0
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number > 0, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a whole number > 0, got {text}")
    return value


def _bounded(ok, wants: str):
    """An argparse type: a finite number for which `ok(value)` holds, refused as "must be `wants`" otherwise.

    >>> _bounded(lambda v: v >= 0, ">= 0")("-1")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: must be >= 0, got -1
    """

    def parse(text: str) -> float:
        value = _number(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {wants}, got {text}")
        return value

    return parse


number = _bounded(lambda v: True, "a number")
"""argparse type: any finite number (inf and nan are refused); the command checks the range."""
positive = _bounded(lambda v: v > 0, "> 0")
"""argparse type: a positive number (e.g. a DPO beta)."""
temperature = _bounded(lambda v: v >= 0, ">= 0 (0: greedy)")
"""argparse type: a sampling temperature."""
top_p = _bounded(lambda v: 0 < v <= 1, "in (0, 1] (1: no nucleus cut)")
"""argparse type: a nucleus-sampling mass."""
fraction = _bounded(lambda v: 0 < v <= 1, "in (0, 1]")
"""argparse type: a share of something, above 0 and at most 1 (a GPU memory share, an MFU)."""


def template_var(text: str) -> tuple[str, bool | int | float | str]:
    """argparse type: ``NAME=VALUE`` for a chat template's variable, the value read as YAML reads a scalar.

    >>> template_var("enable_thinking=false"), template_var("style=terse")
    (('enable_thinking', False), ('style', 'terse'))
    >>> template_var("enable_thinking")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: must be NAME=VALUE (e.g. enable_thinking=false), got 'enable_thinking'
    """
    import yaml

    name, eq, raw = text.partition("=")
    if not eq or not name.strip():
        raise argparse.ArgumentTypeError(f"must be NAME=VALUE (e.g. enable_thinking=false), got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if not isinstance(value, bool | int | float | str):
        raise argparse.ArgumentTypeError(f"the value must be true, false, a number or a string, got {raw!r}")
    return name.strip(), value


def add_template_vars(parser: argparse.ArgumentParser) -> None:
    """`--template-var NAME=VALUE`, repeatable: what `data.chat_template_kwargs` is for a run."""
    parser.add_argument(
        "--template-var", action="append", type=template_var, default=[], metavar="NAME=VALUE",
        help="a value for a variable of the model's chat template (repeatable), as data.chat_template_kwargs sets it "
             "in training: e.g. enable_thinking=false for Qwen3, to score a base model as its fine-tune was trained",
    )  # fmt: skip


def column_rename(text: str) -> tuple[str, str | list[str]]:
    """argparse type: ``FIELD=COLUMN``, a file's column read as one of posttrain's fields (``FIELD=A+B``: columns
    joined, as a list in `data.columns`).

    >>> column_rename("prompt=question"), column_rename("prompt=instruction+input")
    (('prompt', 'question'), ('prompt', ['instruction', 'input']))
    >>> column_rename("prompt")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: must be FIELD=COLUMN (e.g. prompt=question: the file's column question read as prompt), got 'prompt'
    """
    field, eq, column = (part.strip() for part in text.partition("="))
    if not eq or not field or not column or any(not c.strip() for c in column.split("+")):
        raise argparse.ArgumentTypeError(
            f"must be FIELD=COLUMN (e.g. prompt=question: the file's column question read as prompt), got {text!r}"
        )
    return field, [c.strip() for c in column.split("+")] if "+" in column else column


def turn_marker(text: str) -> tuple[str, str]:
    """argparse type: ``ROLE=MARKER``, the text that opens ROLE's turn in a transcript (`data.turns`); ``\\n`` and
    ``\\t`` in MARKER are a newline and a tab, so that HH's marker can be typed in one word.

    >>> turn_marker(r"user=\\n\\nHuman:"), turn_marker("assistant=### Assistant:")
    (('user', '\\n\\nHuman:'), ('assistant', '### Assistant:'))
    """
    role, eq, marker = text.partition("=")
    if not eq or not role.strip() or not marker.strip():
        raise argparse.ArgumentTypeError(f"must be ROLE=MARKER (e.g. user='\\n\\nHuman:'), got {text!r}")
    return role.strip(), _unescaped(marker)


def _unescaped(text: str) -> str:
    """A flag's text with ``\\n`` and ``\\t`` read as a newline and a tab (`typed` turned round)."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def stop_text(text: str) -> str:
    """argparse type: a stop string (``\\n`` a newline, as in YAML's double quotes), not empty.

    >>> stop_text(r"\\n\\nQuestion:")
    '\\n\\nQuestion:'
    """
    if not text:
        raise argparse.ArgumentTypeError("a stop string cannot be empty")
    return _unescaped(text)


def add_stop(parser: argparse.ArgumentParser) -> None:
    """`--stop TEXT`, repeatable: the stop strings an RL run's `algorithm.rollout.stop` samples with, so that an
    answer is scored as training scored it (`trained_stop` says when a run folder had some)."""
    parser.add_argument(
        "--stop", action="append", type=stop_text, default=[], metavar="TEXT",
        help="end each answer at the first TEXT (repeatable; \\n is a newline), as algorithm.rollout.stop does in "
             "an RL run: a model trained with stop strings is scored as it was trained",
    )  # fmt: skip


def run_config(model: str) -> dict:
    """The config.yaml of the run whose folder (or `final/`) `model` names, as read; {} for anything else (a model
    folder, a hub name, a config that does not read)."""
    import yaml

    for folder in (Path(model), *([Path(model).parent] if Path(model).name == "final" else [])):
        config = folder / "config.yaml"
        if config.is_file():
            try:
                saved = yaml.safe_load(config.read_text(encoding="utf-8"))
            except (OSError, yaml.YAMLError):
                return {}
            return saved if isinstance(saved, dict) else {}
    return {}


def setting(saved: dict, dotted: str):
    """A setting (``algorithm.beta``) of a `run_config`, None where it has none.

    >>> setting({"algorithm": {"beta": 0.5}}, "algorithm.beta"), setting({}, "data.max_length")
    (0.5, None)
    """
    node = saved
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def trained_stop(model: str) -> list[str]:
    """The `algorithm.rollout.stop` of the run whose folder (or `final/`) `model` names, [] for anything else."""
    stop = setting(run_config(model), "algorithm.rollout.stop")
    return [s for s in stop if isinstance(s, str) and s] if isinstance(stop, list) else []


def stop_note(args) -> str | None:
    """The note for `--model` a run that sampled with stop strings, scored without them (`--stop` not given)."""
    if args.stop:
        return None
    trained = trained_stop(args.model)
    if not trained:
        return None
    flags = " ".join("--stop " + shlex.quote(typed(s)) for s in trained)
    return (f"note: {args.model} was trained sampling with algorithm.rollout.stop {trained}: its answers here run "
            f"to the end of the turn instead; give {flags} to score them as training did")


LAYOUT_FLAGS = (("--column", "column", "data.columns"), ("--ignore-column", "ignore_column", "data.ignore_columns"),
                ("--message-key", "message_key", "data.message_keys"), ("--role", "role", "data.roles"),
                ("--turn", "turn", "data.turns"))  # fmt: skip
"""The flags that read a file in its own names (`add_columns`): flag, its attribute, the run setting it is."""


def add_columns(parser: argparse.ArgumentParser, hidden: bool = False) -> None:
    """`--column FIELD=COLUMN` and `--ignore-column COLUMN`, repeatable: what `data.columns` and
    `data.ignore_columns` are for a run (`columns_given` reads them); and the message and transcript flags.
    `hidden`: accepted but not listed in --help (`train`, which refuses them with the config's form)."""
    parser.add_argument(
        "--column", action="append", type=column_rename, default=[], metavar="FIELD=COLUMN",
        help=argparse.SUPPRESS if hidden else "read the file's COLUMN as posttrain's FIELD (repeatable), as data.columns does in training: "
             "e.g. --column prompt=question; COLUMN+COLUMN joins text columns (Alpaca: --column prompt=instruction+input)",
    )  # fmt: skip
    parser.add_argument(
        "--ignore-column", action="append", default=[], metavar="COLUMN",
        help=argparse.SUPPRESS if hidden else "leave the file's COLUMN out (repeatable), as data.ignore_columns does in training; COLUMN.KEY leaves "
             "KEY out of every message of COLUMN (ShareGPT's conversations.weight)",
    )  # fmt: skip
    parser.add_argument(
        "--message-key", action="append", type=column_rename, default=[], metavar="KEY=FILE_KEY",
        help=argparse.SUPPRESS if hidden else "read the key FILE_KEY of the file's messages as role or content (repeatable), as data.message_keys "
             "does in training: e.g. ShareGPT's --message-key role=from --message-key content=value",
    )  # fmt: skip
    parser.add_argument(
        "--role", action="append", type=column_rename, default=[], metavar="ROLE=FILE_ROLE",
        help=argparse.SUPPRESS if hidden else "read the file's role name FILE_ROLE as system, user or assistant (repeatable), as data.roles does in "
             "training: e.g. ShareGPT's --role user=human --role assistant=gpt",
    )  # fmt: skip
    parser.add_argument(
        "--turn", action="append", type=turn_marker, default=[], metavar="ROLE=MARKER",
        help=argparse.SUPPRESS if hidden else "read a text holding MARKER as a transcript whose ROLE turns MARKER opens (repeatable), as data.turns "
             "does in training; \\n is a newline: Anthropic HH's --turn 'user=\\n\\nHuman:' --turn "
             "'assistant=\\n\\nAssistant:'",
    )  # fmt: skip


def columns_given(args, kind: str, path: str | None = None, flag: str = "--data"):
    """The `--column`/`--ignore-column` options as a `data.columns.Columns` for the file `path` (given as `flag`)
    of `kind`, refused (with what is wrong) where they cannot apply: no file, a field `kind` rows do not read, one
    column read twice."""
    from posttrain.config import column_problems, message_problems, turn_problems
    from posttrain.data.columns import Columns
    from posttrain.errors import UserError

    given = {flag_: getattr(args, attr, None) or [] for flag_, attr, _ in LAYOUT_FLAGS}
    if path is None and (named := next((f for f, v in given.items() if v), None)):
        raise UserError(f"{named} names what a data file holds, and no file is read: give one with {flag} FILE")
    if bad := [f for f, c in given["--message-key"] + given["--role"] if not isinstance(c, str)]:
        raise UserError(f"--message-key and --role name one key or role each ({bad[0]}=...+... joins nothing there)")
    for name in ("--column", "--message-key", "--role", "--turn"):
        firsts = [f for f, _ in given[name]]
        if twice := sorted({f for f in firsts if firsts.count(f) > 1}):
            raise UserError(f"{name} gives {', '.join(twice)} more than once: each is read from one name")
    rename, ignore = dict(given["--column"]), tuple(given["--ignore-column"])
    keys, roles, turns = dict(given["--message-key"]), dict(given["--role"]), dict(given["--turn"])
    problems = column_problems(rename, ignore, kind, source=("--column", "--ignore-column"))
    problems += message_problems(keys, roles, source=("--message-key", "--role"))
    problems += turn_problems(turns, source="--turn")
    if problems:
        raise UserError("; ".join(problems))
    return Columns(rename, ignore, cli=True, message_keys=keys, roles=roles, turns=turns)


def port(text: str) -> int:
    """argparse type: a TCP port, 0 (a free one) to 65535.

    >>> port("8000")
    8000
    >>> port("99999")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: must be a port number from 0 to 65535, got 99999
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a port number from 0 to 65535, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 0 to 65535, got {text}")
    return value


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def check_output_file(path: str | None, flag: str, *, jsonl: bool = False, inputs: dict | None = None) -> None:
    """Refuse, before any work, an output file that could not be written: a folder, or a path under a file; one
    of the command's `inputs` (flag -> path), which writing would replace; and, with `jsonl` (a data file that is
    read back by its extension), a name that does not end in `.jsonl`.

    >>> check_output_file("/", "--out")
    Traceback (most recent call last):
    posttrain.errors.UserError: --out /: is a folder; give a file path (e.g. /answers.jsonl)
    >>> check_output_file("rows.csv", "--out", jsonl=True)
    Traceback (most recent call last):
    posttrain.errors.UserError: --out rows.csv: this command writes JSON Lines, and data files are read by their extension: name it rows.jsonl
    """
    from pathlib import Path

    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{flag} {path}: is a folder; give a file path (e.g. {p / 'answers.jsonl'})")
    for given, source in (inputs or {}).items():
        if source is not None and p.exists() and Path(source).exists() and p.resolve() == Path(source).resolve():
            raise UserError(f"{flag} {path}: is the file {given} reads, which writing would replace; choose "
                            "another output file")  # fmt: skip
    if jsonl and p.suffix.lower() != ".jsonl":
        raise UserError(f"{flag} {path}: this command writes JSON Lines, and data files are read by their "
                        f"extension: name it {p.with_suffix('.jsonl')}")  # fmt: skip
    _check_parents(p, flag)


def check_output_folder(path: str | None, flag: str) -> None:
    """Refuse, before any work, an output folder that is a file or lies under one."""
    from pathlib import Path

    if path is None:
        return
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{flag} {path}: is a file, not a folder; give a folder (it is created if missing)")
    _check_parents(p, flag)


def _check_parents(p, flag: str) -> None:
    """The nearest existing folder at or above `p`'s parent is a folder this process can write into (a read-only
    file system or folder failed only once the work was done, with a traceback), and an existing `p` can be
    written."""
    import tempfile

    for parent in [p.absolute()] if p.is_dir() else p.absolute().parents:  # an existing output folder: itself
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{flag} {p}: {parent} is a file, not a folder")
            try:  # what the write itself will need: a new file there (os.access is not told of every mount)
                with tempfile.NamedTemporaryFile(dir=parent, prefix=".posttrain-write-check-"):
                    pass
            except OSError as err:
                raise UserError(f"{flag} {p}: {parent} cannot be written into ({err.strerror}); choose a folder "
                                "you can write to") from None  # fmt: skip
            if p.is_file() and not os.access(p, os.W_OK):
                raise UserError(f"{flag} {p}: the file exists and cannot be written; choose another path")
            return
