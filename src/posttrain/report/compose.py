"""What a report says about its runs, as `document` blocks: summary, config differences, evaluation tables,
the curves of each section with their numbers, throughput and memory, RL samples, notes, and the configs."""

from __future__ import annotations

import json
import math
import re
import statistics
from collections import defaultdict

from posttrain.evaluation import format_change, format_value, ordered_metrics
from posttrain.report.catalogue import choose_sections
from posttrain.report.document import Code, Details, Figures, Heading, Image, Table, Text
from posttrain.report.plots import render_panel
from posttrain.report.rundata import Run, setting

PROMPT_CHARS, COMPLETION_CHARS = 300, 600  # longer sample texts are cut in the report (samples.jsonl has them whole)


def fmt(value) -> str:
    """A number for a table: integers as such, 4 significant digits, scientific where tiny or huge.

    >>> [fmt(x) for x in (3, 2.0, 0.123456, 1.5e-7, 123456.7, None, float("nan"))]
    ['3', '2', '0.1235', '1.5e-07', '1.235e+05', '-', 'nan']
    """
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if value != value:
        return "nan"
    if float(value).is_integer() and abs(value) < 1e5:
        return str(int(value))
    return f"{value:.3g}" if abs(value) < 1e-3 else f"{value:.4g}"


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def training_seconds(run: Run) -> float:
    """Training time: the last `elapsed_s` of each stretch of the run. A resumed run's clock restarts at 0: a
    stretch begins where `elapsed_s` falls, or where a step's `elapsed_s` is its own `step_time_s` to the
    millisecond, which only a process's first step has (the loop reads both from one clock reading; later steps'
    clocks also hold the steps before them). Read from the fall alone, a stretch killed after 0.27 s and resumed to
    1.97 s read 2.1 s, not 2.34 (an audit).

    >>> from types import SimpleNamespace
    >>> run = SimpleNamespace(records=[{"step": 1, "elapsed_s": 0.27, "step_time_s": 0.27},
    ...                                {"step": 2, "elapsed_s": 1.97, "step_time_s": 1.97}])
    >>> training_seconds(run)
    2.24
    """
    total, last = 0.0, None
    for r in run.records:
        elapsed, step_time = r.get("elapsed_s"), r.get("step_time_s")
        if not isinstance(elapsed, int | float) or isinstance(elapsed, bool) or not math.isfinite(elapsed):
            continue
        restarted = isinstance(step_time, int | float) and 0 <= elapsed - step_time < 1e-3
        if last is not None and (elapsed < last or restarted):
            total += last
        last = elapsed
    return round(total + (last or 0.0), 9)


def _sum(run: Run, key: str) -> float:
    return sum(run.series(key)[1])


def _peak(run: Run, key: str) -> float | None:
    values = run.series(key)[1]
    return max(values) if values else None


def compose(runs: list[Run]) -> tuple[str, list]:
    """The report's title and blocks for `runs` (one, or several side by side)."""
    names = ", ".join(r.label for r in runs)
    title = f"posttrain report: {names}"
    files = "config.yaml, metrics.jsonl, and where present results.json, eval_base.json and samples.jsonl"
    blocks: list = [
        Heading(title, 1),
        Text(f"Made by `posttrain report` from what each run folder holds ({files}). "
             + ("Curves overlay the runs: one colour per run." if len(runs) > 1 else "")),  # fmt: skip
        Heading("Summary"),
        _summary(runs),
    ]
    if len(runs) > 1:
        blocks += _config_differences(runs)
    blocks += _evaluation(runs)
    blocks += _curves(runs)
    blocks += _samples(runs)
    notes = [f"{r.label}: {n}" for r in runs for n in [*r.notes, *_unfinished(r)]]
    if notes:
        blocks += [Heading("Notes"), *[Text(n) for n in notes]]
    blocks += _configs(runs)
    return title, blocks


def _summary(runs: list[Run]) -> Table:
    gpu = any(_peak(r, "peak_cuda_gb") is not None for r in runs)
    header = ["run", "method", "technique", "model", "last step", "last loss", "training time", "tokens/s",
              "peak RSS (GB)"] + (["peak GPU (GB)"] if gpu else [])  # fmt: skip
    rows = []
    for r in runs:
        steps = r.steps
        seconds = _sum(r, "step_time_s")
        last, target = steps[-1]["step"], _short_of(r)
        row = [r.label, r.method, str(setting(r.config, "technique.name") or "-"),
               str(setting(r.config, "model.name") or "-"), f"{fmt(last)} of {target}" if target else fmt(last),
               fmt(steps[-1].get("loss")),
               _duration(training_seconds(r)) if r.series("elapsed_s")[0] else "-", fmt(_sum(r, "tokens") / seconds) if seconds else "-",
               fmt(_peak(r, "peak_rss_gb"))]  # fmt: skip
        rows.append(row + ([fmt(_peak(r, "peak_cuda_gb"))] if gpu else []))
    return Table(header, rows)


def _unfinished(run: Run) -> list[str]:
    """A note for a run that stopped before `run.max_steps` without a final model newer than its steps: how far it
    got, and what `--resume` continues from (a run killed at step 121 of 3000 read as finished: an audit)."""
    from posttrain.files import checkpoint_step, list_checkpoints

    if (target := _short_of(run)) is None:
        return []
    last = run.steps[-1]["step"]
    kept = [checkpoint_step(c) for c in list_checkpoints(run.path)]
    again = (f"its latest checkpoint is step {kept[-1]}, which `posttrain train` with its config and --resume continues "
             f"from" + (f" (training {_span(kept[-1] + 1, last)} again)" if kept[-1] < last else "")) if kept else (
             "it has no checkpoint, so --resume starts it again")  # fmt: skip
    return [f"the run stopped at step {last} of {target}: {again}. The curves and numbers above are of the steps "
            "it logged."]


def _short_of(run: Run) -> int | None:
    """The run's `run.max_steps` when its last logged step is before it (it stopped before its end), else None."""
    target, steps = setting(run.config, "run.max_steps"), run.steps
    last = steps[-1].get("step") if steps else None
    return target if isinstance(target, int) and isinstance(last, int) and last < target else None


def _span(first: int, last: int) -> str:
    return f"step {first}" if first == last else f"steps {first}-{last}"


def flatten(tree, prefix: str = "") -> dict[str, str]:
    """Dotted names and their values as text (lists as JSON).

    >>> flatten({"a": {"b": 1, "c": [1, 2]}, "d": None})
    {'a.b': '1', 'a.c': '[1, 2]', 'd': 'null'}
    """
    out: dict[str, str] = {}
    for key, value in (tree or {}).items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if not isinstance(value, str) else value
    return out


def _config_differences(runs: list[Run]) -> list:
    flat = [flatten(r.config) for r in runs]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    differ = [k for k in keys if len({f.get(k, "(not set)") for f in flat}) > 1]
    if not differ:
        return [Heading("Config differences"), Text("The runs' config.yaml files hold the same settings.")]
    rows = [[k, *[f.get(k, "(not set)") for f in flat]] for k in differ]
    return [
        Heading("Config differences"),
        Text(f"The {len(differ)} settings whose values differ between the runs (all others are equal)."),
        Table(["setting", *[r.label for r in runs]], rows, marked=True),
    ]


def _before_after(before: dict, after: dict | None) -> Table:
    """Held-out metrics of the base model (and after training, with the change), as the terminal's table shows
    them (`evaluation.format_value`, `format_change`): the page showed `pairs_mean_logp_accuracy` as 0.4333 where
    the terminal said 43.3% (an audit)."""
    numbers = [k for k, v in before.items() if k != "n" and isinstance(v, int | float) and not isinstance(v, bool)]
    keys = ordered_metrics(numbers)  # the order of the table the quickstart prints
    rows = []
    for k in keys:
        b, a = before[k], (after or {}).get(k)
        a = a if isinstance(a, int | float) and not isinstance(a, bool) else None
        row = [k, format_value(k, b)] + ([format_value(k, a), format_change(k, b, a)] if a is not None else [])
        rows.append(row + ["-", "-"] * (after is not None and a is None))
    header = ["held-out metric", "base model"] + (["after training", "change"] if after is not None else [])
    return Table(header, rows)


def _evaluation(runs: list[Run]) -> list:
    blocks: list = []
    for r in runs:
        part: list = []
        res = r.results if isinstance((r.results or {}).get("before"), dict) else None
        if res is not None:
            n = res["before"].get("n")
            part += [Text("Held-out scores before and after training (results.json"
                          + (f"; {fmt(n)} prompts" if n is not None else "") + ")."),  # fmt: skip
                     _before_after(res["before"], res.get("after") if isinstance(res.get("after"), dict) else {})]
            scored, last = res.get("steps"), (r.steps[-1].get("step") if r.steps else None)
            if isinstance(scored, int) and isinstance(last, int) and scored != last:
                part.insert(0, Text(f"Warning: the scores after training are of the model at step {scored}, but the run "
                                    f"has since logged steps up to {last} (it was continued and not scored again): "
                                    "they do not describe the current model. Run the same quickstart command to "
                                    "score it."))  # fmt: skip
            changes = {k: c for k, c in (res.get("changes") or {}).items() if isinstance(c, dict)}
            if changes:
                def interval(c: dict) -> str:
                    ok = all(isinstance(c.get(k), int | float) for k in ("low", "high"))
                    return f"{100 * c['low']:+.1f} to {100 * c['high']:+.1f} pts" if ok else "-"

                part += [
                    Text("Paired changes on the same prompts: prompts gained (wrong before, right after) and lost, "
                         "the 95% interval of the change paired on the prompts (Newcombe 1998), and the exact "
                         "McNemar p-value (the chance of a split at least this uneven if training changed "
                         "nothing)."),  # fmt: skip
                    Table(["metric", "gained", "lost", "change, 95% interval", "exact McNemar p"],
                          [[k, fmt(c.get("gained")), fmt(c.get("lost")), interval(c),
                            f"{c['p_value']:.2g}" if "p_value" in c else "-"] for k, c in changes.items()]),  # fmt: skip
                ]
        elif r.base_scores:
            part += [Text("The base model's held-out scores (eval_base.json); the scores after training are added by "
                          "the quickstart once it has evaluated the trained model."),  # fmt: skip
                     _before_after(r.base_scores, None)]
        evals = [x for x in r.records if "loss" not in x and any(k.startswith("eval_") for k in x)]
        if evals:
            keys = list(dict.fromkeys(k for x in evals for k in x if k.startswith("eval_")))
            part += [Text("Held-out metrics logged during training (`data.eval`, every `run.eval_every` steps and at "
                          "the end)."),  # fmt: skip
                     Table(["step", *keys], [[fmt(x["step"]), *[fmt(x.get(k)) for k in keys]] for x in evals])]
        if not part:  # nothing scored: say how, rather than leave the section out
            part = [Text(f"No held-out scores in this run folder (no data.eval, no quickstart results). To score "
                         f"the trained model: `posttrain evaluate --model {r.path} --task TASK` (a built-in task's "
                         "verifier) or `--data HELDOUT.jsonl --reward SPEC`; for a preference run, `--pairs "
                         "HELDOUT_PAIRS.jsonl`.")]  # fmt: skip
        blocks += ([Heading(r.label, 3)] if len(runs) > 1 else []) + part
    return [Heading("Evaluation"), *blocks] if blocks else []


def _numbers(runs: list[Run], keys: list[str]) -> Table:
    """First, last, min and max of each key (one run), or first -> last per run (several)."""
    if len(runs) == 1:
        rows = []
        for k in keys:
            values = runs[0].series(k)[1]
            if values:
                rows.append([k, fmt(values[0]), fmt(values[-1]), fmt(min(values)), fmt(max(values))])
        return Table(["metric", "first", "last", "min", "max"], rows)
    rows = []
    for k in keys:
        cells = []
        for r in runs:
            values = r.series(k)[1]
            cells.append(f"{fmt(values[0])} -> {fmt(values[-1])}" if values else "-")
        rows.append([k, *cells])
    return Table(["metric (first -> last)", *[r.label for r in runs]], rows)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "plot"


def _curves(runs: list[Run]) -> list:
    keys = set().union(*(r.keys() for r in runs))
    failures = any(v > 0 for r in runs for k in keys if k.startswith("reward/failures_") for v in r.series(k)[1])
    blocks: list = []
    used_names: set[str] = set()
    for section, panels in choose_sections(keys, failures_seen=failures):
        images = []
        for panel in panels:
            png, w, h = render_panel(panel, runs)
            name = _slug(f"{section.title}-{panel.title}")
            while name in used_names:
                name += "-x"
            used_names.add(name)
            images.append(Image(name, png, f"{panel.title} against step", w, h))
        shown = list(dict.fromkeys(k for p in panels for k in p.keys))
        blocks += [Heading(section.title), Text(section.intro), Figures(images), _numbers(runs, shown)]
        if section.title == "Throughput and memory":
            blocks.append(_throughput(runs))
        if section.title == "Rewards" and not failures and any(k.startswith("reward/failures_") for k in keys):
            blocks.append(Text("No reward function failed on any sample (`reward/failures_<name>` is 0 throughout)."))
    return blocks


def _throughput(runs: list[Run]) -> Table:
    """Per run: mean tokens/s over the logged steps, median step time, and where the time went."""
    gpu = any(_peak(r, "peak_cuda_gb") is not None for r in runs)
    rows = []
    for r in runs:
        step_s = _sum(r, "step_time_s")
        share = {k: _sum(r, k) / step_s if step_s else None for k in ("data_time_s", "gen_time_s", "train_time_s")}
        median = statistics.median(r.series("step_time_s")[1]) if r.series("step_time_s")[1] else None
        rows.append([r.label, fmt(len(r.steps)), fmt(_sum(r, "tokens") / step_s) if step_s else "-", fmt(median),
                     *[f"{100 * v:.0f}%" if v is not None and r.series(k)[1] else "-" for k, v in share.items()],
                     fmt(_peak(r, "peak_rss_gb"))] + ([fmt(_peak(r, "peak_cuda_gb"))] if gpu else []))  # fmt: skip
    return Table(["run", "logged steps", "tokens/s (mean)", "median step time (s)", "data/sampling share",
                  "of which generation", "training share", "peak RSS (GB)"] + (["peak GPU (GB)"] if gpu else []),
                 rows)  # fmt: skip


def _cut(text, n: int) -> str:
    text = str(text)
    return text if len(text) <= n else text[:n] + f" [... {len(text) - n} more characters]"


def _samples(runs: list[Run]) -> list:
    blocks: list = []
    for r in runs:
        if not r.samples:
            continue
        by_rollout: dict = defaultdict(list)
        for s in r.samples:
            by_rollout[s.get("rollout")].append(s)
        rollouts = list(by_rollout)
        if len(runs) > 1:
            blocks.append(Heading(r.label, 3))
        for i, index in enumerate(rollouts):
            group = by_rollout[index]
            totals = [s["total"] for s in group if isinstance(s.get("total"), int | float)]
            mean = f"; their mean total reward {fmt(statistics.fmean(totals))}" if totals else ""
            rows = [[_cut(s.get("prompt", ""), PROMPT_CHARS), _cut(s.get("completion", ""), COMPLETION_CHARS),
                     "; ".join(f"{k} {fmt(v)}" for k, v in (s.get("rewards") or {}).items()), fmt(s.get("total")),
                     "yes" if s.get("truncated") else "no", fmt(s.get("length"))] for s in group]  # fmt: skip
            table = Table(["prompt", "completion", "rewards", "total", "truncated", "tokens"], rows, text_columns=(0, 1))
            summary = (f"rollout {fmt(index)} (step {fmt(group[0].get('step'))}): {len(group)} of its samples{mean} "
                       "(the rollout's own mean is in the rewards curves)")  # fmt: skip
            blocks.append(Details(summary, [table], open=i in (0, len(rollouts) - 1)))
    if not blocks:
        return []
    intro = ("A few completions of every Nth rollout (samples.jsonl), each with every reward function's value "
             "(unweighted) and the total the algorithm used; the first and last rollouts are open.")  # fmt: skip
    return [Heading("Sampled completions"), Text(intro), *blocks]


def _configs(runs: list[Run]) -> list:
    blocks: list = [Heading("Config" if len(runs) == 1 else "Configs")]
    for r in runs:
        text = r.config_text if r.config_text is not None else "(no config.yaml in the run folder)"
        what = "config.yaml, the resolved config" + (f" of {r.label}" if len(runs) > 1 else "")
        blocks.append(Details(what, [Code(text)], open=len(runs) == 1))
    return blocks
