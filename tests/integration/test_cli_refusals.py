"""User mistakes found by an audit of the CLI (seventeenth session): each is a one-paragraph error before any work,
not a traceback, a silently ignored setting or lost work; and the fixed command then runs."""

import json
import shutil
from pathlib import Path

import pytest

from posttrain.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _broken_model(tiny_model_dir, tmp_path, how: str):
    folder = tmp_path / how
    shutil.copytree(tiny_model_dir, folder)
    if how == "unknown model type":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "model_type": "llamaxyz"}))
    elif how == "cut weights":
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:5])
    elif how == "no tokenizer":
        for f in folder.glob("tokenizer*"):
            f.unlink()
    return folder


def _train(tiny_model_dir, sft_file, run_dir, *extra):
    return ["train", f"model.name={tiny_model_dir}", "technique.name=lora", f"data.train={sft_file}",
            "data.max_length=64", "optim.batch_size=4", f"run.output_dir={run_dir}", "run.max_steps=1",
            "run.progress=false", *extra]  # fmt: skip


@pytest.mark.parametrize("how", ["unknown model type", "cut weights", "no tokenizer"])
def test_a_model_folder_that_cannot_load_is_named_and_leaves_no_run_folder(capsys, tiny_model_dir, sft_file,
                                                                          tmp_path, how):  # fmt: skip
    broken = _broken_model(tiny_model_dir, tmp_path, how)
    run_dir = tmp_path / "run"
    code, out, err = run(capsys, *_train(broken, sft_file, run_dir))
    assert code == 2 and "Traceback" not in err, err
    assert f"model '{broken}': could not load its" in err and "Check that the folder holds config.json" in err
    assert not run_dir.exists()  # the corrected command then runs as it is
    code, out, err = run(capsys, *_train(tiny_model_dir, sft_file, run_dir))
    assert code == 0, err


def test_lora_targets_the_model_lacks_are_named_and_leave_no_run_folder(capsys, tiny_model_dir, sft_file, tmp_path):
    run_dir = tmp_path / "run"
    code, out, err = run(capsys, *_train(tiny_model_dir, sft_file, run_dir, "technique.target_modules=[foo_proj]"))
    assert code == 2 and "Traceback" not in err
    assert "technique.target_modules = ['foo_proj'] matches no layer" in err and "q_proj" in err
    assert not run_dir.exists()
    # one name of several that matches nothing: peft adapts the others and said nothing
    code, out, err = run(capsys, *_train(tiny_model_dir, sft_file, run_dir,
                                         "technique.target_modules=[q_proj,foo_proj,v_proj]"))  # fmt: skip
    assert code == 2 and "Traceback" not in err
    assert ("technique.target_modules = ['q_proj', 'foo_proj', 'v_proj']: foo_proj matches no layer of this model, "
            "so it would get no adapter; its linear layers are named down_proj, gate_proj, k_proj, lm_head, o_proj, "
            "q_proj, up_proj, v_proj (or use all-linear)") in err  # the model's own names, not peft's wrappers
    assert not run_dir.exists()
    code, out, err = run(capsys, *_train(tiny_model_dir, sft_file, run_dir, "technique.target_modules=[q_proj,v_proj]"))
    assert code == 0, err


def test_an_output_folder_under_a_file_is_refused(capsys, tiny_model_dir, sft_file, tmp_path):
    (tmp_path / "afile").write_text("x")
    code, out, err = run(capsys, *_train(tiny_model_dir, sft_file, tmp_path / "afile" / "run"))
    assert code == 2 and "cannot be created" in err and "Traceback" not in err


def test_yaml_booleans_are_not_numbers(capsys, tiny_model_dir, sft_file, tmp_path):
    """`lr: yes` would train at lr 1.0 (pydantic takes true as 1)."""
    code, out, err = run(capsys, *_train(tiny_model_dir, sft_file, tmp_path / "run", "optim.lr=yes"))
    assert code == 2 and "command line: invalid configuration:\n  optim.lr: needs a number, got true" in err
    assert not (tmp_path / "run").exists()


def test_warmup_longer_than_the_run_is_said(capsys, tiny_model_dir, sft_file, tmp_path):
    code, out, err = run(capsys, *_train(tiny_model_dir, sft_file, tmp_path / "run", "optim.warmup_steps=5"))
    assert code == 0, err
    assert "optim.warmup_steps = 5 is not shorter than this run's 1 steps" in out and "50% of optim.lr" in out


def test_overrides_after_resume_are_overrides(capsys, tiny_model_dir, sft_file, tmp_path):
    argv = _train(tiny_model_dir, sft_file, tmp_path / "run")
    assert run(capsys, *argv)[0] == 0
    code, out, err = run(capsys, *argv, "--resume", "run.max_steps=2")
    assert code == 0, err
    assert "done: 1 step (step 2 of 2)" in out
    code, out, err = run(capsys, *argv, "--resume", "--bogus")  # a usage error
    assert code == 2 and "posttrain: error: unrecognized arguments: --bogus" in err and out == ""


@pytest.fixture()
def lora_run(capsys, tiny_model_dir, sft_file, tmp_path):
    run_dir = tmp_path / "run"
    assert run(capsys, *_train(tiny_model_dir, sft_file, run_dir))[0] == 0
    return run_dir


@pytest.mark.parametrize("flags, says", [
    (["--max-new-tokens", "0"], "argument --max-new-tokens: must be a whole number > 0, got 0"),
    (["--temperature", "-1"], "argument --temperature: must be >= 0 (0: greedy), got -1"),
    (["--temperature", "0.7", "--top-p", "1.5"], "argument --top-p: must be in (0, 1]"),
    (["--top-p", "0.5"], "--top-p 0.5 applies to sampling only"),
    (["--seed", "7"], "--seed 7 applies to sampling only"),  # greedy draws nothing: the seed changed nothing
])  # fmt: skip
def test_generate_refuses_settings_it_cannot_use(capsys, lora_run, flags, says):
    argv = ["generate", "--model", str(lora_run), "--prompt", "hi", *flags]
    code, _, err = run(capsys, *argv)
    assert code == 2 and says in err and "Traceback" not in err
    if says.startswith("argument"):  # argparse's usage error, before anything loads: the usage line leads
        assert err.startswith("usage: posttrain generate ") and f"posttrain generate: error: {says}" in err


@pytest.mark.parametrize("argv, command, says", [
    (["generate", "--prompt", "hi", "--temperature", "-1"], "generate", "argument --temperature: must be >= 0"),
    (["evaluate", "--task", "arithmetic", "--n", "0"], "evaluate", "argument --n: must be a whole number > 0, got 0"),
    (["evaluate", "--pairs", "p.jsonl", "--beta", "-0.1"], "evaluate", "argument --beta: must be > 0, got -0.1"),
    (["evaluate", "--task", "arithmetic", "--bogus"], "evaluate", "unrecognized arguments: --bogus"),
    # inf and nan were accepted (an audit, nineteenth session: --judge-threshold nan scored every answer wrong)
    (["diagnose", "--task", "arithmetic", "--judge-threshold", "nan"], "diagnose",
     "argument --judge-threshold: must be a finite number, got nan"),
    (["diagnose", "--task", "arithmetic", "--temperature", "inf"], "diagnose",
     "argument --temperature: must be a finite number, got inf"),
    (["estimate", "--model", "7b", "--gpu-memory-gb", "inf"], "estimate",
     "argument --gpu-memory-gb: must be a finite number, got inf"),
    (["estimate", "--model", "7b", "--mfu", "1.5"], "estimate", "argument --mfu: must be in (0, 1], got 1.5"),
    (["data", "validate"], "data validate", "the following arguments are required: file"),
    (["data", "pairs", "--prompts", "p.jsonl", "--out", "x.jsonl", "--temperature", "0"], "data pairs",
     "argument --temperature: must be > 0, got 0"),
    (["data", "pairs", "--prompts", "p.jsonl", "--out", "x.jsonl", "--limit", "-2"], "data pairs",
     "argument --limit: must be a whole number > 0, got -2"),
    (["train", "run.yaml", "--bogus"], "train", "unrecognized arguments: --bogus"),
])  # fmt: skip
def test_a_command_line_mistake_under_json_is_a_failure_document(capsys, argv, command, says):
    """docs/cli-json.md: whatever the exit code, stdout carries one document; argparse's own errors included."""
    code, out, err = run(capsys, *argv, "--json")
    assert code == 2 and says in err
    doc = json.loads(out)
    assert doc == {"schema_version": 1, "command": command, "ok": False, "error": {"kind": "user", "message": doc["error"]["message"]}}
    assert says in doc["error"]["message"]
    code, out, err = run(capsys, *argv)  # without --json: argparse's report alone
    assert code == 2 and out == "" and says in err


def test_a_usage_error_of_a_command_without_documents_is_argparse_s_report(capsys):
    """estimate and advise print their own JSON, and since the nineteenth session their failures as the
    envelope's failure documents (before: nothing on stdout, so json.loads(stdout) failed)."""
    code, out, err = run(capsys, "estimate", "--json", "--model")
    assert code == 2 and err.startswith("usage: posttrain estimate")
    assert "posttrain estimate: error: argument --model: expected one argument" in err
    assert json.loads(out)["error"] == {"kind": "user", "message": "argument --model: expected one argument"}
    code, out, err = run(capsys, "advise", "--json", "--demonstrations", "inf")
    assert code == 2 and json.loads(out)["command"] == "advise" and "must be a finite number" in err
    code, out, err = run(capsys, "estimate", "--model")
    assert code == 2 and out == ""
    code, out, err = run(capsys, "--bogus")
    assert code == 2 and out == "" and "posttrain: error: unrecognized arguments: --bogus" in err


def test_evaluate_refuses_flags_of_the_other_mode_and_an_out_folder_before_answering(capsys, lora_run, tmp_path):
    code, out, err = run(capsys, "evaluate", "--model", str(lora_run), "--task", "arithmetic", "--n", "2",
                         "--beta", "0.5")  # fmt: skip
    assert code == 2 and "--beta applies only with --pairs" in err
    (tmp_path / "rows.jsonl").write_text('{"prompt": "2+2?", "answer": 4}\n')
    code, out, err = run(capsys, "evaluate", "--model", str(lora_run), "--data", str(tmp_path / "rows.jsonl"),
                         "--reward", "numeric_answer", "--seed", "3")  # fmt: skip
    assert code == 2 and "--seed 3 would change nothing" in err  # a file's rows, decoded greedily
    code, out, err = run(capsys, "evaluate", "--model", str(lora_run), "--data", str(tmp_path / "rows.jsonl"),
                         "--reward", "numeric_answer", "--split", "train")  # fmt: skip
    assert code == 2 and "--split shape the rows made by --task" in err  # it chose nothing: was accepted
    (tmp_path / "answers").mkdir()
    code, out, err = run(capsys, "evaluate", "--model", str(lora_run), "--task", "arithmetic", "--n", "2",
                         "--no-progress", "--out", str(tmp_path / "answers"))  # fmt: skip
    assert code == 2 and "is a folder; give a file path" in err and "Traceback" not in err
    assert list((tmp_path).glob("answers*")) == [tmp_path / "answers"]  # no stray file, nothing generated


def test_a_run_folder_without_final_says_so(capsys, tiny_model_dir, sft_file, tmp_path):
    run_dir = tmp_path / "run"
    assert run(capsys, *_train(tiny_model_dir, sft_file, run_dir))[0] == 0
    shutil.rmtree(run_dir / "final")
    code, out, err = run(capsys, "generate", "--model", str(run_dir), "--prompt", "hi")
    assert code == 2 and "did the run finish?" in err


def test_data_make_says_it_replaced_a_file(capsys, tmp_path):
    out_file = tmp_path / "rows.jsonl"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "q", "answer": 1}\n')
    code, out, err = run(capsys, "evaluate", "--task", "arithmetic", "--data", str(prompts), "--out", str(prompts))
    assert code == 2 and f"--out {prompts}: is the file --data reads, which writing would replace" in err
    assert prompts.read_text() == '{"prompt": "q", "answer": 1}\n'
    code, out, err = run(capsys, "data", "make", "arithmetic", "--n", "0", "--out", str(out_file))
    assert code == 2 and "posttrain data make: error: argument --n: must be a whole number > 0, got 0" in err
    assert run(capsys, "data", "make", "arithmetic", "--n", "3", "--out", str(out_file))[0] == 0
    code, out, err = run(capsys, "data", "make", "arithmetic", "--n", "2", "--out", str(out_file))
    assert code == 0 and f"{out_file} existed (3 lines) and was replaced" in out
    (tmp_path / "afile").write_text("x")
    code, out, err = run(capsys, "data", "make", "arithmetic", "--n", "2", "--out", str(tmp_path / "afile" / "x.jsonl"))
    assert code == 2 and "is a file, not a folder" in err


@pytest.mark.parametrize("name", ["rows.csv", "rows.json", "rows.parquet", "rows"])
def test_data_make_refuses_a_name_its_readers_would_take_for_another_format(capsys, tmp_path, name):
    """It writes JSON Lines whatever the name, and the readers go by the extension: `rows.csv` made by `data make`
    then failed on every line as CSV (an audit of silent data handling, eighteenth session)."""
    code, out, err = run(capsys, "data", "make", "arithmetic", "--n", "2", "--out", str(tmp_path / name))
    assert code == 2 and "writes JSON Lines" in err and f"name it {tmp_path / 'rows.jsonl'}" in err
    assert not (tmp_path / name).exists()
    assert run(capsys, "data", "make", "arithmetic", "--n", "2", "--out", str(tmp_path / "ROWS.JSONL"))[0] == 0


def test_a_bad_override_is_named_as_the_command_lines_not_the_files(capsys, tiny_model_dir, sft_file, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model:\n  name: {tiny_model_dir}\ndata:\n  train: {sft_file}\n")
    code, out, err = run(capsys, "train", str(cfg), "optim.lr=abc", "model.name=")
    assert code == 2
    assert "optim.lr (command line: optim.lr=abc): should be a valid number" in err
    assert "model.name (command line: model.name=): String should have at least 1 character" in err


def test_a_reward_flag_is_named_as_the_flag(capsys, lora_run, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "add 1 2", "answer": "3"}) + "\n")
    code, out, err = run(capsys, "evaluate", "--model", str(lora_run), "--data", str(rows), "--reward", "exact_match",
                         "--reward", "nosuch")  # fmt: skip
    assert code == 2 and "--reward #2: unknown reward 'nosuch'" in err and "algorithm.rewards" not in err


@pytest.mark.parametrize("flags, says", [
    (["--samples", "0", "--temperature", "0.3"], "--temperature is read only when the diagnosis draws samples"),
    (["--beta", "5"], "--beta is read only when the diagnosis ranks preference pairs (--pairs)"),
    (["--judge-threshold", "3"], "--judge-threshold is read only when the diagnosis has a --judge"),
])  # fmt: skip
def test_diagnose_refuses_flags_of_probes_that_do_not_run(capsys, flags, says):
    code, out, err = run(capsys, "diagnose", "--model", "/nonexistent", "--task", "arithmetic", *flags)
    assert code == 2 and says in err  # before the model is looked up


def test_a_bad_reward_spec_names_the_run_file_line_or_the_override(capsys, tiny_model_dir, tmp_path):
    """Reward specs are resolved after validation (a user file is imported then), before the model loads: the error
    still names the file and line that wrote the spec, or the override that gave it (eighteenth session)."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"add {a} 1"}) + "\n" for a in range(4)))
    run_file = tmp_path / "grpo.yaml"
    run_file.write_text(f"model:\n  name: {tiny_model_dir}\ndata:\n  train: {prompts}\nalgorithm:\n  name: grpo\n"
                        "  rewards:\n    - length_penalty\n    - {name: regex_format, wieght: 3}\n")  # fmt: skip
    run_dir = tmp_path / "run"
    code, out, err = run(capsys, "train", str(run_file), f"run.output_dir={run_dir}")
    assert code == 2 and "Traceback" not in err
    assert f"{run_file}:9: algorithm.rewards[1]: unknown key(s) wieght; allowed: name, weight, args, label" in err
    assert not run_dir.exists()
    code, out, err = run(capsys, "train", str(run_file), f"run.output_dir={run_dir}", "algorithm.rewards=[nope]")
    assert code == 2 and "algorithm.rewards[0] (command line: algorithm.rewards=[nope]): unknown reward 'nope'" in err
    assert not run_dir.exists()


def test_rows_longer_than_the_models_context_are_refused_before_the_run_folder(capsys, tiny_model_dir, tmp_path):
    """The tiny Llama has 512 positions: rows of ~700 tokens under data.max_length=4096 trained past them silently
    (a GPT-2's learned positions raised an index error instead; an audit, eighteenth session)."""
    from posttrain.config import ModelConfig
    from posttrain.models import load_tokenizer

    rows = tmp_path / "long.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": "a b " * 350}) + "\n" for i in range(3))
                    + json.dumps({"prompt": "q", "completion": "short"}) + "\n")  # fmt: skip
    tok = load_tokenizer(ModelConfig(name=str(tiny_model_dir)))
    assert len(tok("a b " * 350)["input_ids"]) > 512
    run_dir = tmp_path / "run"
    code, out, err = run(capsys, *_train(tiny_model_dir, rows, run_dir, "data.max_length=4096"))
    assert code == 2 and "Traceback" not in err
    assert (f"{rows}: 3 of 4 training rows are longer than the model's context of 512 positions (lines 1, 2 and 3), "
            "which data.max_length (4096) allows. Set data.max_length=512 or less") in err  # fmt: skip
    assert not run_dir.exists()
    code, out, err = run(capsys, *_train(tiny_model_dir, rows, run_dir, "data.max_length=512"))
    assert code == 0 and "3 of 4 rows are longer than max_length=512 tokens and were truncated" in out + err


def test_a_folder_that_is_no_run_but_holds_its_files_or_a_model_is_not_trained_into(capsys, tiny_model_dir, sft_file,
                                                                                    tmp_path):  # fmt: skip
    """A user's own report.md and metrics.jsonl were replaced by a run's, and a run into an adapter's folder
    replaced the adapter (an audit, nineteenth session). Other files are no reason to refuse."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("my notes")
    (mine / "metrics.jsonl").write_text("{}\n")
    code, out, err = run(capsys, *_train(tiny_model_dir, sft_file, mine))
    assert code == 2 and f"run.output_dir {mine} is not a run but holds metrics.jsonl, report.md" in err
    assert (mine / "report.md").read_text() == "my notes" and not (mine / "config.yaml").exists()
    code, out, err = run(capsys, *_train(tiny_model_dir, sft_file, tiny_model_dir))
    assert code == 2 and f"run.output_dir {tiny_model_dir} holds a saved model (config.json)" in err
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("kept")
    code, out, err = run(capsys, *_train(tiny_model_dir, sft_file, other))
    assert code == 0, err
    assert (other / "notes.txt").read_text() == "kept" and (other / "final").is_dir()


def test_answers_the_task_verifier_cannot_read_are_refused_before_the_model_loads(capsys, tmp_path):
    """`"answer": "five"` under --task arithmetic raised ValueError after every answer was generated, in evaluate,
    data pairs and diagnose (an audit, nineteenth session). The model path does not exist: the refusal comes first."""
    rows = tmp_path / "p.jsonl"
    rows.write_text('{"prompt": "q", "answer": 3}\n{"prompt": "r", "answer": "five"}\n')
    nothing = str(tmp_path / "no-model")
    for argv in (["evaluate", "--model", nothing, "--task", "arithmetic", "--data", str(rows)],
                 ["data", "pairs", "--model", nothing, "--task", "arithmetic", "--prompts", str(rows), "--out",
                  str(tmp_path / "pairs.jsonl")],
                 ["diagnose", "--model", nothing, "--task", "arithmetic", "--prompts", str(rows)]):  # fmt: skip
        code, out, err = run(capsys, *argv)
        assert code == 2 and "Traceback" not in err, err
        assert f"{rows}:2: answer: 'five' is not a number; --task arithmetic compares answers with it" in err, err


def test_a_missing_data_file_is_named_with_its_field_and_line(capsys, tiny_model_dir, tmp_path):
    """`train configs/sft_lora.yaml` from another folder said only `data/structured_train.jsonl: file not found`
    (an audit, nineteenth session): now with the field, its line and where a relative path is read from."""
    run_file = tmp_path / "run.yaml"
    run_file.write_text(f"model:\n  name: {tiny_model_dir}\ndata:\n  train: data/missing.jsonl\n", encoding="utf-8")
    code, out, err = run(capsys, "train", str(run_file), f"run.output_dir={tmp_path / 'run'}")
    assert code == 2 and f"{run_file}:4: data.train: data/missing.jsonl: file not found (a relative path is read " in err
    assert not (tmp_path / "run").exists()
    # an example config's held-out file, with your own data.train: how to do without it, in one step (setting
    # data.eval=null alone is refused next, run.eval_every then having nothing to evaluate)
    (tmp_path / "mine.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    run_file.write_text(f"model:\n  name: {tiny_model_dir}\ndata:\n  train: {tmp_path / 'mine.jsonl'}\n  eval: "
                        "data/heldout.jsonl\nrun:\n  eval_every: 5\n", encoding="utf-8")  # fmt: skip
    code, out, err = run(capsys, "train", str(run_file), f"run.output_dir={tmp_path / 'run'}")
    assert code == 2 and err.rstrip().endswith(
        "data/heldout.jsonl: file not found (a relative path is read from " + str(Path.cwd()) + "); to train without "
        "a held-out file, data.eval=null run.eval_every=null")  # fmt: skip
    code, out, err = run(capsys, "train", str(run_file), f"run.output_dir={tmp_path / 'run'}", "data.eval=null",
                         "run.eval_every=null", "run.max_steps=1", "run.progress=false", "optim.batch_size=1")  # fmt: skip
    assert code == 0, err


def test_rope_scaling_extends_the_context_the_rows_are_checked_against(capsys, tiny_model_dir, tmp_path):
    """YaRN x2 over the tiny Llama's 512 trained positions (`rope_parameters` naming the original length, as
    Qwen2.5's long-context config does) places 1024: the ~700-token rows refused above train whole, and a row
    past 1024 is still refused, against that 1024."""
    import shutil

    scaled = tmp_path / "yarn"
    shutil.copytree(tiny_model_dir, scaled)
    config = json.loads((scaled / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 512,
                                 "rope_theta": 10000.0}  # fmt: skip
    (scaled / "config.json").write_text(json.dumps(config))
    rows = tmp_path / "long.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": "a b " * 175}) + "\n" for i in range(4)))
    code, out, err = run(capsys, *_train(scaled, rows, tmp_path / "run", "data.max_length=1024"))
    assert code == 0, err
    assert "truncated" not in out + err and "context" not in out + err
    longer = tmp_path / "longer.jsonl"
    longer.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": "a b " * (175 + 150 * (i == 3))}) + "\n"
                              for i in range(4)))  # fmt: skip
    code, out, err = run(capsys, *_train(scaled, longer, tmp_path / "run2", "data.max_length=2048"))
    assert code == 2 and "1 of 4 training rows are longer than the model's context of 1024 positions (line 4)" in err


def test_pairs_without_a_margin_are_said_when_the_run_uses_margins(capsys, tiny_model_dir, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "yes", "rejected": "no",
                                         **({"margin": 1.0} if i % 2 else {})}) + "\n" for i in range(4)))  # fmt: skip
    code, out, err = run(capsys, "train", f"model.name={tiny_model_dir}", "technique.name=lora", "algorithm.name=reward",
                         "algorithm.margin=true", f"data.train={pairs}", "optim.batch_size=2", "run.max_steps=1",
                         f"run.output_dir={tmp_path / 'run'}", "run.progress=false")  # fmt: skip
    assert code == 0, err
    assert f"{pairs}: 2 of 4 pairs have no `margin` (lines 1 and 3): their margin is 0 in the loss" in out + err


def test_chat_template_kwargs_are_checked_before_the_model_loads_and_kept_by_the_saved_tokenizer(
        capsys, tiny_model_dir, sft_file, tmp_path):  # fmt: skip
    """`data.chat_template_kwargs` with a name the template never mentions is refused before anything is written;
    the corrected run trains, and its final/ tokenizer renders with the variable as training did."""
    from transformers import AutoTokenizer

    from posttrain.models.generation import render_prompt

    model = tmp_path / "qwen3ish"
    shutil.copytree(tiny_model_dir, model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% if enable_thinking is false %}{{ '<think></think>' }}"
        "{% endif %}{% endif %}"
    )
    tok.save_pretrained(model)
    run_dir = tmp_path / "run"
    code, out, err = run(capsys, *_train(model, sft_file, run_dir, "data.chat_template_kwargs.enable_thinkng=false"))
    assert code == 2 and "Traceback" not in err, err
    assert "data.chat_template_kwargs: the model's chat template never mentions enable_thinkng" in err
    assert not run_dir.exists()
    code, out, err = run(capsys, *_train(model, sft_file, run_dir, "data.chat_template_kwargs.enable_thinking=false"))
    assert code == 0, err
    saved = AutoTokenizer.from_pretrained(run_dir / "final")
    assert render_prompt(saved, "hi") == "user: hi\nassistant: <think></think>"


def test_template_vars_reach_the_prompt_of_a_base_model_and_a_misspelt_one_is_refused(capsys, tiny_model_dir,
                                                                                     tmp_path):  # fmt: skip
    """`--template-var` (generate, evaluate, diagnose, data pairs): a base model's template gets the values a run
    sets with data.chat_template_kwargs, so a base and its fine-tune are scored on one prompt format."""
    from transformers import AutoTokenizer

    from posttrain.evaluation import load_for_inference
    from posttrain.models.generation import render_prompt

    model = tmp_path / "qwen3ish"
    shutil.copytree(tiny_model_dir, model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ 'assistant: ' }}{% if enable_thinking is false %}"
                         "{{ '<think></think>' }}{% endif %}{% endif %}")  # fmt: skip
    tok.save_pretrained(model)
    _, loaded = load_for_inference(str(model), {"enable_thinking": False})
    assert render_prompt(loaded, "hi") == "user: hi\nassistant: <think></think>"
    base = ["generate", "--model", str(model), "--prompt", "hi", "--max-new-tokens", "2"]
    code, out, err = run(capsys, *base, "--template-var", "enable_thinking=false")
    assert code == 0, err
    code, out, err = run(capsys, *base, "--template-var", "enable_thinkng=false")
    assert code == 2 and "Traceback" not in err
    assert "--template-var: the model's chat template never mentions enable_thinkng" in err
    code, out, err = run(capsys, *base, "--template-var", "enable_thinking")
    assert code == 2 and "must be NAME=VALUE" in err
