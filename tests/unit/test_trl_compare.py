"""The pure parts of benchmarks/trl_compare.py and trl_runners.py: step timing, summaries, ratios, the A B A B
order, the tables, the matched settings and the configs each tool gets. None of this needs TRL installed; the one
test that builds TRL's own config objects skips without it."""

import doctest
import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):
    """A benchmarks/ script as a module, registered under its own name (trl_runners imports trl_compare)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


tc = _load("trl_compare")
tr = _load("trl_runners")


def test_doctests_of_the_helpers_pass():
    """The worked examples in trl_compare's docstrings (step_times, summarise, ratio, schedule, the tables)."""
    result = doctest.testmod(tc, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 7 and result.failed == 0


def test_step_times_start_from_the_loop_start_and_follow_each_end():
    assert tc.step_times([10.5, 12.0, 15.0], start=10.0) == [0.5, 1.5, 3.0]
    assert tc.step_times([], start=3.0) == []


def test_summarise_leaves_out_each_runs_warmup_step_and_pools_the_rest():
    """Run 1: steps 100 (warm-up), 2, 6; run 2: 50 (warm-up), 4, 4. Timed: 2, 6, 4, 4 -> median 4.0; tokens/s =
    (10 + 30 + 20 + 20) / (2 + 6 + 4 + 4) = 80 / 16 = 5.0; the peak is the higher of the two runs'; each repeat's
    own median is 4.0 and 4.0."""
    runs = [
        {"step_s": [100.0, 2.0, 6.0], "tokens": [999, 10, 30], "peak_rss_gb": 2.0},
        {"step_s": [50.0, 4.0, 4.0], "tokens": [999, 20, 20], "peak_rss_gb": 2.5},
    ]
    s = tc.summarise(runs)
    assert s == {"step_s": 4.0, "tokens_per_s": 5.0, "peak_rss_gb": 2.5, "repeat_step_s": [4.0, 4.0],
                 "timed_steps": 4}  # fmt: skip
    assert tc.summarise([{"step_s": [9.0], "tokens": [5], "peak_rss_gb": 1.0}]) is None  # only a warm-up step


def test_ratio_is_posttrain_over_trl_and_none_when_a_side_is_missing():
    assert tc.ratio(1.5, 2.0) == 0.75
    assert tc.ratio(None, 2.0) is None and tc.ratio(2.0, None) is None and tc.ratio(2.0, 0.0) is None


def test_schedule_alternates_the_tools_and_runs_ppo_in_posttrain_only():
    plan = tc.schedule(["sft-lora", "ppo-lora"], 2, tc.tools_of)
    assert plan == [
        (0, "sft-lora", "posttrain"), (0, "sft-lora", "trl"), (0, "ppo-lora", "posttrain"),
        (1, "sft-lora", "posttrain"), (1, "sft-lora", "trl"), (1, "ppo-lora", "posttrain"),
    ]  # fmt: skip
    assert all(tc.tools_of(m) == ("posttrain", "trl") for m in tc.DEFAULT_METHODS)


def test_curve_spread_is_the_largest_gap_between_repeats_at_the_same_step():
    runs = [{"curve": [0.5, 0.25, 0.125]}, {"curve": [0.5, 0.5, 0.125]}, {"curve": [0.25, 0.25, 0.125]}]
    assert tc.curve_spread(runs) == 0.25
    assert tc.curve_spread(runs[:1]) is None


def test_speed_table_shows_dashes_for_a_tool_that_did_not_run():
    table = tc.speed_table({"ppo-lora": {"posttrain": {"step_s": 12.5, "tokens_per_s": 150.0, "peak_rss_gb": 5.25}}})
    assert table.splitlines()[-1] == "| ppo-lora | 12.50 / - | - | 150 / - | - | 5.25 / - | - |"


def test_curve_table_pads_the_shorter_curve():
    lines = tc.curve_table({"posttrain": [1.0, 0.5], "trl": [1.25]}, "loss").splitlines()
    assert lines[2:] == ["| 1 | 1.0000 | 1.2500 | -0.2500 |", "| 2 | 0.5000 | - | - |"]


def test_the_settings_are_the_issues_and_the_report_states_what_was_matched():
    """Issue 15: batch 8, max length 256, LoRA r=16 (alpha 32) on all linear layers, lr 1e-4, GRPO 4 prompts x 8
    completions of up to 64 tokens at T=1; the report must state gradient checkpointing, which tokens carry loss,
    extra reference forwards for logging, the schedule and the loss normalisation."""
    s = tc.SETTINGS
    assert (s["batch_size"], s["max_length"], s["lora_r"], s["lora_alpha"], s["lr"]) == (8, 256, 16, 32, 1e-4)
    assert (s["rl_prompts"], s["rl_group"], s["rl_completions"], s["max_new_tokens"], s["temperature"]) == (
        4, 8, 32, 64, 1.0)  # fmt: skip
    for topic in ("gradient checkpointing", "SFT loss", "DPO loss", "extra forwards for logging", "schedule",
                  "known differences", "timing"):  # fmt: skip
        assert topic in tc.MATCHED
        assert f"- {topic}: " in tc.settings_text()


def test_trl_missing_says_how_to_install_the_bench_extra(tmp_path):
    message = tc.trl_missing(str(tmp_path))
    assert 'pip install -e ".[bench]"' in message and str(tmp_path) in message and "--trl-path" in message
    (tmp_path / "trl").mkdir()
    (tmp_path / "trl" / "__init__.py").write_text("")
    assert tc.trl_missing(str(tmp_path)) is None


def test_the_data_files_are_chat_rows_posttrain_reads_and_sized_to_the_steps(tmp_path):
    """3 steps: 24 SFT rows, 24 DPO pairs, 12 GRPO prompts (4 a step), 96 PPO prompts (32 a step)."""
    from posttrain.data import load_rows

    files = tc.write_data(tmp_path, {"sft", "dpo", "grpo", "ppo"}, steps=3)
    kinds = {"sft": "sft", "dpo": "preference", "grpo": "prompts", "ppo": "prompts"}
    counts = {k: len(load_rows(files[k], kinds[k])) for k in files}
    assert counts == {"sft": 24, "dpo": 24, "grpo": 12, "ppo": 96}
    first = json.loads(files["dpo"].read_text().splitlines()[0])
    assert first["prompt"][0]["role"] == "user" and first["chosen"][0]["role"] == "assistant"


@pytest.mark.parametrize("method", list(tc.METHODS))
def test_posttrain_gets_a_valid_config_with_the_matched_settings(method):
    from posttrain.algorithms import config_from_dict

    cfg = config_from_dict(tr.posttrain_config(method, "m", "d.jsonl", 8, "out", tc.SETTINGS))
    assert cfg.model.gradient_checkpointing is False and cfg.data.shuffle is False and cfg.model.dtype == "float32"
    assert (cfg.optim.lr, cfg.optim.schedule, cfg.optim.warmup_steps, cfg.optim.micro_batch_size) == (
        1e-4, "constant", 0, 8)  # fmt: skip
    assert cfg.data.max_length == 256 and cfg.run.max_steps == 8
    assert cfg.technique.name == tc.METHODS[method]["technique"]
    if cfg.technique.name == "lora":
        assert (cfg.technique.r, cfg.technique.alpha, cfg.technique.dropout) == (16, 32, 0.0)
    if method == "dpo-lora":
        assert (cfg.algorithm.beta, cfg.algorithm.loss_type, cfg.algorithm.reference) == (0.1, "sigmoid", "adapter")
    if method == "grpo-lora":  # 4 prompts x 8, no reference forward for the KL log
        a = cfg.algorithm
        assert (a.num_generations, a.rollout.batch_size, cfg.optim.batch_size, a.log_kl, a.beta) == (8, 32, 32, False,
                                                                                                      0.0)  # fmt: skip


def test_dtype_bfloat16_puts_both_tools_in_bf16_autocast_and_the_report_says_so(tmp_path):
    """`--dtype bfloat16`: posttrain's model.dtype and TRL's bf16 flag both follow the settings' dtype; the report
    states that the comparison is not the fp32 of the matched settings."""
    s = {**tc.SETTINGS, "dtype": "bfloat16"}
    assert tr.posttrain_config("sft-lora", "m", "d.jsonl", 8, "out", s)["model"]["dtype"] == "bfloat16"
    assert tr.trl_arguments("sft-lora", str(tmp_path), 8, s)["bf16"] is True
    assert tr.trl_arguments("sft-lora", str(tmp_path), 8, tc.SETTINGS)["bf16"] is False
    result = {"gemm_gflops": [1.0, 1.0], "steps": 2, "repeats": 1, "wall_s": 1.0, "versions": {}, "smoke": False,
              "settings": s, "summary": {}, "curves": {}}  # fmt: skip
    assert "both tools in bf16 autocast" in tc.report(result)
    assert "both tools in bf16 autocast" not in tc.report({**result, "settings": tc.SETTINGS})
    assert "- model: " in tc.report({**result, "matched": tc.matched_settings("bfloat16")})
    assert "bf16 autocast in both" in tc.matched_settings("bfloat16")["model"]
    assert tc.matched_settings("float32") == tc.MATCHED and "fp32 compute in both" in tc.MATCHED["model"]


@pytest.mark.parametrize("method", list(tc.DEFAULT_METHODS))
def test_trl_gets_the_matched_settings_where_its_defaults_differ(method, tmp_path):
    """TRL's defaults differ from the matched settings in precision (bf16), gradient checkpointing, schedule and
    data order: each is set explicitly. GRPO: one generation of 32 = 4 prompts x 8 per optimisation step."""
    trl = pytest.importorskip("trl", reason="TRL is only in the bench extra (pip install -e '.[bench]')")
    fields = tr.trl_arguments(method, str(tmp_path), 8, tc.SETTINGS)
    kind = tc.METHODS[method]["kind"]
    config = {"sft": trl.SFTConfig, "dpo": trl.DPOConfig, "grpo": trl.GRPOConfig}[kind](**fields)
    assert config.bf16 is False and config.gradient_checkpointing is False and config.activation_checkpointing is False
    assert config.lr_scheduler_type == "constant" and config.learning_rate == 1e-4 and config.max_steps == 8
    if kind == "grpo":
        assert config.generation_batch_size == 32 and config.num_generations == 8 and config.beta == 0.0
        assert config.gradient_accumulation_steps == 4 and config.shuffle_dataset is False
    else:
        assert config.train_sampling_strategy == "sequential" and config.max_length == 256
