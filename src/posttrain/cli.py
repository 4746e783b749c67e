"""The `posttrain` command: a thin layer that parses arguments, calls the Python API and prints.

Exit codes: 0 success, 2 a user error (bad input, bad config, missing model: one clear paragraph, no
traceback), 1 a bug (the traceback is shown), 130 interrupted.

Commands that print results return an `Output`: its text is what they print, and with `--json` its document is
printed instead, as the only thing on stdout (everything else the command prints goes to stderr while it
runs); a failure is a document too. The documents are described in docs/cli-json.md (`SCHEMA_VERSION`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from dataclasses import dataclass, field

from posttrain.errors import EXIT_BUG, EXIT_OK, EXIT_USER, DataError, UserError

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


def _cmd_train(args) -> Output:
    from posttrain.algorithms import RunConfig, load_config
    from posttrain.config import describe_fields
    from posttrain.config_rules import reads

    if args.help_config:
        fields = [{"name": n, "default": d, "doc": doc, "method": m, "read_by": reads(n, RunConfig, m)}
                  for n, d, doc, m in describe_fields(RunConfig)]  # fmt: skip
        lines, shown = [], None
        for f in fields:
            if f["method"] != shown and f["method"] is not None:
                lines.append(f"\n# algorithm.name: {f['method']}")
            shown = f["method"]
            lines.append(f"{f['name']} = {f['default']}\n    {f['doc']}\n    read by: {f['read_by']}")
        return Output(doc={"fields": fields}, text="\n".join(lines))
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not os.path.exists(config):
        config, overrides = None, [config, *overrides]  # no run file: defaults + overrides
    if config is None and not overrides:
        raise UserError(
            "posttrain train needs a run file or overrides: posttrain train RUN.yaml [key=value ...]"
        )
    cfg = load_config(config, overrides)
    from posttrain.train import train
    from posttrain.trainer.runlock import launch_rank
    from posttrain.trainer.summary import format_summary, run_summary

    result = train(cfg, resume=args.resume)
    if launch_rank() != 0:  # one summary per run: rank 0's (the others' history is their own shard's)
        return Output(doc=None)
    summary = run_summary(result)
    return Output(doc=summary, text=format_summary(summary))


def _cmd_quickstart(args) -> int:
    if args.method != "sft":
        from posttrain.recipes import run_recipe

        if args.n_eval is not None:
            raise UserError(
                "--n-eval applies to the sft quickstart; the dpo, grpo and ppo recipes use 200 prompts"
            )
        run_recipe(args.method, output_dir=args.output_dir, steps=args.steps, fresh=args.fresh)
        return EXIT_OK
    from posttrain.quickstart import run_quickstart

    run_quickstart(
        output_dir=args.output_dir or "runs/quickstart",
        steps=args.steps,
        n_eval=args.n_eval,
        fresh=args.fresh,
    )
    return EXIT_OK


def _cmd_data_make(args) -> int:
    from posttrain.data import TASKS, make_pairs, make_prompts, write_jsonl

    if args.task not in TASKS:
        raise UserError(f"unknown task {args.task!r}; built-in tasks: {', '.join(sorted(TASKS))}")
    if args.n <= 0:
        raise UserError(f"--n must be a positive number of rows, got {args.n}")
    task = _task_with_options(TASKS[args.task], args)
    make = {"sft": task.make, "preference": make_pairs, "prompts": make_prompts}[args.kind]
    rows = (
        make(args.n, seed=args.seed, split=args.split)
        if args.kind == "sft"
        else make(task, args.n, seed=args.seed, split=args.split)
    )
    write_jsonl(rows, args.out)
    what = args.task if args.kind == "sft" else f"{args.task} {args.kind}"
    print(f"wrote {len(rows)} {what} rows ({args.split}, seed {args.seed}) to {args.out}")
    return EXIT_OK


# `data make` options that set a field of the task's dataclass (only tasks that have the field accept them).
TASK_OPTIONS = {"min_ops": "--min-ops", "max_ops": "--max-ops", "max_value": "--max-value"}


def _task_with_options(task, args):
    """The built-in task with the difficulty options given on the command line (e.g. arithmetic --max-ops 1)."""
    import dataclasses

    given = {f: getattr(args, f) for f in TASK_OPTIONS if getattr(args, f, None) is not None}
    if not given:
        return task
    fields = {f.name for f in dataclasses.fields(task)} if dataclasses.is_dataclass(task) else set()
    for f, value in given.items():
        if f not in fields:
            raise UserError(f"{TASK_OPTIONS[f]} does not apply to the {task.name} task")
        if value < 1:
            raise UserError(f"{TASK_OPTIONS[f]} must be at least 1, got {value}")
    task = dataclasses.replace(task, **given)
    if getattr(task, "min_ops", 0) > getattr(task, "max_ops", 0):  # both exist where either was given
        raise UserError(f"--min-ops ({task.min_ops}) is larger than --max-ops ({task.max_ops})")
    if getattr(task, "max_value", 2) < 2:
        raise UserError("--max-value must be at least 2")
    return task


def _problems(args, err: DataError) -> Output:
    """Every problem on stderr (`FILE:LINE: field: message`); with --json also as a list in the document."""
    for p in err.problems:
        print(p, file=sys.stderr)
    message = f"{args.file}: {len(err.problems)} problem(s); fix them and validate again"
    print(message, file=sys.stderr)
    problems = [{"file": p.file, "line": p.line, "field": p.field, "message": p.message} for p in err.problems]
    return Output(doc={"file": args.file, "kind": args.kind, "problems": problems}, code=EXIT_USER,
                  error={"kind": "user", "message": message})  # fmt: skip


def _cmd_data_validate(args) -> Output:
    from posttrain.data.schema import row_shapes, shapes_summary

    if (args.model is None) != (args.max_length is None):
        raise UserError("--model and --max-length go together: the length check needs the model's tokenizer")
    if args.model is not None and args.kind == "prompts":
        raise UserError(
            "--max-length checks sft and preference files; prompts files are checked when sampling"
        )
    try:
        shapes = row_shapes(args.file, args.kind)
        notes = _check_lengths(args) if args.model is not None else []
    except DataError as err:
        return _problems(args, err)
    text = shapes_summary(args.file, args.kind, shapes)
    if args.model is not None:
        text += f"; every row fits max_length={args.max_length}" + "".join(f"\nwarning: {w}" for w in notes)
    doc = {"file": args.file, "kind": args.kind, "rows": sum(shapes.values()), "shapes": shapes,
           "max_length": args.max_length, "warnings": notes}  # fmt: skip
    return Output(doc=doc, text=text)


def _check_lengths(args) -> list[str]:
    """Render every row with the model's tokenizer: rows that cannot fit `--max-length` are problems; returns
    the warnings rendering gave (e.g. responses truncated)."""
    import warnings

    from posttrain.config import ModelConfig
    from posttrain.data import load_rows, render_dataset, render_preference_dataset
    from posttrain.models import load_tokenizer

    if args.max_length <= 0:
        raise UserError(f"--max-length must be a positive number of tokens, got {args.max_length}")
    _quiet_libraries()
    tokenizer = load_tokenizer(ModelConfig(name=args.model))
    rows = load_rows(args.file, args.kind)
    render = render_preference_dataset if args.kind == "preference" else render_dataset
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        render(tokenizer, rows, max_length=args.max_length, source=args.file)
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def _cmd_data_pairs(args) -> Output:
    from pathlib import Path

    from posttrain.data import TASKS, load_rows
    from posttrain.rollout.pairs import (
        onpolicy_pairs,
        prepare_prompt_rows,
        reward_scorer,
        task_scorer,
        written_ids,
    )

    if args.task is not None and args.task not in TASKS:
        raise UserError(f"unknown task {args.task!r}; built-in tasks: {', '.join(sorted(TASKS))}")
    if args.n < 2:
        raise UserError(f"--n must be at least 2 completions per prompt to make a pair, got {args.n}")
    if args.temperature <= 0:
        raise UserError("--temperature must be > 0: greedy decoding gives --n equal completions")
    if args.limit is not None and args.limit <= 0:
        raise UserError(f"--limit must be a positive number of prompts, got {args.limit}")
    rows = load_rows(args.prompts, "prompts")[: args.limit]
    prepare_prompt_rows(rows, args.prompts, answer_for=args.task and f"--task {args.task}")
    scorer = task_scorer(TASKS[args.task]) if args.task is not None else reward_scorer(args.reward)
    out = Path(args.out)
    done = written_ids(out)
    todo = [r for r in rows if r["id"] not in done]
    doc = {"model": args.model, "prompts_file": args.prompts, "out": str(out), "n": args.n,
           "already_done": len(rows) - len(todo), "prompts": 0, "kept": 0, "skipped_equal": 0,
           "skipped_empty": 0, "mean_best": None, "mean_worst": None}  # fmt: skip
    if len(todo) < len(rows):
        print(
            f"{out}: {len(rows) - len(todo)} of {len(rows)} prompts already have pairs there; skipping them"
        )
    if not todo:
        return Output(doc=doc, text=f"nothing to do: every prompt already has a pair in {out}")
    from posttrain.evaluation import load_for_inference

    _quiet_libraries()
    model, tokenizer = load_for_inference(args.model)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a", encoding="utf-8") as f:

        def write(pair: dict) -> None:  # one line per pair, flushed: an interrupted run keeps its work
            f.write(json.dumps(pair, ensure_ascii=False) + "\n")
            f.flush()

        _, st = onpolicy_pairs(
            model, tokenizer, todo, n=args.n, scorer=scorer, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_p=args.top_p, seed=args.seed, batch_size=args.batch_size,
            progress=not args.no_progress, on_pair=write,
        )  # fmt: skip
    doc.update(st)
    return Output(doc=doc, text=(
        f"wrote {st['kept']} pairs from {st['prompts']} prompts to {out} ({st['skipped_equal']} skipped: all "
        f"{args.n} samples scored the same; {st['skipped_empty']} skipped: fewer than 2 non-empty samples); "
        f"mean best score {st['mean_best']:.3f}, mean worst {st['mean_worst']:.3f}"
    ))  # fmt: skip


def _cmd_generate(args) -> Output:
    from posttrain.data import plain_messages
    from posttrain.evaluation import load_for_inference
    from posttrain.models import generate

    items = [{"prompt": p} for p in args.prompt or []]
    if args.prompts_file:
        from posttrain.data import load_rows

        rows = load_rows(args.prompts_file, "prompts")
        items += [{**({"id": r["id"]} if "id" in r else {}), "prompt": r["prompt"]} for r in rows]
    if not items:
        raise UserError("give at least one --prompt TEXT or --prompts-file FILE")
    model, tokenizer = load_for_inference(args.model)
    outs = generate(
        model,
        tokenizer,
        [item["prompt"] for item in items],
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        progress="generate" if args.prompts_file and not args.no_progress else None,  # a bar for a file's prompts
    )
    blocks = []
    for item, out in zip(items, outs):
        prompt = item["prompt"]
        item.update(prompt=plain_messages(prompt, "user"), completion=out)
        shown = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        blocks.append(f"### prompt\n{shown}\n### completion\n{out}\n")
    settings = _settings(args, "max_new_tokens", "temperature", "top_p", "seed")
    return Output(doc={"model": args.model, "settings": settings, "results": items}, text="\n".join(blocks))


def _cmd_merge(args) -> int:
    from posttrain.models import merge_adapter
    from posttrain.models.saving import head_kind, read_info

    out = merge_adapter(args.adapter, args.out)
    if head_kind(out) == "reward":
        print(f"merged reward model written to {out}, with its score head (usable as --judge or "
              "algorithm.reward_model)")  # fmt: skip
    elif read_info(out).get("dropped_head") == "value":
        print(f"merged policy written to {out}; the PPO value head was used only in training and is not written")
    else:
        print(f"merged model written to {out}")
    return EXIT_OK


def _cmd_report(args) -> int:
    from posttrain.report import build_report

    paths = build_report(args.runs, args.out)
    print(f"report: {paths.html}\nmarkdown: {paths.markdown} (its plots in {paths.images})")
    return EXIT_OK


NO_VERIFIER = (
    "posttrain evaluate needs to be told how to score the answers: --task NAME (a built-in task's verifier: "
    "structured, arithmetic; its held-out prompts are made fresh, or --data FILE gives rows with an `answer`), "
    "or --data FILE --reward SPEC (a reward as the verifier, e.g. --reward exact_match, --reward numeric_answer, "
    "--reward path/to/file.py:function; the same specs as algorithm.rewards), or --pairs FILE (preference pairs)."
)


def _cmd_evaluate(args) -> Output:
    from posttrain.data import TASKS
    from posttrain.evaluation import (
        answer_records,
        format_table,
        generate_answers,
        load_for_inference,
        score_completions,
        score_rewards,
    )

    if args.n <= 0:
        raise UserError(f"--n must be a positive number of prompts or pairs, got {args.n}")
    if args.pairs is not None:
        if args.task is not None or args.reward or args.data is not None:
            raise UserError("--pairs scores preference pairs with the model's log-probabilities; "
                            "--task, --reward and --data do not apply to it (run them separately)")  # fmt: skip
        return _evaluate_pairs(args)
    if args.task is None and not args.reward:
        raise UserError(NO_VERIFIER)
    if args.task is not None and args.task not in TASKS:
        raise UserError(f"unknown task {args.task!r}; built-in tasks: {', '.join(sorted(TASKS))}")
    if args.reward and args.data is None:
        raise UserError("--reward scores the rows of a prompts file: add --data FILE (rows with a `prompt` and "
                        "the columns the reward reads, e.g. `answer`); or use --task NAME for a built-in task's "
                        "own prompts and verifier")  # fmt: skip
    rows = _evaluation_rows(args)
    if args.temperature < 0:
        raise UserError(f"--temperature must be >= 0 (0: greedy), got {args.temperature}")
    rewards = None
    if args.reward:
        from posttrain.rewards import build_reward_functions, parse_reward_specs
        from posttrain.rewards.checks import check_reward_inputs
        from posttrain.rollout.pairs import parse_reward_args

        specs = parse_reward_specs(parse_reward_args(args.reward))
        check_reward_inputs(specs, rows, args.data)  # a missing column fails here, before the model loads
        rewards = build_reward_functions(specs)
    if args.judge is not None:
        from posttrain.models.heads import reward_model_problem

        why = reward_model_problem(args.judge)
        if why:
            raise UserError(f"--judge: {why}")
    _quiet_libraries()
    model, tokenizer = load_for_inference(args.model)
    completions = generate_answers(
        model, tokenizer, rows, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        sample_seed=args.seed, progress=None if args.no_progress else "evaluate",
    )  # fmt: skip
    per_row: list[dict] = []  # each row's verifier metrics, or its rewards (the --out file)
    if rewards is not None:
        metrics, result = score_rewards(rewards, completions, rows)
        _report_reward_failures(result, len(rows))
        for i, total in enumerate(result.total):  # the weighted sum, and each function's own reward
            per_row.append({"reward": total, **{f"reward_{k}": v[i] for k, v in result.per_function.items()}})
    else:
        metrics = score_completions(args.task, completions, rows, per_row)
    scores = None
    if args.judge is not None:
        from posttrain.evaluation.preference import judge_scores

        scores = judge_scores(args.judge, [r["prompt"] for r in rows], completions)
        metrics["judge_score_mean"] = sum(scores) / len(scores)
    if args.out is not None:
        _write_records(args.out, answer_records(rows, completions, per_row, scores))
    doc = {
        "model": args.model, "verifier": "reward" if rewards is not None else "task", "task": args.task,
        "rewards": [r.name for r in rewards] if rewards is not None else None, "judge": args.judge,
        "data": args.data, "n": len(rows), "settings": _settings(args, "max_new_tokens", "temperature", "seed"),
        "metrics": {k: v for k, v in metrics.items() if k != "n"}, "out": args.out,
    }  # fmt: skip
    return Output(doc=doc, text=format_table({args.model: metrics}))


def _settings(args, *names: str) -> dict:
    return {name: getattr(args, name) for name in names}


def _write_records(path: str, records: list[dict]) -> None:
    """Write `evaluate --out` rows, all at once: scores come once every answer is in (rewards see the whole set,
    as in training), and a file is either a whole evaluation or absent (no resume, unlike `data pairs`: an
    evaluation is rerun in full, and greedy or seeded decoding gives the same answers)."""
    from pathlib import Path

    from posttrain.data import write_jsonl

    out = Path(path)
    tmp = out.with_name(out.name + ".tmp")
    write_jsonl(records, tmp)
    os.replace(tmp, out)


def _evaluation_rows(args) -> list[dict]:
    """The first --n rows of --data, or --n fresh rows of the --task (with its difficulty options)."""
    from posttrain.data import TASKS, load_rows

    if args.data is None:
        return _task_with_options(TASKS[args.task], args).make(args.n, seed=args.seed, split=args.split)
    given = [flag for f, flag in TASK_OPTIONS.items() if getattr(args, f, None) is not None]
    if given:
        raise UserError(f"{', '.join(given)} shape the rows made by --task; with --data the rows come from "
                        f"{args.data}")  # fmt: skip
    rows = load_rows(args.data, "prompts")[: args.n]
    missing = [getattr(r, "line", i + 1) for i, r in enumerate(rows) if "answer" not in r]
    if args.task is not None and missing:
        raise UserError(f"{args.data}: rows need an `answer` for the verifier (missing on line {missing[0]})")
    return rows


def _report_reward_failures(result, n: int) -> None:
    """A reward that could not score some answers says so (they count with the fallback, 0); one that scored
    none measured nothing, which is an error rather than a table of zeros."""
    for name, failed in result.failures.items():
        if not failed:
            continue
        why = result.errors.get(name, "")
        if failed == n:
            raise UserError(f"--reward {name} could not score any answer ({why}); check that --data has the "
                            "columns it reads and that its args are right")  # fmt: skip
        print(f"warning: --reward {name} could not score {failed} of {n} answers; they count as 0 ({why})",
              file=sys.stderr)  # fmt: skip


def _evaluate_pairs(args) -> Output:
    """`posttrain evaluate --pairs FILE`: rank held-out preference pairs with the model and its reference."""
    from posttrain.data import load_rows
    from posttrain.evaluation import load_for_inference
    from posttrain.evaluation.preference import format_preference, pair_records, preference_accuracy

    if args.beta <= 0:
        raise UserError(f"--beta must be > 0, got {args.beta}")
    if args.max_length <= 0:
        raise UserError(f"--max-length must be a positive number of tokens, got {args.max_length}")
    if args.judge is not None:
        raise UserError("--judge scores generated answers; --pairs generates none (run them separately)")
    rows = load_rows(args.pairs, "preference")[: args.n]
    _quiet_libraries()
    model, tokenizer = load_for_inference(args.model)
    reference = load_for_inference(args.reference)[0] if args.reference is not None else None
    per_pair: list[dict] = []
    result = preference_accuracy(
        model, tokenizer, rows, reference=reference, beta=args.beta, max_length=args.max_length,
        source=args.pairs, per_pair=per_pair, progress=not args.no_progress,
    )  # fmt: skip
    if args.out is not None:
        _write_records(args.out, pair_records(rows, per_pair))
    doc = {"model": args.model, "verifier": "pairs", "pairs": args.pairs, "reference": args.reference,
           "n": len(rows), "settings": _settings(args, "beta", "max_length"),
           "metrics": {k: v for k, v in result.items() if k != "n"}, "out": args.out}  # fmt: skip
    return Output(doc=doc, text=format_preference({args.model: result}))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="posttrain", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    q = sub.add_parser(
        "quickstart", help="train the embedded SmolLM2 with LoRA and show held-out before/after"
    )
    q.add_argument(
        "method",
        nargs="?",
        default="sft",
        choices=["sft", "dpo", "grpo", "ppo"],
        help="sft (default): structured-output SFT; dpo, grpo, ppo: the arithmetic recipes (README)",
    )
    q.add_argument("--output-dir", help="run folder (default: runs/quickstart or runs/quickstart-METHOD)")
    q.add_argument("--steps", type=int, default=None, help="training steps (default: the built-in recipe)")
    q.add_argument("--n-eval", type=int, default=None, help="held-out prompts to evaluate (default: recipe)")
    q.add_argument("--fresh", action="store_true", help="delete the run folder first instead of resuming it")
    q.set_defaults(func=_cmd_quickstart)

    t = sub.add_parser("train", help="run a training config: posttrain train RUN.yaml [key=value ...]")
    t.add_argument(
        "config", nargs="?", help="run YAML file (see configs/); may be left out when overrides say it all"
    )
    t.add_argument(
        "overrides", nargs="*",
        help="dotted overrides, e.g. optim.lr=1e-4 run.max_steps=50; they win over the run file, and a key given "
        "twice takes the last value",
    )  # fmt: skip
    t.add_argument(
        "--resume", action="store_true",
        help="continue from the run folder's latest checkpoint, on the same data and config (only run length, "
        "logging and checkpoint settings may change); a finished run trains nothing",
    )  # fmt: skip
    t.add_argument(
        "--help-config", action="store_true",
        help="list every config field with its default and which methods/techniques read it",
    )  # fmt: skip
    _add_json(t)
    t.set_defaults(func=_cmd_train)

    d = sub.add_parser("data", help="make built-in task data, validate a data file, or sample pairs")
    dsub = d.add_subparsers(dest="data_command", metavar="ACTION")
    mk = dsub.add_parser("make", help="write a built-in task as JSONL (sft, preference pairs or prompts)")
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
    mk.add_argument(
        "--kind",
        choices=["sft", "preference", "prompts"],
        default="sft",
        help="sft: prompt+completion; preference: prompt+chosen+rejected (rejected wrong, off-format or "
        "rambling); prompts: prompt+answer for RL (default: sft)",
    )
    mk.add_argument("--min-ops", type=int, help="arithmetic: fewest operations per problem (default 1)")
    mk.add_argument("--max-ops", type=int, help="arithmetic: most operations per problem (default 3)")
    mk.add_argument(
        "--max-value", type=int, help="arithmetic: largest starting count and amount (default 50)"
    )
    mk.set_defaults(func=_cmd_data_make)
    va = dsub.add_parser("validate", help="check every row of a data file")
    va.add_argument("file")
    va.add_argument("--kind", choices=["sft", "preference", "prompts"], default="sft")
    va.add_argument("--model", help="also check lengths with this model's tokenizer (needs --max-length)")
    va.add_argument("--max-length", type=int, help="tokens; a row whose prompt alone reaches it is an error")
    _add_json(va)
    va.set_defaults(func=_cmd_data_validate)
    pa = dsub.add_parser(
        "pairs", help="sample N completions per prompt, score them, write (best, worst) preference pairs"
    )
    pa.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help="run folder, model/adapter folder, .gguf file, hub name or smollm2-135m-instruct",
    )
    pa.add_argument("--prompts", required=True, help="prompt rows (a `prompt` field; `id`, `answer` kept)")
    scoring = pa.add_mutually_exclusive_group(required=True)
    scoring.add_argument("--task", help="score with a built-in task's verifier against each row's `answer`")
    scoring.add_argument(
        "--reward",
        action="append",
        help="score with a reward: a built-in (numeric_answer, task, ...), path/to/file.py:function, or JSON "
        '{"name": ..., "weight": ..., "args": {...}}; repeatable (weighted sum)',
    )
    pa.add_argument("--n", type=int, default=8, help="completions sampled per prompt (default: 8)")
    pa.add_argument("--max-new-tokens", type=int, default=128)
    pa.add_argument("--temperature", type=float, default=1.0, help="must be > 0 (default: 1.0)")
    pa.add_argument("--top-p", type=float, default=1.0)
    pa.add_argument("--seed", type=int, default=0)
    pa.add_argument("--limit", type=int, help="use only the first K prompts")
    pa.add_argument("--batch-size", type=int, default=16, help="sequences per generate call (default: 16)")
    pa.add_argument("--no-progress", action="store_true", help="no progress bar")
    pa.add_argument("--out", required=True, help="output .jsonl; re-running skips prompt ids already in it")
    _add_json(pa)
    pa.set_defaults(func=_cmd_data_pairs)
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
    g.add_argument("--no-progress", action="store_true", help="no progress bar (shown for --prompts-file)")
    _add_json(g)
    g.set_defaults(func=_cmd_generate)

    m = sub.add_parser("merge", help="fold a LoRA adapter into its base and save a standalone model")
    m.add_argument("adapter", help="run folder or adapter folder")
    m.add_argument("--out", required=True, help="output folder for the merged safetensors model")
    m.set_defaults(func=_cmd_merge)

    rp = sub.add_parser(
        "report", help="an HTML page and Markdown of one run or several side by side: curves, evaluation, samples"
    )
    rp.add_argument("runs", nargs="+", metavar="RUN", help="run folder (the run.output_dir of posttrain train)")
    rp.add_argument(
        "--out", help="folder for report.html, report.md and report_files/ (default: the run folder; needed for "
        "several runs)",
    )  # fmt: skip
    rp.set_defaults(func=_cmd_report)

    e = sub.add_parser(
        "evaluate", help="score a model's answers with a task's verifier or a reward, or rank preference pairs"
    )
    e.add_argument(
        "--model", default="smollm2-135m-instruct", help="run folder, model/adapter folder or name"
    )
    verifier = e.add_mutually_exclusive_group()
    verifier.add_argument(
        "--task", help="score with a built-in task's verifier (structured, arithmetic); without --data, on "
        "freshly made held-out prompts of that task"
    )
    verifier.add_argument(
        "--reward",
        action="append",
        help="score the rows of --data with a reward as the verifier: exact_match, numeric_answer, a built-in, "
        'path/to/file.py:function, or JSON {"name": ..., "weight": ..., "args": {...}}; repeatable (weighted '
        "sum). Reports the mean reward and the share of rows with reward > 0",
    )
    e.add_argument("--n", type=int, default=100, help="prompts (or pairs) to evaluate (default: 100)")
    e.add_argument("--seed", type=int, default=1)
    e.add_argument("--split", choices=["train", "heldout"], default="heldout")
    e.add_argument("--min-ops", type=int, help="arithmetic: fewest operations per problem")
    e.add_argument("--max-ops", type=int, help="arithmetic: most operations per problem")
    e.add_argument("--max-value", type=int, help="arithmetic: largest starting count and amount")
    e.add_argument("--data", help="prompts file (a `prompt` per row, and the `answer` the verifier checks)")
    e.add_argument("--max-new-tokens", type=int, default=128)
    e.add_argument(
        "--temperature", type=float, default=0.0, help="0: greedy (default); > 0: one seeded sample"
    )
    e.add_argument("--judge", help="also score the answers with a trained reward model (its folder)")
    e.add_argument(
        "--pairs", help="preference file: report how the model ranks its pairs (DPO implicit reward)"
    )
    e.add_argument("--reference", help="with --pairs: the reference model (default: the adapter disabled)")
    e.add_argument("--beta", type=float, default=0.1, help="with --pairs: DPO beta of the implicit reward")
    e.add_argument("--max-length", type=int, default=512, help="with --pairs: tokens per prompt + response")
    e.add_argument(
        "--out", help="write one JSON line per prompt (or pair) to this file: the prompt, the completion, its "
        "scores, the reference answer (docs/cli-json.md)"
    )
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_json(e)
    e.set_defaults(func=_cmd_evaluate)

    for module in ("posttrain.estimator.cli", "posttrain.advisor.cli"):
        _add_optional(sub, module)
    return p


def _add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true",
        help="print one JSON document on stdout instead (docs/cli-json.md); progress and messages go to stderr",
    )  # fmt: skip
    parser.set_defaults(prints_document=True)  # main() prints the command's Output as JSON


def _add_optional(sub, module: str) -> None:
    import importlib

    try:
        mod = importlib.import_module(module)
    except ImportError:
        return
    mod.add_parser(sub)


_MODEL_COMMANDS = {"quickstart", "train", "generate", "merge", "evaluate"}


def _quiet_libraries() -> None:
    """Our progress bar and messages only: no per-tensor loading bars or deprecation notices from libraries, no
    hub retries when the hub cannot be reached (`models.hub`; before transformers is first imported)."""
    import warnings

    from posttrain.models.hub import prepare_hub_libraries

    prepare_hub_libraries()
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
    # `estimate --json` and `advise --json` print their own JSON; the commands marked by `_add_json` return it.
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
        print("interrupted; a run can be continued with `posttrain train RUN.yaml --resume`", file=sys.stderr)
        return Output(code=130, error={"kind": "interrupted", "message": "interrupted"})
    except Exception as err:
        if os.environ.get("POSTTRAIN_DEBUG") is not None:
            raise
        import traceback

        traceback.print_exc()
        print("error: this is a bug in posttrain (exit 1); please report it with the traceback above", file=sys.stderr)
        return Output(code=EXIT_BUG, error={"kind": "bug", "message": f"{type(err).__name__}: {err}"})
    return result if isinstance(result, Output) else Output(code=int(result or EXIT_OK))


def _command_name(args) -> str:
    sub = getattr(args, "data_command", None) if args.command == "data" else None
    return f"{args.command} {sub}" if sub else args.command


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


if __name__ == "__main__":
    sys.exit(main())
