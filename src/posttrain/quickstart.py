"""The main job: LoRA fine-tuning of the embedded SmolLM2-135M-Instruct on the built-in structured-output task,
with a measured before/after comparison on held-out prompts written in wordings never seen in training.

Steps: make the data (train split, held-out split) -> score the base model with the task's verifier -> train
with LoRA through the normal `train()` path -> score the trained adapter on the same held-out prompts ->
print the table and save it (`results.json`, `results.md`) in the run folder, then one line of wall time per
stage (also in results.json, `seconds`). Running it again resumes an interrupted run from its last checkpoint
instead of starting over (use `--fresh` to start over), and reads the base model's scores back from
`eval_base.json` when they were made from the same model files, held-out rows and decoding settings
(`evaluation.cache`). Scoring decodes all held-out prompts as one greedy batch from which finished answers leave
(`models.generation.greedy_decode`).

The recipe's settings are data: configs/quickstart/sft.yaml (in the package, src/posttrain/configs/), the run
config and a `recipe` section with the data the quickstart makes and how it scores (`SFTRecipe`). The other
paradigms' recipes (`posttrain.recipes`) share `read_recipe` and `recipe_config`.

Note on quality: the embedded weights are a dequantised Q4_1 (4-bit) copy of SmolLM2-135M-Instruct, so
absolute scores are a little below the original model's; the comparison before/after uses the same weights.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from posttrain.algorithms import config_from_dict
from posttrain.config import QUICKSTART_CONFIGS, ModelConfig, TechniqueConfig, read_config_file
from posttrain.data import TASKS, write_jsonl
from posttrain.errors import UserError
from posttrain.evaluation import (
    evaluate_task,
    format_change,
    format_value,
    ordered_metrics,
    paired_changes,
    paired_summary,
)
from posttrain.evaluation.cache import decoding_settings, lookup, scores_key, write_scores
from posttrain.files import write_whole
from posttrain.models import load_model
from posttrain.models.adapters import unmergeable
from posttrain.report import report_or_warning
from posttrain.train import leftover, run_tokenizer, train
from posttrain.trainer.checkpoint import latest_checkpoint
from posttrain.trainer.summary import peak_memory_gb


@dataclass(frozen=True)
class SFTRecipe:
    """The quickstart's own facts, sft.yaml's `recipe` section (not run settings; see the YAML's comments)."""

    task: str
    n_train: int
    n_eval: int
    max_new_tokens: int
    eval_batch_size: int


def read_recipe(method: str) -> tuple[dict, dict]:
    """A quickstart recipe's YAML as (its run settings, its `recipe` section): the run settings are the run
    config without the data files and run folder that `recipe_config` fills in."""
    settings = read_config_file(QUICKSTART_CONFIGS / f"{method}.yaml")
    return settings, settings.pop("recipe")


def recipe_config(
    method: str, run_dir: Path, train_file: Path, steps: int, eval_file: Path | None = None,
    model: str | None = None,
) -> dict:  # fmt: skip
    """The run config of a quickstart recipe, as the YAML a user would write: configs/quickstart/METHOD.yaml with
    this run's data files, folder and steps (and `model` instead of the embedded one, for tests)."""
    cfg, _ = read_recipe(method)
    if model is not None:
        cfg["model"]["name"] = model
    cfg["data"]["train"] = str(train_file)
    cfg["run"].update(output_dir=str(run_dir), max_steps=steps)
    if eval_file is not None:
        cfg["data"]["eval"] = str(eval_file)
        cfg["run"]["eval_every"] = steps  # the held-out set is scored once, at the end
    return cfg


def _stage(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


def run_quickstart(
    output_dir: str = "runs/quickstart",
    steps: int | None = None,
    n_eval: int | None = None,
    fresh: bool = False,
    *,
    model: str | None = None,
) -> dict:
    """Run the quickstart end to end (module docstring); returns the report also written to
    ``RUN/results.json``. `model` replaces the embedded one, for tests (a tiny model)."""
    settings, facts = read_recipe("sft")
    recipe = SFTRecipe(**facts)
    steps = steps if steps is not None else settings["run"]["max_steps"]
    n_eval = n_eval if n_eval is not None else recipe.n_eval
    if steps <= 0 or n_eval <= 0:
        raise UserError("--steps and --n-eval must be positive")
    run_dir = Path(output_dir)
    if fresh and run_dir.exists():
        if not _is_quickstart_folder(run_dir):
            raise UserError(
                f"--fresh would delete {run_dir}, which does not look like a quickstart run folder "
                "(no data/train.jsonl and results of a previous quickstart); remove it yourself or pick another "
                "--output-dir"
            )
        shutil.rmtree(run_dir)
    refuse_foreign_folder(run_dir, _is_quickstart_folder, "quickstart")
    task = TASKS[recipe.task]
    clock = _StageClock()
    with clock("data"):
        train_file, eval_file, heldout = _make_data(task, recipe.n_train, n_eval, run_dir / "data")
    cfg = config_from_dict(recipe_config("sft", run_dir, train_file, steps, model=model), source="quickstart recipe")

    _stage("loading the embedded SmolLM2-135M-Instruct (first run converts the GGUF once, ~30 s)")
    with clock("model set-up"):  # the tokenizer; the first run also converts the embedded GGUF
        tokenizer = run_tokenizer(cfg)
    with clock("base scoring"):
        before = _base_scores(cfg, tokenizer, recipe, heldout, eval_file, run_dir / "eval_base.json")

    resume = latest_checkpoint(run_dir) is not None
    _stage(
        f"LoRA fine-tuning for {steps} steps of {cfg.optim.batch_size} examples"
        + (" (resuming from the last checkpoint)" if resume else "")
    )
    with clock("training"):
        result = train(cfg, resume=True, return_model=True,  # starts fresh when there is nothing to resume
                       continue_with="the same `posttrain quickstart` command")  # fmt: skip

    _stage(f"scoring the fine-tuned model on the same {n_eval} held-out prompts")
    with clock("adapter scoring"):
        model = result.model
        model.eval()
        if unmergeable(model) is None:
            # The adapter is saved (final/) and the model is not used after scoring: fold the adapters into the
            # base weights in place, so decoding runs one product per layer without holding merged copies beside
            # the base (`generate` would make them: +0.4 GiB of peak here). The same W + delta either way.
            model = model.merge_and_unload()
        after = _rates(model, result.tokenizer, task.name, heldout, recipe)
    changes = paired_changes(before, after)  # every 0/1 metric, paired on the held-out rows (results.json)
    report = {"before": before, "after": after, "changes": changes, "steps": steps, "minutes": round(clock.total() / 60, 1),
              "seconds": clock.seconds, "run_dir": str(run_dir), "model": str(result.final_dir)}  # fmt: skip
    _write_results(report, run_dir, n_eval, f'"{heldout[0]["prompt"][:60]}..."')
    rss, _ = peak_memory_gb()
    print(clock.line() + (f"; peak RSS {rss:.1f} GB" if rss is not None else ""))
    return report


class _StageClock:
    """Wall time per stage of the quickstart, for its closing line and results.json's `seconds`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = round(time.perf_counter() - started, 1)

    def total(self) -> float:
        return sum(self.seconds.values())

    def line(self) -> str:
        """One line: each stage's seconds and its share, then the total in minutes.

        >>> c = _StageClock(); c.seconds = {"data": 0.6, "training": 179.4}
        >>> c.line()
        'time: data 1 s (0%), training 179 s (100%); 3.0 min in all'
        """
        total = max(self.total(), 1e-9)
        parts = [f"{k} {v:.0f} s ({100 * v / total:.0f}%)" for k, v in self.seconds.items()]
        return f"time: {', '.join(parts)}; {total / 60:.1f} min in all"


def _make_data(task, n_train: int, n_eval: int, data_dir: Path) -> tuple[Path, Path, list[dict]]:
    """The training rows (written), the held-out rows (written, and returned for scoring)."""
    _stage(f"data: {n_train} training rows, {n_eval} held-out rows (unseen wordings) -> {data_dir}")
    data_dir.mkdir(parents=True, exist_ok=True)
    train_file, eval_file = data_dir / "train.jsonl", data_dir / "heldout.jsonl"
    write_jsonl(task.make(n_train, seed=0, split="train"), train_file)
    heldout = task.make(n_eval, seed=1, split="heldout")
    write_jsonl(heldout, eval_file)
    return train_file, eval_file, heldout


def _base_scores(cfg, tokenizer, recipe: SFTRecipe, heldout: list[dict], eval_file: Path, cache: Path) -> dict:
    """The base model's verifier rates on the held-out rows, from `cache` when it holds the scores of the same
    model files, held-out file and decoding settings (`evaluation.cache`)."""
    decoding = decoding_settings(max_new_tokens=recipe.max_new_tokens, batch_size=recipe.eval_batch_size,
                                 task=recipe.task)  # fmt: skip
    key = scores_key(cfg.model.name, eval_file, decoding)
    before, why = lookup(cache, key)
    if before is not None:
        print(f"base-model scores reused from {cache} (same model files, held-out rows and decoding settings)")
        return before
    _stage(f"scoring the base model on {len(heldout)} held-out prompts (greedy; {why})")
    base = load_model(ModelConfig(name=cfg.model.name), TechniqueConfig(name="full"), train=False)
    base.eval()
    before = _rates(base, tokenizer, recipe.task, heldout, recipe)
    write_scores(cache, key, before)
    return before


def _rates(model, tokenizer, task: str, heldout: list[dict], recipe: SFTRecipe) -> dict:
    """The verifier's rates on the held-out rows, with each row's own (`per_row_<metric>`) for the paired tests."""
    per_row: list[dict] = []
    rates = evaluate_task(model, tokenizer, task, rows=heldout, max_new_tokens=recipe.max_new_tokens,
                          batch_size=recipe.eval_batch_size, per_row=per_row)  # fmt: skip
    return {**rates, **{f"per_row_{k}": [r[k] for r in per_row] for k in (per_row[0] if per_row else {})}}


def _write_results(report: dict, run_dir: Path, n_eval: int, example_prompt: str) -> None:
    """results.json, results.md, the table on the terminal, and the run's report page."""
    table = format_before_after(report["before"], report["after"])
    headline = {k: c for k, c in report["changes"].items() if not k.startswith("field_")}  # each field's: results.json
    table += "\n\n" + paired_summary(headline, n_eval) if headline else ""
    write_whole(run_dir / "results.json", json.dumps(report, indent=1))
    (run_dir / "results.md").write_text(table + "\n")
    _stage(
        f"held-out results ({n_eval} prompts, wordings never seen in training; {report['minutes']:.1f} min in all)"
    )
    print(table)
    print(
        f"\nadapter: {report['model']}\ntry it:  posttrain generate --model {run_dir} --prompt {example_prompt}"
    )
    page = report_or_warning(run_dir)  # again, now with results.json: the before/after table is in it
    if page is not None:
        print(f"report:  {page}")


def refuse_foreign_folder(run_dir: Path, ours, what: str) -> None:
    """Refuse, before anything is written, an --output-dir that is a file, or a folder that `ours` does not take
    for a `what` run folder (another run's, or the user's: the quickstart wrote its data and base scores there,
    then failed at its --resume check). A folder holding only the data folder is a run stopped as it began."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise UserError(f"--output-dir {run_dir}: is a file; give a folder (a new one, or an earlier {what} run's)")
    if not ours(run_dir) and {p.name for p in run_dir.iterdir() if not leftover(p.name)} != {"data"}:
        raise UserError(f"--output-dir {run_dir}: not an earlier {what} run folder (it holds files a {what} run "
                        "does not write), so nothing is written there; pick another --output-dir")  # fmt: skip


def _is_quickstart_folder(path: Path) -> bool:
    """An empty folder, or one a previous quickstart made (its data file and nothing foreign at the top; what a
    killed run leaves, `leftover`, is its own)."""
    entries = {p.name for p in path.iterdir() if not leftover(p.name)} if path.is_dir() else {"?"}
    ours = {
        "data",
        "eval_base.json",
        "config.yaml",
        "data_fingerprint.json",
        "environment.json",
        "metrics.jsonl",
        "checkpoints",
        "final",
        "results.json",
        "results.md",
        "tensorboard",
        "report.html",
        "report.md",
        "report_files",
    }
    return not entries or ((path / "data" / "train.jsonl").is_file() and entries <= ours)


def format_before_after(before: dict, after: dict) -> str:
    """Markdown table of the verifier's rates before and after training, with the change in points.

    >>> print(format_before_after({"n": 4, "exact": 0.25}, {"n": 4, "exact": 0.75}))
    | held-out metric | base model | fine-tuned | change |
    |---|---|---|---|
    | exact | 25.0% | 75.0% | +50.0 pts |
    >>> print(format_before_after({"judge_score_mean": 1.5}, {"judge_score_mean": 2.25}).splitlines()[-1])
    | judge_score_mean | 1.5 | 2.25 | +0.75 |
    """

    keys = [k for k in ordered_metrics(before) if k != "n"]
    lines = ["| held-out metric | base model | fine-tuned | change |", "|---|---|---|---|"]
    for k in keys:
        b, a = before[k], after.get(k, 0.0)
        lines.append(f"| {k} | {format_value(k, b)} | {format_value(k, a)} | {format_change(k, b, a)} |")
    return "\n".join(lines)
