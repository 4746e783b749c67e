"""`posttrain evaluate`: score a model's answers with a task's verifier or a reward (and optionally a trained
judge), or rank preference pairs with its implicit reward (`posttrain.evaluation`)."""

from __future__ import annotations

import math
import sys
from dataclasses import replace
from pathlib import Path

from posttrain.cli.data import task_or_file_rows
from posttrain.cli.output import (
    Once,
    Output,
    add_columns,
    add_json,
    add_stop,
    add_template_vars,
    check_output_file,
    columns_given,
    place_error,
    positive,
    positive_int,
    quiet_libraries,
    run_config,
    setting,
    settings,
    stop_note,
    temperature,
)
from posttrain.errors import EXIT_USER, UserError

NO_VERIFIER = (
    "posttrain evaluate needs to be told how to score the answers: --task NAME (a built-in task's verifier: "
    "structured, arithmetic; its held-out prompts are made fresh, or --data FILE gives rows with an `answer`), "
    "or --data FILE --reward SPEC (a reward as the verifier, e.g. --reward exact_match, --reward numeric_answer, "
    "--reward path/to/file.py:function; the same specs as algorithm.rewards), or --pairs FILE (preference pairs)."
)


PAIRS_ONLY = {"reference": None, "beta": 0.1, "max_length": 512}
"""The flags read only with --pairs, and their defaults: given another value without --pairs, they are refused."""


def add_parser(sub) -> None:
    e = sub.add_parser(
        "evaluate",
        help="score a model's answers with a task's verifier or a reward, or rank preference pairs",
    )
    e.add_argument(
        "--model", action=Once, default="smollm2-135m-instruct", help="run folder, model/adapter folder or name"
    )
    verifier = e.add_mutually_exclusive_group()
    verifier.add_argument(
        "--task",
        help="score with a built-in task's verifier (structured, arithmetic); without --data, on "
        "freshly made held-out prompts of that task",
    )
    verifier.add_argument(
        "--reward",
        action="append",
        help="score the rows of --data with a reward as the verifier: exact_match, numeric_answer, a built-in, "
        'path/to/file.py:function, or JSON {"name": ..., "weight": ..., "args": {...}}; repeatable (weighted '
        "sum). Reports the mean reward and the share of rows with reward > 0",
    )
    e.add_argument("--n", type=positive_int, default=100, help="prompts (or pairs) to evaluate (default: 100)")
    e.add_argument("--seed", type=int, default=None, help="the --task's prompts, and sampling (--temperature > 0); "
                   "default 1")  # fmt: skip
    e.add_argument("--split", choices=["train", "heldout"], default=None,
                   help="the --task's rows: heldout (the default) or train wordings")  # fmt: skip
    e.add_argument("--min-ops", type=int, help="arithmetic: fewest operations per problem")
    e.add_argument("--max-ops", type=int, help="arithmetic: most operations per problem")
    e.add_argument("--max-value", type=int, help="arithmetic: largest starting count and amount")
    e.add_argument("--data", help="prompts file (a `prompt` per row, and the `answer` the verifier checks)")
    e.add_argument("--max-new-tokens", type=positive_int, default=None, help="tokens per answer (default: 128)")
    e.add_argument(
        "--temperature", type=temperature, default=0.0, help="0: greedy (default); > 0: one seeded sample"
    )
    e.add_argument("--judge", help="also score the answers with a trained reward model (its folder)")
    e.add_argument(
        "--pairs", help="preference file: report how the model ranks its pairs (DPO implicit reward)"
    )
    e.add_argument("--reference", default=PAIRS_ONLY["reference"],
                   help="with --pairs: the reference model (default: the adapter disabled)")  # fmt: skip
    e.add_argument("--beta", type=positive, default=None,
                   help="with --pairs: DPO beta of the implicit reward (default: the run's algorithm.beta when "
                        "--model is a run folder, else 0.1)")  # fmt: skip
    e.add_argument("--max-length", type=positive_int, default=None,
                   help="with --pairs: tokens per prompt + response (default: the run's data.max_length when "
                        "--model is a run folder, else 512)")  # fmt: skip
    e.add_argument(
        "--out",
        help="write one JSON line per prompt (or pair) to this file: the prompt, the completion, its "
        "scores, the reference answer (docs/cli-json.md)",
    )
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_stop(e)
    add_columns(e)
    add_template_vars(e)
    add_json(e)
    e.set_defaults(func=run, loads_models=True)


def run(args) -> Output:
    """Answers to --n prompts, scored by the verifier (a task's, or rewards), and by a judge if given."""
    from posttrain.evaluation import (
        answer_records,
        format_table,
        generate_answers,
        load_for_inference,
        metric_intervals,
    )

    # before the answers are made, not after
    check_output_file(args.out, "--out", inputs={"--data": args.data, "--pairs": args.pairs})
    _check_pairs_only_flags(args)
    if args.seed is not None and args.pairs is not None:
        raise UserError(f"--seed {args.seed} would change nothing: --pairs ranks given pairs by log-probability and "
                        "draws nothing; leave it out")  # fmt: skip
    if args.seed is not None and args.data is not None and args.temperature == 0:
        raise UserError(f"--seed {args.seed} would change nothing: it draws a --task's prompts and samples at "
                        "--temperature > 0, and this evaluation reads its rows from a file and decodes greedily; leave "
                        "it out, or give --temperature > 0")  # fmt: skip
    args.seed = 1 if args.seed is None else args.seed
    if args.pairs is not None:
        return evaluate_pairs(args)
    args.max_new_tokens = args.max_new_tokens or 128
    _check_verifier(args)
    rows = _evaluation_rows(args)
    rewards = _reward_functions(args, rows) if args.reward else None
    if args.judge is not None:
        from posttrain.models.heads import reward_model_problem

        why = reward_model_problem(args.judge)
        if why:
            raise UserError(f"--judge: {why}")
    quiet_libraries()
    model, tokenizer = load_for_inference(args.model, dict(args.template_var))
    if args.data is not None:  # the file's rows, with their lines, before anything is decoded
        from posttrain.data.render import refuse_markers

        refuse_markers(tokenizer, rows, source=args.data)
    if note := stop_note(args):
        print(note, file=sys.stderr)
    finished: list[bool] = []
    completions = generate_answers(
        model, tokenizer, rows, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        sample_seed=args.seed, progress=None if args.no_progress else "evaluate", stop=args.stop or None,
        finished=finished,
    )  # fmt: skip
    metrics, per_row = _score(args, rewards, completions, rows)
    scores = None
    if args.judge is not None:
        from posttrain.evaluation.preference import judge_scores

        cut = [not f for f in finished]  # scored as unfinished turns, as in RL training
        scores = judge_scores(args.judge, [r["prompt"] for r in rows], completions, cut)
        metrics["judge_score_mean"] = sum(scores) / len(scores)
    doc = {
        "model": args.model, "verifier": "reward" if rewards is not None else "task", "task": args.task,
        "rewards": [r.name for r in rewards] if rewards is not None else None, "judge": args.judge,
        "data": args.data, "n": len(rows), "settings": {
            **settings(args, "max_new_tokens", "temperature", "seed", "stop"), "template_var": dict(args.template_var),
            # what picked a --task's rows (null with --data, whose rows are the file's)
            **({"split": args.split or "heldout", **{k: getattr(args, k) for k in ("min_ops", "max_ops", "max_value")}}
               if args.data is None else dict.fromkeys(("split", "min_ops", "max_ops", "max_value")))},
        "metrics": {k: v for k, v in metrics.items() if k != "n"}, "out": args.out,
    }  # fmt: skip
    values = {"judge_score_mean": scores} if scores is not None else {}
    if rewards is not None:  # each row's reward, and each function's: their means' t intervals
        values["reward_mean"] = [r["reward"] for r in per_row]
        values.update({f"{k}_mean": [r[k] for r in per_row] for k in per_row[0] if k != "reward"} if per_row else {})
    intervals = metric_intervals(metrics, values)
    doc["intervals"] = {k: list(v) for k, v in intervals.items()}
    text = format_table({args.model: metrics}, intervals)
    return _written(Output(doc=doc, text=text), args.out, lambda: answer_records(rows, completions, per_row, scores))


def _check_verifier(args) -> None:
    """A verifier is named (--task or --reward), exists, and has the rows it scores."""
    from posttrain.data import TASKS

    if args.task is None and not args.reward:
        raise UserError(NO_VERIFIER)
    if args.task is not None and args.task not in TASKS:
        raise UserError(f"unknown task {args.task!r}; built-in tasks: {', '.join(sorted(TASKS))}")
    if args.reward and args.data is None:
        raise UserError("--reward scores the rows of a prompts file: add --data FILE (rows with a `prompt` and "
                        "the columns the reward reads, e.g. `answer`); or use --task NAME for a built-in task's "
                        "own prompts and verifier")  # fmt: skip


def _reward_functions(args, rows: list[dict]) -> list:
    """The --reward functions, after checking that the rows have the columns they read (before the model loads)."""
    from posttrain.rewards import build_reward_functions, parse_reward_specs
    from posttrain.rewards.checks import EVALUATE, check_reward_inputs
    from posttrain.rollout.pairs import parse_reward_args

    specs = parse_reward_specs(parse_reward_args(args.reward), where="--reward #{n}")
    check_reward_inputs(specs, rows, args.data, EVALUATE)
    return build_reward_functions(specs)


def _score(args, rewards: list | None, completions: list[str], rows: list[dict]) -> tuple[dict, list[dict]]:
    """The metrics of the answers, and each row's own (its verifier metrics, or its rewards: the --out file)."""
    from posttrain.evaluation import score_completions, score_rewards

    per_row: list[dict] = []
    if rewards is None:
        return score_completions(args.task, completions, rows, per_row), per_row
    metrics, result = score_rewards(rewards, completions, rows)
    _report_reward_failures(result, len(rows), rewards)
    for i, total in enumerate(result.total):  # the weighted sum, and each function's own reward
        per_row.append({"reward": total, **{f"reward_{k}": v[i] for k, v in result.per_function.items()}})
    return metrics, per_row


def _written(result: Output, path: str | None, records) -> Output:
    """`result`, after writing its `evaluate --out` rows (`records()`) to `path`, all at once: scores come once
    every answer is in (rewards see the whole set, as in training), and a file is either a whole evaluation or
    absent (no resume, unlike `data pairs`: an evaluation is rerun in full, and greedy or seeded decoding gives the
    same answers). When the file cannot be written (a full disk, a place turned read-only since the check before
    the model loaded), the run fails as the user's problem, and its results are still printed, or with --json
    kept in the document beside the error: the evaluation is not lost."""
    from posttrain.data import write_jsonl

    if path is None:
        return result
    out, made = Path(path), records()
    replaced = out.exists()
    try:
        write_jsonl(made, out)  # whole or not at all
    except OSError as err:
        if (message := place_error(err, "run the command again (the results are printed here)")) is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return replace(result, code=EXIT_USER, error={"kind": "user", "message": message})
    print(f"wrote {len(made)} rows to {out}" + (" (replacing the file there)" if replaced else ""),
          file=sys.stderr)  # fmt: skip
    return result


def _evaluation_rows(args) -> list[dict]:
    """The first --n rows of --data, or --n fresh rows of the --task (with its difficulty options)."""
    rows = task_or_file_rows(args, args.data, "--data")
    if args.data is None:
        return rows
    missing = [getattr(r, "line", i + 1) for i, r in enumerate(rows) if "answer" not in r]
    if args.task is not None and missing:
        raise UserError(f"{args.data}: rows need an `answer` for the verifier (missing on line {missing[0]})")
    return rows


def _check_pairs_only_flags(args) -> None:
    """Flags that apply with or without --pairs only are refused where they would do nothing: those of --pairs
    without it, and those of generated answers (and of a task's prompts) with it."""
    if args.pairs is None:
        given = ["--" + name.replace("_", "-") for name in PAIRS_ONLY if getattr(args, name) is not None]
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            raise UserError(f"{', '.join(given)} {verb} only with --pairs (ranking preference pairs); this evaluation "
                            "generates answers, which they do not change")  # fmt: skip
    elif args.temperature != 0:
        raise UserError("--temperature applies to generated answers; --pairs ranks given pairs by log-probability "
                        "and samples nothing")  # fmt: skip
    else:
        answers_only = {"--task": args.task is not None, "--reward": bool(args.reward), "--data": args.data is not None,
                        "--stop": bool(args.stop), "--max-new-tokens": args.max_new_tokens is not None,
                        "--split": args.split is not None, "--min-ops": args.min_ops is not None,
                        "--max-ops": args.max_ops is not None, "--max-value": args.max_value is not None}  # fmt: skip
        if given := [flag for flag, on in answers_only.items() if on]:
            raise UserError(f"--pairs scores preference pairs with the model's log-probabilities and generates no "
                            f"answer; {', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to it "
                            "(run them separately)")  # fmt: skip


def _report_reward_failures(result, n: int, rewards: list) -> None:
    """A reward that could not score some answers says so (they count with the fallback, 0); one that scored
    none measured nothing, which is an error rather than a table of zeros; one whose call on all the answers failed
    (it returned one value for them all) while each answer alone scored says it was called once per answer. What a
    reward counts of its own (`code_exec`'s timeouts: answers scored lower on a slower machine) is said too."""
    notes = {r.name: getattr(r.fn, "event_notes", {}) for r in rewards}
    for name, counted in result.events.items():
        for event, count in counted.items():
            if count:
                print(f"warning: --reward {name}: {count} of {n} answers: {notes[name].get(event, event)}",
                      file=sys.stderr)  # fmt: skip
    for name, failed in result.failures.items():
        why = result.errors.get(name, "")
        if not failed and why:  # the call on every answer failed, each answer alone scored: said as training says it
            at = f" (at {result.sites[name]})" if name in result.sites else ""
            print(f"warning: --reward {name}: its call on the {n} answers failed ({why}{at}), so it was called once "
                  "per answer, and every answer scored that way; a function that returns one value per completion "
                  "is called once for them all", file=sys.stderr)  # fmt: skip
        if not failed:
            continue
        if failed == n:
            raise UserError(f"--reward {name} could not score any answer ({why}); check that --data has the "
                            "columns it reads and that its args are right")  # fmt: skip
        print(f"warning: --reward {name} could not score {failed} of {n} answers; they count as 0 ({why})",
              file=sys.stderr)  # fmt: skip


def evaluate_pairs(args) -> Output:
    """`posttrain evaluate --pairs FILE`: rank held-out preference pairs with the model and its reference."""
    from posttrain.data import load_rows
    from posttrain.evaluation import load_for_inference, metric_intervals
    from posttrain.evaluation.preference import format_preference, pair_records, preference_accuracy
    from posttrain.models import is_adapter_model
    from posttrain.models.heads import reward_model_problem

    if args.judge is not None:
        raise UserError("--judge scores generated answers; --pairs generates none (run them separately)")
    rows = load_rows(args.pairs, "preference", columns_given(args, "preference", args.pairs, "--pairs"))[: args.n]
    if reward_model_problem(args.model) is None:  # a reward model ranks by its scores, not by log-probabilities
        return _rank_with_reward_model(args, rows)
    taken = []  # the run's own beta and max_length where not given: a beta=0.5 run was ranked at 0.1, silently
    saved = run_config(args.model)
    dpo = setting(saved, "algorithm.name") == "dpo" and setting(saved, "algorithm.loss_type") != "simpo"
    for attr, dotted in (("beta", "algorithm.beta"), ("max_length", "data.max_length")):
        if getattr(args, attr) is None:  # beta: DPO's implicit-reward scale (an RL run's is a KL coefficient)
            ran = setting(saved, dotted) if attr != "beta" or dpo else None
            ok = isinstance(ran, int | float) and not isinstance(ran, bool) and ran > 0
            setattr(args, attr, (int(ran) if attr == "max_length" else float(ran)) if ok else PAIRS_ONLY[attr])
            if ok:
                taken.append(f"{dotted} {getattr(args, attr):g}")
    if taken:
        print(f"note: ranking with the run's {' and '.join(taken)} (--beta, --max-length to choose others)",
              file=sys.stderr)
    quiet_libraries()
    # an IPO run on length-averaged log-probabilities logged its margins per token: ranked the same way
    per_token = dpo and setting(saved, "algorithm.loss_type") == "ipo" and setting(saved, "algorithm.ipo_logps") != "sum"
    if per_token:
        print("note: implicit rewards from per-token mean log-probabilities, as this IPO run (ipo_logps: mean) "
              "trained them", file=sys.stderr)  # fmt: skip
    model, tokenizer = load_for_inference(args.model, dict(args.template_var))
    if args.reference is None and not is_adapter_model(model):  # before every pair is scored, not after
        raise UserError(f"{args.model} is a full model, not an adapter: ranking pairs by the DPO implicit reward "
                        "needs the model it was trained from as the reference; give it (--reference)")  # fmt: skip
    reference = load_for_inference(args.reference)[0] if args.reference is not None else None
    per_pair: list[dict] = []
    result = preference_accuracy(
        model, tokenizer, rows, reference=reference, beta=args.beta, max_length=args.max_length,
        source=args.pairs, per_pair=per_pair, progress=not args.no_progress, per_token=per_token,
    )  # fmt: skip
    intervals = metric_intervals(result)  # the accuracies' (a margin is a difference of rewards: none)
    text = format_preference({args.model: result}, intervals)
    doc = {"model": args.model, "verifier": "pairs", "pairs": args.pairs, "reference": args.reference,
           "n": len(rows), "settings": {**settings(args, "beta", "max_length"), "per_token": per_token},
           "metrics": {k: v for k, v in result.items() if k != "n"}, "out": args.out,
           "intervals": {k: list(v) for k, v in intervals.items()}}  # fmt: skip
    return _written(Output(doc=doc, text=text), args.out, lambda: pair_records(rows, per_pair))


def _rank_with_reward_model(args, rows: list[dict]) -> Output:
    """`evaluate --pairs` with a reward model: its own scores rank the pairs (`reward_model_accuracy`). Its
    backbone's DPO implicit reward read 50% for a model whose run logged 100% (the score head was left out)."""
    from posttrain.evaluation import metric_intervals
    from posttrain.evaluation.preference import format_preference, pair_records, reward_model_accuracy

    given = [f"--{k.replace('_', '-')}" for k in PAIRS_ONLY if getattr(args, k) is not None]
    given += [f"--template-var {k}" for k in dict(args.template_var)]
    if given:
        raise UserError(f"{args.model} is a reward model: it ranks the pairs by its scores, as its run trained it, "
                        f"so {', '.join(given)} (for a policy's log-probabilities and its chat template's variables) "
                        "would change nothing; leave them out")  # fmt: skip
    quiet_libraries()
    per_pair: list[dict] = []
    result = reward_model_accuracy(args.model, rows, per_pair=per_pair)
    values = {f"{side}_score_mean": [p[f"{side}_score"] for p in per_pair if not math.isnan(p["chosen_score"])
                                      and not math.isnan(p["rejected_score"])] for side in ("chosen", "rejected")}
    intervals = metric_intervals(result, values)
    text = format_preference({args.model: result}, intervals)
    doc = {"model": args.model, "verifier": "reward_model", "pairs": args.pairs, "reference": None,
           "n": len(rows), "settings": {}, "metrics": {k: v for k, v in result.items() if k != "n"},
           "out": args.out, "intervals": {k: list(v) for k, v in intervals.items()}}  # fmt: skip
    return _written(Output(doc=doc, text=text), args.out, lambda: pair_records(rows, per_pair))
