"""`--json` on every command that prints results, the end-of-run summary of `train`, `evaluate --out`, and the
progress bars of `evaluate` and `generate` (docs/cli-json.md), through `posttrain.cli.main` in-process."""

import json

import pytest

import posttrain.models
import posttrain.rollout.pairs
from posttrain.cli import main
from posttrain.evaluation import generate_answers, load_for_inference
from posttrain.evaluation.intervals import wilson_interval
from posttrain.evaluation.preference import judge_scores
from posttrain.trainer.metrics import read_metrics

PROMPTS = ["add 1 2", "add 2 2", "add 3 1", "add 0 4"]
PAIRS = [{"prompt": f"add {a} {b}", "chosen": str(a + b), "rejected": f"{a}{b}?"} for a in range(4) for b in range(2)]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def run_json(capsys, *argv):
    """Run with --json: stdout must be exactly one JSON document (json.loads refuses anything else)."""
    code, out, err = run(capsys, *argv, "--json")
    return code, json.loads(out), err


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _envelope(doc, command, ok=True):
    assert (doc["schema_version"], doc["command"], doc["ok"]) == (1, command, ok)
    assert ("error" in doc) == (not ok)


def _train_args(tiny_model_dir, tmp_path, run_dir, *extra):
    pairs = _jsonl(tmp_path / "pairs.jsonl", PAIRS)
    return ["train", f"model.name={tiny_model_dir}", "technique.name=lora", "algorithm.name=dpo",
            f"data.train={pairs}", f"data.eval={pairs}", "data.max_length=64", "optim.batch_size=4",
            "optim.lr=1e-2", f"run.output_dir={run_dir}", *extra]  # fmt: skip


def test_train_json(capsys, tiny_model_dir, tmp_path):
    run_dir = tmp_path / "dpo"
    args = _train_args(tiny_model_dir, tmp_path, run_dir)
    code, doc, err = run_json(capsys, *args, "run.max_steps=2", "run.progress=false")
    assert code == 0, err
    _envelope(doc, "train")
    records = read_metrics(run_dir / "metrics.jsonl")
    last = [r for r in records if "loss" in r][-1]
    evaluation = [r for r in records if "eval_loss" in r][-1]
    assert (doc["run_dir"], doc["final_dir"], doc["method"]) == (str(run_dir), str(run_dir / "final"), "dpo")
    assert (doc["steps"], doc["steps_trained"], doc["first_step"]) == (2, 2, 1)
    assert doc["final_loss"] == last["loss"] and doc["metrics"] == last and doc["eval"] == evaluation
    assert doc["key_metric"] == {"name": "reward_accuracy", "value": last["reward_accuracy"]}
    assert doc["wall_time_s"] > 0 and doc["peak_rss_gb"] > 0 and doc["peak_gpu_gb"] is None  # CPU run
    # one unit: the process's peak after training is at least the peak every step logged (in GiB it read 7% less)
    assert doc["peak_rss_gb"] >= max(r["peak_rss_gb"] for r in records if "peak_rss_gb" in r)
    assert doc["metrics_file"] == str(run_dir / "metrics.jsonl")
    assert doc["report"] == str(run_dir / "report.html") and (run_dir / "report.html").is_file()
    assert doc["tensorboard"] is None and doc["steps_without_signal"] is None  # DPO has no groups


def test_train_summary_and_progress_bar(capsys, tiny_model_dir, tmp_path):
    run_dir = tmp_path / "dpo"
    args = _train_args(tiny_model_dir, tmp_path, run_dir)
    code, out, err = run(capsys, *args, "run.max_steps=2", "run.progress=true")
    assert code == 0, err
    # The progress bar (stderr) shows the step's loss and DPO's key metric.
    last = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r][-1]
    assert f"loss={last['loss']:.4f}, reward_accuracy={last['reward_accuracy']:.4g}, lr=" in err

    # Resumed for two more steps: the summary names this call's steps, the key metric, the evaluation, time,
    # memory and the run's files (a report.html there is named; the TensorBoard folder when it is on).
    (run_dir / "report.html").write_text("<html></html>", encoding="utf-8")
    code, out, err = run(capsys, *args, "run.max_steps=4", "run.progress=false", "run.tensorboard=true", "--resume")
    assert code == 0, err
    records = read_metrics(run_dir / "metrics.jsonl")
    last = [r for r in records if "loss" in r][-1]
    evaluation = [r for r in records if "eval_loss" in r][-1]
    lines = out.splitlines()
    assert lines[-8:] == [
        f"done: 2 steps (steps 3-4 of 4); last loss {last['loss']:.4f}; model in {run_dir / 'final'}",
        f"  last step:    loss {last['loss']:.4f}, reward_accuracy {last['reward_accuracy']:.4g}",
        f"  evaluation:   step 4: eval_loss {evaluation['eval_loss']:.4f}, "
        f"eval_reward_accuracy {evaluation['eval_reward_accuracy']:.4g}",
        lines[-5],  # time and memory: checked below
        lines[-4],
        f"  run folder:   {run_dir}",
        f"  report:       {run_dir / 'report.html'}",
        f"  TensorBoard:  tensorboard --logdir {run_dir / 'tensorboard'}",
    ]
    assert lines[-5].startswith("  time:         ") and lines[-5].endswith(" s")
    assert lines[-4].startswith("  peak memory:  ") and lines[-4].endswith(" GB RAM")


def test_train_json_failure_is_a_document(capsys, tiny_model_dir, tmp_path):
    code, doc, err = run_json(capsys, "train", f"model.name={tiny_model_dir}", "optim.nosuch=1")
    assert code == 2 and "optim.nosuch: unknown key" in err
    _envelope(doc, "train", ok=False)
    assert doc["error"]["kind"] == "user" and "optim.nosuch: unknown key" in doc["error"]["message"]


def test_help_config_json(capsys):
    from posttrain.algorithms import RunConfig
    from posttrain.config import describe_fields

    code, doc, _ = run_json(capsys, "train", "--help-config")
    assert code == 0
    _envelope(doc, "train")
    assert [(f["name"], f["default"], f["doc"], f["method"]) for f in doc["fields"]] == describe_fields(RunConfig)
    assert all(f["read_by"] for f in doc["fields"])


def test_a_bug_under_json_is_a_document_too(capsys, tiny_model_dir, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(posttrain.models, "generate", broken)
    code, doc, err = run_json(capsys, "generate", "--model", tiny_model_dir, "--prompt", "hi")
    assert code == 1 and "Traceback" in err and "RuntimeError: boom" in err
    _envelope(doc, "generate", ok=False)
    assert doc["error"] == {"kind": "bug", "message": "RuntimeError: boom"}


@pytest.fixture(scope="module")
def answers(tiny_model_dir):
    model, tok = load_for_inference(str(tiny_model_dir))
    return generate_answers(model, tok, [{"prompt": p} for p in PROMPTS], max_new_tokens=4)


def test_evaluate_json_and_out_with_a_reward(capsys, tiny_model_dir, tmp_path, answers):
    # Rows 0 and 1 hold the model's own answer: exact_match scores 1, 1, 0, 0.
    rows = [{"id": f"r{i}", "prompt": p, "answer": a + ("" if i < 2 else " no")}
            for i, (p, a) in enumerate(zip(PROMPTS, answers))]  # fmt: skip
    data = _jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "answers.jsonl"
    base = ["evaluate", "--model", tiny_model_dir, "--data", data, "--max-new-tokens", 4, "--reward", "exact_match"]
    code, doc, err = run_json(capsys, *base, "--out", out)
    assert code == 0, err
    _envelope(doc, "evaluate")
    assert (doc["verifier"], doc["task"], doc["rewards"], doc["judge"], doc["n"]) == ("reward", None, ["exact_match"],
                                                                                      None, 4)  # fmt: skip
    assert doc["metrics"] == {"reward_mean": 0.5, "reward_positive": 0.5, "reward_failures": 0.0}
    # 95% intervals: Wilson's for 2 of 4 rows, (0.5 + 0.480182 -+ 1.959964 sqrt(0.0625 + 0.060023)) / 1.960365;
    # Student's t for the rewards 1, 1, 0, 0: 0.5 +- t_3 (3.18245) x 0.57735 / 2
    assert doc["intervals"].keys() == {"reward_mean", "reward_positive"}
    assert doc["intervals"]["reward_positive"] == pytest.approx([0.150039, 0.849961], abs=1e-6)
    assert doc["intervals"]["reward_mean"] == pytest.approx([0.5 - 0.918693, 0.5 + 0.918693], abs=1e-5)
    assert doc["data"] == str(data) and doc["out"] == str(out)
    assert f"wrote 4 rows to {out}\n" in err  # where they went, on stderr (stdout is the document)
    assert doc["settings"] == {"max_new_tokens": 4, "temperature": 0.0, "seed": 1, "stop": [], "template_var": {},
                               "split": None, "min_ops": None, "max_ops": None, "max_value": None}  # (--data)
    assert [json.loads(line) for line in out.read_text().splitlines()] == [
        {"index": i, "id": r["id"], "prompt": r["prompt"], "answer": r["answer"], "completion": a,
         "reward": float(i < 2), "reward_exact_match": float(i < 2)}
        for i, (r, a) in enumerate(zip(rows, answers))
    ]  # fmt: skip
    assert "evaluate: 100%" in err and "4/4" in err  # the progress bar, on stderr

    code, text, err = run(capsys, *base, "--no-progress")
    assert code == 0 and "| reward_mean | 0.5 | [-0.419, 1.42] |" in text and "evaluate:" not in err
    assert "| reward_positive | 50.0% | [15.0%, 85.0%] |" in text and "| reward_failures | 0 |  |" in text


def test_evaluate_keeps_its_results_when_out_cannot_be_written(capsys, tiny_model_dir, tmp_path, answers, monkeypatch):
    """A disk that fills while `--out` is written: the --json document held the error alone, the metrics of every
    answer generated and scored lost (an audit). They stay in the document beside the error, and in the text."""
    import errno

    import posttrain.data

    def full(records, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    rows = [{"id": f"r{i}", "prompt": p, "answer": a} for i, (p, a) in enumerate(zip(PROMPTS, answers))]
    data, out = _jsonl(tmp_path / "p.jsonl", rows), tmp_path / "answers.jsonl"
    base = ["evaluate", "--model", tiny_model_dir, "--data", data, "--max-new-tokens", 4, "--reward", "exact_match",
            "--out", out, "--no-progress"]  # fmt: skip
    monkeypatch.setattr(posttrain.data, "write_jsonl", full)
    code, doc, err = run_json(capsys, *base)
    assert code == 2 and "Traceback" not in err and not out.exists()
    _envelope(doc, "evaluate", ok=False)
    assert doc["error"] == {"kind": "user", "message": f"No space left on device: {out}; free some space, and run "
                            "the command again (the results are printed here)"}  # fmt: skip
    assert doc["metrics"] == {"reward_mean": 1.0, "reward_positive": 1.0, "reward_failures": 0.0}
    code, text, err = run(capsys, *base)
    assert code == 2 and "| reward_mean | 1 |" in text and "error: No space left on device" in err


def test_evaluate_task_out_and_a_judge_scored_as_numbers(capsys, make_cfg, tiny_model_dir, tmp_path, answers):
    from posttrain.train import train

    rm = train(make_cfg("rm", **{"algorithm.name": "reward", "technique.name": "lora",
                                 "data.train": _jsonl(tmp_path / "pairs.jsonl", PAIRS), "run.max_steps": 1}))  # fmt: skip
    judge = rm.run_dir
    # The reward model's key metric (summary, progress bar) is its pair accuracy, logged every step.
    assert rm.key_metric == "accuracy" and 0 <= rm.history[-1]["accuracy"] <= 1
    rows = [{"prompt": p, "answer": 3} for p in PROMPTS]
    data = _jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "answers.jsonl"
    base = ["evaluate", "--model", tiny_model_dir, "--data", data, "--max-new-tokens", 4, "--task", "arithmetic",
            "--judge", judge, "--no-progress"]  # fmt: skip
    code, doc, err = run_json(capsys, *base, "--out", out)
    assert code == 0, err
    # Answers cut at --max-new-tokens are judged as unfinished turns, as RL training scores them (judged as closed
    # turns, they read as answers that chose to end there: the judge over-scored answers that run on).
    model, tok = load_for_inference(str(tiny_model_dir))
    finished: list[bool] = []
    generate_answers(model, tok, [{"prompt": p} for p in PROMPTS], max_new_tokens=4, finished=finished)
    cut = [not f for f in finished]
    scores = judge_scores(str(judge), PROMPTS, answers, cut)
    assert any(cut) and scores != judge_scores(str(judge), PROMPTS, answers)
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["prompt"], r["completion"], r["answer"], r["judge_score"]) for r in written] == list(
        zip(PROMPTS, answers, [3] * 4, scores)
    )
    assert all(set(r) == {"index", "prompt", "answer", "completion", "correct", "formatted", "has_number",
                          "judge_score"} for r in written)  # fmt: skip
    assert doc["verifier"] == "task" and doc["judge"] == str(judge)
    assert doc["metrics"]["judge_score_mean"] == sum(scores) / 4
    assert doc["metrics"]["correct"] == sum(r["correct"] for r in written) / 4
    # The table shows the judge's mean score as a number, not as a percentage.
    code, text, err = run(capsys, *base)
    assert code == 0, err
    assert f"| judge_score_mean | {sum(scores) / 4:.4g} |" in text


def test_evaluate_pairs_json_and_out(capsys, tiny_model_dir, tmp_path):
    pairs = _jsonl(tmp_path / "pairs.jsonl", PAIRS[:3])
    out = tmp_path / "ranked.jsonl"
    code, doc, err = run_json(capsys, "evaluate", "--model", tiny_model_dir, "--reference", tiny_model_dir,
                              "--pairs", pairs, "--out", out)  # fmt: skip
    assert code == 0, err
    _envelope(doc, "evaluate")
    assert (doc["verifier"], doc["pairs"], doc["n"]) == ("pairs", str(pairs), 3)
    assert doc["settings"] == {"beta": 0.1, "max_length": 512, "per_token": False}
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in written] == [
        (p["prompt"], p["chosen"], p["rejected"]) for p in PAIRS[:3]
    ]
    # The same model as its own reference: every implicit reward is 0 and the log-probs are the reference's.
    assert all(r["chosen_reward"] == r["rejected_reward"] == 0.0 for r in written)
    assert all((r["chosen_logp"], r["rejected_logp"]) == (r["ref_chosen_logp"], r["ref_rejected_logp"])
               for r in written)  # fmt: skip
    logp_accuracy = sum(r["chosen_logp"] > r["rejected_logp"] for r in written) / 3
    assert (doc["metrics"]["implicit_accuracy"], doc["metrics"]["logp_accuracy"]) == (0.5, logp_accuracy)
    # every accuracy has its Wilson interval over the 3 pairs (ties count 1/2: 1.5 of 3); a margin has none
    assert doc["intervals"]["implicit_accuracy"] == list(wilson_interval(1.5, 3))
    assert set(doc["intervals"]) == {k for k in doc["metrics"] if "accuracy" in k}
    assert "pairs (policy): 100%" in err and "pairs (reference): 100%" in err
    # A judge scores generated answers; --pairs generates none, so it is refused rather than ignored.
    code, doc, err = run_json(capsys, "evaluate", "--model", tiny_model_dir, "--pairs", pairs, "--judge", "rm")
    assert code == 2 and "--judge scores generated answers" in doc["error"]["message"]
    # a full model without --reference is refused before any pair is scored (it was after scoring them all)
    code, doc, err = run_json(capsys, "evaluate", "--model", tiny_model_dir, "--pairs", pairs)
    assert code == 2 and "is a full model, not an adapter" in doc["error"]["message"] and "pairs (policy)" not in err


def test_generate_json_and_progress_for_a_prompts_file(capsys, tiny_model_dir, tmp_path, answers):
    prompts_file = _jsonl(tmp_path / "prompts.jsonl", [{"id": 7, "prompt": PROMPTS[2]}, {"prompt": PROMPTS[3]}])
    base = ["generate", "--model", tiny_model_dir, "--max-new-tokens", 4, "--prompt", PROMPTS[0],
            "--prompt", PROMPTS[1]]  # fmt: skip
    code, doc, err = run_json(capsys, *base, "--prompts-file", prompts_file)
    assert code == 0, err
    _envelope(doc, "generate")
    assert doc["model"] == str(tiny_model_dir)
    assert doc["settings"] == {"max_new_tokens": 4, "temperature": 0.0, "top_p": 1.0, "seed": 0, "stop": [],
                               "template_var": {}}
    assert doc["results"] == [
        {"prompt": PROMPTS[0], "completion": answers[0]},
        {"prompt": PROMPTS[1], "completion": answers[1]},
        {"id": 7, "prompt": PROMPTS[2], "completion": answers[2]},
        {"prompt": PROMPTS[3], "completion": answers[3]},
    ]
    assert "generate: 100%" in err and "4/4" in err
    code, doc, err = run_json(capsys, *base)  # --prompt only: no bar
    assert code == 0 and len(doc["results"]) == 2 and "generate:" not in err
    code, _, err = run(capsys, *base, "--prompts-file", prompts_file, "--no-progress")
    assert code == 0 and "generate:" not in err


def test_data_validate_json(capsys, tmp_path):
    good = _jsonl(tmp_path / "good.jsonl", [{"prompt": "a", "completion": "b"}, {"text": "plain"},
                                            {"prompt": "c", "completion": "d"}])  # fmt: skip
    code, doc, err = run_json(capsys, "data", "validate", good)
    assert code == 0, err
    _envelope(doc, "data validate")
    assert doc == {**doc, "file": str(good), "kind": "sft", "rows": 3, "max_length": None, "warnings": [],
                   "shapes": {"prompt/completion": 2, "text": 1}}  # fmt: skip
    assert list(doc["shapes"]) == ["prompt/completion", "text"]  # most common first

    bad = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": 3}, {"prompt": "ok", "completion": "b"},
                                          {"nope": 1}])  # fmt: skip
    code, doc, err = run_json(capsys, "data", "validate", bad)
    assert code == 2
    _envelope(doc, "data validate", ok=False)
    assert doc["error"]["kind"] == "user" and "2 problem(s)" in doc["error"]["message"]
    assert [(p["file"], p["line"], p["field"]) for p in doc["problems"]] == [(str(bad), 1, "completion"),
                                                                              (str(bad), 3, None)]  # fmt: skip
    assert doc["problems"][0]["message"] == "must be a string or a list of messages, got integer"
    assert f"{bad}:1: completion: must be a string" in err  # the same problems, for people, on stderr


def test_data_pairs_json(capsys, tiny_model_dir, tmp_path, monkeypatch):
    def fake_generate(model, tokenizer, prompts, **kwargs):  # the i-th sample of a prompt answers 10 + i
        seen, out = {}, []
        for p in prompts:
            seen[p] = seen.get(p, -1) + 1
            out.append(f"Answer: {10 + seen[p]}")
        if kwargs.get("finished") is not None:  # every answer ended (none cut at max_new_tokens)
            kwargs["finished"][:] = [True] * len(out)
        return out

    monkeypatch.setattr(posttrain.rollout.pairs, "generate", fake_generate)
    prompts = _jsonl(tmp_path / "prompts.jsonl", [{"id": "a", "prompt": "q1", "answer": 11},
                                                  {"id": "b", "prompt": "q2", "answer": 99}])  # fmt: skip
    out = tmp_path / "pairs.jsonl"
    args = ["data", "pairs", "--model", tiny_model_dir, "--prompts", prompts, "--task", "arithmetic", "--n", 3,
            "--out", out, "--no-progress"]  # fmt: skip
    code, doc, err = run_json(capsys, *args)
    assert code == 0, err
    _envelope(doc, "data pairs")
    # q1: samples answer 10, 11, 12 -> one pair (scores 0, 1, 0); q2: all wrong -> skipped as equal.
    assert {k: v for k, v in doc.items() if k not in ("schema_version", "command", "ok")} == {
        "model": str(tiny_model_dir), "prompts_file": str(prompts), "out": str(out), "n": 3, "already_done": 0,
        "prompts": 2, "kept": 1, "skipped_equal": 1, "skipped_empty": 0, "cut": 0, "mean_best": 0.5,
        "mean_worst": 0.0,
    }  # fmt: skip
    assert len(out.read_text().splitlines()) == 1
    code, doc, err = run_json(capsys, *args)  # a re-run skips the prompt paired and the one recorded as giving none
    assert code == 0, err
    assert (doc["already_done"], doc["prompts"], doc["kept"], doc["mean_best"]) == (2, 0, 0, None)
