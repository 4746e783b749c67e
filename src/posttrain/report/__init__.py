"""Run reports: `build_report(run_dirs, out_dir)` writes `report.html` (self-contained) and `report.md` (with its
plots in `report_files/`) for one run or several side by side (`posttrain report RUN [RUN ...]`).

What a report holds, each part only where the run folder has what it needs: a summary table (method, technique,
model, last step and loss, training time, tokens/s, peak memory); for several runs, the config settings that
differ; evaluation tables (held-out scores before and after with paired gained/lost and McNemar p-values from a
quickstart's `results.json`, `eval_*` records from `data.eval`); the curves of each metric section the runs logged
(loss and optimisation; DPO pairs; reward model; per-function rewards; completions; policy update; value head;
throughput and memory; any other metric), each with its first/last/min/max numbers; a few sampled completions
with their rewards from every Nth rollout of an RL run (`samples.jsonl`); notes; the resolved config as YAML.

It reads only the files of a run folder (`rundata`), so it works on any run, finished or not, of any version.
It does not train, evaluate or load a model. matplotlib is imported only when a report is built.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from posttrain.errors import UserError
from posttrain.files import write_whole
from posttrain.report.compose import compose
from posttrain.report.document import to_html, to_markdown
from posttrain.report.rundata import read_runs

__all__ = ["ReportPaths", "build_report", "report_or_warning", "write_report", "IMAGE_DIR"]

IMAGE_DIR = "report_files"
"""The folder beside report.md that holds its plots (report.html embeds its own copies)."""


@dataclass
class ReportPaths:
    html: Path
    markdown: Path
    images: Path


def build_report(run_dirs: list[str | Path] | str | Path, out_dir: str | Path | None = None) -> ReportPaths:
    """Write the report of `run_dirs` (a list of run folders, or one) into `out_dir` (default: the run folder
    itself, for one run) and return where. Raises `UserError` for a folder that is not a run folder, or has no
    logged step yet."""
    if isinstance(run_dirs, str | Path):  # one run: a string was read a character at a time, as 33 runs
        run_dirs = [run_dirs]
    if not run_dirs:
        raise UserError("give at least one run folder: posttrain report RUN [RUN ...]")
    if out_dir is None and len(run_dirs) > 1:
        raise UserError(
            f"{len(run_dirs)} runs side by side need a folder for their report: add --out DIR (one run's report "
            "goes into its own folder)"
        )
    runs = read_runs(list(run_dirs))
    out = Path(out_dir) if out_dir is not None else runs[0].path
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder; give a folder for report.html and report.md")
    title, blocks = compose(runs)
    return write_report(out, title, blocks)


def write_report(out: str | Path, title: str, blocks: list) -> ReportPaths:
    """Write `blocks` (`report.document`) as `out`/report.html (self-contained) and `out`/report.md with its plots
    in `out`/report_files/; any report, a run's or another command's (`posttrain diagnose`)."""
    out = Path(out)
    page = to_html(title, blocks)
    markdown, images = to_markdown(blocks, IMAGE_DIR)
    paths = ReportPaths(html=out / "report.html", markdown=out / "report.md", images=out / IMAGE_DIR)
    try:
        _write(paths, page, markdown, images)
    except OSError as err:
        raise UserError(f"cannot write the report into {out} ({err.strerror or err}); give another folder with "
                        "--out DIR") from None  # fmt: skip
    return paths


def _write(paths: ReportPaths, page: str, markdown: str, images: dict[str, bytes]) -> None:
    paths.images.mkdir(parents=True, exist_ok=True)
    for old in paths.images.glob("*.png"):  # plots of an earlier report of this folder that this one may not have
        old.unlink()
    for rel, png in images.items():
        (paths.markdown.parent / rel).write_bytes(png)
    for path, text in ((paths.markdown, markdown), (paths.html, page)):
        write_whole(path, text)  # a reader never sees half a page


def report_or_warning(run_dir: str | Path) -> Path | None:
    """The report of one run, written into its folder, at the end of a run (`posttrain train`, the quickstarts):
    the path of its HTML, or None after a warning that says why there is none. The model is saved by then, so a
    report that cannot be written never fails the run."""
    try:
        return build_report([run_dir]).html
    except Exception as err:  # whatever went wrong, the run itself succeeded
        print(f"warning: no report written for {run_dir} ({type(err).__name__}: {err}); "
              f"`posttrain report {run_dir}` tries again", file=sys.stderr)  # fmt: skip
        return None
