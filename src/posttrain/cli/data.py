"""`posttrain data make | validate | pairs | tree`: write a built-in task's rows, check a data file, sample
on-policy preference pairs, or turn message trees (oasst1) into rows (`posttrain.data`)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import warnings
from pathlib import Path

from posttrain.cli.output import (
    Output,
    add_columns,
    add_json,
    add_template_vars,
    check_output_file,
    column_rename,
    columns_given,
    positive,
    positive_int,
    quiet_libraries,
    top_p,
)
from posttrain.errors import EXIT_OK, EXIT_USER, DataError, UserError, problem_lines

TASK_OPTIONS = {"min_ops": "--min-ops", "max_ops": "--max-ops", "max_value": "--max-value"}
"""`data make` and `evaluate` options that set a field of the task's dataclass (only tasks that have the field
accept them)."""


def add_parser(sub) -> None:
    d = sub.add_parser("data", help="make built-in task data, validate a data file, or sample pairs")
    dsub = d.add_subparsers(dest="data_command", metavar="ACTION")
    _add_make(dsub)
    _add_validate(dsub)
    _add_pairs(dsub)
    _add_tree(dsub)
    d.set_defaults(func=lambda a: (d.print_help(), EXIT_USER)[1])


def _add_make(dsub) -> None:
    mk = dsub.add_parser("make", help="write a built-in task as JSONL (sft, preference pairs or prompts)")
    mk.add_argument("task", help="built-in task: structured, arithmetic")
    mk.add_argument("--n", type=positive_int, required=True, help="number of rows")
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
    mk.set_defaults(func=make)


def _add_validate(dsub) -> None:
    va = dsub.add_parser("validate", help="check every row of a data file")
    va.add_argument("file")
    va.add_argument("--kind", choices=["sft", "preference", "prompts"], default="sft",
                    help="what the rows are for: sft (prompt/completion, messages or text; the default), preference "
                         "(prompt, chosen, rejected: dpo, reward) or prompts (prompt, and what the rewards read: RL)")
    va.add_argument("--model", help="also check lengths with this model's tokenizer (needs --max-length)")
    va.add_argument("--max-length", type=int, help="tokens; a row whose prompt alone reaches it is an error")
    add_columns(va)
    add_json(va)
    va.set_defaults(func=validate)


def _add_pairs(dsub) -> None:
    pa = dsub.add_parser(
        "pairs", help="sample N completions per prompt, score them, write (best, worst) preference pairs"
    )
    pa.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help="the policy whose samples are paired (on-policy pairs come from the model DPO will train, e.g. your "
             "SFT run): run folder, model/adapter folder, .gguf file, hub name (default: the embedded "
             "smollm2-135m-instruct)",
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
    pa.add_argument("--max-new-tokens", type=positive_int, default=128)
    pa.add_argument("--temperature", type=positive, default=1.0, help="must be > 0 (default: 1.0)")
    pa.add_argument("--top-p", type=top_p, default=1.0)
    pa.add_argument("--seed", type=int, default=0)
    pa.add_argument("--limit", type=positive_int, help="use only the first K prompts")
    pa.add_argument("--batch-size", type=positive_int, default=16, help="sequences per generate call (default: 16)")
    pa.add_argument("--no-progress", action="store_true", help="no progress bar")
    pa.add_argument("--out", required=True, help="output .jsonl; re-running skips prompt ids already in it")
    add_columns(pa)
    add_template_vars(pa)
    add_json(pa)
    pa.set_defaults(func=pairs, loads_models=True)


def _add_tree(dsub) -> None:
    tr = dsub.add_parser("tree", help="turn message trees, one message per row (OpenAssistant's oasst1, oasst2), "
                                      "into SFT rows or preference pairs")  # fmt: skip
    tr.add_argument("file", help="the messages (JSONL, JSON, CSV, Parquet or a datasets folder)")
    tr.add_argument("--kind", choices=["sft", "preference"], required=True,
                    help="sft: one row per chosen assistant reply, the conversation before it as its prompt; "
                         "preference: the best-ranked reply against each lower-ranked sibling")  # fmt: skip
    tr.add_argument("--out", required=True, help="output .jsonl")
    tr.add_argument("--replies", choices=["best", "all"], default="best",
                    help="sft: the replies that train: best (each best ranked among its siblings, on a conversation "
                         "of best-ranked replies; the default) or all")  # fmt: skip
    tr.add_argument("--lang", help="only the trees whose first message has this `lang` (e.g. en)")
    tr.add_argument("--key", action="append", type=column_rename, default=[], metavar="PART=COLUMN",
                    help="the column holding a part of each message (id, parent, role, content, rank), if not "
                         "oasst1's (message_id, parent_id, role, text, rank); repeatable")  # fmt: skip
    tr.add_argument("--role", action="append", type=column_rename, default=[], metavar="ROLE=FILE_ROLE",
                    help="the file's name of a role, if not oasst1's (user=prompter, assistant=assistant)")
    add_json(tr)
    tr.set_defaults(func=tree)


def tree(args) -> Output:
    from posttrain.data import write_jsonl
    from posttrain.data.trees import KEYS, ROLES, tree_rows

    keys, roles = dict(args.key), dict(args.role)
    if bad := [k for k in keys if k not in KEYS] + [r for r in roles if r not in ROLES]:
        raise UserError(f"--key names one of {', '.join(KEYS)} and --role one of {', '.join(ROLES)}; got {bad[0]!r}")
    if bad := [f for f, c in [*args.key, *args.role] if not isinstance(c, str)]:
        raise UserError(f"--key and --role name one column or role each ({bad[0]}=...+... joins nothing there)")
    check_output_file(args.out, "--out", jsonl=True, inputs={"FILE": args.file})
    made = tree_rows(args.file, args.kind, keys=keys, roles=roles, replies=args.replies, lang=args.lang)
    if not made.rows:
        raise UserError(f"{args.file}: no {args.kind} rows in its {made.trees} tree(s) of {made.messages} message(s)"
                        + (f" ({_left_out(made.skipped)} left out)" if made.skipped else "")
                        + ("; pairs need replies with a rank" if args.kind == "preference" and made.trees else ""))  # fmt: skip
    write_jsonl(made.rows, args.out)
    what = "rows, one per chosen reply," if args.kind == "sft" else "pairs"
    text = f"wrote {len(made.rows)} {args.kind} {what} from {made.trees} tree(s) of {made.messages} message(s) to {args.out}"
    if made.skipped:
        text += f"\nleft out: {_left_out(made.skipped)}"
    doc = {"file": args.file, "kind": args.kind, "out": args.out, "rows": len(made.rows), "trees": made.trees,
           "messages": made.messages, "left_out": dict(made.skipped)}  # fmt: skip
    return Output(doc=doc, text=text)


def _left_out(skipped) -> str:
    """
    >>> _left_out({"parent not in the file": 2, "deleted or failing review": 5})
    '5 messages deleted or failing review, 2 messages parent not in the file'
    """
    return ", ".join(f"{n} message{'s' if n != 1 else ''} {why}" for why, n in sorted(skipped.items(), key=lambda kv: -kv[1]))


def _lines_in(path: str) -> int | None:
    """How many lines the file at `path` holds, or None when there is none."""
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return None


def make(args) -> int:
    from posttrain.data import TASKS, make_pairs, make_prompts, write_jsonl

    if args.task not in TASKS:
        raise UserError(f"unknown task {args.task!r}; built-in tasks: {', '.join(sorted(TASKS))}")
    check_output_file(args.out, "--out", jsonl=True)
    task = task_with_options(TASKS[args.task], args)
    maker = {"sft": task.make, "preference": make_pairs, "prompts": make_prompts}[args.kind]
    rows = (
        maker(args.n, seed=args.seed, split=args.split)
        if args.kind == "sft"
        else maker(task, args.n, seed=args.seed, split=args.split)
    )
    replaced = _lines_in(args.out)
    write_jsonl(rows, args.out)
    if replaced is not None:
        print(f"note: {args.out} existed ({replaced} lines) and was replaced")
    what = args.task if args.kind == "sft" else f"{args.task} {args.kind}"
    print(f"wrote {len(rows)} {what} rows ({args.split}, seed {args.seed}) to {args.out}")
    return EXIT_OK


def task_with_options(task, args):
    """The built-in task with the difficulty options given on the command line (e.g. arithmetic --max-ops 1)."""
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


def task_or_file_rows(args, path, flag: str, columns=None) -> list[dict]:
    """The first --n prompt rows of `path` (the file given as `flag`), or --n fresh rows of --task with its
    difficulty options; those options with a file are refused (they shape only the rows a task makes). `columns`:
    the file's own names, if not the command's --column options for this file alone."""
    from posttrain.data import TASKS, load_rows

    columns = columns if columns is not None else columns_given(args, "prompts", path, flag)
    if path is None:
        args.split = getattr(args, "split", None) or "heldout"
        return task_with_options(TASKS[args.task], args).make(args.n, seed=args.seed, split=args.split)
    given = [opt for f, opt in TASK_OPTIONS.items() if getattr(args, f, None) is not None]
    given += ["--split"] if getattr(args, "split", None) is not None else []
    if given:
        raise UserError(f"{', '.join(given)} shape the rows made by --task; with {flag} the rows come from {path}")
    rows = load_rows(path, "prompts", columns)[: args.n]
    check_task_answers(args, rows, path)
    return rows


def check_task_answers(args, rows: list[dict], path) -> None:
    """Refuse, before any model loads, rows whose `answer` the --task's verifier cannot compare with (it raised
    after every answer was generated: `"answer": "five"` under --task arithmetic)."""
    from posttrain.data import TASKS
    from posttrain.data.tasks import answer_problems

    task = TASKS.get(getattr(args, "task", None) or "")
    if task is not None:
        problems = answer_problems(task, rows, str(path), f"--task {task.name}")
        if problems:
            raise DataError(problems, header=f"{path}: --task {task.name} cannot score these rows:")


def validate(args) -> Output:
    from posttrain.data.schema import rows_and_shapes, shapes_summary

    if (args.model is None) != (args.max_length is None):
        raise UserError("--model and --max-length go together: the length check needs the model's tokenizer")
    if args.model is not None and args.kind == "prompts":
        raise UserError(
            "--max-length checks sft and preference files; prompts files are checked when sampling"
        )
    columns = columns_given(args, args.kind, args.file)
    said: list[str] = []  # the readers' warnings (carriage returns in CSV cells), once each
    try:
        with _warnings_into(said):
            rows, shapes = rows_and_shapes(args.file, args.kind, columns)
        notes = _check_lengths(args, rows) if args.model is not None else []
    except DataError as err:
        return _problems(args, err, said)
    text = shapes_summary(args.file, args.kind, shapes)
    if args.model is not None:
        fits = "every row's prompt fits" if notes else "every row fits"  # the notes name the rows that are cut
        text += f"; {fits} max_length={args.max_length}"
    text += "".join(f"\nwarning: {w}" for w in [*said, *notes])
    doc = {"file": args.file, "kind": args.kind, "rows": sum(shapes.values()), "shapes": shapes,
           "max_length": args.max_length, "warnings": [*said, *notes]}  # fmt: skip
    return Output(doc=doc, text=text)


@contextlib.contextmanager
def _warnings_into(said: list[str]):
    """The `UserWarning`s raised inside (the readers warn through Python's `warnings`, for the library's callers)
    appended to `said`, once each, for the command to report as its own `warning:` lines and in its --json
    document, not in Python's format with a source path and line. Other warnings are shown as they would be."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)  # Python's default says a warning once per line of code
        try:
            yield
        finally:
            for w in caught:
                if not issubclass(w.category, UserWarning):
                    warnings.showwarning(w.message, w.category, w.filename, w.lineno)
                elif str(w.message) not in said:
                    said.append(str(w.message))


def _problems(args, err: DataError, said: list[str]) -> Output:
    """Every problem on stderr (`FILE:LINE: field: message`); with --json also as a list in the document. `said`:
    the readers' warnings, on stderr after the count and in the document's `warnings`."""
    if err.header:  # how many problems in how many rows, first (as a run's error says it)
        print(err.header, file=sys.stderr)
    for w in said:
        print(f"warning: {w}", file=sys.stderr)
    for line in problem_lines(err.problems):  # every distinct problem; one repeated on many rows is counted
        print(line, file=sys.stderr)
    if err.footer:  # how to read a file in another tool's columns (`schema._columns_hint`)
        print(err.footer, file=sys.stderr)
    message = f"{args.file}: {len(err.problems)} problem(s); fix them and validate again"
    fields = {p.field for p in err.problems}
    if args.kind != "preference" and {"chosen", "rejected"} <= fields:  # pairs checked as another kind
        message += " (the rows hold chosen and rejected: preference pairs are checked with --kind preference)"
    elif args.kind == "sft" and fields == {"completion"} and all("missing" in p.message for p in err.problems):
        message += " (rows of a prompt without a completion are RL prompts: check them with --kind prompts)"
    print(message, file=sys.stderr)
    problems = [{"file": p.file, "line": p.line, **({"row": p.row} if p.row is not None else {}), "field": p.field,
                 "message": p.message} for p in err.problems]  # fmt: skip
    return Output(doc={"file": args.file, "kind": args.kind, "problems": problems, "hint": err.footer,
                       "warnings": said}, code=EXIT_USER, error={"kind": "user", "message": message})  # fmt: skip


def _check_lengths(args, rows: list[dict]) -> list[str]:
    """Render every row (as `validate` read them) with the model's tokenizer: rows that cannot fit `--max-length`
    are problems; returns the warnings rendering gave (e.g. responses truncated)."""
    from posttrain.config import ModelConfig
    from posttrain.data import render_dataset, render_preference_dataset
    from posttrain.data.render import lines_text
    from posttrain.models import load_tokenizer
    from posttrain.models.loading import model_context

    if args.max_length <= 0:
        raise UserError(f"--max-length must be a positive number of tokens, got {args.max_length}")
    quiet_libraries()
    tokenizer = load_tokenizer(ModelConfig(name=args.model))
    render = render_preference_dataset if args.kind == "preference" else render_dataset
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rendered = render(tokenizer, rows, max_length=args.max_length, source=args.file)
    context = model_context(ModelConfig(name=args.model))
    if context is not None and args.max_length > context:  # as `train` refuses them (`train._check_context`)
        if args.kind == "preference":
            lengths = [len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in rendered]
        else:
            lengths = [len(r.input_ids) for r in rendered[0]]
        over = [getattr(row, "line", i + 1) for i, (row, n) in enumerate(zip(rows, lengths)) if n > context]
        if over:
            raise UserError(f"{args.file}: {len(over)} of {len(rows)} rows are longer than {args.model}'s context "
                            f"of {context} positions ({lines_text(over)}), which --max-length {args.max_length} "
                            f"allows, and training refuses them; set --max-length {context} or less (data.max_length "
                            "in training: longer rows are then cut, with a note), or shorten them")  # fmt: skip
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def pairs(args) -> Output:
    from posttrain.data import TASKS, load_rows
    from posttrain.models.saving import model_digest
    from posttrain.rollout.pairs import (
        check_same_making,
        onpolicy_pairs,
        prepare_prompt_rows,
        reward_scorer,
        skipped_file,
        task_scorer,
        written_ids,
    )
    from posttrain.trainer.fingerprint import tokenizer_digest

    _check_pairs_args(args)
    check_output_file(args.out, "--out", jsonl=True, inputs={"--prompts": args.prompts})
    rows = load_rows(args.prompts, "prompts", columns_given(args, "prompts", args.prompts))[: args.limit]
    had_id = ["id" in r for r in rows]
    prepare_prompt_rows(rows, args.prompts, answer_for=args.task and f"--task {args.task}")
    check_task_answers(args, rows, args.prompts)
    scorer = task_scorer(TASKS[args.task]) if args.task is not None else reward_scorer(args.reward)
    out = Path(args.out)
    # what makes the pairs (not --batch-size: it sets memory use; the groups it makes change no sample's law)
    made = {"model": args.model, "model_sha256": model_digest(args.model),
            "tokenizer_sha256": tokenizer_digest(args.model), "template_var": dict(args.template_var), "n": args.n,
            "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed,
            "max_new_tokens": args.max_new_tokens,
            "scorer": {"task": args.task} if args.task is not None else {"reward": list(args.reward)}}  # fmt: skip
    if note := check_same_making(out, made):
        print(note)
    done = written_ids(out)
    if any(str(i).startswith("line-") for i in done):  # an older posttrain named a row without an id by its line
        done |= {r["id"] for r, own in zip(rows, had_id) if not own and f"line-{getattr(r, 'line', None)}" in done}
    todo = [r for r in rows if r["id"] not in done]
    doc = {"model": args.model, "prompts_file": args.prompts, "out": str(out), "n": args.n,
           "already_done": len(rows) - len(todo), "prompts": 0, "kept": 0, "skipped_equal": 0,
           "skipped_empty": 0, "cut": 0, "mean_best": None, "mean_worst": None}  # fmt: skip
    if len(todo) < len(rows):
        print(f"{out}: {len(rows) - len(todo)} of {len(rows)} prompts were done there already (a pair, or none, "
              f"recorded in {skipped_file(out)}: their samples all scored alike, or fewer than 2 finished); skipping "
              "them")  # fmt: skip
    if not todo:
        return Output(doc=doc, text=f"nothing to do: every prompt was done in {out} already")
    quiet_libraries()
    from posttrain.evaluation import load_for_inference  # after quiet_libraries: it decides the hub's mode

    model, tokenizer = load_for_inference(args.model, dict(args.template_var))
    from posttrain.data.render import refuse_markers

    refuse_markers(tokenizer, todo, source=args.prompts)  # the file's rows, with their lines, before any sampling
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a", encoding="utf-8") as f, skipped_file(out).open("a", encoding="utf-8") as skips:

        def write(pair: dict) -> None:  # one line per pair, flushed: an interrupted run keeps its work
            f.write(json.dumps(pair, ensure_ascii=False) + "\n")
            f.flush()

        def skip(row: dict, why: str) -> None:  # and each prompt that gave none, so that a re-run does not redraw it
            skips.write(json.dumps({"id": row["id"], "skipped": why}) + "\n")
            skips.flush()

        # every row, with those done: the groups and seeds of one uninterrupted run (`onpolicy_pairs`)
        _, st = onpolicy_pairs(
            model, tokenizer, rows, n=args.n, scorer=scorer, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_p=args.top_p, seed=args.seed, batch_size=args.batch_size,
            progress=not args.no_progress, on_pair=write, on_skip=skip, done=done,
        )  # fmt: skip
    doc.update(st)
    return Output(doc=doc, text=(
        f"wrote {st['kept']} pairs from {st['prompts']} prompts to {out} ({st['skipped_equal']} skipped: all "
        f"{args.n} samples scored the same; {st['skipped_empty']} skipped: fewer than 2 finished, non-empty samples); "
        f"{st['cut']} of {st['prompts'] * args.n} samples were cut at --max-new-tokens {args.max_new_tokens} and are "
        "never a side of a pair"
        + (" (raise --max-new-tokens to keep them)" if st["cut"] else "")
        + f"; mean best score {st['mean_best']:.3f}, mean worst {st['mean_worst']:.3f}"
    ))  # fmt: skip


def _check_pairs_args(args) -> None:
    from posttrain.data import TASKS

    if args.task is not None and args.task not in TASKS:
        raise UserError(f"unknown task {args.task!r}; built-in tasks: {', '.join(sorted(TASKS))}")
    if args.n < 2:
        raise UserError(f"--n must be at least 2 completions per prompt to make a pair, got {args.n}")
