"""The `posttrain` command: a thin layer that parses arguments, calls the Python API and prints.

One module per command group (`quickstart`, `train`, `data`, `generate`, `merge`, `report`, `evaluate`,
`diagnose`, `study`, `estimate`, `advise`, `vllm_serve`), each with `add_parser(subparsers)` and the function that
runs the command; `output` holds what they report (`Output`, the `--json` document). This module assembles the
parser and runs the command.

Exit codes: 0 success, 2 a user error (bad input, bad config, missing model: one clear paragraph, no
traceback), 1 a bug (the traceback is shown), 130 interrupted.

Commands that print results return an `Output`: its text is what they print, and with `--json` its document is
printed instead, as the only thing on stdout (everything else the command prints goes to stderr while it
runs); a failure is a document too. The documents are described in docs/cli-json.md (`SCHEMA_VERSION`).

Start-up: `posttrain estimate` and `posttrain advise` run where torch is not installed, and every command's
parser is built at each start. So the command modules import at their top only what is torch-free (errors,
each other, the estimator and the advisor), and each command imports the library it calls inside its function.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback

from posttrain import __version__
from posttrain.cli import (
    advise,
    allocator,
    data,
    diagnose,
    estimate,
    evaluate,
    generate,
    merge,
    quickstart,
    report,
    study,
    train,
    vllm_serve,
)
from posttrain.cli.output import SCHEMA_VERSION, Output, json_document, place_error, quiet_libraries
from posttrain.errors import EXIT_BUG, EXIT_OK, EXIT_USER, UserError, term_as_interrupt

__all__ = ["SCHEMA_VERSION", "Output", "UsageError", "build_parser", "json_document", "main"]

PROG = "posttrain"

COMMANDS = (quickstart, train, data, generate, merge, report, evaluate, diagnose, study, estimate, advise,
            vllm_serve)
"""The command modules, in the order `posttrain --help` lists them."""


class UsageError(Exception):
    """A mistake in the command line itself (an unknown flag, a value its type refuses), from `parser`."""

    def __init__(self, parser: argparse.ArgumentParser, message: str):
        super().__init__(message)
        self.parser, self.message = parser, message


class _Parser(argparse.ArgumentParser):
    """argparse's parser, but a usage error is raised (`UsageError`) instead of printed before `sys.exit(2)`, so
    that `main` can report it like any other user error: also as the `--json` document of a command that prints
    one."""

    def error(self, message: str):
        raise UsageError(self, message)


DESCRIPTION = "Post-train language models (SFT, DPO, reward models, PPO, GRPO, RLOO; LoRA and QLoRA), and decide how."
EPILOG = """a first session:
  posttrain quickstart                                  # the embedded SmolLM2 learns a task, scored before and after
  posttrain advise --data my_train.jsonl --model 7B     # which method and technique, why, and what it costs
  posttrain estimate --model 7B --method dpo --technique lora   # memory per GPU, hours and money, before a run
  posttrain train configs/sft_lora.yaml data.train=my_train.jsonl run.output_dir=runs/mine
  posttrain evaluate --model runs/mine --data my_heldout.jsonl --reward numeric_answer
  posttrain diagnose --model runs/mine --task arithmetic --sft-data my_train.jsonl   # are SFT's pairs enough?

`posttrain COMMAND --help` gives a command's flags; the README has every command with an example."""


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"posttrain {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except UsageError as err:  # within a command's own flags: its parser knows whether it prints a document
        given = sys.argv[1:] if argv is None else argv
        document = bool(err.parser.get_default("fails_as_document")) and "--json" in given
        return _usage_error(err.parser, err.message, err.parser.prog.removeprefix(f"{PROG} ") if document else None)
    if extra and getattr(args, "command", None) == "train" and all("=" in a and not a.startswith("-") for a in extra):
        # `train RUN.yaml --resume run.max_steps=3`: argparse ends the positional overrides at the first flag;
        # key=value words after one are overrides too, in the order given
        args.overrides = [*args.overrides, *extra]
    elif extra:
        document = getattr(args, "fails_as_document", False) and args.json
        return _usage_error(parser, f"unrecognized arguments: {' '.join(extra)}",
                            _command_name(args) if document else None)  # fmt: skip
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USER
    if getattr(args, "loads_models", False):  # set by the commands that load a model (`set_defaults`)
        # A process of its own (not a caller's `main([...])`) may re-execute under another malloc; it does so
        # before anything else, so the new process starts from the environment the user gave this one.
        args.func = _loading_models(args.func, may_reexec=argv is None)
    # `estimate --json` and `advise --json` print their own JSON; the commands given `--json` by `add_json` return
    # an `Output` that becomes the document.
    as_json = getattr(args, "prints_document", False) and args.json
    stdout = sys.stdout
    try:
        # With --json, stdout carries the document alone: whatever the command prints while it runs goes to stderr.
        with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
            out = _run(args)
        if as_json and (out.doc is not None or out.error is not None):
            print(json_document(_command_name(args), out), file=stdout)
        elif out.text:
            print(out.text, file=stdout)
    except BrokenPipeError:
        # `posttrain estimate --table | head`: the reader left; not an error of ours.
        sys.stderr.close()
        return EXIT_OK
    return out.code


def _usage_error(parser: argparse.ArgumentParser, message: str, document: str | None) -> int:
    """argparse's report of a command-line mistake on stderr (usage, then the error), exit 2; and when `--json`
    was given to a command that prints a document (`document`: its name), that document (docs/cli-json.md:
    failures are documents too)."""
    parser.print_usage(sys.stderr)
    print(f"{parser.prog}: error: {message}", file=sys.stderr)
    if document is not None:
        with contextlib.suppress(BrokenPipeError):  # `... --json | head`: the reader left
            print(json_document(document, Output(code=EXIT_USER, error={"kind": "user", "message": message})))
    return EXIT_USER


def _run(args) -> Output:
    """The command's `Output`; a user error, an interrupt or a bug becomes a failed one, after saying so on
    stderr (the message, or the traceback of a bug)."""
    try:
        result = args.func(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return Output(code=EXIT_USER, error={"kind": "user", "message": str(err)})
    except BrokenPipeError:
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)  # `train` has said how its run continues (`train._interrupted_note`)
        return Output(code=130, error={"kind": "interrupted", "message": "interrupted"})
    except OSError as err:
        again = ("continue the run with --resume (its checkpoints are kept)" if args.command == "train"
                 else "run the command again")  # fmt: skip
        if (message := place_error(err, again)) is None:  # not the place written to: posttrain's own
            return _bug(err)
        print(f"error: {message}", file=sys.stderr)
        return Output(code=EXIT_USER, error={"kind": "user", "message": message})
    except Exception as err:
        return _bug(err)
    return result if isinstance(result, Output) else Output(code=int(result or EXIT_OK))


def _bug(err: Exception) -> Output:
    if os.environ.get("POSTTRAIN_DEBUG") is not None:
        raise err
    traceback.print_exception(err)
    print(
        "error: this is a bug in posttrain (exit 1); please report it with the traceback above",
        file=sys.stderr,
    )
    return Output(code=EXIT_BUG, error={"kind": "bug", "message": f"{type(err).__name__}: {err}"})


def _loading_models(func, *, may_reexec: bool):
    """`func`, run after this process has re-executed itself (once, before torch loads) under the malloc that
    `allocator.choose` picks, and after `quiet_libraries`; a bad ``POSTTRAIN_MALLOC`` is a user error like any
    other."""

    def run(args):
        if may_reexec and (library := allocator.choose(os.environ)):
            allocator.reexec_with(library, sys.argv[1:])
        quiet_libraries()
        with term_as_interrupt():  # as Ctrl-C: cleanup runs, and the command says it was stopped
            return func(args)

    return run


def _command_name(args) -> str:
    sub = getattr(args, "data_command", None) if args.command == "data" else None
    return f"{args.command} {sub}" if sub else args.command
