"""`posttrain estimate` in-process: JSON parses and matches the Python API, the reality-check table, exit codes."""

import argparse
import json
import subprocess
import sys

import pytest

from posttrain.estimator import estimate
from posttrain.estimator.cli import add_parser
from posttrain.estimator.table import reality_check


def run_cli(argv, capsys):
    p = argparse.ArgumentParser()
    add_parser(p.add_subparsers())
    args = p.parse_args(["estimate", *argv])
    rc = args.func(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_json_output_parses_and_matches_api(capsys):
    argv = ["--model", "llama-3-8b", "--technique", "qlora", "--batch-size", "2", "--seq-len", "1024"]
    rc, out, _ = run_cli(argv + ["--gradient-checkpointing", "--tokens", "500M", "--json"], capsys)
    assert rc == 0
    data = json.loads(out)
    api = estimate(
        "llama-3-8b", technique="qlora", batch_size=2, seq_len=1024, gradient_checkpointing=True, tokens=5e8
    )
    assert data["peak_memory_gb"] == pytest.approx(api.peak_memory_gb, rel=1e-12)
    assert data["tokens"] == 5e8
    assert set(data["breakdown_gb"]) >= {"weights", "activations", "logits", "kv_cache", "rollout_buffers"}
    for key in ("fits", "flops", "hours", "cost_usd", "assumptions"):
        assert key in data


def test_text_output_names_the_breakdown(capsys):
    rc, out, _ = run_cli(["--model", "7b", "--method", "dpo", "--technique", "lora"], capsys)
    assert rc == 0
    assert "peak memory per GPU" in out and "logits" in out and "assumptions:" in out


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--model", "mistral-8b"], "Did you mean"),
        (["--method", "ppo"], "ppo needs a reward source"),
        (["--batch-size", "0"], "batch_size must be a positive integer"),
        (["--gpu", "Z80"], "unknown GPU"),
    ],
)
def test_user_errors_exit_2_without_traceback(argv, fragment, capsys):
    rc, out, err = run_cli(argv, capsys)
    assert rc == 2 and out == ""
    assert err.startswith("error: ") and fragment in err and "Traceback" not in err


def test_reality_check_table(capsys):
    rc, out, _ = run_cli(["--table"], capsys)
    assert rc == 0
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 5 * 4  # every method x technique
    assert rows[0].startswith("| sft | full |") and rows[0].endswith("| 1.00x |")


def test_reality_check_rows_are_consistent():
    rows, _ = reality_check("7b")
    by = {(r.method, r.technique): r for r in rows}
    # Full fine-tuning of a 7B model needs more than one 80 GB GPU; every LoRA variant fits on one.
    assert by["sft", "full"].gpus_needed == 2
    assert all(by[m, t].gpus_needed == 1 for m in ("sft", "dpo", "grpo") for t in ("lora", "8bit", "qlora"))
    # QLoRA < int8 < 16-bit base, for every method.
    for m in ("sft", "reward", "dpo", "ppo", "grpo"):
        assert (
            by[m, "qlora"].memory_one_gpu_gb
            < by[m, "8bit"].memory_one_gpu_gb
            < by[m, "lora"].memory_one_gpu_gb
        )
    # RL generates before it trains, so it costs more than SFT on the same tokens.
    assert by["grpo", "lora"].relative_cost > 2 * by["sft", "lora"].relative_cost


def test_import_loads_no_torch():
    code = "import sys, posttrain.estimator, posttrain.advisor; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_flags_build_the_inputs_object():
    """Every flag is the `EstimateInputs` field of the same name: the CLI builds one object and passes it on."""
    from posttrain.estimator import EstimateInputs
    from posttrain.estimator.cli import inputs_from_args

    p = argparse.ArgumentParser()
    add_parser(p.add_subparsers())
    argv = ["--model", "llama-3-8b", "--method", "grpo", "--technique", "qlora", "--group-size", "4"]
    args = p.parse_args(["estimate", *argv, "--completion-len", "256", "--tokens", "2B", "--gpu", "a100"])
    expected = EstimateInputs(
        model="llama-3-8b",
        method="grpo",
        technique="qlora",
        group_size=4,
        completion_len=256,
        tokens=2e9,
        gpu="a100",
    )
    assert inputs_from_args(args) == expected
