"""The `posttrain` command: a thin layer that parses arguments, calls the Python API and prints.

Exit codes: 0 success, 2 a user error (bad input, bad config, missing model: one clear paragraph, no
traceback), 1 a bug (the traceback is shown), 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys

from posttrain.errors import EXIT_BUG, EXIT_OK, EXIT_USER, DataError, UserError


def _cmd_train(args) -> int:
    from posttrain.config import describe_fields, load_config

    if args.help_config:
        for name, default, doc in describe_fields():
            print(f"{name} = {default}\n    {doc}")
        return EXIT_OK
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not os.path.exists(config):
        config, overrides = None, [config, *overrides]  # no run file: defaults + overrides
    if config is None and not overrides:
        raise UserError(
            "posttrain train needs a run file or overrides: posttrain train RUN.yaml [key=value ...]"
        )
    cfg = load_config(config, overrides)
    from posttrain.train import train

    result = train(cfg, resume=args.resume)
    last = next((h for h in reversed(result.history) if "loss" in h), None)
    summary = f"; last loss {last['loss']:.4f}" if last else ""
    print(
        f"done: {result.steps} step{'s' if result.steps != 1 else ''}{summary}; model in {result.final_dir}"
    )
    return EXIT_OK


def _cmd_quickstart(args) -> int:
    from posttrain.quickstart import run_quickstart

    run_quickstart(output_dir=args.output_dir, steps=args.steps, n_eval=args.n_eval, fresh=args.fresh)
    return EXIT_OK


def _cmd_data_make(args) -> int:
    from posttrain.data import TASKS, write_jsonl

    if args.task not in TASKS:
        raise UserError(f"unknown task {args.task!r}; built-in tasks: {', '.join(sorted(TASKS))}")
    if args.n <= 0:
        raise UserError(f"--n must be a positive number of rows, got {args.n}")
    rows = TASKS[args.task].make(args.n, seed=args.seed, split=args.split)
    write_jsonl(rows, args.out)
    print(f"wrote {len(rows)} {args.task} rows ({args.split}, seed {args.seed}) to {args.out}")
    return EXIT_OK


def _cmd_data_validate(args) -> int:
    from posttrain.data import validate_file

    try:
        print(validate_file(args.file, args.kind))
    except DataError as err:
        for p in err.problems:
            print(p, file=sys.stderr)
        print(f"{args.file}: {len(err.problems)} problem(s); fix them and validate again", file=sys.stderr)
        return EXIT_USER
    return EXIT_OK


def _cmd_generate(args) -> int:
    from posttrain.evaluation import load_for_inference
    from posttrain.models import generate

    prompts = list(args.prompt or [])
    if args.prompts_file:
        from posttrain.data import load_rows

        prompts += [r["prompt"] for r in load_rows(args.prompts_file, "prompts")]
    if not prompts:
        raise UserError("give at least one --prompt TEXT or --prompts-file FILE")
    model, tokenizer = load_for_inference(args.model)
    outs = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )
    for prompt, out in zip(prompts, outs):
        shown = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        print(f"### prompt\n{shown}\n### completion\n{out}\n")
    return EXIT_OK


def _cmd_merge(args) -> int:
    from posttrain.models import merge_adapter

    out = merge_adapter(args.adapter, args.out)
    print(f"merged model written to {out}")
    return EXIT_OK


def _cmd_evaluate(args) -> int:
    from posttrain.evaluation import evaluate_task, format_table, load_for_inference

    model, tokenizer = load_for_inference(args.model)
    metrics = evaluate_task(model, tokenizer, args.task, n=args.n, seed=args.seed, split=args.split)
    print(format_table({args.model: metrics}))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="posttrain", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    q = sub.add_parser("quickstart", help="fine-tune the embedded SmolLM2 with LoRA and show before/after")
    q.add_argument("--output-dir", default="runs/quickstart", help="run folder (default: runs/quickstart)")
    q.add_argument("--steps", type=int, default=None, help="training steps (default: the built-in recipe)")
    q.add_argument("--n-eval", type=int, default=None, help="held-out prompts to evaluate (default: recipe)")
    q.add_argument("--fresh", action="store_true", help="delete the run folder first instead of resuming it")
    q.set_defaults(func=_cmd_quickstart)

    t = sub.add_parser("train", help="run a training config: posttrain train RUN.yaml [key=value ...]")
    t.add_argument(
        "config", nargs="?", help="run YAML file (see configs/); may be left out when overrides say it all"
    )
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4 run.max_steps=50")
    t.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    t.add_argument("--help-config", action="store_true", help="list every config field with its default")
    t.set_defaults(func=_cmd_train)

    d = sub.add_parser("data", help="make built-in task data or validate a data file")
    dsub = d.add_subparsers(dest="data_command", metavar="ACTION")
    mk = dsub.add_parser("make", help="write a built-in task as JSONL")
    mk.add_argument("task", help="built-in task: structured, arithmetic")
    mk.add_argument("--n", type=int, required=True, help="number of rows")
    mk.add_argument("--out", required=True, help="output .jsonl file")
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument(
        "--split",
        choices=["train", "heldout"],
        default="train",
        help="heldout uses wordings never used by train",
    )
    mk.set_defaults(func=_cmd_data_make)
    va = dsub.add_parser("validate", help="check every row of a data file")
    va.add_argument("file")
    va.add_argument("--kind", choices=["sft", "preference", "prompts"], default="sft")
    va.set_defaults(func=_cmd_data_validate)
    d.set_defaults(func=lambda a: (d.print_help(), EXIT_USER)[1])

    g = sub.add_parser("generate", help="sample from a run, a model folder or the embedded default")
    g.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help="run folder, model/adapter folder, .gguf file, hub name or smollm2-135m-instruct",
    )
    g.add_argument("--prompt", action="append", help="a user message (repeatable)")
    g.add_argument("--prompts-file", help="a file of prompt rows (JSONL/JSON/CSV with a `prompt` field)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=_cmd_generate)

    m = sub.add_parser("merge", help="fold a LoRA adapter into its base and save a standalone model")
    m.add_argument("adapter", help="run folder or adapter folder")
    m.add_argument("--out", required=True, help="output folder for the merged safetensors model")
    m.set_defaults(func=_cmd_merge)

    e = sub.add_parser(
        "evaluate", help="score a model on a built-in task's held-out prompts with its verifier"
    )
    e.add_argument("--model", default="smollm2-135m-instruct")
    e.add_argument("--task", default="structured")
    e.add_argument("--n", type=int, default=100)
    e.add_argument("--seed", type=int, default=1)
    e.add_argument("--split", choices=["train", "heldout"], default="heldout")
    e.set_defaults(func=_cmd_evaluate)

    for module in ("posttrain.estimator.cli", "posttrain.advisor.cli"):
        _add_optional(sub, module)
    return p


def _add_optional(sub, module: str) -> None:
    import importlib

    try:
        mod = importlib.import_module(module)
    except ImportError:
        return
    mod.add_parser(sub)


_MODEL_COMMANDS = {"quickstart", "train", "generate", "merge", "evaluate"}


def _quiet_libraries() -> None:
    """Our progress bar and messages only: no per-tensor loading bars or deprecation notices from libraries."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _version() -> str:
    from posttrain import __version__

    return f"posttrain {__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USER
    if args.command in _MODEL_COMMANDS:
        _quiet_libraries()
    try:
        return int(args.func(args) or EXIT_OK)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER
    except BrokenPipeError:
        # `posttrain estimate --table | head`: the reader left; not an error of ours.
        sys.stderr.close()
        return EXIT_OK
    except KeyboardInterrupt:
        print("interrupted; a run can be continued with `posttrain train RUN.yaml --resume`", file=sys.stderr)
        return 130
    except Exception:
        if os.environ.get("POSTTRAIN_DEBUG") is None:
            import traceback

            traceback.print_exc()
            print(
                "error: this is a bug in posttrain (exit 1); please report it with the traceback above",
                file=sys.stderr,
            )
        else:
            raise
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
