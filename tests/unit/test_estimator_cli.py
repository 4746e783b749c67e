"""`posttrain estimate` in-process: JSON parses and matches the Python API, the reality-check table, exit codes."""

import argparse
import json
import subprocess
import sys

import pytest

from posttrain.cli.estimate import add_parser
from posttrain.estimator import estimate
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
    from posttrain.cli.estimate import inputs_from_args
    from posttrain.estimator import EstimateInputs

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


def test_a_setup_that_does_not_fit_prints_no_cost_but_what_would(capsys):
    argv = ["--model", "7b", "--technique", "lora", "--batch-size", "2", "--gpu-memory-gb", "24"]
    rc, out, _ = run_cli(argv, capsys)
    assert rc == 0
    assert (
        "does not fit 1 x custom-24GB: 27.1 GB per GPU, more than the 21.6 GB usable on each (90% of its memory)"
        in out
    )
    assert "$" not in out and " h on " not in out and "no time or cost for a setup that does not fit" in out
    assert "  - gradient checkpointing (16.2 GB per GPU): --gradient-checkpointing" in out
    assert "  - technique qlora (6.2 GB per GPU): --technique qlora" in out
    rc, out, _ = run_cli(argv + ["--gradient-checkpointing"], capsys)
    assert rc == 0 and "does not fit" not in out and "on 1 x custom-24GB, $" in out


def test_qlora_estimate_states_its_checkpointing_default(capsys):
    rc, out, _ = run_cli(["--model", "70b", "--technique", "qlora"], capsys)
    assert rc == 0 and "gradient checkpointing on)" in out
    assert "gradient checkpointing on: the default for qlora" in out and "--no-gradient-checkpointing" in out


def test_estimate_and_advise_start_without_torch(tmp_path):
    """`python -X importtime -m posttrain.cli estimate/advise` lists every module imported: no torch."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "d.parquet"
    pq.write_table(
        pa.Table.from_pylist([{"prompt": f"{i} + {i}?", "answer": str(2 * i)} for i in range(200)]), data
    )
    commands = {
        "posttrain.estimator.core": ["estimate", "--model", "7b", "--json"],
        "posttrain.data.readers": ["advise", "--data", str(data), "--verifiable", "true"],
    }
    for used, argv in commands.items():
        run = subprocess.run([sys.executable, "-X", "importtime", "-m", "posttrain.cli", *argv], capture_output=True, text=True)  # fmt: skip
        assert run.returncode == 0, run.stderr[-2000:]
        imported = {line.split("|")[-1].strip() for line in run.stderr.splitlines() if "|" in line}
        assert used in imported and not any(m.split(".")[0] == "torch" for m in imported), argv


@pytest.mark.parametrize("argv, says", [
    (["--technique", "full", "--lora-rank", "8"], "--lora-rank applies to --technique lora or qlora or 8bit only"),
    (["--lora-dropout", "0.1"], "--lora-dropout applies to --technique lora or qlora or 8bit only"),
    (["--method", "sft", "--group-size", "4"], "--group-size applies to --method grpo or rloo only"),
    (["--table", "--batch-size", "2", "--gpu-memory-gb", "24"], "--batch-size, --gpu-memory-gb would be ignored"),
    (["--method", "grpo", "--value-model", "70b"], "value_model='70b' applies to ppo only: grpo has no critic"),
])  # fmt: skip
def test_flags_the_estimate_would_ignore_are_refused(capsys, argv, says):
    rc, _, err = run_cli(argv, capsys)
    assert rc == 2 and says in err


def test_flags_left_out_take_the_defaults_and_aliases_count(capsys):
    """--lora-rank 16 and --group-size 8 given equal them left out (a group size left out is said so, as a batch
    size is); `int8` is the 8bit technique, which reads a rank."""
    for given, left in ((["--technique", "lora", "--lora-rank", "16"], ["--technique", "lora"]),
                        (["--method", "grpo", "--group-size", "8", "--reward-function"],
                         ["--method", "grpo", "--reward-function"])):  # fmt: skip
        a, b = (json.loads(run_cli([*argv, "--json"], capsys)[1]) for argv in (given, left))
        noted = a.pop("assumptions")
        stated = [n for n in b.pop("assumptions") if n not in noted]
        assert a == b and stated == ([] if "--lora-rank" in given else [
            "group_size not given: 8 completions per prompt, the grpo default; set group_size (--group-size) to "
            "change it"])
    rc, out, _ = run_cli(["--technique", "int8", "--lora-rank", "8", "--json"], capsys)
    assert rc == 0 and json.loads(out)["inputs"]["lora_rank"] == 8


def test_data_sizes_the_sequence_and_the_tokens(tmp_path, capsys):
    """`--data FILE` reads the rows as `advise --data` does: seq_len is 1.5 x the 95th-percentile row (characters /
    4) to a power of two, and the tokens are rows x mean tokens x epochs (x 2 for a pair's two sides). Worked: 100
    rows of 400 characters (prompt 40 + completion 360) are 100 tokens each: seq_len 1 << int(150).bit_length() =
    256, tokens 100 x 100 x 3 = 30,000. Given flags win; a file the method does not train on, --epochs without a
    file and the layout flags without one are refused."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"question": "q" * 40, "reply": "a" * 360}) + "\n" for _ in range(100)))
    argv = ["--data", str(rows), "--column", "prompt=question", "--column", "completion=reply", "--json"]
    rc, out, err = run_cli([*argv, "--epochs", "3"], capsys)
    doc = json.loads(out)
    assert rc == 0, err
    assert (doc["inputs"]["seq_len"], doc["tokens"]) == (256, 30_000)
    assert doc["assumptions"][:2] == [
        f"seq_len 256 from {rows}: 95% of its 100 rows are up to ~100 tokens (characters / 4), x 1.5 for the chat "
        "template, to a power of two", f"tokens 3e+04 from {rows}: 100 rows x 100 tokens x 3 epoch(s)"]
    rc, out, _ = run_cli([*argv, "--seq-len", "1024", "--tokens", "5e6"], capsys)
    assert (json.loads(out)["inputs"]["seq_len"], json.loads(out)["tokens"]) == (1024, 5e6)
    for extra, says in ((["--method", "dpo"], "holds sft rows, which --method dpo does not train on; estimate it "
                                              "with --method sft"),
                        (["--tokens", "5e6", "--epochs", "2"], "--epochs sizes the tokens from --data")):  # fmt: skip
        rc, _, err = run_cli([*argv, *extra], capsys)
        assert rc == 2 and says in err
    for argv, says in ((["--epochs", "2"], "--epochs counts passes over --data"),
                       (["--column", "prompt=question"], "--column names what a data file holds, and no file is read"),
                       (["--table", "--data", str(rows)], "--data would be ignored")):  # fmt: skip
        rc, _, err = run_cli(argv, capsys)
        assert rc == 2 and says in err
    # a prompts file holds prompts only: the completion comes on top (given: 1024 + the prompts' room of 256; left
    # out: as many as the room), and a given --completion-len was refused against a seq_len the file gave
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": "p" * 400}) + "\n" for _ in range(10)))
    for extra, seq in ((["--completion-len", "1024"], 256 + 1024), ([], 512)):
        rc, out, err = run_cli(["--method", "grpo", "--data", str(prompts), *extra, "--json"], capsys)
        assert rc == 0 and json.loads(out)["inputs"]["seq_len"] == seq, err
