"""On-policy pairs with the tiny model, and `posttrain data make/pairs/validate` for preference data in-process."""

import json

import pytest

import posttrain.models
import posttrain.rollout.pairs
from posttrain.cli import main
from posttrain.data import load_rows, make_prompts, write_jsonl
from posttrain.rollout.pairs import onpolicy_pairs, pick_pair


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def by_length(prompts, completions, rows):
    """A toy scorer: longer is better."""
    return [float(len(c)) for c in completions]


def loud_eos(model, scale: float):
    """A copy of the tiny model whose EOS (id 2) logit is scaled: its samples end at different steps."""
    import copy

    import torch

    model = copy.deepcopy(model)
    with torch.no_grad():
        model.lm_head.weight[2] *= scale
    return model


def test_generate_says_which_answers_ended():
    """`generate(finished=...)` marks an answer that ended (EOS, or a stop string) True, one cut at max_new_tokens
    False: `data pairs` never makes a cut answer a side of a pair (DPO would score an end-of-turn token the model
    did not write there)."""
    from posttrain.models import generate
    from posttrain.testing import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model(len(tok)).eval()
    flags: list[bool] = []
    texts = generate(loud_eos(model, 25), tok, ["hi", "hello"] * 4, max_new_tokens=12, temperature=1.0, seed=0,
                     finished=flags)  # fmt: skip
    assert len(flags) == len(texts) == 8 and True in flags and False in flags
    never = []
    generate(loud_eos(model, -25), tok, ["hi", "hello"], max_new_tokens=5, temperature=1.0, seed=0, finished=never)
    assert never == [False, False]
    stopped = []
    generate(loud_eos(model, -25), tok, ["hi"], max_new_tokens=40, temperature=1.0, seed=0, stop=["a"],
             finished=stopped)  # fmt: skip
    assert stopped in ([True], [False])  # a stop string seen ends the answer; none in 40 bytes leaves it cut


def test_a_resumed_call_makes_the_pairs_one_uninterrupted_call_makes(tiny_model, tiny_tokenizer):
    """Resumed, the rows left were sampled in new groups with new seeds (group b of what was left got seed + b):
    another set of pairs than one call gives, drawn again for the prompts that had given none."""
    model = loud_eos(tiny_model, 25)  # answers of several lengths: pairs by length
    rows = [{"id": i, "prompt": f"say {i}", "answer": i} for i in range(6)]
    settings = dict(n=4, scorer=by_length, max_new_tokens=16, temperature=1.0, seed=3, batch_size=8, progress=False)
    skipped: list = []
    whole, _ = onpolicy_pairs(model, tiny_tokenizer, rows, on_skip=lambda row, why: skipped.append(row["id"]),
                              **settings)  # fmt: skip
    assert len(whole) >= 2
    for cut in (1, 3, 4):  # interrupted after `cut` prompts (inside a group of two prompts, or between groups)
        done = {r["id"] for r in rows[:cut]}
        resumed, stats = onpolicy_pairs(model, tiny_tokenizer, rows, done=done, **settings)
        assert resumed == [p for p in whole if p["id"] not in done], cut
        assert stats["prompts"] == len(rows) - cut


def test_onpolicy_pairs_keep_best_and_worst(tiny_model, tiny_tokenizer, tmp_path):
    rows = [{"id": i, "prompt": f"say {i}", "answer": i} for i in range(5)]
    seen = []
    model = loud_eos(tiny_model, 35)  # samples that end (EOS) within 10 tokens, and samples that do not
    pairs, stats = onpolicy_pairs(
        model, tiny_tokenizer, rows, n=4, scorer=by_length, max_new_tokens=10, seed=1, batch_size=8,
        progress=False, on_pair=seen.append,
    )  # fmt: skip
    assert seen == pairs
    assert stats["prompts"] == 5 and stats["kept"] == len(pairs) > 0 and 0 < stats["cut"] < 20
    assert stats["kept"] + stats["skipped_equal"] + stats["skipped_empty"] == 5
    for p in pairs:
        m = p["metadata"]
        assert len(m["scores"]) == 4
        assert m["chosen_score"] == len(p["chosen"]) > m["rejected_score"] == len(p["rejected"]) > 0
        assert m["chosen_score"] == max(s for s, ended in zip(m["scores"], m["finished"]) if ended)
        assert p["answer"] == p["id"] and p["prompt"] == f"say {p['id']}"
    assert stats["mean_best"] >= stats["mean_worst"]
    # The rows are valid preference data, ids and answers kept.
    loaded = load_rows(write_jsonl(pairs, tmp_path / "pairs.jsonl"), "preference")
    assert [r["id"] for r in loaded] == [p["id"] for p in pairs]
    # Repeatable for equal inputs.
    again, _ = onpolicy_pairs(model, tiny_tokenizer, rows, n=4, scorer=by_length, max_new_tokens=10, seed=1,
                              batch_size=8, progress=False)  # fmt: skip
    assert again == pairs


def test_equal_scores_keep_nothing(tiny_model, tiny_tokenizer):
    rows = [{"prompt": "hi"}, {"prompt": "ho"}]
    constant = lambda prompts, completions, rows: [0.5] * len(completions)  # noqa: E731
    pairs, stats = onpolicy_pairs(tiny_model, tiny_tokenizer, rows, n=3, scorer=constant, max_new_tokens=4,
                                  progress=False)  # fmt: skip
    assert pairs == [] and stats["kept"] == 0 and stats["prompts"] == 2
    with pytest.raises(ValueError, match="at least 2"):
        onpolicy_pairs(tiny_model, tiny_tokenizer, rows, n=1, scorer=constant, max_new_tokens=4)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        onpolicy_pairs(
            tiny_model, tiny_tokenizer, rows, n=2, scorer=constant, max_new_tokens=4, temperature=0
        )


def test_pick_pair_ties_go_to_the_first_sample_and_empties_are_left_out():
    row = {"id": "a", "prompt": "q", "answer": 1, "metadata": {"task": "t"}}
    pair, why = pick_pair(row, ["x", "y", "", "z", "w"], [0.0, 1.0, -5.0, 1.0, 0.0])
    assert why is None and (pair["chosen"], pair["rejected"]) == ("y", "x")
    assert pair["metadata"] == {"task": "t", "chosen_score": 1.0, "rejected_score": 0.0,
                                "scores": [0.0, 1.0, -5.0, 1.0, 0.0]}  # fmt: skip
    assert pick_pair(row, ["x", "", " "], [1.0, 0.0, 0.0]) == (None, "skipped_empty")
    assert pick_pair(row, ["x", "x"], [1.0, 0.0]) == (None, "skipped_equal")  # equal texts make no pair


def fake_generate(calls):
    """Stands in for `models.generate`: the i-th sample of a prompt answers 10 + i (arithmetic-scorable)."""

    def generate(model, tokenizer, prompts, **kwargs):
        calls.append(len(prompts))
        out, count = [], {}
        for p in prompts:
            i = count[p] = count.get(p, -1) + 1
            out.append(f"Answer: {10 + i}")
        if kwargs.get("finished") is not None:  # every answer ended (none cut at max_new_tokens)
            kwargs["finished"][:] = [True] * len(out)
        return out

    return generate


def write_prompts(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_cli_pairs_with_a_task_write_resume_and_validate(capsys, tiny_model_dir, tmp_path, monkeypatch):
    prompts = write_prompts(tmp_path / "prompts.jsonl", [
        {"id": "a", "prompt": "q1", "answer": 11},
        {"id": "b", "prompt": "q2", "answer": 12},
        {"prompt": "q3", "answer": 99},  # every sample wrong: no pair; gets an id made of its prompt and answer
    ])  # fmt: skip
    out = tmp_path / "out" / "pairs.jsonl"
    calls = []
    monkeypatch.setattr(posttrain.rollout.pairs, "generate", fake_generate(calls))
    args = ["data", "pairs", "--model", tiny_model_dir, "--prompts", prompts, "--task", "arithmetic", "--n", 3,
            "--out", out, "--no-progress", "--limit", 2]  # fmt: skip
    code, stdout, err = run(capsys, *args)
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"], r["chosen"], r["rejected"], r["answer"]) for r in rows] == [
        ("a", "Answer: 11", "Answer: 10", 11),
        ("b", "Answer: 12", "Answer: 10", 12),
    ]
    assert "wrote 2 pairs from 2 prompts" in stdout
    code, stdout, _ = run(capsys, "data", "validate", out, "--kind", "preference")
    assert code == 0 and "2 preference rows OK" in stdout

    # A re-run skips the ids already written, and appends only new pairs. The three prompts are one group of the
    # sampler (16 // 3 prompts a call), as in a run of all three at once: it is sampled again with the same seed,
    # so q3 gets the samples one uninterrupted run would have given it.
    calls.clear()
    code, stdout, err = run(capsys, *args[:-2])  # no --limit: all 3 prompts
    assert code == 0, err
    assert "2 of 3 prompts were done there already" in stdout
    assert calls == [9]
    assert "wrote 0 pairs from 1 prompts" in stdout and "1 skipped: all 3 samples scored the same" in stdout
    assert len(out.read_text().splitlines()) == 2
    # q3 gave no pair, and that is recorded: the same command again samples nothing and adds nothing (each re-run of
    # a finished job drew the prompts without a pair again, and kept the pairs their luckier draws gave)
    [skipped] = [json.loads(line)["id"] for line in (out.parent / ".pairs.jsonl.skipped").read_text().splitlines()]
    assert skipped.startswith("prompt-")
    calls.clear()
    code, stdout, err = run(capsys, *args[:-2])
    assert code == 0 and "nothing to do" in stdout and calls == [] and len(out.read_text().splitlines()) == 2
    # Pairs made otherwise (another model, or the same name with other weights: the next round's policy; other
    # sampling settings; another scorer) are refused: their prompts counted as done by id, whatever made them.
    code, _, err = run(capsys, *args[:-2], "--temperature", "0.5")
    assert code == 2 and "holds pairs made otherwise (temperature: 1.0 -> 0.5)" in err
    # another file of as many rows without ids is other prompts (ids were line-N: any such file was "done")
    other = write_prompts(tmp_path / "other.jsonl", [{"prompt": "q4", "answer": 4}, {"prompt": "q5", "answer": 5},
                                                     {"prompt": "q6", "answer": 6}])  # fmt: skip
    calls.clear()
    code, stdout, err = run(capsys, *[other if a == prompts else a for a in args[:-2]])
    assert code == 0 and "were done there already" not in stdout and calls == [9]

    # A line cut short by an interrupt is dropped, and its prompt is done again.
    out.write_text(out.read_text() + '{"id": "c", "prompt": "q', encoding="utf-8")
    code, stdout, err = run(capsys, *args)
    assert code == 0 and "nothing to do" in stdout
    assert out.read_text().count("\n") == 2 and out.read_text().endswith("\n")


def test_cli_pairs_on_the_tiny_model(capsys, tiny_model_dir, tmp_path):
    prompts = write_jsonl(make_prompts("arithmetic", 2), tmp_path / "prompts.jsonl")
    out = tmp_path / "pairs.jsonl"
    code, stdout, err = run(capsys, "data", "pairs", "--model", tiny_model_dir, "--prompts", prompts, "--task",
                            "arithmetic", "--n", 2, "--max-new-tokens", 4, "--out", out, "--no-progress")  # fmt: skip
    assert code == 0, err
    assert "from 2 prompts" in stdout and "mean best score" in stdout
    assert out.exists()  # a random model is never right: likely no pairs, but the file is there to resume


def test_cli_pairs_errors_exit_2_without_traceback(capsys, tmp_path):
    out = tmp_path / "pairs.jsonl"
    base = ["data", "pairs", "--model", tmp_path / "no-model", "--out", out]
    code, _, err = run(capsys, *base, "--prompts", tmp_path / "missing.jsonl", "--task", "arithmetic")
    assert code == 2 and "missing.jsonl" in err and "Traceback" not in err

    good = write_prompts(tmp_path / "p.jsonl", [{"prompt": "q", "answer": 1}])
    code, _, err = run(capsys, *base, "--prompts", good, "--task", "nosuch")
    assert code == 2 and "unknown task 'nosuch'" in err and "arithmetic" in err

    no_answer = write_prompts(tmp_path / "na.jsonl", [{"prompt": "q", "answer": 1}, {"prompt": "r", "id": 7}])
    code, _, err = run(capsys, *base, "--prompts", no_answer, "--task", "arithmetic")
    assert code == 2 and f"{no_answer}:2: answer: missing: --task arithmetic scores" in err

    dup = write_prompts(tmp_path / "dup.jsonl", [{"prompt": "q", "answer": 1, "id": 1}] * 2)
    code, _, err = run(capsys, *base, "--prompts", dup, "--task", "arithmetic")
    assert code == 2 and f"{dup}:2: id: repeats the id of line 1" in err

    bad = write_prompts(tmp_path / "bad.jsonl", [{"prompt": ""}, {"question": "q"}])
    code, _, err = run(capsys, *base, "--prompts", bad, "--task", "arithmetic")
    assert code == 2 and f"{bad}:1: prompt" in err and f"{bad}:2:" in err

    for flags, msg in (((("--n", 1)), "--n must be at least 2"),
                       (("--temperature", 0), "argument --temperature: must be > 0, got 0"),
                       (("--limit", 0), "argument --limit: must be a whole number > 0, got 0")):  # fmt: skip
        code, _, err = run(capsys, *base, "--prompts", good, "--task", "arithmetic", *flags)
        assert code == 2 and msg in err

    out.write_text("not json\n")
    code, _, err = run(capsys, *base, "--prompts", good, "--task", "arithmetic")
    assert code == 2 and f"{out}:1: not a pair with an `id`" in err

    # A missing model is a clear error too (after the cheap checks).
    out.unlink()
    code, _, err = run(capsys, *base, "--prompts", good, "--task", "arithmetic")
    assert code == 2 and "no-model" in err and "Traceback" not in err


def test_cli_pairs_with_reward_functions(capsys, tiny_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("posttrain.rewards")
    prompts = write_prompts(tmp_path / "prompts.jsonl", [{"id": 1, "prompt": "q", "answer": 12}])
    monkeypatch.setattr(posttrain.rollout.pairs, "generate", fake_generate([]))
    out = tmp_path / "pairs.jsonl"
    base = [
        "data",
        "pairs",
        "--model",
        tiny_model_dir,
        "--prompts",
        prompts,
        "--n",
        4,
        "--out",
        out,
        "--no-progress",
    ]
    # numeric_answer: 1 for "Answer: 12" (the third sample); a length penalty in JSON form is added to it.
    code, stdout, err = run(capsys, *base, "--reward", "numeric_answer",
                            "--reward", '{"name": "regex_format", "weight": 0.5, "args": {"pattern": "Answer: 1[01]"}}')  # fmt: skip
    assert code == 0, err
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["metadata"]["scores"] == [0.5, 0.5, 1.0, 0.0]
    assert (row["chosen"], row["rejected"], row["answer"]) == ("Answer: 12", "Answer: 13", 12)
    code, _, err = run(capsys, *base, "--reward", "nosuch")
    assert code == 2 and "unknown reward 'nosuch'" in err and "Traceback" not in err


def test_cli_make_preference_and_prompts(capsys, tmp_path):
    for kind in ("preference", "prompts"):
        f = tmp_path / f"{kind}.jsonl"
        code, out, err = run(capsys, "data", "make", "arithmetic", "--n", 6, "--kind", kind, "--out", f)
        assert code == 0 and f"wrote 6 arithmetic {kind} rows" in out
        code, out, err = run(capsys, "data", "validate", f, "--kind", kind)
        assert code == 0 and f"6 {kind} rows OK" in out
    first = json.loads((tmp_path / "prompts.jsonl").read_text().splitlines()[0])
    assert set(first) == {"id", "prompt", "answer", "metadata"}
    code, out, _ = run(capsys, "data", "make", "structured", "--n", 2, "--out", tmp_path / "s.jsonl")
    assert code == 0 and "wrote 2 structured rows" in out  # sft stays the default


def test_cli_validate_checks_prompt_length_with_a_tokenizer(capsys, tiny_model_dir, tmp_path):
    f = write_prompts(tmp_path / "pairs.jsonl", [
        {"prompt": "short", "chosen": "a", "rejected": "b"},
        {"prompt": "x" * 100, "chosen": "a", "rejected": "b"},
    ])  # fmt: skip
    code, out, err = run(capsys, "data", "validate", f, "--kind", "preference", "--model", tiny_model_dir,
                         "--max-length", 64)  # fmt: skip
    assert code == 2 and f"{f}:2: prompt: prompt is 119 tokens, max_length is 64" in err
    code, out, err = run(capsys, "data", "validate", f, "--kind", "preference", "--model", tiny_model_dir,
                         "--max-length", 120)  # fmt: skip
    # the prompts fit; a row whose response is cut is named below, so "every row fits" would contradict it
    assert code == 0 and "2 preference rows OK" in out and "every row's prompt fits max_length=120" in out
    assert "were truncated (their ends are not scored: line 2)" in out
    code, out, err = run(capsys, "data", "validate", f, "--kind", "preference", "--max-length", 120)
    assert code == 2 and "--model and --max-length go together" in err


def test_the_making_record_refuses_only_what_changes_the_pairs(capsys, tiny_model_dir, tmp_path, monkeypatch):
    """A review of the record of what made a file's pairs: a first attempt that died before any prompt was done,
    the same model spelt with a trailing slash, a digest unknown on the first run (a hub model not yet cached) and
    a file of an older posttrain (ids `line-N`, no record) were refused or sampled again; another --template-var was
    taken silently. Each behaves as it should now."""
    prompts = write_prompts(tmp_path / "prompts.jsonl", [{"prompt": f"q{i}", "answer": 10 + i % 2} for i in range(3)])
    out = tmp_path / "pairs.jsonl"
    record = tmp_path / ".pairs.jsonl.made.json"
    calls = []
    monkeypatch.setattr(posttrain.rollout.pairs, "generate", fake_generate(calls))
    base = ["data", "pairs", "--model", tiny_model_dir, "--prompts", prompts, "--task", "arithmetic", "--n", 3,
            "--out", out, "--no-progress"]  # fmt: skip
    # a first attempt that failed before any prompt was done leaves an empty file: a new start, other settings too
    out.write_text("")
    json.dump({"model": "x", "n": 9}, record.open("w"))
    code, stdout, err = run(capsys, *base, "--limit", 1)
    assert code == 0, err
    # the same model spelt otherwise (its weights' digest is the same)
    code, _, err = run(capsys, *[f"{tiny_model_dir}/" if a == tiny_model_dir else a for a in base], "--limit", 2)
    assert code == 0, err
    # a chat template variable changes the prompts the model sees: refused
    code, _, err = run(capsys, *base, "--template-var", "enable_thinking=false")
    assert code == 2 and "template_var: {} -> {'enable_thinking': False}" in err
    # a digest that could not be taken then (None) matches, and is filled in for the next run
    made = json.loads(record.read_text())
    record.write_text(json.dumps({**made, "model_sha256": None}))
    code, _, err = run(capsys, *base)
    assert code == 0, err
    assert json.loads(record.read_text())["model_sha256"] == made["model_sha256"]
    # a file of an older posttrain: no record, rows without ids named line-N; they count as done
    lines = out.read_text().splitlines()
    assert len(lines) == 3  # every prompt has its pair
    old = [json.dumps({**json.loads(line), "id": f"line-{i + 1}"}) for i, line in enumerate(lines)]
    out.write_text("".join(line + "\n" for line in old))
    record.unlink()
    (tmp_path / ".pairs.jsonl.skipped").unlink(missing_ok=True)
    calls.clear()
    code, stdout, err = run(capsys, *base)
    assert code == 0 and "without a record of what made its pairs" in stdout
    assert calls == [] and "nothing to do" in stdout and len(out.read_text().splitlines()) == 3
    code, stdout, err = run(capsys, *base)  # and on every later run, not only the first (a review)
    assert code == 0 and calls == [] and "nothing to do" in stdout
    # a record of an earlier release, without the keys added since: unknown, filled in, not a change
    made = json.loads(record.read_text())
    record.write_text(json.dumps({k: v for k, v in made.items() if k not in ("template_var", "tokenizer_sha256")}))
    code, stdout, err = run(capsys, *base)
    assert code == 0 and "nothing to do" in stdout and json.loads(record.read_text())["template_var"] == {}
