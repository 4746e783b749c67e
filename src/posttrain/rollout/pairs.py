"""On-policy preference pairs: sample N completions per prompt, score them, keep (best, worst) when they differ.

This makes DPO usable with only a verifier: the model's own samples, ranked by a task's ``score`` or a reward
function, become ``{"id", "prompt", "chosen", "rejected", "answer", "metadata"}`` rows (valid ``preference``
rows, see `schema.py`). ``metadata`` holds ``chosen_score``, ``rejected_score`` and every sample's score.

Rules, per prompt:

- the prompt is repeated `n` times and sampled with `models.generate` (`temperature` > 0, or all n are equal);
- ``scorer(prompts, completions, rows) -> list[float]`` scores all n (prompts are the rows' ``prompt`` values,
  a string or a message list, one per completion, and `rows` the matching prompt rows);
- empty completions (the model stopped at once) never enter a pair: a preference row needs two responses;
- chosen is the highest-scoring completion, rejected the lowest; on ties the first sampled wins (so the pick is
  repeatable); the pair is kept only when best > worst and the two texts differ.

Sampling is repeatable for equal inputs (`seed` + the batch number), not per prompt: re-running with other rows
(e.g. after a resume skips some) draws other samples.

It samples from a policy and scores with rewards, hence its place with the rollouts (`rollout/`), above the
models and the rewards. Helpers for `posttrain data pairs`: `task_scorer` and `reward_scorer` (the two kinds of scorer),
`prepare_prompt_rows` (ids, answers) and `written_ids` (resume). The CLI opens and appends the output file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from posttrain.data.schema import plain_messages
from posttrain.errors import DataError, Problem, UserError
from posttrain.models import generate
from posttrain.rewards import build_reward_functions, compute_rewards, parse_reward_specs, row_columns

Scorer = Callable[[list, list[str], list[dict]], list[float]]


def onpolicy_pairs(
    model,
    tokenizer,
    rows: Sequence[dict],
    *,
    n: int,
    scorer: Scorer,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
    on_pair: Callable[[dict], None] | None = None,
    on_skip: Callable[[dict, str], None] | None = None,
    done: set | frozenset = frozenset(),
) -> tuple[list[dict], dict]:
    """Sample `n` completions per prompt row, score them, keep (best, worst) where best > worst.

    `on_pair(row)` is called with each kept pair as soon as it exists (the CLI writes it to disk there), and
    `on_skip(row, why)` with each prompt that gave none. `done`: the ids of rows an earlier, interrupted call
    finished (a pair, or a skip); they are not made again. The rows are sampled in the same groups, with the same
    seeds, as in one uninterrupted call (a group whose every row is done is left out, and one partly done is sampled
    again in full, keeping only its rows not done), so the pairs of a resumed call are those one call would make.
    `batch_size` bounds the sequences per `generate` call: ``max(1, batch_size // n)`` prompts at a time.
    Returns ``(pairs, stats)``; stats: ``prompts``, ``kept``, ``skipped_equal`` (every usable completion
    scored the same), ``skipped_empty`` (fewer than two usable completions), ``cut`` (completions cut at
    `max_new_tokens`: never a side of a pair, since DPO would score the end-of-turn token the model did not write
    there, teaching that stopping mid-sentence ends an answer), ``mean_best`` and ``mean_worst`` (the mean over
    prompts of the best and worst of all n scores).
    """
    if n < 2:
        raise ValueError(f"n must be at least 2 completions per prompt to make a pair, got {n}")
    if temperature <= 0:
        raise ValueError("temperature must be > 0: greedy decoding gives n equal completions")
    per_call = max(1, batch_size // n)
    pairs: list[dict] = []
    stats = {"prompts": 0, "kept": 0, "skipped_equal": 0, "skipped_empty": 0, "cut": 0}
    best_sum = worst_sum = 0.0
    left = [r.get("id") not in done for r in rows]
    bar = tqdm(total=sum(left), desc="pairs", unit="prompt", disable=not progress)
    try:
        for b, start in enumerate(range(0, len(rows), per_call)):
            if not any(left[start : start + per_call]):
                continue
            chunk = list(rows[start : start + per_call])
            rep_rows = [r for r in chunk for _ in range(n)]  # each prompt n times, side by side
            prompts = [r["prompt"] for r in rep_rows]
            ended: list[bool] = []
            completions = generate(
                model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                top_p=top_p, batch_size=batch_size, seed=seed + b, finished=ended,
            )  # fmt: skip
            scores = [float(s) for s in scorer(prompts, completions, rep_rows)]
            if len(scores) != len(completions):
                raise ValueError(
                    f"the scorer returned {len(scores)} scores for {len(completions)} completions"
                )
            for i, row in enumerate(chunk):
                if not left[start + i]:
                    continue
                texts, got = completions[i * n : (i + 1) * n], scores[i * n : (i + 1) * n]
                stats["prompts"] += 1
                stats["cut"] += ended[i * n : (i + 1) * n].count(False)
                best_sum, worst_sum = best_sum + max(got), worst_sum + min(got)
                pair, why = pick_pair(row, texts, got, ended[i * n : (i + 1) * n])
                if pair is None:
                    stats[why] += 1
                    if on_skip is not None:
                        on_skip(row, why)
                else:
                    stats["kept"] += 1
                    pairs.append(pair)
                    if on_pair is not None:
                        on_pair(pair)
                bar.update(1)
            bar.set_postfix(kept=stats["kept"])
    finally:
        bar.close()
    m = max(stats["prompts"], 1)
    stats.update(mean_best=best_sum / m, mean_worst=worst_sum / m)
    return pairs, stats


def pick_pair(row: dict, completions: list[str], scores: list[float], finished: list[bool] | None = None
              ) -> tuple[dict | None, str | None]:  # fmt: skip
    """The (best, worst) preference row for one prompt, or None and the reason (``skipped_equal``/``_empty``).

    Ties go to the first sample; empty completions, and those `finished` marks as cut at the token limit, are left
    out.

    >>> pair, _ = pick_pair({"id": 1, "prompt": "q", "answer": 4}, ["4", "", "5", "4!"], [1.0, 0.0, 0.0, 1.0])
    >>> pair["chosen"], pair["rejected"], pair["metadata"]["scores"]
    ('4', '5', [1.0, 0.0, 0.0, 1.0])
    >>> pick_pair({"prompt": "q"}, ["a", "b"], [0.5, 0.5])
    (None, 'skipped_equal')
    >>> pick_pair({"prompt": "q"}, ["4", "5 because th", "6"], [1.0, 0.0, 0.5], [True, False, True])[0]["rejected"]
    '6'
    """
    ok = finished if finished is not None else [True] * len(completions)
    usable = [i for i, c in enumerate(completions) if c.strip() and ok[i]]
    if len(usable) < 2:
        return None, "skipped_empty"
    best = max(usable, key=lambda i: (scores[i], -i))  # highest score; the earliest among equals
    worst = min(usable, key=lambda i: (scores[i], i))  # lowest score; the earliest among equals
    if scores[best] <= scores[worst] or completions[best] == completions[worst]:
        return None, "skipped_equal"
    pair = {"prompt": row["prompt"], "chosen": completions[best], "rejected": completions[worst]}
    if "id" in row:
        pair = {"id": row["id"], **pair}
    if "answer" in row:
        pair["answer"] = row["answer"]
    meta = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
    pair["metadata"] = {**meta, "chosen_score": scores[best], "rejected_score": scores[worst],
                        "scores": list(scores)}  # fmt: skip
    if finished is not None:  # which samples ended (the others, cut at the token limit, were not candidates)
        pair["metadata"]["finished"] = list(finished)
    return pair, None


def task_scorer(task) -> Scorer:
    """A scorer from a built-in task: ``task.score(completion, row["answer"])`` for each completion.

    >>> from posttrain.data.tasks import TASKS
    >>> task_scorer(TASKS["arithmetic"])(["q", "q"], ["Answer: 4", "Answer: 5"], [{"answer": 4}] * 2)
    [1.0, 0.0]
    """

    def scorer(prompts, completions, rows):
        return [task.score(c, r["answer"]) for c, r in zip(completions, rows)]

    return scorer


def reward_scorer(specs: list) -> Scorer:
    """A scorer from `posttrain.rewards` specs (a built-in name, ``path/to/file.py:function``, or a JSON object
    ``{"name", "weight", "args"}``): their weighted sum (`rewards.compute_rewards`), each function called as
    ``fn(prompts, completions, **columns)`` with the prompt rows' other columns (``answer``, ``id``, ...) by
    name. A sample a function fails on gets 0 from it."""
    funcs = build_reward_functions(parse_reward_specs(parse_reward_args(specs), where="--reward #{n}"))

    def scorer(prompts, completions, rows):
        columns = row_columns(rows, skip=["prompt"])
        return compute_rewards(funcs, prompts, completions, columns).total

    return scorer


def parse_reward_args(specs: list[str]) -> list:
    """`--reward` values as reward specs: a JSON object (``{"name": ..., "args": ...}``) is parsed, anything
    else (a built-in name, ``path/to/file.py:function``) is kept as it is.

    >>> parse_reward_args(["exact_match", '{"name": "numeric_answer", "weight": 2}'])
    ['exact_match', {'name': 'numeric_answer', 'weight': 2}]
    """
    parsed = []
    for spec in specs:
        if isinstance(spec, str) and spec.lstrip().startswith("{"):
            try:
                spec = json.loads(spec)
            except json.JSONDecodeError as err:
                raise UserError(f"--reward {spec!r}: not valid JSON ({err})") from None
        parsed.append(spec)
    return parsed


def prepare_prompt_rows(rows: list[dict], source: str, *, answer_for: str | None = None) -> None:
    """Ready prompt rows (from ``load_rows(path, "prompts")``) for `onpolicy_pairs`, in place.

    Every row gets an ``id`` (a re-run skips prompts by id): one without its own gets ``prompt-`` and a digest of
    its prompt and answer (``-2``, ``-3`` for a repeat), so that another file's row on the same line is another
    prompt (``line-N`` made any two files of as many rows the same prompts), and a plain-string prompt when it is one
    user message (what the output row shows). A bad or repeated id, or a missing ``answer`` when `answer_for`
    (e.g. ``"--task arithmetic"``) needs it, is a problem; all are raised together.
    """
    problems, seen, made = [], {}, {}
    for row in rows:
        line = getattr(row, "line", None)
        if "id" not in row:
            content = json.dumps([row.get("prompt"), row.get("answer")], sort_keys=True, default=str)
            digest = f"prompt-{hashlib.sha256(content.encode()).hexdigest()[:12]}"
            made[digest] = made.get(digest, 0) + 1
            row["id"] = digest if made[digest] == 1 else f"{digest}-{made[digest]}"
        if not isinstance(row["id"], (str, int)) or isinstance(row["id"], bool):
            problems.append(Problem(source, line, "id", "must be a string or an integer"))
        elif row["id"] in seen:
            problems.append(
                Problem(source, line, "id", f"repeats the id of line {seen[row['id']]}: ids must be unique")
            )
        else:
            seen[row["id"]] = line
        if answer_for and "answer" not in row:
            problems.append(
                Problem(source, line, "answer", f"missing: {answer_for} scores completions against it")
            )
        row["prompt"] = plain_messages(row["prompt"], "user")
    if problems:
        raise DataError(problems, header=f"{source}: {len(problems)} problem(s); no pairs made")


def skipped_file(path: str | Path) -> Path:
    """Where `posttrain data pairs` records the prompts of `path` that gave no pair (hidden, beside it): a re-run
    samples them again otherwise, and a finished file kept growing with each identical re-run."""
    path = Path(path)
    return path.with_name(f".{path.name}.skipped")


def settings_file(path: str | Path) -> Path:
    """Where `posttrain data pairs` records what made the pairs of `path` (hidden, beside it): the model (its name
    and weights' digest), the sampling settings and the scorer; a re-run with others is refused (`check_same_making`)."""
    path = Path(path)
    return path.with_name(f".{path.name}.made.json")


def check_same_making(path: str | Path, made: dict) -> str | None:
    """Refuse (`UserError`) to add to `path` pairs made otherwise than those in it: another model (or the same
    name with other weights: the next round's policy), other sampling settings or another scorer; its prompts were
    taken as done by their ids whatever made them. Records `made` for a new file; returns a note for a file written
    before this record existed (it cannot be checked)."""
    path, record, skipped = Path(path), settings_file(path), skipped_file(path)
    nothing = not path.exists() or (path.stat().st_size == 0 and not (skipped.exists() and skipped.stat().st_size))
    if nothing:  # new, or left empty by a first attempt that failed before any prompt was done
        record.unlink(missing_ok=True)
        _write_record(record, made)
        return None
    if not record.exists():
        _write_record(record, made)
        return (f"note: {path} was written without a record of what made its pairs (an older posttrain), so this "
                "run cannot check that its model, sampling settings and scorer are those of the pairs already there")
    before = json.loads(record.read_text(encoding="utf-8"))
    changed = [f"{k}: {before.get(k)!r} -> {v!r}" for k, v in made.items() if not _same(k, before, made)]
    if changed:
        raise UserError(f"{path} holds pairs made otherwise ({'; '.join(changed)}), and its prompts count as done "
                        "whatever made them: write these pairs to a new --out file (or remove the old one)")  # fmt: skip
    filled = {k: before[k] if before.get(k) is not None else v for k, v in made.items()}
    filled.update({k: v for k, v in before.items() if k not in made})
    if filled != before:  # a digest known now that was not then: kept for the next run's check
        _write_record(record, filled)
    return None


def _same(key: str, before: dict, now: dict) -> bool:
    """Whether `key` of two records agrees. A digest that could not be taken (a hub model not yet in the cache on
    the first run) matches any; the model's name is compared only where neither run has its weights' digest (a
    path spelt with a trailing slash, or made absolute, is the same model)."""
    if key not in before:  # a record of an earlier release, without this key: unknown, filled in now
        return True
    if key.endswith("_sha256") and (before.get(key) is None or now.get(key) is None):
        return True
    if key == "model" and before.get("model_sha256") and now.get("model_sha256"):
        return True
    return before.get(key) == now.get(key)


def _write_record(record: Path, made: dict) -> None:
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(made, indent=2) + "\n", encoding="utf-8")


def written_ids(path: str | Path) -> set:
    """Ids of the prompts already done in `path` (a re-run skips them): its pairs', and those its `skipped_file`
    records as giving none; none when `path` does not exist (and a skipped record left without its file is removed).

    Every line is written with its newline, so a last line without one was cut by an interrupt: it is dropped
    from the file.
    """
    path = Path(path)
    skipped = skipped_file(path)
    if not path.exists():
        skipped.unlink(missing_ok=True)
        return set()
    ids = _ids(path)
    return ids | (_ids(skipped) if skipped.exists() else set())


def _ids(path: Path) -> set:
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines.pop()
        path.write_text("".join(lines), encoding="utf-8")
    ids = set()
    for k, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or "id" not in row:
            raise UserError(
                f"{path}:{k}: not a pair with an `id`; --out must be a new file or one written by "
                "`posttrain data pairs`"
            )
        ids.add(row["id"])
    return ids
