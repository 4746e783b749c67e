"""`posttrain advise` in-process: profile files, flags, --data shape detection, --interactive, --write-config."""

import argparse
import json

import pytest
import yaml

from posttrain.advisor.datafile import summarise
from posttrain.advisor.profile import KEYS, ask, load_profile
from posttrain.algorithms import load_config
from posttrain.cli.advise import add_parser
from posttrain.errors import UserError


def run_cli(argv, capsys):
    p = argparse.ArgumentParser()
    add_parser(p.add_subparsers())
    args = p.parse_args(["advise", *argv])
    rc = args.func(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture()
def profile_file(tmp_path):
    path = tmp_path / "profile.yaml"
    path.write_text(
        "task: Extract invoice fields as JSON\ndemonstrations: 3000\nmodel: 7b\ngpu_memory_gb: 24\n"
    )
    return path


def test_json_output(profile_file, capsys):
    rc, out, _ = run_cli(["--profile", str(profile_file), "--json"], capsys)
    assert rc == 0
    data = json.loads(out)
    assert data["pipeline"] == ["sft"] and data["technique"] == "lora"
    for key in ("reasons", "alternatives", "estimate", "config", "risks", "would_change", "assumptions"):
        assert key in data
    assert data["estimate"]["peak_memory_gb"] <= 24


def test_flags_override_the_profile_file(profile_file, capsys):
    rc, out, _ = run_cli(
        ["--profile", str(profile_file), "--gpu", "H100-80GB", "--gpus", "8", "--json"], capsys
    )
    assert rc == 0 and json.loads(out)["technique"] == "full"


def test_write_config_is_loadable_by_train(profile_file, tmp_path, capsys):
    target = tmp_path / "sft.yaml"
    rc, out, _ = run_cli(["--profile", str(profile_file), "--write-config", str(target)], capsys)
    assert rc == 0 and f"wrote {target}" in out
    cfg = load_config(target)
    assert cfg.technique.name == "lora" and cfg.algorithm.name == "sft"


def test_write_config_replaces_only_what_advise_wrote(profile_file, tmp_path, capsys):
    """--write-config over the user's own run config replaced it, saying only "wrote" (an audit, nineteenth
    session); a config an earlier advise wrote is replaced."""
    mine = tmp_path / "mine.yaml"
    mine.write_text("optim:\n  lr: 0.1\n", encoding="utf-8")
    rc, out, err = run_cli(["--profile", str(profile_file), "--write-config", str(mine)], capsys)
    assert rc == 2 and f"--write-config: {mine} exists and was not written by posttrain advise" in err
    assert mine.read_text(encoding="utf-8") == "optim:\n  lr: 0.1\n"
    target = tmp_path / "sft.yaml"
    for _ in range(2):
        rc, out, _ = run_cli(["--profile", str(profile_file), "--write-config", str(target)], capsys)
        assert rc == 0 and f"wrote {target}" in out


def test_write_config_writes_every_stage(tmp_path, capsys):
    argv = [
        "--demonstrations",
        "500",
        "--preference-pairs",
        "4000",
        "--quality",
        "subjective",
        "--model",
        "135m",
    ]
    rc, _, _ = run_cli(argv + ["--write-config", str(tmp_path / "run.yaml")], capsys)
    assert rc == 0
    second = yaml.safe_load((tmp_path / "run-2-dpo.yaml").read_text())
    assert second["algorithm"]["name"] == "dpo"
    assert load_config(tmp_path / "run.yaml").algorithm.name == "sft"


@pytest.mark.parametrize(
    "text, fragment",
    [
        (
            "demonstrations: 10\nverifable: true\n",
            "profile.yaml:2: verifable: unknown profile key (did you mean verifiable?)",
        ),
        ("demonstrations: lots\n", "profile.yaml:1: demonstrations: must be a number"),
        ("demonstrations: 10\nmulti_step: maybe\n", "profile.yaml:2: multi_step: must be true or false"),
        ("- demonstrations: 10\n", "profile.yaml: a profile is a flat mapping"),
        ("demonstrations: [1, 2\n", "profile.yaml:2: not valid YAML"),
        ("demonstrations: 10\nverifiable: true\ndemonstrations: 100\n",
         "profile.yaml:3: demonstrations is given twice (lines 1 and 3)"),
        ("demonstrations: 10\nverifiable: true\nprompts: {n: 3}\n", "profile.yaml:3: prompts: profiles are flat"),
        ("demonstrations: 10\nverifiable: \xff\n", "profile.yaml: not UTF-8 text"),
    ],
)
def test_bad_profile_file(tmp_path, text, fragment, capsys):
    path = tmp_path / "profile.yaml"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(UserError) as err:
        load_profile(path)
    assert fragment in str(err.value)
    rc, _, errout = run_cli(["--profile", str(path)], capsys)
    assert rc == 2 and fragment in errout and "Traceback" not in errout


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_data_shapes(tmp_path):
    sft = write_jsonl(tmp_path / "a.jsonl", [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"}]}] * 3)  # fmt: skip
    s = summarise(sft)
    assert (s.shape, s.rows, s.max_chars) == ("sft", 3, 8)
    pairs = tmp_path / "b.csv"
    pairs.write_text("prompt,chosen,rejected\nabcd,efgh,ij\nab,cdefgh,z\n")
    s = summarise(pairs)
    assert (s.shape, s.rows) == ("preference", 2)
    assert s.mean_chars == (8 + 8) / 2 and s.mean_tokens == 4 / 2  # prompt + longer answer; chars / 4
    prompts = tmp_path / "c.json"
    prompts.write_text(json.dumps([{"prompt": "2+2?", "answer": "4"}, {"prompt": "3+3?", "answer": "6"}]))
    assert summarise(prompts).shape == "prompts"
    text = write_jsonl(tmp_path / "d.jsonl", [{"text": "x" * 40}, {"prompt": "p", "completion": "c"}])
    assert summarise(text).shape == "sft"


@pytest.mark.parametrize(
    "content, suffix, fragment",
    [
        ('{"prompt": "a"}\n{"prompt": \n', ".jsonl", "bad.jsonl:2: malformed JSON"),
        ('{"prompt": "a"}\n{"question": "b"}\n', ".jsonl", "bad.jsonl:2: cannot tell the row's shape"),
        (
            '{"prompt": "a"}\n{"prompt": "a", "chosen": "b", "rejected": "c"}\n',
            ".jsonl",
            "bad.jsonl:2: a preference row",
        ),
        ("prompt,chosen\nx,y,z\n", ".csv", "bad.csv:2: 3 cells, but the header has 2"),
        ('{"prompt": "a"}', ".json", "expected a JSON list of objects"),
        ("", ".jsonl", "bad.jsonl: file is empty"),
        ("a", ".parquet", "bad.parquet: not a readable Parquet file"),
        ("a", ".txt", "unsupported file type '.txt'"),
    ],
)
def test_bad_data_files(tmp_path, content, suffix, fragment):
    path = tmp_path / f"bad{suffix}"
    path.write_text(content)
    with pytest.raises(UserError) as err:
        summarise(path)
    assert fragment in str(err.value)


def test_data_fills_the_profile(tmp_path, capsys):
    rows = [{"prompt": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(250)]
    data = write_jsonl(tmp_path / "math.jsonl", rows)
    rc, out, _ = run_cli(
        ["--data", str(data), "--verifiable", "true", "--model", "qwen2.5-0.5b", "--json"], capsys
    )
    assert rc == 0
    a = json.loads(out)
    assert a["pipeline"] == ["grpo"] and a["profile"]["prompts"] == 250
    assert a["data"]["shape"] == "prompts" and a["config"]["data"]["train"] == str(data)
    assert any("250 prompts exist" in r for r in a["reasons"])


def test_interactive_asks_one_question_at_a_time(monkeypatch, capsys):
    answers = {"demonstrations": "1,200", "quality": "nice", "model": "qwen2.5-0.5b"}
    asked = []

    def fake_input(prompt):
        key = next(k for k in KEYS if prompt.startswith(k.question))
        asked.append(key.name)
        if key.name == "quality" and asked.count("quality") % 2 == 0:
            return "objective"  # the first answer was refused and the question asked again
        return answers.get(key.name, "")

    monkeypatch.setattr("builtins.input", fake_input)
    p = ask()
    assert (p.demonstrations, p.quality, p.model) == (1200, "objective", "qwen2.5-0.5b")
    assert asked.count("quality") == 2 and len(asked) == len(KEYS) + 1
    asked.clear()
    rc, out, _ = run_cli(["--interactive"], capsys)
    assert rc == 0 and "Recommendation: sft, technique full" in out


SFT_ROWS = [
    {"messages": [{"role": "user", "content": "q" * i}, {"role": "assistant", "content": "a" * (2 * i)}]}
    for i in range(1, 41)
]


def _write_every_format(tmp_path, rows):
    """The same rows as JSONL, JSON, CSV (messages as a JSON cell), Parquet and a `datasets` folder."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = [
        write_jsonl(tmp_path / "d.jsonl", rows),
        tmp_path / "d.json",
        tmp_path / "d.csv",
        tmp_path / "d.parquet",
    ]
    paths[1].write_text(json.dumps(rows, indent=1))
    paths[2].write_text(
        "messages\n" + "".join('"' + json.dumps(r["messages"]).replace('"', '""') + '"\n' for r in rows)
    )
    pq.write_table(pa.Table.from_pylist(rows), paths[3])
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "d_dataset"))
    return paths + [tmp_path / "d_dataset"]


def test_data_reads_every_format_data_validate_reads(tmp_path, capsys):
    """advise --data goes through posttrain.data's readers: JSONL, JSON, CSV, Parquet and datasets folders give
    the same summary (40 SFT rows of 3 i characters, i = 1..40: mean 61.5, max 120)."""
    for path in _write_every_format(tmp_path, SFT_ROWS):
        s = summarise(path)
        assert (s.shape, s.rows, s.mean_chars, s.max_chars) == ("sft", 40, 61.5, 120), path
        rc, out, _ = run_cli(["--data", str(path), "--model", "135m", "--json"], capsys)
        a = json.loads(out)
        assert rc == 0 and a["profile"]["demonstrations"] == 40 and a["config"]["data"]["train"] == str(path)


def test_data_rejects_what_data_validate_rejects(tmp_path, capsys):
    """A pair without its rejected side: the same `FILE:LINE: field: message` as `posttrain data validate`."""
    from posttrain.cli import main

    bad = tmp_path / "pairs.csv"
    bad.write_text("prompt,chosen,rejected\nabcd,efgh,ij\nab,cdefgh,\n")
    rc, _, err = run_cli(["--data", str(bad)], capsys)
    assert rc == 2 and f"{bad}:3: rejected: missing required field" in err
    assert main(["data", "validate", str(bad), "--kind", "preference"]) == 2
    assert f"{bad}:3: rejected: missing required field" in capsys.readouterr().err


@pytest.mark.parametrize("argv, says", [
    (["--gpu", "H100-80GB", "--gpu-memory-gb", "8"], "the command line: gpu (H100-80GB) and gpu_memory_gb (8) both"),
    (["--avg-tokens", "5000", "--seq-len", "100"], "avg_tokens (5000) is more than seq_len (100)"),
])  # fmt: skip
def test_answers_that_contradict_each_other_are_refused(capsys, argv, says):
    """They were planned for silently: --gpu dropped for a custom 8 GB GPU; an average longer than the maximum."""
    rc, _, err = run_cli(["--demonstrations", "100", *argv], capsys)
    assert rc == 2 and says in err and "Traceback" not in err


def test_a_gpu_in_the_profile_file_and_one_in_the_flags_is_not_a_contradiction(profile_file, tmp_path, capsys):
    """The flag wins, however the file named the GPU; the same file naming two GPUs is refused."""
    rc, out, _ = run_cli(["--profile", str(profile_file), "--gpu-memory-gb", "80", "--json"], capsys)
    assert rc == 0
    both = tmp_path / "both.yaml"
    both.write_text("demonstrations: 100\ngpu: H100-80GB\ngpu_memory_gb: 24\n")
    rc, _, err = run_cli(["--profile", str(both)], capsys)
    assert rc == 2 and f"{both}: gpu (H100-80GB) and gpu_memory_gb (24) both name the GPU" in err


def test_advise_reads_a_file_in_its_own_column_names_and_its_configs_carry_them(tmp_path, capsys):
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"a{i}", "source": "s"}) + "\n"
                            for i in range(40)))  # fmt: skip
    rc, _, err = run_cli(["--data", str(data), "--model", "135m"], capsys)
    assert rc == 2 and "read them with --column prompt=question --column completion=answer (docs/data.md)" in err
    target = tmp_path / "run.yaml"
    rc, out, err = run_cli(["--data", str(data), "--model", "135m", "--column", "prompt=question", "--column",
                            "completion=answer", "--ignore-column", "source", "--write-config", str(target)],
                           capsys)  # fmt: skip
    assert rc == 0, err
    cfg = yaml.safe_load(target.read_text())
    assert cfg["data"]["columns"] == {"prompt": "question", "completion": "answer"}
    assert cfg["data"]["ignore_columns"] == ["source"]
    # the written config loads and reads the file: every row becomes a training row
    from posttrain.data import load_rows
    from posttrain.data.columns import run_columns

    assert len(load_rows(data, "sft", run_columns(load_config(target)))) == 40
    # a rename into a field the detected kind does not read, and --column without --data, are refused
    rc, _, err = run_cli(["--data", str(data), "--model", "135m", "--column", "prompt=question", "--column",
                          "completion=answer", "--column", "chosen=source"], capsys)  # fmt: skip
    assert rc == 2
    assert f"{data} holds preference rows: --column: 'completion' is not a field of preference rows" in err
    rc, _, err = run_cli(["--model", "135m", "--column", "prompt=question"], capsys)
    assert rc == 2 and "no file is read: give one with --data FILE" in err


def test_a_small_file_gets_a_batch_its_rows_can_fill(tmp_path, capsys):
    """An 8-row file got optim.batch_size 32, which `train` then refused (fewer rows than a step): a
    user-journey audit, twenty-third session."""
    data = tmp_path / "small.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(6)))
    target = tmp_path / "run.yaml"
    rc, out, _ = run_cli(["--data", str(data), "--model", "135m", "--gpu-memory-gb", "24", "--write-config",
                          str(target)], capsys)  # fmt: skip
    assert rc == 0
    cfg = load_config(target)
    assert cfg.optim.batch_size == 4 and cfg.optim.batch_size % cfg.optim.micro_batch_size == 0
    assert "optim.batch_size 4, not" in out and "the file has 6 rows" in out
    # 3 GPUs: a step they split (4, a power of two, did not: `train` refused it), each share whole micro-batches
    rc, _, _ = run_cli(["--data", str(data), "--model", "135m", "--gpu-memory-gb", "24", "--gpus", "3",
                        "--write-config", str(target)], capsys)  # fmt: skip
    cfg = load_config(target)
    assert rc == 0 and cfg.optim.batch_size == 6 and (cfg.optim.batch_size // 3) % cfg.optim.micro_batch_size == 0
    # fewer rows than GPUs: no batch splits, so no config is written (it was, with batch 32 and a note)
    rc, _, err = run_cli(["--data", str(data), "--model", "135m", "--gpu-memory-gb", "24", "--gpus", "8"], capsys)
    assert rc == 2 and f"{data} has 6 rows, fewer than the 8 GPUs need for a sft step of one row each" in err


def test_verifiable_demonstrations_count_as_rl_prompts(tmp_path, capsys):
    """1,200 GSM8K-style rows with --verifiable true were advised SFT alone, beside 'prompts not stated: assuming
    none' and 'if a program could check answers on 1,000+ prompts: sft -> grpo' (a user-journey audit)."""
    data = tmp_path / "gsm.jsonl"
    data.write_text("".join(json.dumps({"question": f"{i} + 3?", "answer": f"{i}+3={i + 3}\n#### {i + 3}"}) + "\n"
                            for i in range(1200)))  # fmt: skip
    argv = ["--data", str(data), "--column", "prompt=question", "--column", "completion=answer", "--model", "135m",
            "--gpu-memory-gb", "24", "--json"]  # fmt: skip
    rc, out, _ = run_cli([*argv, "--verifiable", "true"], capsys)
    doc = json.loads(out)
    assert rc == 0 and doc["pipeline"] == ["sft", "grpo"]
    assert any("serve as RL prompts too" in a for a in doc["assumptions"])
    rc, out, _ = run_cli(argv, capsys)  # not said to be verifiable: the rows are demonstrations only
    assert json.loads(out)["pipeline"] == ["sft"]


def test_a_135m_size_writes_the_embedded_model_that_loads_offline():
    """`--model 135m` wrote HuggingFaceTB/SmolLM2-135M, which fails offline beside the embedded model."""
    from posttrain.advisor.configs import config_model_name

    name, note = config_model_name("135m")
    assert name == "smollm2-135m-instruct" and "dequantised 4-bit copy, loaded offline" in note
    assert config_model_name("7b")[0] == "mistralai/Mistral-7B-v0.1"


def test_a_small_file_is_said_to_make_few_optimiser_steps(tmp_path, capsys):
    """A 40-row SFT file made a config of 2 epochs at batch 32: 4 optimiser steps at lr 2e-5, said nowhere."""
    data = write_jsonl(tmp_path / "small.jsonl", SFT_ROWS)
    rc, out, _ = run_cli(["--data", str(data), "--model", "135m", "--gpu-memory-gb", "24", "--json"], capsys)
    a = json.loads(out)
    steps = -(-40 // a["config"]["optim"]["batch_size"]) * 2
    assert rc == 0 and a["config"]["run"]["epochs"] == 2.0 and steps < 30
    assert any(n.startswith(f"sft: the file's 40 rows make {steps} optimiser steps") for n in a["assumptions"])
    big = write_jsonl(tmp_path / "big.jsonl", SFT_ROWS * 25)  # 1,000 rows: 32 batches of 32 an epoch
    rc, out, _ = run_cli(["--data", str(big), "--model", "135m", "--gpu-memory-gb", "24", "--json"], capsys)
    assert rc == 0 and not any("optimiser steps" in n for n in json.loads(out)["assumptions"])
