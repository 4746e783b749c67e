"""`posttrain report`: an HTML page and Markdown of one run or several side by side (`posttrain.report`)."""

from __future__ import annotations

from posttrain.errors import EXIT_OK


def add_parser(sub) -> None:
    rp = sub.add_parser(
        "report",
        help="an HTML page and Markdown of one run or several side by side: curves, evaluation, samples",
    )
    rp.add_argument(
        "runs", nargs="+", metavar="RUN", help="run folder (the run.output_dir of posttrain train)"
    )
    rp.add_argument(
        "--out", help="folder for report.html, report.md and report_files/ (default: the run folder; needed for "
        "several runs)",
    )  # fmt: skip
    rp.set_defaults(func=run)


def run(args) -> int:
    from posttrain.report import build_report

    paths = build_report(args.runs, args.out)
    print(f"report: {paths.html}\nmarkdown: {paths.markdown} (its plots in {paths.images})")
    return EXIT_OK
