"""The quickstart recipes (`posttrain quickstart dpo|grpo|ppo`): their configs validate and resolve to the run
configs they had before their settings moved to YAML, and the recipes run end to end on the tiny model (data,
base scores, training, scores after, the paired change, resumption)."""

import json
from pathlib import Path

import pytest
import yaml

from posttrain.algorithms import config_from_dict
from posttrain.config import dump_config
from posttrain.quickstart import read_recipe
from posttrain.recipes import RECIPES, _is_recipe_folder, recipe_config, run_recipe

# The raw run configs the recipes built when their settings were Python dicts (commit 0bbe9dd), with RUN_DIR and
# MODEL_DIR for the run folder and the model: their resolved config.yaml is the one the recipes must still write.
GOLDEN = yaml.safe_load(
    (Path(__file__).parent / "golden" / "recipe_configs.yaml").read_text(encoding="utf-8")
)


def golden(case: str, **paths) -> dict:
    """A golden raw config with its placeholders (keyword names) replaced by these paths."""
    text = json.dumps(GOLDEN[case])
    for placeholder, path in paths.items():
        text = text.replace(placeholder, json.dumps(str(path))[1:-1])
    return json.loads(text)


def resolved(raw: dict, tmp_path) -> str:
    """The config.yaml a run of `raw` writes: the validated config, dumped by `dump_config` as `train` does."""
    dump_config(config_from_dict(raw), tmp_path / "expected-config.yaml")
    return (tmp_path / "expected-config.yaml").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    "method", ["sft", "dpo", "grpo", "ppo"]
)  # the recipes that were in Python (not rloo)
def test_recipe_yaml_resolves_to_the_config_the_python_recipe_wrote(method, tmp_path):
    """configs/quickstart/METHOD.yaml filled in by `recipe_config`, at the recipe's own steps, resolves byte for
    byte to the config.yaml of the recipe as it was in Python."""
    run = tmp_path / "run"
    train = (
        run / "data" / {"sft": "train.jsonl", "dpo": "train_pairs.jsonl"}.get(method, "train_prompts.jsonl")
    )
    pairs = run / "data" / "heldout_pairs.jsonl" if method == "dpo" else None
    steps = read_recipe(method)[0]["run"]["max_steps"]
    raw = recipe_config(method, run, train, steps, pairs)
    assert resolved(raw, tmp_path) == resolved(golden(method, RUN_DIR=run), tmp_path)


@pytest.mark.parametrize("method", sorted(RECIPES))
def test_recipe_configs_validate(method, tmp_path):
    pairs = tmp_path / "eval.jsonl" if method == "dpo" else None
    cfg = config_from_dict(recipe_config(method, tmp_path / "run", tmp_path / "train.jsonl", 7, pairs))
    assert cfg.algorithm.name == method and cfg.run.max_steps == 7 and cfg.technique.name == "lora"
    if method != "dpo":
        assert cfg.algorithm.rollout.temperature == 0.7 and len(cfg.algorithm.rewards) == 2


def test_dpo_recipe_end_to_end_on_the_tiny_model(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "qs-dpo"
    report = run_recipe("dpo", output_dir=str(out), steps=2, model=str(tiny_model_dir), n_heldout=6)
    printed = capsys.readouterr().out
    assert "| held-out metric | base model | after DPO | change |" in printed
    assert printed.rstrip().endswith(
        f"report: {out / 'report.html'}"
    )  # the quickstart ends by naming its report
    page = (out / "report.html").read_text(encoding="utf-8")
    assert (
        "<th>after training</th>" in page and "<th>exact McNemar p</th>" in page
    )  # written after results.json
    before, after = report["before"], report["after"]
    assert before["n"] == after["n"] == 6.0
    # the base model compared with itself: every implicit reward is 0, so every pair is a tie (accuracy 1/2)
    assert before["pairs_implicit_accuracy"] == 0.5 and before["pairs_implicit_margin"] == 0.0
    # every 0/1 metric is tested on the same prompts (formatted had no test), with its paired interval
    assert list(report["changes"]) == ["correct", "sampled_correct", "formatted", "sampled_formatted"]
    for change in report["changes"].values():
        assert 0 <= change["gained"] + change["lost"] <= 6 and 0.0 < change["p_value"] <= 1.0
        assert -1 <= change["low"] <= (change["gained"] - change["lost"]) / 6 <= change["high"] <= 1
    saved = json.loads((out / "results.json").read_text())
    assert saved["steps"] == 2 and (out / "final").is_dir() and (out / "results.md").is_file()
    assert len((out / "metrics.jsonl").read_text().splitlines()) >= 2

    # run again: the base scores are reused and the finished run is not trained again
    final = {p.name: p.stat().st_mtime_ns for p in (out / "final").iterdir()}
    again = run_recipe("dpo", output_dir=str(out), steps=2, model=str(tiny_model_dir), n_heldout=6)
    printed = capsys.readouterr().out
    assert "base-model scores reused" in printed and "finished at step 2; nothing to train" in printed
    assert again["before"] == before and again["after"] == after
    assert {p.name: p.stat().st_mtime_ns for p in (out / "final").iterdir()} == final
    assert _is_recipe_folder(out)  # --fresh may delete it: every file in it is one a recipe run writes
    expected = resolved(golden("dpo_tiny", RUN_DIR=out, MODEL_DIR=tiny_model_dir), tmp_path)
    assert (out / "config.yaml").read_text(encoding="utf-8") == expected  # as the recipe in Python wrote it


def test_every_quickstart_yaml_is_a_recipe_of_the_cli():
    """The recipes and the CLI's choices come from the YAML files: a new configs/quickstart/METHOD.yaml is a
    new `posttrain quickstart METHOD`."""
    from posttrain.cli import UsageError, build_parser

    assert set(RECIPES) == {"dpo", "grpo", "ppo", "rloo"}
    parser = build_parser()
    for method in ["sft", *RECIPES]:
        assert parser.parse_args(["quickstart", method]).method == method
    with pytest.raises(UsageError, match="invalid choice: 'kto'"):
        parser.parse_args(["quickstart", "kto"])


@pytest.mark.parametrize("method", ["grpo", "ppo", "rloo"])
def test_rl_recipes_end_to_end_on_the_tiny_model(method, tiny_model_dir, tmp_path, capsys):
    """The RL recipes run through training and both evaluations (PPO: the policy is scored, not its
    value-head wrapper). The tiny byte-level tokenizer needs a longer max_length for the arithmetic prompts."""
    out = tmp_path / f"qs-{method}"
    report = run_recipe(method, output_dir=str(out), steps=2, model=str(tiny_model_dir), n_heldout=4,
                        overrides=["data.max_length=320", "algorithm.rollout.max_new_tokens=8"])  # fmt: skip
    assert f"| held-out metric | base model | after {method.upper()} | change |" in capsys.readouterr().out
    assert report["before"]["n"] == report["after"]["n"] == 4.0
    assert list(report["changes"]) == ["correct", "sampled_correct", "formatted", "sampled_formatted"]
    hist = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(hist) == 2 and all("reward/formatted_mean" in h for h in hist)
    assert (out / "samples.jsonl").is_file() and (out / "report.html").is_file()
    assert _is_recipe_folder(out)  # --fresh may delete it: every file in it is one a recipe run writes
    if method in ("grpo", "ppo"):  # the recipes that were in Python
        expected = resolved(golden(f"{method}_tiny", RUN_DIR=out, MODEL_DIR=tiny_model_dir), tmp_path)
        assert (out / "config.yaml").read_text(
            encoding="utf-8"
        ) == expected  # as the recipe in Python wrote it
