"""`posttrain diagnose`: measure a model's robustness to perturbed prompts, its sampling headroom, its SFT data,
its preference signal and its drift from a base, and recommend SFT with better data, SFT -> DPO or SFT -> GRPO
(`posttrain.diagnose`; docs/diagnose.md)."""

from __future__ import annotations

import sys
from pathlib import Path

from posttrain.cli.data import task_or_file_rows, task_with_options
from posttrain.cli.output import (
    Once,
    Output,
    add_columns,
    add_json,
    add_template_vars,
    check_output_folder,
    columns_given,
    json_document,
    number,
    quiet_libraries,
    settings,
)
from posttrain.errors import UserError

NO_VERIFIER = (
    "posttrain diagnose needs to be told what a right answer is; there is no default. Give --task NAME (a built-in "
    "task's verifier, on its freshly made held-out prompts or on --prompts FILE rows with an `answer`), or --prompts "
    "FILE with --reward SPEC (reward functions as the verifier: numeric_answer, exact_match, path/to/file.py:function, "
    "...; right when their sum is > 0) or --judge DIR (a trained reward model; right when its score is > "
    "--judge-threshold)."
)


DEFAULTS = {"judge_threshold": 0.0, "temperature": 1.0, "dup_threshold": 0.8, "reference": None, "beta": 0.1,
            "max_length": 512}
"""The defaults of the flags `_check_numbers` refuses when their probe does not run (a value other than the
default was given)."""


def add_parser(sub) -> None:
    d = sub.add_parser(
        "diagnose", help="measure robustness, sampling headroom, data ambiguity and drift; recommend SFT, DPO or GRPO"
    )
    d.add_argument("--model", action=Once, default="smollm2-135m-instruct", help="run folder, model/adapter folder or name")
    verifier = d.add_mutually_exclusive_group()
    verifier.add_argument("--task", help="a built-in task's verifier (arithmetic, structured); without --prompts, "
                                         "on its freshly made held-out prompts, with perturbed variants")  # fmt: skip
    verifier.add_argument("--reward", action="append", help="reward functions as the verifier (with --prompts): "
                          "a built-in, path/to/file.py:function or JSON; repeatable (weighted sum); right when > 0")  # fmt: skip
    verifier.add_argument("--judge", help="a trained reward model folder as the verifier (with --prompts)")
    d.add_argument("--judge-threshold", type=number, default=DEFAULTS["judge_threshold"], help="with --judge: right when the score is above "
                   "this (default 0)")  # fmt: skip
    d.add_argument("--prompts", help="evaluation prompts (a `prompt` per row, an `id`, and the `answer` or columns "
                   "the verifier reads)")  # fmt: skip
    d.add_argument("--n", type=int, default=100, help="clean prompts to evaluate (default: 100)")
    d.add_argument("--seed", type=int, default=1, help="prompts made, variants and samples (default: 1)")
    d.add_argument("--split", choices=["train", "heldout"], default=None,
                   help="the --task's rows: heldout (the default) or train wordings")  # fmt: skip
    d.add_argument("--min-ops", type=int, help="arithmetic: fewest operations per problem")
    d.add_argument("--max-ops", type=int, help="arithmetic: most operations per problem")
    d.add_argument("--max-value", type=int, help="arithmetic: largest starting count and amount")
    d.add_argument("--perturbed", help="your perturbed prompts: rows with `perturbs` (a clean row's id), `kind`, "
                   "`prompt` and the same `answer` (replaces the task's own variants)")  # fmt: skip
    d.add_argument("--perturbations", help="with --task: the task's variants to make, comma-separated (arithmetic: "
                   "paraphrase,noop,names,reorder,numbers; default all)")  # fmt: skip
    d.add_argument("--samples", type=int, default=8, help="samples per prompt for pass@k (0: no headroom probe)")
    d.add_argument("--temperature", type=number, default=DEFAULTS["temperature"], help="sampling temperature for pass@k (default 1.0)")
    d.add_argument("--max-new-tokens", type=int, default=128)
    d.add_argument("--batch-size", type=int, default=16, help="sequences per generate call (default 16)")
    d.add_argument("--sft-data", help="SFT training data: near-duplicate prompts with different responses, wrong "
                   "demonstrations (rows the verifier can check)")  # fmt: skip
    d.add_argument("--dup-threshold", type=number, default=DEFAULTS["dup_threshold"], help="word-set Jaccard at which two prompts with "
                   "the same numbers are near-duplicates (default 0.8)")  # fmt: skip
    d.add_argument("--pairs", help="preference pairs: how often the model already ranks chosen above rejected")
    d.add_argument("--reference", default=DEFAULTS["reference"], help="with --pairs: a reference model to rank them too (default: the adapter "
                   "disabled for an adapter, else none)")  # fmt: skip
    d.add_argument("--beta", type=number, default=DEFAULTS["beta"], help="with --pairs and a reference: DPO beta")
    d.add_argument("--max-length", type=int, default=DEFAULTS["max_length"], help="with --pairs: tokens per prompt + response")
    d.add_argument("--base", help="the base model: KL from it on the task, top-1 agreement on unrelated prompts")
    d.add_argument("--out", help="write the report here: report.html, report.md, report_files/, diagnosis.json")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_template_vars(d)
    add_columns(d)  # read --prompts, --sft-data and --pairs in their own names
    add_json(d)
    d.set_defaults(func=run, loads_models=True)


def _harder_than_trained(rows: list[dict], sft: list[dict], sft_file: str) -> str | None:
    """A note when the measured prompts are harder than any SFT row (a task's rows record `metadata.n_ops`, and
    the `max_value` they were made with): the task's defaults (3 operations, values to 50) measured problems
    harder than those `data make --max-ops 2 --max-value 20` trained on, and the recommendation changed with
    them (an audit). Rows made before `max_value` was recorded are checked for their operations alone.

    >>> note = _harder_than_trained([{"metadata": {"n_ops": 3, "max_value": 50}}],
    ...                             [{"metadata": {"n_ops": 1, "max_value": 20}}], "math.jsonl")
    >>> print(note[:101])
    warning: the prompts measured have up to 3 operations and values of 50, and math.jsonl's rows up to 1
    >>> print(note[-79:])
    the range trained on, pass --max-ops 1 --max-value 20 (the data's own settings)
    """
    def most(rs: list[dict], key: str) -> int | None:
        found = [r["metadata"][key] for r in rs if isinstance(r.get("metadata"), dict)
                 and isinstance(r["metadata"].get(key), int) and not isinstance(r["metadata"][key], bool)]  # fmt: skip
        return max(found) if found else None

    harder, flags = [], []
    for key, what, flag in (("n_ops", "operations", "--max-ops"), ("max_value", "values of", "--max-value")):
        measured, trained = most(rows, key), most(sft, key)
        if measured is not None and trained is not None and measured > trained:
            harder.append((what, measured, trained))
            flags.append(f"{flag} {trained}")
    if not harder:
        return None
    said = [(f"{m} {w}", f"{t} {w}") if w == "operations" else (f"{w} {m}", f"{w} {t}") for w, m, t in harder]
    return (f"warning: the prompts measured have up to {' and '.join(m for m, _ in said)}, and {sft_file}'s rows "
            f"up to {' and '.join(t for _, t in said)}: the diagnosis measures harder problems than SFT trained "
            f"on, and its recommendation is about those; to measure the range trained on, pass {' '.join(flags)} "
            f"(the data's own settings)")


def run(args) -> Output:
    """Check every input before any model loads, then measure, recommend, print and write the report."""
    from posttrain.data import load_rows
    from posttrain.diagnose import (
        Settings,
        format_diagnosis,
        load_perturbed,
        run_diagnosis,
        write_diagnosis_report,
    )
    from posttrain.diagnose.robustness import shared_ids_problem
    from posttrain.evaluation import load_for_inference

    _check_numbers(args)
    verifier = _verifier(args)
    columns = _file_columns(args)
    rows = _prompt_rows(args, verifier, columns)
    variants, source = _variants(args, rows)
    if args.perturbed is not None:
        variants, source = load_perturbed(args.perturbed, rows), args.perturbed
    if variants and (why := shared_ids_problem(rows)):  # refused before the model loads, not after decoding
        raise UserError(f"{args.prompts or 'the prompts'}: {why}")
    sft = load_rows(args.sft_data, "sft", columns) if args.sft_data is not None else None
    if sft is not None and (note := _harder_than_trained(rows, sft, args.sft_data)):
        print(note, file=sys.stderr)
    pairs = load_rows(args.pairs, "preference", columns) if args.pairs is not None else None
    if args.reference is not None and pairs is None:
        raise UserError("--reference ranks the --pairs; give --pairs FILE too, or leave --reference out")
    check_output_folder(args.out, "--out")  # a file, or a path under one: refused before the measurements run
    quiet_libraries()
    model, tokenizer = load_for_inference(args.model, dict(args.template_var))
    reference = load_for_inference(args.reference)[0] if args.reference is not None else None
    base = load_for_inference(args.base)[0] if args.base is not None else None
    s = Settings(samples=args.samples, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                 batch_size=args.batch_size, seed=args.seed, dup_threshold=args.dup_threshold, beta=args.beta,
                 max_length=args.max_length)  # fmt: skip
    result = run_diagnosis(
        rows, verifier, model=model, tokenizer=tokenizer, model_name=args.model, variants=variants,
        variant_source=source, sft_rows=sft, sft_file=args.sft_data or "", pairs=pairs, reference=reference,
        base=base, base_name=args.base or "", settings=s, progress=not args.no_progress,
    )  # fmt: skip
    doc = {"model": args.model, "verifier": {"kind": verifier.kind, "name": verifier.name}, "task": args.task,
           "prompts_file": args.prompts, "perturbed_file": args.perturbed, "sft_data": args.sft_data,
           "pairs_file": args.pairs, "reference": args.reference, "base": args.base,
           **{k: v for k, v in result.to_dict().items() if k not in ("model", "verifier")},
           "settings": {**settings(args, "split", "judge_threshold"), **result.to_dict()["settings"]},
           "out": args.out}  # fmt: skip
    text = format_diagnosis(result)
    if args.out is not None:
        paths = write_diagnosis_report(result, args.out)
        (Path(args.out) / "diagnosis.json").write_text(json_document("diagnose", Output(doc=doc)) + "\n",
                                                       encoding="utf-8")  # fmt: skip
        text += f"\nreport: {paths.html}"
    return Output(doc=doc, text=text)


def _check_numbers(args) -> None:
    checks = [(args.n > 0, f"--n must be a positive number of prompts, got {args.n}"),
              (args.samples >= 0, f"--samples must be >= 0 (0: no headroom probe), got {args.samples}"),
              (args.samples != 1, "--samples 1 cannot measure headroom: a prompt needs two samples or more to have "
                                  "both a right and a wrong one, so its share of mixed prompts would read 0 whatever "
                                  "the model (and advise against RL); give 2 or more (8 by default), or 0 to skip "
                                  "the probe"),
              (args.samples == 0 or args.temperature > 0, f"--temperature must be > 0 to draw samples (greedy "
               f"decoding gives {args.samples} equal answers), got {args.temperature}"),
              (0 < args.dup_threshold <= 1, f"--dup-threshold must be in (0, 1], got {args.dup_threshold}"),
              (args.max_new_tokens > 0, f"--max-new-tokens must be positive, got {args.max_new_tokens}"),
              (args.batch_size > 0, f"--batch-size must be positive, got {args.batch_size}"),
              (args.beta > 0, f"--beta must be > 0, got {args.beta}"),
              (args.max_length > 0, f"--max-length must be a positive number of tokens, got {args.max_length}"),
              ]  # fmt: skip
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    # flags whose part of the diagnosis does not run: refused, not silently dropped
    pairs = "ranks preference pairs (--pairs)"
    unused = [(args.samples == 0, "temperature", "draws samples (--samples > 0)"), (args.pairs is None, "beta", pairs),
              (args.pairs is None, "max_length", pairs), (args.pairs is None, "reference", pairs),
              (args.judge is None, "judge_threshold", "has a --judge"),
              (args.sft_data is None, "dup_threshold", "reads --sft-data")]  # fmt: skip
    for off, name, needs in unused:
        if off and getattr(args, name) != DEFAULTS[name]:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} is read only when the diagnosis {needs}; this one does not, so it would do "
                            "nothing")  # fmt: skip


def _verifier(args):
    """The verifier the user named (a task, rewards or a judge), checked before any model loads."""
    from posttrain.diagnose import judge_verifier, reward_verifier, task_verifier

    if args.task is None and not args.reward and args.judge is None:
        raise UserError(NO_VERIFIER)
    if args.task is not None:
        return task_verifier(args.task)
    if args.prompts is None:
        flag = "--reward" if args.reward else "--judge"
        raise UserError(f"{flag} scores the answers to your prompts: add --prompts FILE (rows with a `prompt` and the "
                        "columns the verifier reads, e.g. `answer`); or use --task NAME for a built-in task's own "
                        "prompts and verifier")  # fmt: skip
    if args.judge is not None:
        from posttrain.models.heads import reward_model_problem

        why = reward_model_problem(args.judge)
        if why:
            raise UserError(f"--judge: {why}")
        return judge_verifier(args.judge, args.judge_threshold)
    from posttrain.rewards import build_reward_functions, parse_reward_specs
    from posttrain.rollout.pairs import parse_reward_args

    specs = parse_reward_specs(parse_reward_args(args.reward), where="--reward #{n}")
    return reward_verifier(build_reward_functions(specs), [s.label or s.name for s in specs])


def _file_columns(args):
    """--column, --ignore-column, --message-key, --role and --turn, for every file read as rows (--prompts,
    --sft-data, --pairs; not --perturbed, which is posttrain's own layout): one file may lack a name another has,
    and a name none of them has is refused, before any model loads."""
    import dataclasses

    from posttrain.data.schema import unused_in_files

    files = [p for p in (args.prompts, args.sft_data, args.pairs) if p is not None]
    columns = columns_given(args, None, files[0] if files else None, "--prompts, --sft-data or --pairs")
    if columns and (unused := unused_in_files(columns, files)):
        raise UserError(f"{', '.join(map(str, files))}: " + "; ".join(unused))
    return dataclasses.replace(columns, strict=False)


def _prompt_rows(args, verifier, columns=None) -> list[dict]:
    """The clean prompts: the first --n rows of --prompts, or --n fresh rows of --task; each with an `id`."""
    from posttrain.diagnose.robustness import row_id

    rows = task_or_file_rows(args, args.prompts, "--prompts", columns)
    if args.prompts is None:
        return rows
    missing = next((r for r in rows if "answer" not in r), None)
    if verifier.needs_answer and missing is not None:
        raise UserError(f"{args.prompts}:{missing.line}: answer: missing; the task's verifier compares each answer "
                        "with the row's `answer`")  # fmt: skip
    if verifier.kind == "reward":
        from posttrain.rewards import parse_reward_specs
        from posttrain.rewards.checks import DIAGNOSE, check_reward_inputs
        from posttrain.rollout.pairs import parse_reward_args

        specs = parse_reward_specs(parse_reward_args(args.reward), where="--reward #{n}")
        check_reward_inputs(specs, rows, args.prompts, DIAGNOSE)
    return [{**r, "id": row_id(r, i)} for i, r in enumerate(rows)]


def _variants(args, rows: list[dict]) -> tuple[list[dict], str]:
    """The task's own variants of the clean prompts (--task with a task that makes them, no --perturbed)."""
    from posttrain.data import TASKS
    from posttrain.data.tasks import Perturbable, make_perturbed

    kinds = tuple(k.strip() for k in args.perturbations.split(",") if k.strip()) if args.perturbations else None
    task = TASKS.get(args.task) if args.task is not None else None
    if kinds is not None and (task is None or args.perturbed is not None or not isinstance(task, Perturbable)):
        raise UserError("--perturbations chooses the variants a built-in task makes (--task arithmetic); with "
                        "--perturbed FILE, or a verifier that is not such a task, leave it out")  # fmt: skip
    if args.perturbed is not None or not isinstance(task, Perturbable):
        return [], ""
    unknown = sorted(set(kinds or ()) - set(task.perturbations))
    if unknown:
        raise UserError(f"--perturbations: unknown variant {unknown[0]!r}; {args.task} makes "
                        f"{', '.join(task.perturbations)}")  # fmt: skip
    task = task_with_options(task, args)
    return make_perturbed(task, rows, seed=args.seed, kinds=kinds), f"task {args.task}"
