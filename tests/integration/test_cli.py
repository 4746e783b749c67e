"""The CLI, called in-process: exit codes 0 / 2, one-paragraph errors, and the commands end to end."""

import json
import subprocess
import sys

import pytest

from posttrain.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_train_generate_merge_round_trip(capsys, tiny_model_dir, sft_file, tmp_path):
    run_dir = tmp_path / "run"
    code, out, err = run(capsys, "train")
    assert code == 2 and "needs a run file" in err
    # overrides alone (no run file) start from the defaults
    code, out, err = run(
        capsys,
        "train",
        "model.name=" + str(tiny_model_dir),
        "technique.name=lora",
        f"data.train={sft_file}",
        "data.max_length=64",
        f"run.output_dir={tmp_path / 'o'}",
        "run.max_steps=1",
        "run.progress=false",
        "optim.batch_size=4",
    )
    assert code == 0, err

    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"model:\n  name: {tiny_model_dir}\ntechnique:\n  name: lora\ndata:\n  train: {sft_file}\n"
        f"  max_length: 64\noptim:\n  batch_size: 4\nrun:\n  output_dir: {run_dir}\n  max_steps: 2\n"
        "  progress: false\n"
    )
    code, out, err = run(capsys, "train", str(cfg))
    assert code == 0, err
    assert "done: 2 steps" in out and (run_dir / "final" / "adapter_config.json").is_file()

    code, out, err = run(
        capsys, "generate", "--model", str(run_dir), "--prompt", "add 1 2", "--max-new-tokens", "4"
    )
    assert code == 0, err
    assert "### completion" in out

    merged = tmp_path / "merged"
    code, out, err = run(capsys, "merge", str(run_dir), "--out", str(merged))
    assert code == 0, err
    assert (merged / "model.safetensors").is_file() and f"merged model written to {merged}\n" in out
    code, out, err = run(capsys, "merge", str(run_dir), "--out", str(merged))  # again: said, not silent
    assert code == 0 and f"merged model written to {merged} (replacing the merged model there)" in out

    code, out, err = run(capsys, "train", str(cfg))  # the run exists: refuse, do not overwrite
    assert code == 2 and "--resume" in err and "Traceback" not in err


def test_config_errors_exit_2_without_traceback(capsys, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("optim:\n  lr: -1\n  batchsize: 4\n")
    code, out, err = run(capsys, "train", str(cfg))
    assert code == 2
    assert "optim.lr (line 2): should be greater than 0" in err and "optim.batchsize (line 3): unknown key" in err
    assert "Traceback" not in err


def test_missing_model_path_is_a_clear_error(capsys, sft_file, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"model:\n  name: ./no/such/model\ndata:\n  train: {sft_file}\nrun:\n  output_dir: {tmp_path / 'r'}\n"
    )
    code, out, err = run(capsys, "train", str(cfg))
    assert code == 2 and "no/such/model" in err and "Traceback" not in err


def test_bad_data_fails_before_the_model_loads(capsys, tiny_model_dir, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": ""}\n{"prompt": 3,\n')
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"model:\n  name: {tiny_model_dir}\ndata:\n  train: {data}\nrun:\n  output_dir: {tmp_path / 'r'}\n"
    )
    code, out, err = run(capsys, "train", str(cfg))
    assert code == 2
    assert f"{data}:2: completion" in err and f"{data}:3" in err
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_data_make_and_validate(capsys, tmp_path):
    out_file = tmp_path / "s.jsonl"
    code, out, err = run(capsys, "data", "make", "structured", "--n", "5", "--out", str(out_file))
    assert code == 0 and len(out_file.read_text().splitlines()) == 5
    code, out, err = run(capsys, "data", "validate", str(out_file), "--kind", "sft")
    assert code == 0 and "5 sft rows OK" in out

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"text": 5}\n')
    code, out, err = run(capsys, "data", "validate", str(bad), "--kind", "sft")
    assert code == 2
    lines = err.splitlines()
    assert lines[0] == f"{bad}: 2 problem(s) in 2 of 2 rows; no sft data loaded"  # the count first
    assert lines[1].startswith(f"{bad}:1: messages") and lines[2].startswith(f"{bad}:2: text")

    code, out, err = run(capsys, "data", "validate", str(tmp_path / "missing.jsonl"))
    assert code == 2 and "missing.jsonl" in err

    # rows of another kind, checked as sft (the default): the message says which --kind they need
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    code, out, err = run(capsys, "data", "validate", str(pairs))
    assert code == 2 and "preference pairs are checked with --kind preference" in err
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a", "answer": 3}\n')
    code, out, err = run(capsys, "data", "validate", str(prompts))
    assert code == 2 and "are RL prompts: check them with --kind prompts" in err
    assert run(capsys, "data", "validate", str(pairs), "--kind", "preference")[0] == 0

    code, out, err = run(capsys, "data", "make", "nosuchtask", "--n", "5", "--out", str(out_file))
    assert code == 2 and "structured" in err


def test_data_validate_names_the_row_where_a_line_holds_several(capsys, tmp_path):
    """A JSON array on one line said `FILE:1` for every row's problem; --json adds `row` only there."""
    f = tmp_path / "compact.json"
    f.write_text(json.dumps([{"prompt": "q", "completion": "a"}, {"prompt": "q", "completion": ""}]))
    code, out, err = run(capsys, "data", "validate", str(f), "--json")
    assert code == 2 and f"{f}:1 (row 2): completion: empty completion" in err.splitlines()
    assert json.loads(out)["problems"] == [
        {"file": str(f), "line": 1, "row": 2, "field": "completion", "message": "empty completion"}]
    g = tmp_path / "d.jsonl"
    g.write_text('{"prompt": "q", "completion": "a"}\n{"prompt": "q", "completion": ""}\n')
    code, out, err = run(capsys, "data", "validate", str(g), "--json")
    assert code == 2 and json.loads(out)["problems"] == [
        {"file": str(g), "line": 2, "field": "completion", "message": "empty completion"}]


def test_data_validate_says_the_readers_warnings_as_its_own(capsys, tiny_model_dir, tmp_path):
    """The carriage-return warning of a CSV came as Python's `UserWarning` with a source path and code line on
    stderr, and --json's `warnings` was `[]`."""
    f = tmp_path / "crlf.csv"
    f.write_bytes(b'prompt,completion\r\n"line one\r\nline two",ok\r\nplain,fine\r\n')
    said = (f"{f}: 1 row holds a carriage return (\\r, Windows line ends) inside a cell (line 2): kept as written, so "
            "the model reads it; save the file with \\n line ends if the text is not meant to hold it")  # fmt: skip
    code, out, err = run(capsys, "data", "validate", str(f), "--json")
    assert (code, err, json.loads(out)["warnings"]) == (0, "", [said])
    code, out, err = run(capsys, "data", "validate", str(f))
    assert (code, out, err) == (0, f"{f}: 2 sft rows OK (prompt/completion: 2)\nwarning: {said}\n", "")
    code, out, err = run(capsys, "data", "validate", str(f), "--model", str(tiny_model_dir), "--max-length", "64")
    # read twice (the rows, then their lengths): said once, and not taken for a row cut to max_length
    assert (code, out) == (0, f"{f}: 2 sft rows OK (prompt/completion: 2); every row fits max_length=64\n"
                              f"warning: {said}\n")
    f.write_bytes(b'prompt,completion\r\n"line one\r\nline two",\r\n')  # and a problem: the warning is still said
    code, out, err = run(capsys, "data", "validate", str(f), "--json")
    assert code == 2 and json.loads(out)["warnings"] == [said] and err.splitlines()[:3] == [
        f"{f}: 1 problem(s) in 1 of 1 rows; no sft data loaded", f"warning: {said}",
        f"{f}:2: completion: missing required field"]


def test_help_config_lists_fields(capsys):
    code, out, err = run(capsys, "train", "--help-config")
    assert code == 0 and "optim.lr" in out and "technique.r" in out


def test_estimate_json_through_main(capsys):
    code, out, err = run(capsys, "estimate", "--model", "7b", "--technique", "qlora", "--json")
    assert code == 0, err
    assert json.loads(out)["peak_memory_gb"] > 0


def test_no_command_prints_help(capsys):
    code, out, err = run(capsys)
    assert code == 2 and "quickstart" in out


def test_a_command_whose_code_cannot_be_imported_fails_loudly():
    """A broken import is a bug to see, not a command that silently vanishes from the parser (here `advise`, whose
    advisor is made unimportable): posttrain exits 1 with the traceback naming the module."""
    code = (
        "import sys; sys.modules['posttrain.advisor.core'] = None\n"
        "from posttrain.cli import main\nsys.exit(main(['advise']))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 1 and "posttrain.advisor.core" in run.stderr, run.stderr[-2000:]
    assert "invalid choice" not in run.stderr


def test_lazy_top_level_api():
    import posttrain

    assert posttrain.estimate(model="7b", technique="qlora").peak_memory_gb > 0
    with pytest.raises(AttributeError):
        posttrain.nope  # noqa: B018


def test_quickstart_fresh_refuses_a_foreign_folder(capsys, tmp_path):
    (tmp_path / "thesis.tex").write_text("precious")
    code, out, err = run(capsys, "quickstart", "--fresh", "--output-dir", str(tmp_path))
    assert code == 2 and "does not look like a quickstart run folder" in err
    assert (tmp_path / "thesis.tex").read_text() == "precious"


def test_a_run_refused_before_the_model_loads_leaves_no_folder_and_the_fixed_rerun_starts(
    capsys, tiny_model_dir, tmp_path
):
    """Refusals that need the data (a rollout larger than the prompts file) or only the config (a DPO option
    the loss type does not read) come before anything is written: no run folder, so the corrected command runs
    as it is, without --resume or another run.output_dir."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"say {i}", "answer": str(i)}) + "\n" for i in range(3)))
    run_dir = tmp_path / "grpo"
    base = [
        "train", f"model.name={tiny_model_dir}", "technique.name=lora", f"data.train={prompts}", "data.max_length=64",
        "algorithm.name=grpo", "algorithm.rewards=[exact_match]", "algorithm.num_generations=2",
        "algorithm.rollout.max_new_tokens=4", "optim.batch_size=4", f"run.output_dir={run_dir}", "run.max_steps=1",
        "run.progress=false",
    ]  # fmt: skip
    code, out, err = run(capsys, *base, "algorithm.rollout.batch_size=8")  # 4 prompts per rollout, 3 in the file
    assert code == 2 and "data.train has 3 prompts, fewer than one rollout needs" in err, err
    assert not run_dir.exists()
    code, out, err = run(capsys, *base)  # rollouts of 4 sequences: 2 prompts
    assert code == 0, err
    assert "done: 1 step" in out and (run_dir / "final").is_dir()

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"p{i}", "chosen": "yes", "rejected": "no"}) + "\n"
                             for i in range(4)))  # fmt: skip
    run_dir = tmp_path / "dpo"
    base = [
        "train", f"model.name={tiny_model_dir}", "technique.name=lora", f"data.train={pairs}", "data.max_length=64",
        "algorithm.name=dpo", "algorithm.loss_type=ipo", "optim.batch_size=4", f"run.output_dir={run_dir}",
        "run.max_steps=1", "run.progress=false",
    ]  # fmt: skip
    code, out, err = run(capsys, *base, "algorithm.label_smoothing=0.1")
    assert code == 2 and "algorithm.label_smoothing = 0.1 would be ignored" in err and "dpo" in err
    assert not run_dir.exists() and "Traceback" not in err
    code, out, err = run(capsys, *base)
    assert code == 0, err


def test_a_file_in_its_own_column_names_trains_as_the_same_rows(capsys, tiny_model_dir, sft_file, tmp_path):
    """data.columns / data.ignore_columns on a run, --column / --ignore-column on `data validate`: the same loss
    as the file in posttrain's names, step for step; the refusal says the options that read the file."""
    from tests.integration.conftest import SFT_ROWS

    theirs = tmp_path / "theirs.jsonl"
    theirs.write_text("".join(json.dumps({"question": r["prompt"], "answer": r["completion"], "source": "s"}) + "\n"
                              for r in SFT_ROWS), encoding="utf-8")  # fmt: skip
    code, out, err = run(capsys, "data", "validate", str(theirs), "--json")
    assert code == 2 and "--column prompt=question --column completion=answer --ignore-column source" in err
    assert json.loads(out)["hint"].startswith("Rename the file's columns")
    code, out, err = run(capsys, "data", "validate", str(theirs), "--column", "prompt=question", "--column",
                         "completion=answer", "--ignore-column", "source")  # fmt: skip
    assert code == 0 and out == f"{theirs}: 16 sft rows OK (prompt/completion: 16)\n"
    code, out, err = run(capsys, "data", "validate", str(theirs), "--column", "response=answer")
    assert code == 2 and "--column: 'response' is not a field of sft rows" in err

    def train(data, out_dir, *extra):
        code, out, err = run(capsys, "train", "model.name=" + str(tiny_model_dir), f"data.train={data}",
                             "data.max_length=64", f"run.output_dir={out_dir}", "run.max_steps=2",
                             "run.progress=false", "optim.batch_size=4", *extra, "--json")  # fmt: skip
        assert code == 0, err
        lines = open(json.loads(out)["metrics_file"], encoding="utf-8").read().splitlines()
        return [(r["step"], r["loss"], r["tokens"]) for r in map(json.loads, lines) if "loss" in r]

    ours = train(sft_file, tmp_path / "ours")
    mapped = train(theirs, tmp_path / "theirs", "data.columns={prompt: question, completion: answer}",
                   "data.ignore_columns=[source]")  # fmt: skip
    assert mapped == ours and len(ours) == 2


def test_data_validate_reads_sharegpt_with_message_options(capsys, tmp_path):
    f = tmp_path / "sg.jsonl"
    f.write_text(json.dumps({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}) + "\n")
    options = ["--column", "messages=conversations", "--message-key", "role=from", "--message-key", "content=value",
               "--role", "user=human", "--role", "assistant=gpt"]  # fmt: skip
    code, out, err = run(capsys, "data", "validate", str(f), *options)
    assert (code, out) == (0, f"{f}: 1 sft rows OK (messages: 1)\n"), err
    code, out, err = run(capsys, "data", "validate", str(f), *options, "--role", "user=person")
    assert code == 2 and "--role gives user more than once: each is read from one name" in err
    code, out, err = run(capsys, "data", "validate", str(f), *options[:2], "--role", "bot=gpt")
    assert code == 2 and "--role: 'bot' is not a role (they are: system, user, assistant)" in err


def test_data_validate_refuses_rows_longer_than_the_models_context_as_train_does(capsys, tmp_path):
    """`data validate --max-length 64` on a model of 16 positions said every row fit; `train` then refused the
    same rows as longer than the model's context (here 32 positions: ChatML's markers alone take ~20)."""
    from posttrain.testing import save_tiny_model

    model = save_tiny_model(tmp_path / "short", max_position_embeddings=32)
    f = tmp_path / "rows.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"question {i}", "completion": "a long enough answer"}) + "\n"
                         for i in range(3)) + json.dumps({"prompt": "q", "completion": "a"}) + "\n")  # fmt: skip
    code, out, err = run(capsys, "data", "validate", str(f), "--model", str(model), "--max-length", "64")
    assert code == 2 and f"{f}: 3 of 4 rows are longer than {model}'s context of 32 positions (lines 1, 2 and 3)" in err
    code, out, err = run(capsys, "data", "validate", str(f), "--model", str(model), "--max-length", "32")
    assert code == 0 and "every row's prompt fits max_length=32" in out  # cut to the context, with a note
