"""Task evaluation: generate answers for held-out prompts and score them with a verifier.

The verifier is a built-in task's (`evaluate_task`: rates, the means of its per-row metrics, e.g. `json_valid`,
`schema_match`, `exact`, `field_<name>`) or reward functions (`evaluate_rewards`, the same specs as
`algorithm.rewards`: `reward_mean`, the mean reward; `reward_positive`, the share of rows whose reward is > 0,
which is the accuracy for 0/1 rewards such as `exact_match`, `numeric_answer` and `task` on arithmetic (not for
partial credit: `task` on structured scores the share of fields right); `reward_failures`,
samples a reward function could not score). `format_table` puts several models side by side. Greedy decoding by
default, so two evaluations of the same model on the same rows agree exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import comb
from pathlib import Path

from posttrain.config import ModelConfig, TechniqueConfig
from posttrain.data import TASKS, plain_messages
from posttrain.errors import UserError
from posttrain.models import generate, load_model, load_tokenizer, load_trained
from posttrain.rewards import compute_rewards, row_columns


def load_for_inference(name_or_path: str, template_variables: dict | None = None):
    """(model, tokenizer) for a run folder, a trained model/adapter folder, or any base model name or path;
    `template_variables`: values for the chat template's variables (`data.render.set_template_variables`,
    `--template-var`), checked before a base model's weights load."""
    from posttrain.data.render import set_template_variables
    from posttrain.models.heads import reward_model_problem

    p = Path(name_or_path).expanduser()
    if p.is_dir() and reward_model_problem(p) is None:  # its backbone alone was never trained to write
        raise UserError(f"{name_or_path} is a reward model (a score head on its backbone): it scores answers, it does "
                        "not write them; rank preference pairs with it (evaluate --pairs FILE), judge answers with it "
                        "(evaluate --judge), or reward an RL run with it (algorithm.reward_model)")  # fmt: skip
    if p.is_dir() and (
        (p / "final").is_dir()
        or (p / "posttrain_model.json").exists()
        or (p / "adapter_config.json").exists()
        or ((p / "config.yaml").is_file() and not (p / "config.json").is_file())  # a run folder: did it finish?
    ):
        model, tokenizer = load_trained(p)
        set_template_variables(tokenizer, template_variables or {}, setting="--template-var")
    else:
        cfg = ModelConfig(name=name_or_path)
        tokenizer = load_tokenizer(cfg)
        set_template_variables(tokenizer, template_variables or {}, setting="--template-var")
        model = load_model(cfg, TechniqueConfig(name="full"), train=False)
    model.eval()
    return model, tokenizer


def score_completions(
    task: str, completions: Sequence[str], rows: Sequence[dict], per_row: list[dict] | None = None
) -> dict[str, float]:
    """Mean of every verifier metric over the rows (booleans count as 0/1), plus `n`. `per_row`, when given,
    receives each row's verifier metrics (for paired comparisons, `paired_change`)."""
    verify = TASKS[task].verify
    totals: dict[str, float] = {}
    for completion, row in zip(completions, rows):
        checked = verify(completion, row["answer"])
        if per_row is not None:
            per_row.append({k: float(v) for k, v in checked.items()})
        for k, v in checked.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    n = max(len(rows), 1)
    return {"n": float(len(rows)), **{k: v / n for k, v in totals.items()}}


def score_rewards(rewards, completions: Sequence[str], rows: Sequence[dict]) -> tuple[dict[str, float], object]:
    """Reward functions (`rewards.NamedReward`s) as the verifier: (metrics, the `rewards.RewardResult`).

    Each function is called as in GRPO/PPO training: ``fn(prompts, completions, **columns)``, a prompt being the
    text of its last user message, with every other column of the rows (``answer``, ...) by name and
    ``prompt_messages`` (the whole prompt as chat messages); their weighted sum is the row's reward. Metrics: `reward_mean`,
    `reward_positive` (share of rows with reward > 0), `reward_<name>_mean` per function when there are several,
    `reward_failures` (samples scored with the fallback because a function failed on them) and `n`.

    >>> from posttrain.rewards import build_reward_functions
    >>> rows = [{"prompt": "q", "answer": a} for a in ("4", "5", "6", "7")]
    >>> metrics, _ = score_rewards(build_reward_functions(["exact_match"]), ["4", "5", "x", "y"], rows)
    >>> metrics
    {'n': 4.0, 'reward_mean': 0.5, 'reward_positive': 0.5, 'reward_failures': 0.0}
    """
    messages = [[{"role": "user", "content": r["prompt"]}] if isinstance(r["prompt"], str) else list(r["prompt"])
                for r in rows]  # fmt: skip
    prompts = [next((m["content"] for m in reversed(msgs) if m["role"] == "user"), msgs[-1]["content"])
               for msgs in messages]  # fmt: skip
    columns = row_columns(rows, skip=["prompt"])
    columns["prompt_messages"] = messages
    result = compute_rewards(rewards, prompts, list(completions), columns)
    n = max(len(rows), 1)
    metrics = {
        "n": float(len(rows)),
        "reward_mean": sum(result.total) / n,
        "reward_positive": sum(t > 0 for t in result.total) / n,
    }
    if len(rewards) > 1:
        for name, values in result.per_function.items():
            metrics[f"reward_{name}_mean"] = sum(values) / n
    metrics["reward_failures"] = float(sum(result.failures.values()))
    return metrics, result


def generate_answers(
    model,
    tokenizer,
    rows: Sequence[dict],
    *,
    max_new_tokens: int = 128,
    batch_size: int = 16,
    temperature: float = 0.0,
    sample_seed: int = 0,
    progress: str | None = None,
    stop: list[str] | None = None,
    finished: list[bool] | None = None,
) -> list[str]:
    """One completion per row's `prompt`: greedy, or one sample at `temperature` > 0 (repeatable by
    `sample_seed`), ended at the first of the `stop` strings if any. `progress`: the label of a progress bar on
    stderr (None: no bar); `finished` (an empty list) receives whether each answer ended rather than being cut at
    `max_new_tokens` (`models.generate`)."""
    return generate(
        model,
        tokenizer,
        [r["prompt"] for r in rows],
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        batch_size=batch_size,
        seed=sample_seed if temperature > 0 else None,
        progress=progress,
        stop=stop,
        finished=finished,
    )


def answer_records(
    rows: Sequence[dict], completions: Sequence[str], scores: Sequence[dict], judge: Sequence[float] | None = None
) -> list[dict]:
    """One JSON-ready record per evaluated row, as `posttrain evaluate --out` writes them: `index`, `id` and
    `answer` when the row has them, `prompt` (a string when it is one user message), `completion`, the row's
    `scores` (its verifier metrics, or its rewards) and `judge_score` when a judge scored it.

    >>> answer_records([{"prompt": [{"role": "user", "content": "2+2?"}], "answer": 4}], ["4"], [{"correct": 1.0}])
    [{'index': 0, 'prompt': '2+2?', 'answer': 4, 'completion': '4', 'correct': 1.0}]
    """
    records = []
    for i, (row, completion, score) in enumerate(zip(rows, completions, scores, strict=True)):
        record: dict = {"index": i, **({"id": row["id"]} if "id" in row else {})}
        record["prompt"] = plain_messages(row["prompt"], "user")
        if "answer" in row:
            record["answer"] = row["answer"]
        record.update(completion=completion, **score)
        if judge is not None:
            record["judge_score"] = judge[i]
        records.append(record)
    return records


def evaluate_task(
    model,
    tokenizer,
    task: str,
    *,
    rows: Sequence[dict] | None = None,
    n: int = 100,
    seed: int = 1,
    split: str = "heldout",
    max_new_tokens: int = 128,
    batch_size: int = 16,
    completions_out: list[str] | None = None,
    per_row: list[dict] | None = None,
    temperature: float = 0.0,
    sample_seed: int = 0,
) -> dict[str, float]:
    """Score `model` on `rows` (or `n` freshly made rows of the built-in `task`) with greedy decoding, or one
    sample per prompt at `temperature` > 0 (repeatable by `sample_seed`).
    `completions_out` and `per_row`, when given, receive the generated answers (e.g. for a judge) and each
    row's verifier metrics."""

    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; built-in tasks: {', '.join(sorted(TASKS))}")
    if rows is None:
        rows = TASKS[task].make(n, seed=seed, split=split)
    completions = generate_answers(
        model, tokenizer, rows, max_new_tokens=max_new_tokens, batch_size=batch_size,
        temperature=temperature, sample_seed=sample_seed,
    )  # fmt: skip
    if completions_out is not None:
        completions_out.extend(completions)
    return score_completions(task, completions, rows, per_row)


def paired_change(before: Sequence[float], after: Sequence[float]) -> dict[str, float]:
    """How a 0/1 metric changed on the same rows: rows gained (0 -> 1), lost (1 -> 0), the exact two-sided
    McNemar p-value, the chance of a split at least this uneven between gained and lost if training changed
    nothing (McNemar 1947; exact binomial form: 2 P[Bin(gained + lost, 1/2) <= min(gained, lost)], capped at 1),
    and `low`/`high`, the 95% interval of the change of the rate, after - before, paired on the rows (Newcombe
    1998, `intervals.paired_difference_interval`).

    Worked example: 12 gained, 3 lost -> 2 P[Bin(15, 1/2) <= 3] = 2 (1 + 15 + 105 + 455) / 2^15 = 0.0352.

    >>> r = paired_change([0] * 12 + [1] * 3 + [1] * 5, [1] * 12 + [0] * 3 + [1] * 5)
    >>> r["gained"], r["lost"], round(r["p_value"], 4), r["low"] < 9 / 20 < r["high"]
    (12, 3, 0.0352, True)
    """
    from posttrain.evaluation.intervals import paired_difference_interval

    if len(before) != len(after):
        raise ValueError(f"{len(before)} rows before but {len(after)} after")
    gained = sum(1 for b, a in zip(before, after) if not b and a)
    lost = sum(1 for b, a in zip(before, after) if b and not a)
    both = sum(1 for b, a in zip(before, after) if b and a)
    n = gained + lost
    tail = sum(comb(n, k) for k in range(min(gained, lost) + 1)) / 2**n if n else 1.0
    low, high = paired_difference_interval(both, gained, lost, len(before) - both - gained - lost)
    return {"gained": gained, "lost": lost, "p_value": min(1.0, 2 * tail), "low": low, "high": high}


def paired_changes(before: dict, after: dict) -> dict[str, dict]:
    """`paired_change` of every metric both score dicts hold row by row (`per_row_<metric>`: 0/1 per row, the same
    rows in the same order), popping those lists out of both: what the before/after tables test, every 0/1 metric
    and not only some (an audit found `formatted` and the SFT quickstart's rates shown with no test)."""
    keys = [k for k in before if k.startswith("per_row_") and k in after]
    changes = {}
    for key in keys:
        b, a = before.pop(key), after.pop(key)
        if all(v in (0, 1) for v in [*b, *a]):
            changes[key.removeprefix("per_row_")] = paired_change(b, a)
    for scores in (before, after):  # one side's alone (an older cache): not a metric of the table either
        for key in [k for k in scores if k.startswith("per_row_")]:
            del scores[key]
    return {k: changes[k] for k in ordered_metrics(changes)}


def paired_summary(changes: dict[str, dict], n: int) -> str:
    """One line per `paired_changes` entry, as the quickstarts print them under their tables.

    >>> print(paired_summary({"correct": {"gained": 12, "lost": 3, "p_value": 0.0352, "low": 0.2, "high": 0.65}}, 20))
    correct: 12 prompts gained, 3 lost of 20; change +20.0 to +65.0 pts (95%, paired); exact McNemar p = 0.035
    """
    return "\n".join(
        f"{k}: {c['gained']} prompts gained, {c['lost']} lost of {n}; change {100 * c['low']:+.1f} to "
        f"{100 * c['high']:+.1f} pts (95%, paired); exact McNemar p = {c['p_value']:.2g}"
        for k, c in changes.items()
    )


HEADLINE_METRICS = ["json_valid", "schema_match", "exact", "correct", "sampled_correct", "formatted",
                    "sampled_formatted", "reward_mean", "reward_positive", "pairs_implicit_accuracy",
                    "pairs_implicit_margin"]  # fmt: skip


def ordered_metrics(keys) -> list[str]:
    """Display order: the verifier's summary rates, other metrics, per-field rates, then the count `n`.

    >>> ordered_metrics({"n", "field_b", "exact", "json_valid", "field_a", "score"})
    ['json_valid', 'exact', 'score', 'field_a', 'field_b', 'n']
    """
    rank = {k: i for i, k in enumerate(HEADLINE_METRICS)}
    return sorted(keys, key=lambda k: (k == "n", k.startswith("field_"), rank.get(k, len(rank)), k))


def is_rate(metric: str) -> bool:
    """Whether a metric is a share of rows or pairs (shown as a percentage): not a count (`n`, `*_failures`,
    `unscored_*`), a mean of scores (`*_mean`: rewards, a judge's scores) or a difference of rewards (`*margin*`).

    >>> [is_rate(k) for k in ("exact", "mean_logp_accuracy", "judge_score_mean", "implicit_margin", "n")]
    [True, True, False, False, False]
    >>> is_rate("unscored_pairs")  # 2 pairs a reward model could not score read "200.0%"
    False
    """
    return not (_is_count(metric) or metric.endswith("_mean") or "margin" in metric)


def _is_count(metric: str) -> bool:
    return metric == "n" or metric.endswith("_failures") or metric.startswith("unscored_")


def format_value(metric: str, value: float) -> str:
    """One metric as the tables show it: counts as integers, shares as percentages, differences of rewards
    with a sign, means of scores as numbers (never as percentages: a judge's score of 3.5 is not 350%).

    >>> [format_value(k, v) for k, v in (("n", 4.0), ("exact", 0.5), ("implicit_margin", 0.25),
    ...                                  ("judge_score_mean", 3.5))]
    ['4', '50.0%', '+0.250', '3.5']
    """
    if _is_count(metric):
        return f"{value:.0f}"
    if "margin" in metric:
        return f"{value:+.3f}"
    if not is_rate(metric):
        return f"{value:.4g}"
    return f"{100 * value:.1f}%"


def format_change(metric: str, before: float, after: float) -> str:
    """How a metric changed, as the before/after tables show it: shares in points, differences of rewards and
    means of scores as signed numbers.

    >>> [format_change(k, b, a) for k, b, a in (("exact", 0.25, 0.75), ("implicit_margin", 0.1, 0.35),
    ...                                         ("judge_score_mean", 1.5, 2.25))]
    ['+50.0 pts', '+0.250', '+0.75']
    """
    if is_rate(metric):
        return f"{100 * (after - before):+.1f} pts"
    return f"{after - before:+.3f}" if "margin" in metric else f"{after - before:+.4g}"


def metric_intervals(metrics: dict[str, float], values: dict[str, Sequence[float]] | None = None, *,
                     level: float = 0.95) -> dict[str, tuple[float, float]]:  # fmt: skip
    """The `level` intervals of an evaluation's metrics over its `n` rows: a rate (`is_rate`) gets the Wilson
    interval of value x n of n (`intervals.wilson_interval`; a rate that is a mean of per-row fractions, such as a
    share of fields, gets one at least as wide as it needs); a mean of scores named in `values` (each row's value:
    rewards, a judge's scores) gets Student's t interval over them. Counts and anything else get none. An
    evaluation of 8 rows all wrong read "0.0%": its interval says "at most 32.4%" (an audit).

    >>> {k: [round(x, 4) for x in v] for k, v in metric_intervals({"n": 8.0, "correct": 0.0}).items()}
    {'correct': [0.0, 0.3244]}
    >>> [round(x, 4) for x in metric_intervals({"n": 3.0, "reward_mean": 0.5}, {"reward_mean": [0, 0.5, 1]})["reward_mean"]]
    [-0.7421, 1.7421]
    """
    from posttrain.evaluation.intervals import t_interval, wilson_interval

    n = metrics.get("n", 0)
    out: dict[str, tuple[float, float]] = {}
    for k, v in metrics.items():
        if k in (values or {}):
            if (bounds := t_interval(list(values[k]), level=level)) is not None:
                out[k] = bounds
        elif is_rate(k) and n >= 1 and 0 <= v <= 1:
            out[k] = wilson_interval(v * n, n, level=level)
    return out


def format_interval(metric: str, bounds: tuple[float, float]) -> str:
    """An interval as the tables show its metric: shares in percent, other values as numbers.

    >>> format_interval("correct", (0.0, 0.32444)), format_interval("reward_mean", (-0.7421, 1.7421))
    ('[0.0%, 32.4%]', '[-0.742, 1.74]')
    """
    if is_rate(metric):
        return f"[{100 * bounds[0]:.1f}%, {100 * bounds[1]:.1f}%]"
    return f"[{bounds[0]:.3g}, {bounds[1]:.3g}]"


def format_table(results: dict[str, dict[str, float]], intervals: dict[str, tuple[float, float]] | None = None, *,
                 order=ordered_metrics) -> str:  # fmt: skip
    """A markdown table: one row per metric, one column per model; for one model, its `intervals` (from
    `metric_intervals`) in a column beside it.

    >>> print(format_table({"base": {"n": 2.0, "exact": 0.5}, "tuned": {"n": 2.0, "exact": 1.0}}))
    | metric | base | tuned |
    |---|---|---|
    | exact | 50.0% | 100.0% |
    | n | 2 | 2 |
    >>> print(format_table({"m": {"n": 4.0, "reward_mean": -0.25, "reward_positive": 0.5, "reward_failures": 1}}))
    | metric | m |
    |---|---|
    | reward_mean | -0.25 |
    | reward_positive | 50.0% |
    | reward_failures | 1 |
    | n | 4 |
    >>> print(format_table({"m": {"judge_score_mean": 3.5, "pairs_implicit_margin": 0.25}}))
    | metric | m |
    |---|---|
    | pairs_implicit_margin | +0.250 |
    | judge_score_mean | 3.5 |
    >>> print(format_table({"m": {"n": 8.0, "correct": 0.0}}, {"correct": (0.0, 0.32444)}))
    | metric | m | 95% interval |
    |---|---|---|
    | correct | 0.0% | [0.0%, 32.4%] |
    | n | 8 |  |
    """
    names = list(results)
    if intervals is not None and len(names) != 1:
        raise ValueError("intervals are shown beside one model's column")
    metrics = order({k for r in results.values() for k in r})
    head = [*names, *(["95% interval"] if intervals is not None else [])]
    lines = ["| metric | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for k in metrics:
        cells = ["" if results[nm].get(k) is None else format_value(k, results[nm][k]) for nm in names]
        if intervals is not None:
            cells.append(format_interval(k, intervals[k]) if k in intervals else "")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
