"""`posttrain study`: run (or continue) the SFT-vs-RL study on the embedded model and report it
(`posttrain.study`; docs/study.md)."""

from __future__ import annotations

from pathlib import Path

from posttrain.cli.output import Output, add_json, json_document


def add_parser(sub) -> None:
    s = sub.add_parser("study", help="when are SFT's pairs not enough? arms from one warm start, matched budgets, "
                       "in- and out-of-distribution accuracy with intervals")  # fmt: skip
    which = s.add_mutually_exclusive_group()
    which.add_argument("--quick", action="store_true", help="the quick setting: 1 seed, 4 arms, no noise condition "
                       "(7.1 min measured on 2 CPU cores at ~290 GFLOP/s; sized to stay within 15 at ~150; docs/study.md)")  # fmt: skip
    which.add_argument("--setting", default="standard", help="quick, standard (3 seeds, 4 arms; 29.7 min measured at 188 GFLOP/s fp32, about an hour on slower cores), "
                       "full (3 seeds, 6 arms, 0 and 30%% wrong demonstrations; hours) or a YAML file of the same "
                       "shape (default: standard)")  # fmt: skip
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="change one setting, dotted "
                   "(e.g. task.eval_problems=40, budget.seconds=120); repeatable")  # fmt: skip
    s.add_argument("--model", help="the base model (default: the setting's, the embedded smollm2-135m-instruct)")
    s.add_argument("--out", help="the study folder: runs, scores, report.html, report.md, study.json; re-running "
                   "into it continues where it stopped (default: runs/study-SETTING)")  # fmt: skip
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_json(s)
    s.set_defaults(func=run, loads_models=True)


def run(args) -> Output:
    """Read and check the settings (before any model loads), run the study, print and write its report."""
    from posttrain.study import format_study, load_study_config, run_study, write_study_report

    setting = "quick" if args.quick else args.setting
    overrides = list(args.set) + ([f"model={args.model}"] if args.model else [])
    cfg, name = load_study_config(setting, overrides)
    out = Path(args.out or f"runs/study-{name}")
    result = run_study(cfg, out, setting=name, progress=not args.no_progress)
    doc = result.to_dict()
    paths = write_study_report(result, out)
    (out / "study.json").write_text(json_document("study", Output(doc=doc)) + "\n", encoding="utf-8")
    return Output(doc=doc, text=format_study(result) + f"\nreport: {paths.html}")
