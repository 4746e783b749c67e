"""Quickstart recipes for the other paradigms: DPO, GRPO, PPO and RLOO with LoRA on the embedded
SmolLM2-135M-Instruct, each measured before and after on held-out data (`posttrain quickstart dpo|grpo|ppo|rloo`).

All of them use the built-in arithmetic task at one operation with amounts up to 10. That setting was chosen by
measurement: RL needs a model that sometimes succeeds, and there the base model answers about 20-30% of the
problems correctly (greedy, and sampled at temperature 0.7), against about 3% at temperature 1.0 or with amounts
up to 100 (the dequantised Q4_1 weights make its low-probability tail noisy). Steps per recipe:

1. data in ``RUN/data``: training pairs (DPO) or prompts (the RL methods), held-out prompts in wordings never used
   in training, and (DPO) held-out pairs;
2. the base model's scores on the held-out prompts, greedy and one sample each at the RL temperature 0.7
   (verifier: ``correct``; ``formatted``: the answer is marked ``Answer: N``) and, for DPO, its ranking of the
   held-out pairs; cached in ``RUN/eval_base.json``;
3. training through the normal `posttrain.train.train` path (re-running resumes it);
4. the trained model's scores on the same held-out data; the table with the change per metric and, for
   ``correct`` (greedy and sampled), the prompts gained and lost and the exact McNemar p-value
   (`evaluation.paired_change`).

Each recipe's settings are data: configs/quickstart/dpo.yaml, grpo.yaml, ppo.yaml, rloo.yaml (in the package,
src/posttrain/configs/), read by `quickstart.read_recipe`: the run config, and a `recipe` section with what this
module makes and how it scores (`ArithmeticRecipe`).

What this module does not do: choose hyperparameters at run time. The recipes are fixed, and their measured
results are in README.md.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from posttrain.algorithms import config_from_dict
from posttrain.config import ModelConfig, TechniqueConfig, apply_overrides, quickstart_methods
from posttrain.data import TASKS, load_rows, make_pairs, make_prompts, write_jsonl
from posttrain.errors import UserError
from posttrain.evaluation import evaluate_task, paired_changes, paired_summary
from posttrain.evaluation.cache import decoding_settings, lookup, scores_key, write_scores
from posttrain.evaluation.preference import preference_accuracy
from posttrain.files import write_whole
from posttrain.models import load_model
from posttrain.quickstart import (
    _stage,
    format_before_after,
    read_recipe,
    recipe_config,
    refuse_foreign_folder,
)
from posttrain.report import report_or_warning
from posttrain.train import RUN_FILES, leftover, run_tokenizer, train
from posttrain.trainer.checkpoint import latest_checkpoint
from posttrain.trainer.fingerprint import file_digest

RECIPES = tuple(m for m in quickstart_methods() if m != "sft")
"""The recipes of this module (dpo, grpo, ppo, rloo): one per configs/quickstart/METHOD.yaml but sft.yaml."""

__all__ = ["RECIPES", "ArithmeticRecipe", "recipe_config", "run_recipe"]


@dataclass(frozen=True)
class ArithmeticRecipe:
    """A recipe's own facts, its YAML's `recipe` section (not run settings; see the YAML's comments)."""

    arithmetic: dict
    """The arithmetic task's settings (min_ops, max_ops, max_value) for every row the recipe makes."""
    n_train: int
    n_heldout: int
    eval: dict
    """Scoring the held-out prompts: max_new_tokens, the sampled pass's temperature, prompts per batch_size."""
    n_heldout_pairs: int | None = None
    """DPO: held-out preference pairs ranked before and after."""


def _make_data(method: str, recipe: ArithmeticRecipe, data_dir: Path, n_heldout: int) -> dict[str, Path]:

    task = TASKS["arithmetic"].__class__(**recipe.arithmetic)
    data_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "heldout": write_jsonl(
            make_prompts(task, n_heldout, seed=2, split="heldout"), data_dir / "heldout.jsonl"
        )
    }
    if method == "dpo":
        files["train"] = write_jsonl(make_pairs(task, recipe.n_train, seed=0), data_dir / "train_pairs.jsonl")
        files["pairs"] = write_jsonl(
            make_pairs(task, recipe.n_heldout_pairs, seed=1, split="heldout"),
            data_dir / "heldout_pairs.jsonl",
        )
    else:
        files["train"] = write_jsonl(
            make_prompts(task, recipe.n_train, seed=0), data_dir / "train_prompts.jsonl"
        )
    return files


def _scores(
    model, tokenizer, recipe: ArithmeticRecipe, files: dict[str, Path], *, max_length: int, reference=None
) -> dict:
    """Verifier rates (and per-row results) on the held-out prompts; DPO adds the ranking of held-out pairs
    (at the run's `max_length`)."""

    rows = [json.loads(line) for line in files["heldout"].read_text(encoding="utf-8").splitlines()]
    out: dict = {}
    for mode, temperature in (("", 0.0), ("sampled_", recipe.eval["temperature"])):
        per_row: list[dict] = []
        rates = evaluate_task(model, tokenizer, "arithmetic", rows=rows, max_new_tokens=recipe.eval["max_new_tokens"],
                              batch_size=recipe.eval["batch_size"], per_row=per_row, temperature=temperature)  # fmt: skip
        out.update(
            {f"{mode}{k}": v for k, v in rates.items() if k != "has_number" and not (mode and k == "n")}
        )
        for k in ("correct", "formatted"):  # each row's, for the paired tests of the before/after table
            out[f"per_row_{mode}{k}"] = [r[k] for r in per_row]
    if "pairs" in files:
        pref = preference_accuracy(
            model,
            tokenizer,
            load_rows(files["pairs"], "preference"),
            reference=reference,
            max_length=max_length,
        )
        out.update({f"pairs_{k}": v for k, v in pref.items() if k != "n"})
    return out


def run_recipe(
    method: str, output_dir: str | None = None, steps: int | None = None, fresh: bool = False, *,
    model: str | None = None, n_heldout: int | None = None, overrides: list[str] | None = None,
) -> dict:  # fmt: skip
    """Run one recipe end to end (module docstring); returns the report also written to ``RUN/results.json``.
    `model`, `n_heldout` and `overrides` (dotted config overrides) exist for tests (a tiny model, a few prompts);
    the published figures use the recipe's own (configs/quickstart/METHOD.yaml)."""
    settings, facts = read_recipe(method)
    recipe = ArithmeticRecipe(**facts)
    steps = steps if steps is not None else settings["run"]["max_steps"]
    n_heldout = n_heldout if n_heldout is not None else recipe.n_heldout
    if steps <= 0:
        raise UserError("--steps must be positive")
    run_dir = Path(output_dir or f"runs/quickstart-{method}")
    if fresh and run_dir.exists():
        if not _is_recipe_folder(run_dir):
            raise UserError(f"--fresh would delete {run_dir}, which does not look like a quickstart {method} run "
                            "folder; remove it yourself or pick another --output-dir")  # fmt: skip
        shutil.rmtree(run_dir)
    refuse_foreign_folder(run_dir, _is_recipe_folder, f"quickstart {method}")
    started = time.perf_counter()
    _stage(f"data: arithmetic, one operation, amounts up to 10 -> {run_dir}/data")
    files = _make_data(method, recipe, run_dir / "data", n_heldout)
    raw = recipe_config(method, run_dir, files["train"], steps, files.get("pairs"), model)
    cfg = config_from_dict(apply_overrides(raw, list(overrides or [])), source=f"quickstart {method}")

    tokenizer = run_tokenizer(cfg)
    before = _base_scores(cfg, tokenizer, recipe, files, n_heldout, run_dir / "eval_base.json")

    resume = latest_checkpoint(run_dir) is not None
    _stage(f"{method.upper()} with LoRA for {steps} steps" + (" (resuming)" if resume else ""))
    result = train(cfg, resume=True, return_model=True,
                   continue_with=f"the same `posttrain quickstart {method}` command")  # fmt: skip

    _stage(f"scoring the trained model on the same {n_heldout} held-out prompts")
    model = getattr(result.model, "policy", result.model)  # PPO: the policy inside its value-head wrapper
    model.eval()
    after = _scores(model, result.tokenizer, recipe, files, max_length=cfg.data.max_length)
    changes = paired_changes(before, after)
    report = {"method": method, "before": before, "after": after, "changes": changes, "steps": steps,
              "minutes": round((time.perf_counter() - started) / 60, 1), "run_dir": str(run_dir),
              "model": str(result.final_dir)}  # fmt: skip
    _write_results(report, run_dir, n_heldout)
    return report


def _base_scores(
    cfg, tokenizer, recipe: ArithmeticRecipe, files: dict[str, Path], n_heldout: int, cache: Path
) -> dict:
    """The base model's `_scores` (with itself as the reference of the pairs), from `cache` when it holds the scores
    of the same model files, held-out rows, decoding and scoring (`evaluation.cache`: it was reused whenever the
    file existed, whatever model, rows or settings had made it, and a file cut by a kill failed the next run)."""
    extra = {"eval": dict(recipe.eval), "max_length": cfg.data.max_length,
             "pairs": file_digest(files["pairs"]) if "pairs" in files else None}  # fmt: skip
    decoding = decoding_settings(max_new_tokens=recipe.eval["max_new_tokens"], batch_size=recipe.eval["batch_size"],
                                 temperature=recipe.eval["temperature"], task="arithmetic", extra=extra)  # fmt: skip
    key = scores_key(cfg.model.name, files["heldout"], decoding)
    before, why = lookup(cache, key)
    if before is not None:
        print(f"base-model scores reused from {cache} (same model files, held-out rows, decoding and scoring)")
        return before
    _stage(f"scoring the base model on {n_heldout} held-out prompts (greedy, and sampled at "
           f"T={recipe.eval['temperature']}; {why})")  # fmt: skip
    base = load_model(ModelConfig(name=cfg.model.name), TechniqueConfig(name="full"), train=False)
    before = _scores(base, tokenizer, recipe, files, max_length=cfg.data.max_length, reference=base)
    write_scores(cache, key, before)
    return before


def _write_results(report: dict, run_dir: Path, n_heldout: int) -> None:
    """results.json, results.md (the table and the paired changes), the same on the terminal, the report page."""
    after_name = f"| after {report['method'].upper()} |"
    table = format_before_after(report["before"], report["after"]).replace("| fine-tuned |", after_name)
    summary = paired_summary(report["changes"], n_heldout)
    write_whole(run_dir / "results.json", json.dumps(report, indent=1))
    (run_dir / "results.md").write_text(table + "\n\n" + summary + "\n")
    _stage(
        f"held-out results ({n_heldout} prompts, wordings never seen in training; {report['minutes']:.1f} min in all)"
    )
    print(table + "\n\n" + summary)
    print(f"\nadapter: {report['model']}\ntraining log: {run_dir / 'metrics.jsonl'}")
    page = report_or_warning(run_dir)  # again, now with results.json: the before/after and paired tables
    if page is not None:
        print(f"report: {page}")


def _is_recipe_folder(path: Path) -> bool:
    entries = {p.name for p in path.iterdir() if not leftover(p.name)} if path.is_dir() else {"?"}
    ours = {*RUN_FILES, "data", "eval_base.json", "results.json", "results.md", "reference_logps.pt"}
    return not entries or ((path / "data" / "heldout.jsonl").is_file() and entries <= ours)
