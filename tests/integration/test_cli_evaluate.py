"""`posttrain evaluate`: no verifier, no evaluation; a task's verifier or any reward scores the answers."""

import json

import pytest

from posttrain.cli import main
from posttrain.evaluation import generate_answers, load_for_inference
from posttrain.rewards import build_reward_functions

PROMPTS = ["add 1 2", "add 2 2", "add 3 1", "add 0 4"]
TOKENS = "4"  # --max-new-tokens: short answers keep the test fast


def _table(out: str) -> dict[str, str]:
    rows = [line.strip("|").split("|") for line in out.splitlines() if line.startswith("| ")]
    return {r[0].strip(): r[1].strip() for r in rows[1:]}  # the metric and its value (an interval may follow)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def answers(tiny_model_dir):
    """What the tiny model answers, greedily, as the CLI will generate it."""
    model, tok = load_for_inference(str(tiny_model_dir))
    return generate_answers(model, tok, [{"prompt": p} for p in PROMPTS], max_new_tokens=int(TOKENS))


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_no_stated_verifier_is_refused(capsys, tiny_model_dir, tmp_path):
    data = _write(tmp_path / "p.jsonl", [{"prompt": p, "answer": "3"} for p in PROMPTS])
    for argv in (["--data", data], []):
        code, out, err = run(capsys, "evaluate", "--model", str(tiny_model_dir), *argv)
        assert code == 2 and out == ""
        assert "needs to be told how to score" in err and "--task NAME" in err and "--reward exact_match" in err
    code, _, err = run(capsys, "evaluate", "--model", str(tiny_model_dir), "--reward", "exact_match")
    assert code == 2 and "add --data FILE" in err
    code, out, err = run(capsys, "evaluate", "--data", data, "--task", "arithmetic", "--reward", "exact_match")
    assert code == 2 and out == "" and "argument --reward: not allowed with argument --task" in err


def test_reward_as_verifier(capsys, tiny_model_dir, tmp_path, answers):
    # Rows 0 and 1 hold the model's own answer, rows 2 and 3 do not: exact_match scores 1, 1, 0, 0.
    rows = [{"prompt": p, "answer": a + ("" if i < 2 else " no"), "value": v}
            for i, (p, a, v) in enumerate(zip(PROMPTS, answers, [1.0, 0.0, 0.5, -1.0]))]  # fmt: skip
    data = _write(tmp_path / "p.jsonl", rows)
    base = ["evaluate", "--model", str(tiny_model_dir), "--data", data, "--max-new-tokens", TOKENS]

    code, out, err = run(capsys, *base, "--reward", "exact_match")
    assert code == 0, err
    table = _table(out)
    assert (table["reward_mean"], table["reward_positive"], table["reward_failures"], table["n"]) == (
        "0.5", "50.0%", "0", "4"
    )

    code, out, err = run(capsys, *base, "--reward", '{"name": "exact_match", "weight": 2}')
    assert code == 0, err
    assert (_table(out)["reward_mean"], _table(out)["reward_positive"]) == ("1", "50.0%")

    # A user's function reads another column: rewards 1, 0, 0.5, -1 -> mean 0.125, 2 of 4 above zero.
    (tmp_path / "mine.py").write_text(
        "def by_value(prompts, completions, value, **kwargs):\n    return [float(v) for v in value]\n"
    )
    code, out, err = run(capsys, *base, "--reward", f"{tmp_path / 'mine.py'}:by_value")
    assert code == 0, err
    assert (_table(out)["reward_mean"], _table(out)["reward_positive"]) == ("0.125", "50.0%")

    # numeric_answer refuses gold answers it could never match (these rows hold the model's text), naming them;
    # on numbers it is accepted and scores what the built-in function gives on the same answers.
    code, out, err = run(capsys, *base, "--reward", "numeric_answer")
    assert code == 2 and f"{data}:4: answer: " in err and "is not a number" in err
    gold = ["3", 7, "1/2", r"\frac{1}{2}"]
    numbers = _write(tmp_path / "n.jsonl", [{"prompt": p, "answer": g} for p, g in zip(PROMPTS, gold)])
    expected = build_reward_functions(["numeric_answer"])[0].fn(PROMPTS, answers, answer=gold)
    code, out, err = run(capsys, "evaluate", "--model", str(tiny_model_dir), "--data", numbers, "--max-new-tokens",
                         TOKENS, "--reward", "numeric_answer")  # fmt: skip
    assert code == 0, err
    assert _table(out)["reward_mean"] == f"{sum(expected) / 4:.4g}"

    # Two rewards: the weighted sum is the verifier, each one's mean is shown as well.
    code, out, err = run(capsys, *base, "--reward", "exact_match", "--reward", f"{tmp_path / 'mine.py'}:by_value")
    assert code == 0, err
    table = _table(out)
    assert (table["reward_mean"], table["reward_exact_match_mean"], table["reward_by_value_mean"]) == (
        "0.625", "0.5", "0.125"
    )


def test_reward_failures_are_reported(capsys, tiny_model_dir, tmp_path):
    data = _write(tmp_path / "p.jsonl", [{"prompt": p, "answer": "3"} for p in PROMPTS])
    (tmp_path / "r.py").write_text(
        "def half(prompts, completions, **kw):\n"
        "    if len(prompts) > 1:\n        raise ValueError('one at a time')\n"
        "    if prompts[0] in ('add 1 2', 'add 2 2'):\n        raise ValueError('cannot score this one')\n"
        "    return [1.0]\n"
        "def never(prompts, completions, **kw):\n    raise KeyError('no_such_column')\n"
    )
    base = ["evaluate", "--model", str(tiny_model_dir), "--data", data, "--max-new-tokens", TOKENS]
    code, out, err = run(capsys, *base, "--reward", f"{tmp_path / 'r.py'}:half")
    assert code == 0, err
    assert _table(out)["reward_failures"] == "2" and _table(out)["reward_mean"] == "0.5"
    assert "warning: --reward half could not score 2 of 4 answers; they count as 0" in err
    code, out, err = run(capsys, *base, "--reward", f"{tmp_path / 'r.py'}:never")
    assert code == 2 and "--reward never could not score any answer" in err and "no_such_column" in err
    # what a reward counts of its own (code_exec's timeouts) is said with its note
    (tmp_path / "c.py").write_text(
        "def counting(prompts, completions, **kw):\n    return [1.0] * len(completions)\n"
        "counting.events = lambda: {'slow': 3}\ncounting.event_notes = {'slow': 'ran slowly'}\n"
    )
    code, out, err = run(capsys, *base, "--reward", f"{tmp_path / 'c.py'}:counting")
    assert code == 0 and "warning: --reward counting: 3 of 4 answers: ran slowly" in err
    # A column a built-in reward reads is checked before the model loads, as for training.
    nocol = _write(tmp_path / "nocol.jsonl", [{"prompt": p} for p in PROMPTS])
    code, out, err = run(capsys, "evaluate", "--model", "./no/such/model", "--data", nocol, "--reward", "exact_match")
    assert code == 2 and "nocol.jsonl:1: answer: missing: reward 'exact_match'" in err


def test_task_verifier_on_a_data_file(capsys, tiny_model_dir, tmp_path):
    data = _write(tmp_path / "p.jsonl", [{"prompt": p, "answer": 3} for p in PROMPTS])
    base = ["evaluate", "--model", str(tiny_model_dir), "--data", data, "--max-new-tokens", TOKENS]
    code, out, err = run(capsys, *base, "--task", "arithmetic")
    assert code == 0, err
    assert _table(out)["n"] == "4" and "correct" in _table(out)
    code, _, err = run(capsys, *base, "--task", "arithmetic", "--max-ops", "1")
    assert code == 2 and "--max-ops shape the rows made by --task" in err


def test_an_sft_file_scored_by_exact_match_says_how_to_read_its_completion(capsys, tiny_model_dir, tmp_path, answers):
    """An SFT file (prompt, completion) has no `answer`: the refusal gives two fixes, and each one runs (rows 0 and 1
    hold the model's own answer, so exact_match scores 1, 1, 0, 0 either way)."""
    sft = _write(tmp_path / "sft.jsonl", [{"prompt": p, "completion": a + ("" if i < 2 else " no")}
                                          for i, (p, a) in enumerate(zip(PROMPTS, answers))])  # fmt: skip
    base = ["evaluate", "--model", str(tiny_model_dir), "--data", sft, "--max-new-tokens", TOKENS]
    code, out, err = run(capsys, *base, "--n", "1", "--reward", "exact_match")
    assert code == 2 and out == ""
    assert err.splitlines()[-1] == (
        f"{sft}:1: answer: missing: reward 'exact_match' (--reward #1) reads it; this row has: completion. The "
        "reference is read from column answer: here "
        """--reward '{"name": "exact_match", "args": {"column": "completion"}}' reads the completion"""
    )  # fmt: skip
    for fix in (["--reward", "exact_match", "--column", "answer=completion"],
                ["--reward", '{"name": "exact_match", "args": {"column": "completion"}}']):  # fmt: skip
        code, out, err = run(capsys, *base, *fix)
        assert code == 0, err
        assert (_table(out)["reward_mean"], _table(out)["reward_failures"]) == ("0.5", "0")


def test_a_reward_that_returns_one_value_for_all_the_answers_is_said_to_be_called_once_per_answer(capsys, tiny_model_dir,
                                                                                                  tmp_path):  # fmt: skip
    """`return [1.0]` for 4 answers: each answer is then scored alone (1.0, no failure), which training says and
    evaluate did not (an audit)."""
    data = _write(tmp_path / "p.jsonl", [{"prompt": p, "answer": "3"} for p in PROMPTS])
    (tmp_path / "one.py").write_text("def one(prompts, completions, **kwargs):\n    return [1.0]\n")
    code, out, err = run(capsys, "evaluate", "--model", str(tiny_model_dir), "--data", data, "--max-new-tokens", TOKENS,
                         "--no-progress", "--reward", f"{tmp_path / 'one.py'}:one")  # fmt: skip
    assert code == 0 and (_table(out)["reward_mean"], _table(out)["reward_failures"]) == ("1", "0")
    assert [line for line in err.splitlines() if line.startswith("warning:")] == [
        f"warning: --reward one: its call on the 4 answers failed (returned 1 values for 4 samples (at "
        f"{tmp_path / 'one.py'}:1)), so it was called once per answer, and every answer scored that way; a function "
        "that returns one value per completion is called once for them all"
    ]  # fmt: skip


def test_stop_strings_end_the_answers_as_an_rl_run_sampled_them(capsys, tiny_model_dir, tmp_path, answers):
    """An RL run samples with algorithm.rollout.stop; `evaluate` had no way to, so the same model scored differently
    in training and in evaluation (an audit, twenty-third session). --stop ends each answer at its first stop string
    (cut off, as training cuts it); a run folder that sampled with some says so when --stop is not given."""
    k = next(i for i in range(1, len(answers[0])) if answers[0][: answers[0].find(answers[0][i])].strip())
    stop = answers[0][k]
    cut = answers[0][: answers[0].find(stop)]
    data = _write(tmp_path / "p.jsonl", [{"prompt": PROMPTS[0], "answer": cut}])
    base = ["evaluate", "--data", data, "--max-new-tokens", TOKENS, "--reward", "exact_match", "--json"]
    run_dir = tmp_path / "run"
    (run_dir).mkdir()
    (run_dir / "final").symlink_to(tiny_model_dir, target_is_directory=True)
    (run_dir / "config.yaml").write_text(json.dumps({"algorithm": {"rollout": {"stop": [stop]}}}), encoding="utf-8")
    code, out, err = run(capsys, *base, "--model", str(run_dir / "final"))
    assert code == 0, err
    assert json.loads(out)["metrics"]["reward_mean"] == (1.0 if cut.strip() == answers[0].strip() else 0.0)
    assert f"was trained sampling with algorithm.rollout.stop {[stop]!r}" in err and "--stop " in err
    code, out, err = run(capsys, *base, "--model", str(run_dir / "final"), "--stop", stop)
    doc = json.loads(out)
    assert code == 0 and doc["metrics"]["reward_mean"] == 1.0 and doc["settings"]["stop"] == [stop]
    assert "was trained sampling" not in err
    code, _, err = run(capsys, "evaluate", "--model", str(tiny_model_dir), "--pairs", data, "--stop", stop)
    assert code == 2 and "--stop does not apply to it" in err
    # the flags that shape generated answers or a task's prompts were accepted with --pairs and changed nothing
    code, _, err = run(capsys, "evaluate", "--model", str(tiny_model_dir), "--pairs", data, "--max-new-tokens", "7",
                       "--split", "train", "--max-ops", "2")  # fmt: skip
    assert code == 2 and "--max-new-tokens, --split, --max-ops do not apply to it" in err


def test_pairs_are_ranked_with_the_runs_own_beta_and_max_length(capsys, make_cfg, tmp_path):
    """A beta=0.5 DPO run was ranked by `evaluate --pairs` at the default 0.1, with no note (its implicit margin a
    fifth of training's): a run folder's own algorithm.beta and data.max_length are the defaults now."""
    from posttrain.train import train

    pairs_file = tmp_path / "pairs.jsonl"
    _write(pairs_file, [{"prompt": f"add {i} 1", "chosen": str(i + 1), "rejected": str(i + 2)} for i in range(8)])

    run_dir = train(make_cfg("dpo", **{"algorithm.name": "dpo", "algorithm.beta": 0.5, "data.train": str(pairs_file),
                                       "technique.name": "lora", "run.max_steps": 1})).run_dir  # fmt: skip
    code, out, err = run(capsys, "evaluate", "--model", str(run_dir), "--pairs", str(pairs_file), "--n", "2", "--json")
    assert code == 0, err
    assert json.loads(out)["settings"] == {"beta": 0.5, "max_length": 64, "per_token": False}
    assert "note: ranking with the run's algorithm.beta 0.5 and data.max_length 64" in err
    code, out, err = run(capsys, "evaluate", "--model", str(run_dir / "final"), "--pairs", str(pairs_file), "--n", "2",
                         "--beta", "0.2", "--json")  # fmt: skip
    assert code == 0 and json.loads(out)["settings"] == {"beta": 0.2, "max_length": 64, "per_token": False}
    assert "algorithm.beta" not in err


def test_an_ipo_run_on_mean_log_probabilities_is_ranked_as_it_trained(capsys, make_cfg, tmp_path):
    """An IPO run (ipo_logps: mean) logged its eval margin from per-token mean log-probabilities; `evaluate --pairs`
    ranked it with summed ones (the margin several times the logged one). It ranks as the run trained now: the
    margin is the run's own logged eval_reward_margin, on the same pairs."""
    from posttrain.train import train

    pairs_file = tmp_path / "pairs.jsonl"
    _write(pairs_file, [{"prompt": f"add {i} 1", "chosen": f"{i + 1} it is", "rejected": "no"} for i in range(8)])
    result = train(make_cfg("ipo", **{"algorithm.name": "dpo", "algorithm.loss_type": "ipo", "algorithm.beta": 0.5,
                                      "data.train": str(pairs_file), "data.eval": str(pairs_file),
                                      "technique.name": "lora", "optim.lr": 0.02, "run.max_steps": 3,
                                      "run.eval_every": 3}))  # fmt: skip
    logged = [h for h in result.history if "eval_reward_margin" in h][-1]
    capsys.readouterr()
    code, out, err = run(capsys, "evaluate", "--model", str(result.run_dir), "--pairs", str(pairs_file), "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["settings"]["per_token"] is True and "per-token mean log-probabilities" in err
    assert doc["metrics"]["implicit_margin"] == pytest.approx(logged["eval_reward_margin"], rel=1e-4)
    assert doc["metrics"]["implicit_accuracy"] == pytest.approx(logged["eval_reward_accuracy"])


def test_a_reward_model_ranks_pairs_by_its_scores_and_writes_nothing(capsys, make_cfg, tmp_path):
    """`evaluate --pairs` on a reward model read its backbone's DPO implicit reward (the score head left out): 50%
    for a model whose run logged 100%. It ranks by the model's own scores now, the reward run's `accuracy` on the
    same pairs; generating from it (its backbone alone was never trained to write) is refused."""
    from posttrain.evaluation.preference import judge_scores
    from posttrain.train import train

    pairs_file = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"add {i} 1", "chosen": str(i + 1), "rejected": "no"} for i in range(8)]
    _write(pairs_file, rows)
    result = train(make_cfg("rm", **{"algorithm.name": "reward", "technique.name": "lora", "data.train": str(pairs_file),
                                     "data.eval": str(pairs_file), "optim.lr": 0.05, "run.max_steps": 12,
                                     "run.eval_every": 12}))  # fmt: skip
    logged = [h for h in result.history if "eval_accuracy" in h][-1]["eval_accuracy"]
    capsys.readouterr()
    code, out, err = run(capsys, "evaluate", "--model", str(result.run_dir), "--pairs", str(pairs_file), "--json",
                         "--out", str(tmp_path / "ranked.jsonl"))  # fmt: skip
    assert code == 0, err
    doc = json.loads(out)
    chosen = judge_scores(str(result.run_dir), [r["prompt"] for r in rows], [r["chosen"] for r in rows])
    rejected = judge_scores(str(result.run_dir), [r["prompt"] for r in rows], ["no"] * 8)
    assert doc["verifier"] == "reward_model" and doc["metrics"]["reward_accuracy"] == logged > 0.5
    assert doc["metrics"]["reward_margin"] == pytest.approx(sum(c - r for c, r in zip(chosen, rejected)) / 8, abs=1e-5)
    records = [json.loads(line) for line in (tmp_path / "ranked.jsonl").read_text().splitlines()]
    assert [r["chosen_score"] for r in records] == pytest.approx(chosen, abs=1e-5)
    code, _, err = run(capsys, "evaluate", "--model", str(result.run_dir), "--pairs", str(pairs_file), "--beta", "0.2")
    assert code == 2 and "is a reward model: it ranks the pairs by its scores" in err and "--beta" in err
    for argv in (["generate", "--model", str(result.run_dir), "--prompt", "add 1 1"],
                 ["evaluate", "--model", str(result.run_dir / "final"), "--task", "arithmetic", "--n", "2"]):  # fmt: skip
        code, out, err = run(capsys, *argv)
        assert code == 2 and "is a reward model (a score head on its backbone): it scores answers" in err, argv


def test_the_json_settings_hold_what_picked_the_rows_and_the_template_variables(capsys, tiny_model_dir):
    """`evaluate --task` documents with other --split/--max-ops/--max-value (other prompts) were byte-identical but
    for the metrics, and --template-var (other renderings) was in no document (an audit)."""
    code, out, err = run(capsys, "evaluate", "--model", str(tiny_model_dir), "--task", "arithmetic", "--n", "2",
                         "--max-new-tokens", "2", "--split", "train", "--max-ops", "1", "--max-value", "5", "--json")  # fmt: skip
    assert code == 0, err
    settings = json.loads(out)["settings"]
    assert (settings["split"], settings["min_ops"], settings["max_ops"], settings["max_value"]) == ("train", None, 1, 5)
    assert settings["template_var"] == {}
