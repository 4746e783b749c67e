"""The quickstart recipes (`posttrain quickstart dpo|grpo|ppo`): their configs validate, and the DPO recipe runs
end to end on the tiny model (data, base scores, training, scores after, the paired change, resumption)."""

import json

import pytest

from posttrain.algorithms import config_from_dict
from posttrain.recipes import RECIPES, _is_recipe_folder, recipe_config, run_recipe


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
    assert printed.rstrip().endswith(f"report: {out / 'report.html'}")  # the quickstart ends by naming its report
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "<th>after training</th>" in page and "<th>exact McNemar p</th>" in page  # written after results.json
    before, after = report["before"], report["after"]
    assert before["n"] == after["n"] == 6.0
    # the base model compared with itself: every implicit reward is 0, so every pair is a tie (accuracy 1/2)
    assert before["pairs_implicit_accuracy"] == 0.5 and before["pairs_implicit_margin"] == 0.0
    assert set(report["changes"]) == {"correct", "sampled_correct"}
    for change in report["changes"].values():
        assert 0 <= change["gained"] + change["lost"] <= 6 and 0.0 < change["p_value"] <= 1.0
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


@pytest.mark.parametrize("method", ["grpo", "ppo"])
def test_rl_recipes_end_to_end_on_the_tiny_model(method, tiny_model_dir, tmp_path, capsys):
    """GRPO and PPO recipes run through training and both evaluations (PPO: the policy is scored, not its
    value-head wrapper). The tiny byte-level tokenizer needs a longer max_length for the arithmetic prompts."""
    out = tmp_path / f"qs-{method}"
    report = run_recipe(method, output_dir=str(out), steps=2, model=str(tiny_model_dir), n_heldout=4,
                        overrides=["data.max_length=320", "algorithm.rollout.max_new_tokens=8"])  # fmt: skip
    assert f"| held-out metric | base model | after {method.upper()} | change |" in capsys.readouterr().out
    assert report["before"]["n"] == report["after"]["n"] == 4.0
    assert set(report["changes"]) == {"correct", "sampled_correct"}
    hist = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(hist) == 2 and all("reward/regex_format_mean" in h for h in hist)
    assert (out / "samples.jsonl").is_file() and (out / "report.html").is_file()
    assert _is_recipe_folder(out)  # --fresh may delete it: every file in it is one a recipe run writes
