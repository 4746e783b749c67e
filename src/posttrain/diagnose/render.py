"""A `Diagnosis` for people: the terminal tables (`format_diagnosis`) and the report folder (`write_diagnosis_report`:
report.html, self-contained, and report.md with its PNG plots, through `posttrain.report`'s document and plot
helpers): the perturbation gaps as bars with their 95% intervals, the pass@k curve.
"""

from __future__ import annotations

import json
from pathlib import Path

from posttrain.diagnose.core import Diagnosis
from posttrain.report import ReportPaths, write_report
from posttrain.report.document import Code, Figures, Heading, Image, Table, Text
from posttrain.report.plots import render_bars, render_lines


def pct(x: float | None) -> str:
    """
    >>> pct(0.1234), pct(None)
    ('12.3%', 'n/a')
    """
    return "n/a" if x is None else f"{100 * x:.1f}%"


def pts(x: float) -> str:
    """A difference of rates in percentage points, signed.

    >>> pts(0.06), pts(-0.125)
    ('+6.0 pts', '-12.5 pts')
    """
    return f"{100 * x:+.1f} pts"


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def robustness_table(d: Diagnosis) -> tuple[list[str], list[list[str]]]:
    header = ["variant", "pairs", "clean", "perturbed", "gap (clean - perturbed)", "95% interval",
              "prompts lost / gained", "sign test p", f"p x {len(d.robustness.kinds)} kinds"]  # fmt: skip
    rows = [[k.kind, str(k.pairs) if k.pairs == k.prompts else f"{k.pairs} ({k.prompts} prompts)",
             pct(k.clean_accuracy), pct(k.perturbed_accuracy), pts(k.gap),
             f"[{100 * k.ci_low:+.1f}, {100 * k.ci_high:+.1f}]", f"{k.lost} / {k.gained}", f"{k.p_value:.3g}",
             f"{d.robustness.adjusted_p(k):.3g}"] for k in d.robustness.kinds]  # fmt: skip
    return header, rows


def headroom_table(d: Diagnosis) -> tuple[list[str], list[list[str]]]:
    """pass@k for each k, with the 95% intervals of pass@1 and pass@n over the prompts (`Headroom.intervals`)."""
    h = d.headroom
    ends = h.intervals()
    span = {1: ends.get("pass_at_1"), h.samples: ends.get("pass_at_n")}
    return ["k", *map(str, h.pass_at_k)], [
        ["pass@k", *(pct(v) for v in h.pass_at_k.values())],
        ["95% interval", *(f"[{pct(span[k][0])}, {pct(span[k][1])}]" if span.get(k) else "" for k in h.pass_at_k)],
    ]


def headroom_line(d: Diagnosis) -> str:
    """The mixed prompts and the headroom, each with its 95% interval over the prompts."""
    h, ends = d.headroom, d.headroom.intervals()
    mixed, room = ends.get("mixed_share"), ends.get("headroom")

    def span(bounds):
        return f" [{pct(bounds[0])}, {pct(bounds[1])}]" if bounds else ""

    return (f"mixed prompts (some samples right, some wrong): {pct(h.mixed_share)}{span(mixed)} ({h.mixed} of "
            f"{len(h.prompts)}); all right {h.all_right}, all wrong {h.all_wrong}; headroom pass@{h.samples} - "
            f"pass@1 {100 * h.headroom:.1f} pts" + (f" [{100 * room[0]:.1f}, {100 * room[1]:.1f}]" if room else "")
            + " (95% intervals over the prompts)")


def data_lines(d: Diagnosis) -> list[str]:
    a = d.data
    lines = [f"{a.rows} rows ({a.text_rows} plain-text rows left out); near-duplicate prompts (same numbers, word "
             f"Jaccard >= {a.threshold:g}): {a.duplicate_clusters} clusters, {a.duplicate_rows} rows",
             f"ambiguous (different responses): {a.ambiguous_clusters} clusters, {a.ambiguous_rows} rows "
             f"({pct(a.ambiguous_share)})"]  # fmt: skip
    if a.length_spread_mean is not None:
        lines.append(f"response length spread in a cluster, (max - min) / mean words: {a.length_spread_mean:.2f} "
                     "on average")  # fmt: skip
    if a.checked:
        where = f" (lines {', '.join(map(str, a.wrong_lines))}{', ...' if a.wrong > len(a.wrong_lines) else ''})"
        lines.append(f"wrong demonstrations: {a.wrong} of {a.checked} checked ({pct(a.wrong_share)})"
                     + (where if a.wrong else ""))  # fmt: skip
    else:
        lines.append("wrong demonstrations: none could be checked (a task's verifier needs an `answer` column)")
    return lines


def preference_lines(d: Diagnosis) -> list[str]:
    p = d.preferences
    out = [f"{p['n']:.0f} pairs; the model gives the chosen response the higher log-probability on "
           f"{pct(p['logp_accuracy'])} (per token: {pct(p['mean_logp_accuracy'])})"]  # fmt: skip
    if "ref_logp_accuracy" in p:
        out.append(f"the reference: {pct(p['ref_logp_accuracy'])} (per token {pct(p['ref_mean_logp_accuracy'])}); "
                   f"DPO implicit-reward accuracy against it {pct(p['implicit_accuracy'])}")  # fmt: skip
    return out


def drift_lines(d: Diagnosis) -> list[str]:
    t, p = d.drift.task, d.drift.probe
    return [f"task ({t.tokens} tokens of the model's greedy completions): KL(pi || base) {t.kl_policy_base:.4f}, "
            f"KL(base || pi) {t.kl_base_policy:.4f} nats/token; top-1 agreement {pct(t.top1_agreement)}",
            f"unrelated probe ({p.tokens} positions of 20 general prompts): top-1 agreement "
            f"{pct(p.top1_agreement)}, KL(pi || base) {p.kl_policy_base:.4f} nats/token"]  # fmt: skip


def next_step(d: Diagnosis) -> str:
    """The recommendation's `next`, with the diagnosed model's name in it."""
    return d.recommendation.next.replace("{model}", d.model)


def reason_lines(d: Diagnosis) -> list[str]:
    out = []
    for f in d.recommendation.fired:
        evidence = f" [{f.evidence()}]" if f.conditions else ""
        out.append(f"  - {f.rule} ({f.kind}{' ' + f.option if f.option else ''}): {f.reason}{evidence}")
    return out


def borderline_lines(d: Diagnosis) -> list[str]:
    """A line per measurement whose 95% interval reaches another recommendation (`recommend.borderline`).

    >>> from types import SimpleNamespace as S
    >>> b = {"fact": "mixed_share", "value": 0.22, "low": 0.12, "high": 0.35, "at": 0.12, "option": "sft-dpo"}
    >>> print(borderline_lines(S(recommendation=S(borderline=[b]), prompts=40))[0][:111])
    borderline: mixed_share = 22.0% (95% interval 12.0% to 35.0% over the 40 prompts); at 12.0% the rules recommend
    """
    from posttrain.diagnose.recommend import load_rules

    options = load_rules()[0]
    return [f"borderline: {b['fact']} = {pct(b['value'])} (95% interval {pct(b['low'])} to {pct(b['high'])} over "
            f"the {d.prompts} prompts); at {pct(b['at'])} the rules recommend {options[b['option']]}: the "
            "recommendation may change on more prompts (--n)" for b in d.recommendation.borderline]  # fmt: skip


def format_diagnosis(d: Diagnosis) -> str:
    """The terminal report: one section per probe that ran, then the recommendation with its reasons."""
    out = [f"posttrain diagnose: {d.model}; verifier {d.verifier}; {d.prompts} prompts; greedy accuracy "
           f"{pct(d.greedy_accuracy)}"]  # fmt: skip
    if d.robustness is not None:
        out += ["", f"Robustness (greedy, each variant paired with its clean prompt; {d.robustness.source}):",
                _markdown(*robustness_table(d))]  # fmt: skip
    if d.headroom is not None:
        h = d.headroom
        out += ["", f"Sampling headroom ({h.samples} samples per prompt at temperature {h.temperature:g}):",
                _markdown(*headroom_table(d)), headroom_line(d)]  # fmt: skip
    if d.data is not None:
        out += ["", f"SFT data ({d.data.file}):", *(f"  {line}" for line in data_lines(d))]
    if d.preferences is not None:
        out += ["", "Preference pairs:", *(f"  {line}" for line in preference_lines(d))]
    if d.drift is not None:
        out += ["", f"Drift from the base ({d.drift.base}):", *(f"  {line}" for line in drift_lines(d))]
    out += ["", f"Recommendation: {d.recommendation.label}", *reason_lines(d), *borderline_lines(d)]
    if d.recommendation.next:
        out += [f"next: {next_step(d)}"]
    out += [f"note: {n}" for n in d.notes]
    return "\n".join(out)


def report_blocks(d: Diagnosis) -> tuple[str, list]:
    """(title, blocks) of the report page."""
    title = f"posttrain diagnose: {d.model}"
    blocks: list = [Heading(title, 1), Text(f"Verifier: {d.verifier}. {d.prompts} clean prompts; greedy accuracy "
                                            f"{pct(d.greedy_accuracy)}.")]  # fmt: skip
    r = d.recommendation
    blocks += [Heading("Recommendation"), Text(r.label), *(Text(line) for line in borderline_lines(d)),
               *([Text(f"Next: {next_step(d)}")] if r.next else []),
               Table(["rule", "kind", "option", "reason", "measured (threshold)", "why this threshold", "source"],
                     [[f.rule, f.kind, f.option or "", f.reason, f.evidence(), f.threshold, f.principle]
                      for f in r.fired], text_columns=(3, 5, 6))]  # fmt: skip
    if d.robustness is not None:
        kinds = d.robustness.kinds
        png, w, h = render_bars("accuracy gap, clean - perturbed (95% interval)", [k.kind for k in kinds],
                                [100 * k.gap for k in kinds], [100 * k.ci_low for k in kinds],
                                [100 * k.ci_high for k in kinds], ylabel="percentage points")  # fmt: skip
        blocks += [Heading("Robustness"), Text(f"Greedy accuracy on each clean prompt and on its variants "
                                               f"({d.robustness.source}); paired statistics."),
                   Table(*robustness_table(d)),
                   Figures([Image("perturbation_gaps", png, "accuracy gap per perturbation, 95% intervals", w, h)])]
    if d.headroom is not None:
        hd = d.headroom
        ks = list(hd.pass_at_k)
        png, w, h = render_lines(f"pass@k ({hd.samples} samples, T={hd.temperature:g})", ks,
                                 {"pass@k": [100 * v for v in hd.pass_at_k.values()],
                                  "greedy accuracy": [100 * d.greedy_accuracy] * len(ks)},
                                 xlabel="k", ylabel="% of prompts")  # fmt: skip
        line = headroom_line(d)
        blocks += [Heading("Sampling headroom"), Table(*headroom_table(d)), Text(line[0].upper() + line[1:] + "."),
                   Figures([Image("pass_at_k", png, "pass@k against k", w, h)])]  # fmt: skip
    if d.data is not None:
        blocks += [Heading("SFT data"), *(Text(line) for line in data_lines(d))]
        if d.data.clusters:
            blocks.append(Table(["lines", "prompts", "responses"],
                                [[", ".join(map(str, c["lines"])), "\n---\n".join(c["prompts"]),
                                  "\n---\n".join(c["responses"])] for c in d.data.clusters],
                                text_columns=(1, 2)))  # fmt: skip
    if d.preferences is not None:
        blocks += [Heading("Preference pairs"), *(Text(line) for line in preference_lines(d))]
    if d.drift is not None:
        blocks += [Heading("Drift from the base"), Text(f"Base: {d.drift.base}."), *(Text(x) for x in drift_lines(d))]
    seconds = {k: round(v, 1) for k, v in d.seconds.items()}
    blocks += [Heading("Settings"), Code(json.dumps({**d.to_dict()["settings"], "seconds": seconds}, indent=2))]
    blocks += [Text(f"Note: {n}") for n in d.notes]
    return title, blocks


def write_diagnosis_report(d: Diagnosis, out: str | Path) -> ReportPaths:
    """report.html and report.md (its plots in report_files/) in `out`."""
    return write_report(out, *report_blocks(d))
