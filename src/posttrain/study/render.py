"""A `StudyResult` for people: the terminal tables (`format_study`) and the report folder (`write_study_report`:
report.html, self-contained, and report.md with its PNG plots, through `posttrain.report`): accuracy against
compute per arm, pass@k curves, the arms with their intervals, the differences from the baseline and the
predictions.
"""

from __future__ import annotations

import json
from pathlib import Path

from posttrain.diagnose.render import pct
from posttrain.report import ReportPaths, write_report
from posttrain.report.document import Code, Figures, Heading, Image, Table, Text
from posttrain.report.plots import render_bars, render_lines
from posttrain.study.data import OOD_SPLITS, SPLITS
from posttrain.study.summary import ArmSummary, Estimate, StudyResult


def rate(e: Estimate | None) -> str:
    """A share with its interval, in percent.

    >>> rate(Estimate(0.5, 0.25, 0.75)), rate(Estimate(0.5, None, None)), rate(None)
    ('50.0% [25.0, 75.0]', '50.0%', 'n/a')
    """
    if e is None:
        return "n/a"
    return pct(e.value) + (f" [{100 * e.low:.1f}, {100 * e.high:.1f}]" if e.low is not None else "")


def number(e: Estimate | None) -> str:
    """
    >>> number(Estimate(0.01234, 0.01, 0.02)), number(None)
    ('0.0123 [0.01, 0.02]', 'n/a')
    """
    if e is None:
        return "n/a"
    return f"{e.value:.3g}" + (f" [{e.low:.3g}, {e.high:.3g}]" if e.low is not None else "")


def signed(x: float | None, *, points: bool = True) -> str:
    """
    >>> signed(0.05), signed(-0.5, points=False), signed(None)
    ('+5.0', '-0.5', '')
    """
    if x is None:
        return ""
    return f"{100 * x:+.1f}" if points else f"{x:+.3g}"


def _arms_table(r: StudyResult, noise: float) -> tuple[list[str], list[list[str]]]:
    header = ["arm", "seconds (budget)", "tokens", "steps", *SPLITS, "ood (pooled)", "shortcut (ood subtractions)"]
    rows = []
    for a in _at(r, noise):
        budget = f" ({a.budget_s:.0f})" if a.budget_s else ""
        if a.status == "not run":  # no training and no scores: the notes say why
            rows.append([a.arm, "not run", *[""] * (len(header) - 2)])
            continue
        rows.append([a.arm, f"{a.seconds:.0f}{budget}", f"{a.tokens:.0f}", f"{a.steps:g}",
                     *(rate(a.accuracy.get(sp)) for sp in (*SPLITS, "ood")), rate(a.shortcut.get("ood"))])  # fmt: skip
    return header, rows


def _sampling_table(r: StudyResult, noise: float) -> tuple[list[str], list[list[str]]]:
    ks = [str(k) for k in r.settings["evaluation"]["ks"]]
    header = ["arm", *(f"pass@{k}" for k in ks), "mixed prompts", "KL(pi || base), task", "KL(base || pi), task",
              "top-1 agreement, probe"]  # fmt: skip
    rows = [[a.arm, *(rate(a.pass_at_k.get(k)) for k in ks), rate(a.mixed_share), number(a.drift.get("kl_task")),
             number(a.drift.get("kl_task_reverse")), rate(a.drift.get("probe_agreement"))] for a in _at(r, noise)]  # fmt: skip
    return header, rows


def _gap_table(r: StudyResult, noise: float) -> tuple[list[str], list[list[str]]]:
    header = ["arm", *(f"{sp} (pts)" for sp in OOD_SPLITS), "shortcut: id", "shortcut: rare_op"]
    rows = [[a.arm, *(_pts(a.gap.get(sp)) for sp in OOD_SPLITS), rate(a.shortcut.get("id")),
             rate(a.shortcut.get("rare_op"))] for a in _at(r, noise)]  # fmt: skip
    return header, rows


def _pts(e: Estimate | None) -> str:
    if e is None:
        return "n/a"
    return signed(e.value) + (f" [{signed(e.low)}, {signed(e.high)}]" if e.low is not None else "")


def _comparison_table(r: StudyResult) -> tuple[list[str], list[list[str]]]:
    header = ["arm", "noise", "measurement", f"minus {r.baseline} (pts)", "95% interval", "MDD (pts)", "verdict"]
    rows = [[c.arm, pct(c.noise), c.metric, signed(c.difference),
             f"[{signed(c.low)}, {signed(c.high)}]" if c.low is not None else "", f"{100 * c.mdd:.1f}" if c.mdd else "",
             c.verdict] for c in r.comparisons]  # fmt: skip
    return header, rows


def _prediction_table(r: StudyResult) -> tuple[list[str], list[list[str]]]:
    header = ["prediction", "source", "test", "expects", "measured", "95% interval", "verdict", "direction"]
    rows = []
    for p in r.predictions:
        t = p.test
        rate_like = t is not None and not t.metric.startswith(("kl_",))
        value = signed(t.difference, points=rate_like) if t else ""
        interval = f"[{signed(t.low, points=rate_like)}, {signed(t.high, points=rate_like)}]" if t and t.low is not None else ""
        test = f"{t.arm} - {t.other}: {t.metric}" if t else ""
        rows.append([p.claim, p.source, test, p.expect, value, interval, p.verdict, p.direction])
    return header, rows


def _at(r: StudyResult, noise: float) -> list[ArmSummary]:
    return [a for a in r.summaries if a.noise == noise]


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(x) + " |" for x in rows])


def _intro(r: StudyResult) -> list[str]:
    budget = r.settings["budget"]["seconds"]
    problems = ", ".join(f"{k} {v}" for k, v in r.problems.items())
    mdd = ", ".join(f"{k} {100 * v:.1f}" for k, v in r.mdd.items())
    lines = [f"posttrain study ({r.setting}): {r.model}; seeds {', '.join(map(str, r.seeds))}; wrong demonstrations "
             f"{', '.join(pct(n) for n in r.noise)}; arms {', '.join(r.arms)} from the warm start W, {budget:g} s "
             f"each; {r.seconds / 60:.1f} min for this invocation (a continued study counts only its own part)",
             f"Problems per seed: {problems}",
             f"Minimum detectable difference, stated in advance ({100 * r.settings['statistics']['power']:.0f}% "
             f"power, {100 * r.settings['statistics']['level']:.0f}% level), points: {mdd}"]  # fmt: skip
    for w in r.warm_check:
        lines.append(f"W's check (seed {w['seed']}, noise {pct(w['noise'])}): sampled pass@1 {pct(w['pass_at_1'])} "
                     f"(wanted {100 * w['pass_range'][0]:.0f}-{100 * w['pass_range'][1]:.0f}%), mixed prompts "
                     f"{pct(w['mixed_share'])} (wanted >= {pct(w['min_mixed'])}): {'met' if w['ok'] else 'NOT met'}")  # fmt: skip
    return lines


def format_study(r: StudyResult) -> str:
    """The terminal report: the design, W's check, then per noise level the arms, the sampling and drift, the
    gaps; the differences from the baseline; the predictions; the notes."""
    out = _intro(r)
    for noise in r.noise:
        out += ["", f"Arms, {pct(noise)} wrong demonstrations: greedy accuracy, mean over seeds [95% interval]",
                _markdown(*_arms_table(r, noise)), "", "Sampling (pass@k at the setting's temperature) and drift:",
                _markdown(*_sampling_table(r, noise)), "", "Robustness gap (in distribution - variant, paired, "
                "points) and the shortcut error (a + k answered on a subtraction):", _markdown(*_gap_table(r, noise))]  # fmt: skip
    out += ["", f"Differences from {r.baseline} (paired per problem; called only when the interval excludes 0 and "
            "the difference is at least the MDD):", _markdown(*_comparison_table(r)), "",
            "Predictions (pre-registered in README.md and docs/study.md):", _markdown(*_prediction_table(r))]  # fmt: skip
    out += [f"note: {n}" for n in r.notes]
    return "\n".join(out)


def _plots(r: StudyResult) -> list[Image]:
    noise = r.noise[0]
    arms = [a for a in _at(r, noise) if a.curve]
    images = []
    for key, what in (("id", "in distribution"), ("ood", "out of distribution")):
        png, w, h = render_lines(f"accuracy against compute, {what}", {a.arm: [p["seconds"] for p in a.curve]
                                 for a in arms}, {a.arm: [100 * p[key] for p in a.curve] for a in arms},
                                 xlabel="seconds on this machine (W at 0)", ylabel="% right (curve problems)",
                                 integer_x=False)  # fmt: skip
        images.append(Image(f"accuracy_{key}", png, f"accuracy against compute, {what}", w, h))
    sampled = [a for a in _at(r, noise) if a.pass_at_k]
    if sampled:
        ks = [int(k) for k in sampled[0].pass_at_k]
        png, w, h = render_lines("pass@k", ks, {a.arm: [100 * a.pass_at_k[str(k)].value for k in ks] for a in sampled},
                                 xlabel="k", ylabel="% of prompts")  # fmt: skip
        images.append(Image("pass_at_k", png, "pass@k per arm", w, h))
    with_ood = [a for a in _at(r, noise) if "ood" in a.accuracy]
    lows = [100 * (a.accuracy["ood"].low if a.accuracy["ood"].low is not None else a.accuracy["ood"].value)
            for a in with_ood]  # fmt: skip
    highs = [100 * (a.accuracy["ood"].high if a.accuracy["ood"].high is not None else a.accuracy["ood"].value)
             for a in with_ood]  # fmt: skip
    png, w, h = render_bars("out-of-distribution accuracy (95% interval)", [a.arm for a in with_ood],
                            [100 * a.accuracy["ood"].value for a in with_ood], lows, highs, ylabel="% right")  # fmt: skip
    images.append(Image("ood_accuracy", png, "out-of-distribution accuracy per arm", w, h))
    return images


def report_blocks(r: StudyResult) -> tuple[str, list]:
    title = f"posttrain study ({r.setting})"
    blocks: list = [Heading(title, 1), *(Text(line) for line in _intro(r)), Figures(_plots(r))]
    for noise in r.noise:
        blocks += [Heading(f"Arms, {pct(noise)} wrong demonstrations"), Table(*_arms_table(r, noise)),
                   Table(*_sampling_table(r, noise)), Table(*_gap_table(r, noise))]  # fmt: skip
    blocks += [Heading(f"Differences from {r.baseline}"),
               Text("Paired per problem, 95% hierarchical bootstrap interval (seeds, then problems); called only when "
                    "the interval excludes 0 and the difference is at least the minimum detectable difference."),
               Table(*_comparison_table(r)), Heading("Predictions"), Table(*_prediction_table(r), text_columns=(0,))]  # fmt: skip
    blocks += [Text(f"Note: {n}") for n in r.notes]
    blocks += [Heading("Settings"), Code(json.dumps(r.settings, indent=2))]
    return title, blocks


def write_study_report(r: StudyResult, out: str | Path) -> ReportPaths:
    """report.html and report.md (its plots in report_files/) in `out`."""
    return write_report(out, *report_blocks(r))
