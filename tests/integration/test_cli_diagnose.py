"""`posttrain diagnose` end to end on the tiny random model: every probe through the CLI, its --json document and
report folder; a reward file with the user's own perturbed set; bad input is exit 2 with one clear paragraph,
found before any model loads."""

import json

import pytest

from posttrain.cli import main
from posttrain.data import TASKS

TOKENS = "4"  # --max-new-tokens: the tiny model's answers are noise anyway; short keeps the test fast
TOP_KEYS = ["schema_version", "command", "ok", "model", "verifier", "task", "prompts_file", "perturbed_file",
            "sft_data", "pairs_file", "reference", "base", "prompts", "greedy_accuracy", "settings", "robustness",
            "headroom", "data", "preferences", "drift", "recommendation", "seconds", "notes", "out"]  # fmt: skip


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_every_probe_through_the_cli(capsys, tiny_model_dir, tmp_path):
    sft = _write(tmp_path / "sft.jsonl", [{"prompt": "Sam has 5 apples. He buys 3 more.", "completion": "Answer: 8",
                                           "answer": 8},
                                          {"prompt": "Sam has 5 apples; he buys 3 more!", "completion": "Answer: 9",
                                           "answer": 8}])  # fmt: skip
    pairs = _write(tmp_path / "pairs.jsonl", [{"prompt": "add 1 2", "chosen": "3", "rejected": "4 or so"}] * 2)
    out = tmp_path / "report"
    code, stdout, err = run(capsys, "diagnose", "--model", str(tiny_model_dir), "--task", "arithmetic", "--n", "3",
                            "--samples", "2", "--max-new-tokens", TOKENS, "--sft-data", sft, "--pairs", pairs,
                            "--base", str(tiny_model_dir), "--out", str(out), "--json", "--no-progress")  # fmt: skip
    assert code == 0, err
    doc = json.loads(stdout)
    assert list(doc) == TOP_KEYS and doc["ok"] and doc["command"] == "diagnose"
    assert doc["verifier"] == {"kind": "task", "name": "task arithmetic"} and doc["prompts"] == 3
    rob = doc["robustness"]
    assert [k["kind"] for k in rob["kinds"]] == ["paraphrase", "noop", "names", "reorder", "numbers"]
    assert set(rob["kinds"][0]) == {"kind", "pairs", "clean_accuracy", "perturbed_accuracy", "gap", "ci_low",
                                    "ci_high", "lost", "gained", "p_value", "prompts"}  # fmt: skip
    assert len(rob["pairs"]) == 15 and set(rob["pairs"][0]) == {"id", "perturbs", "kind", "clean", "perturbed"}
    head = doc["headroom"]
    assert head["samples"] == 2 and list(head["pass_at_k"]) == ["1", "2"]
    assert [set(p) for p in head["prompts"]] == [{"id", "n", "c"}] * 3 and all(p["n"] == 2 for p in head["prompts"])
    assert doc["data"]["ambiguous_clusters"] == 1 and doc["data"]["wrong"] == 1 and doc["data"]["checked"] == 2
    assert set(doc["preferences"]) == {"n", "logp_accuracy", "mean_logp_accuracy"}  # no reference: its own ranking
    drift = doc["drift"]  # the base is the model itself: no drift
    assert drift["task"]["kl_policy_base"] == pytest.approx(0, abs=1e-6) and drift["probe"]["top1_agreement"] == 1.0
    rec = doc["recommendation"]
    assert rec["option"] in ("sft-data", "sft-dpo", "sft-grpo") and rec["fired"] and set(rec["facts"]) >= {
        "worst_gap", "headroom", "mixed_share", "wrong_share", "pairs_logp_accuracy", "probe_agreement"}  # fmt: skip
    assert rec["facts"]["wrong_share"] == 0.5 and rec["fired"][0]["rule"] == "wrong-demonstrations"
    assert json.loads((out / "diagnosis.json").read_text(encoding="utf-8")) == doc
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.count("<img ") == 2 and "Recommendation" in page and (out / "report.md").is_file()
    assert sorted(p.name for p in (out / "report_files").iterdir()) == ["pass_at_k.png", "perturbation_gaps.png"]


def test_a_reward_file_and_the_users_perturbed_set(capsys, tiny_model_dir, tmp_path):
    (tmp_path / "rw.py").write_text("def starts_with_a(prompts, completions, **kw):\n"
                                    "    return [float(c[:1] in 'aeiou') for c in completions]\n")  # fmt: skip
    prompts = _write(tmp_path / "p.jsonl", [{"id": f"q{i}", "prompt": f"add {i} 1", "answer": i + 1} for i in range(3)])
    perturbed = _write(tmp_path / "v.jsonl", [{"perturbs": f"q{i}", "kind": "typos", "prompt": f"ad {i} 1",
                                               "answer": i + 1} for i in range(3)])  # fmt: skip
    code, stdout, err = run(capsys, "diagnose", "--model", str(tiny_model_dir), "--prompts", prompts, "--reward",
                            f"{tmp_path / 'rw.py'}:starts_with_a", "--perturbed", perturbed, "--samples", "0",
                            "--max-new-tokens", TOKENS, "--no-progress")  # fmt: skip
    assert code == 0, err
    assert "| typos | 3 |" in stdout and "Sampling headroom" not in stdout and "Recommendation: " in stdout
    assert "verifier reward" in stdout.splitlines()[0]


def test_files_in_their_own_names_give_the_same_diagnosis(capsys, tiny_model_dir, tmp_path):
    """--column and the other layout options read --prompts, --sft-data and --pairs in their own names: the same
    measurements as the files in posttrain's names (one file may lack a column another has)."""
    ours = {"prompts": [{"id": f"q{i}", "prompt": f"Sam has {i} apples. He buys 3 more.", "answer": i + 3}
                        for i in range(2)],
            "sft": [{"prompt": "Sam has 5 apples. He buys 3 more.", "completion": "Answer: 8", "answer": 8},
                    {"prompt": "Sam has 5 apples; he buys 3 more!", "completion": "Answer: 9", "answer": 8}],
            "pairs": [{"prompt": "add 1 2", "chosen": "3", "rejected": "4 or so"}]}  # fmt: skip
    names = {"prompt": "question", "completion": "response", "chosen": "good"}
    theirs = {k: [{names.get(c, c): v for c, v in r.items()} | {"source": "x"} for r in rows] for k, rows in ours.items()}

    def diagnosis(files, *options):
        paths = {k: _write(tmp_path / f"{k}-{len(options)}.jsonl", rows) for k, rows in files.items()}
        code, stdout, err = run(capsys, "diagnose", "--model", str(tiny_model_dir), "--task", "arithmetic",
                                "--prompts", paths["prompts"], "--sft-data", paths["sft"], "--pairs", paths["pairs"],
                                "--samples", "2", "--max-new-tokens", TOKENS, "--json", "--no-progress", *options)  # fmt: skip
        assert code == 0, err
        doc = json.loads(stdout)
        return {k: doc[k] for k in ("prompts", "greedy_accuracy", "headroom", "preferences")} | {
            "data": {k: v for k, v in doc["data"].items() if k != "file"}}  # fmt: skip

    got = diagnosis(theirs, "--column", "prompt=question", "--column", "completion=response", "--column",
                    "chosen=good", "--ignore-column", "source")  # fmt: skip
    assert got == diagnosis(ours) and got["data"]["wrong"] == 1 and got["preferences"]["n"] == 1
    code, _, err = run(capsys, "diagnose", "--model", str(tmp_path / "no-model"), "--task", "arithmetic", "--prompts",
                       _write(tmp_path / "p.jsonl", theirs["prompts"]), "--column", "prompt=question", "--column",
                       "completion=reply")  # fmt: skip
    assert code == 2 and "--column reads completion from column 'reply', which no row has" in err


@pytest.mark.parametrize(("argv", "says"), [
    ([], "needs to be told what a right answer is; there is no default"),
    (["--reward", "exact_match"], "--reward scores the answers to your prompts: add --prompts FILE"),
    (["--task", "arithmetic", "--sft-data", "{tmp}/missing.jsonl"], "missing.jsonl: file not found"),
    (["--task", "arithmetic", "--perturbed", "{tmp}/bad.jsonl"], "bad.jsonl:2: perturbs: no clean prompt has the id"),
    (["--task", "arithmetic", "--perturbations", "typos"], "--perturbations: unknown variant 'typos'"),
    (["--task", "arithmetic", "--samples", "2", "--temperature", "0"], "--temperature must be > 0"),
    # one sample a prompt cannot be both right and wrong: the mixed share read 0 and advised against RL (an audit)
    (["--task", "arithmetic", "--samples", "1"], "--samples 1 cannot measure headroom"),
    (["--task", "structured", "--perturbations", "noop"], "--perturbations chooses the variants a built-in task"),
    # a folder under a file failed only after every measurement (an audit, nineteenth session)
    (["--task", "arithmetic", "--out", "{tmp}/bad.jsonl/report"], "bad.jsonl is a file, not a folder"),
    # the task's variants name their prompt by id: a repeated row was paired with its last copy, after decoding
    (["--task", "arithmetic", "--prompts", "{tmp}/dup.jsonl"],
     "dup.jsonl: the clean prompts share ids: id 'arithmetic-heldout-1-0' on lines 1, 2"),
])  # fmt: skip
def test_bad_input_is_one_paragraph_before_any_model_loads(capsys, tmp_path, argv, says):
    _write(tmp_path / "bad.jsonl", [{"perturbs": "arithmetic-heldout-1-0", "kind": "x", "prompt": "p", "answer": 0},
                                     {"perturbs": "nope", "kind": "x", "prompt": "p", "answer": 0}])  # fmt: skip
    made = TASKS["arithmetic"].make(2, seed=1, split="heldout")
    _write(tmp_path / "dup.jsonl", [made[0], made[0], made[1]])  # (--n 2: the first two rows)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    # A model that does not exist: the input is checked first, so its error is the one reported.
    code, out, err = run(capsys, "diagnose", "--model", str(tmp_path / "no-model"), "--n", "2", *argv)
    assert code == 2 and out == "" and says in err
    assert "Traceback" not in err and err.startswith("error: ")
    code, out, _ = run(capsys, "diagnose", "--model", str(tmp_path / "no-model"), "--n", "2", *argv, "--json")
    doc = json.loads(out)
    assert code == 2 and doc["ok"] is False and doc["error"]["kind"] == "user" and says in doc["error"]["message"]


def test_a_trained_reward_model_as_the_judge(capsys, make_cfg, tiny_model_dir, tmp_path):
    from posttrain.evaluation import generate_answers, load_for_inference
    from posttrain.evaluation.preference import judge_scores
    from posttrain.train import train

    pairs = _write(tmp_path / "pairs.jsonl", [{"prompt": f"add {a} 1", "chosen": str(a + 1), "rejected": "no"}
                                              for a in range(8)])  # fmt: skip
    judge = train(make_cfg("rm", **{"algorithm.name": "reward", "technique.name": "lora", "data.train": pairs,
                                    "run.max_steps": 1})).run_dir  # fmt: skip
    rows = [{"id": f"q{i}", "prompt": f"add {i} 2", "answer": i + 2} for i in range(6)]
    model, tok = load_for_inference(str(tiny_model_dir))
    finished: list[bool] = []
    answers = generate_answers(model, tok, rows, max_new_tokens=int(TOKENS), finished=finished)
    # an answer cut at the token limit is judged as an unfinished turn, as in RL training and evaluate --judge
    cut = [not f for f in finished]
    scores = judge_scores(str(judge), [r["prompt"] for r in rows], answers, cut)
    assert any(cut) and scores != judge_scores(str(judge), [r["prompt"] for r in rows], answers)
    threshold = sorted(scores)[2]  # right: the three scores above the third lowest
    code, stdout, err = run(capsys, "diagnose", "--model", str(tiny_model_dir), "--prompts",
                            _write(tmp_path / "p.jsonl", rows), "--judge", str(judge), "--judge-threshold",
                            repr(threshold), "--samples", "0", "--max-new-tokens", TOKENS, "--json",
                            "--no-progress")  # fmt: skip
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["verifier"]["kind"] == "judge" and doc["settings"]["judge_threshold"] == threshold
    assert doc["greedy_accuracy"] == sum(s > threshold for s in scores) / 6 == 0.5
    assert doc["robustness"] is None and doc["headroom"] is None


def test_prompts_harder_than_the_sft_data_are_said(capsys, tmp_path):
    """The README made math.jsonl with --max-ops 2 and diagnosed at the task's default 3: harder problems than
    trained on, and another recommendation, unsaid (an audit). Said before the model loads."""
    sft = tmp_path / "math.jsonl"
    assert main(["data", "make", "arithmetic", "--n", "20", "--max-ops", "1", "--out", str(sft)]) == 0
    capsys.readouterr()
    code, _, err = run(capsys, "diagnose", "--model", str(tmp_path / "no-model"), "--task", "arithmetic", "--n", "4",
                       "--sft-data", str(sft))  # fmt: skip
    assert code == 2  # (no such model: after the warning)
    assert f"the prompts measured have up to 3 operations, and {sft}'s rows up to 1 operations:" in err
    assert "pass --max-ops 1 (the data's own settings)" in err
    code, _, err = run(capsys, "diagnose", "--model", str(tmp_path / "no-model"), "--task", "arithmetic", "--n", "4",
                       "--max-ops", "1", "--sft-data", str(sft))  # fmt: skip
    assert "harder problems" not in err
    # values: rows made with --max-value 20 and prompts at the task's 50 (the README's own mismatch)
    assert main(["data", "make", "arithmetic", "--n", "20", "--max-ops", "1", "--max-value", "20", "--out",
                 str(sft)]) == 0  # fmt: skip
    capsys.readouterr()
    code, _, err = run(capsys, "diagnose", "--model", str(tmp_path / "no-model"), "--task", "arithmetic", "--n", "4",
                       "--max-ops", "1", "--sft-data", str(sft))  # fmt: skip
    assert f"have up to values of 50, and {sft}'s rows up to values of 20:" in err and "pass --max-value 20 (" in err
    code, _, err = run(capsys, "diagnose", "--model", str(tmp_path / "no-model"), "--task", "arithmetic", "--n", "4",
                       "--max-ops", "1", "--max-value", "20", "--sft-data", str(sft))  # fmt: skip
    assert "harder problems" not in err
