"""`posttrain study --quick` end to end on the tiny random model with a tiny plan, through the CLI with --json: the
document's keys, the arms' runs, the report folder; a second run reuses every finished arm; bad input is exit 2
with one clear paragraph, found before any model loads. The report page opens in headless Chromium with every image
loaded (support.py)."""

import json

import pytest
import yaml
from support import chromium, images, loaded_in_browser, valid_png

from posttrain.cli import main

# A tiny plan: 2 problems per split, 2 checkpoints per arm, batches of 4, answers of 4 tokens. The tiny random
# model is never right, so W fails its check and DPO finds no pair (the arm is reported as not run).
TINY = ["task.train_rows=16", "task.eval_problems=2", "warm_start.steps=2", "budget.seconds=0.01",
        "budget.calibration_steps=1", "budget.checkpoints=2", "arms=[sft-more, grpo, dpo-onpolicy]",
        "onpolicy.prompts=4", "onpolicy.samples=2", "evaluation.max_new_tokens=4", "evaluation.samples=2",
        "evaluation.ks=[1, 2]", "evaluation.pass_problems=1", "evaluation.curve_problems=1",
        "statistics.resamples=200", "runs.common.data.max_length=256", "runs.warm.optim.batch_size=4",
        "runs.sft.optim.batch_size=4", "runs.grpo.optim.batch_size=4", "runs.grpo.algorithm.rollout.batch_size=4",
        "runs.grpo.algorithm.num_generations=2", "runs.grpo.algorithm.rollout.max_new_tokens=4",
        "runs.dpo.optim.batch_size=2"]  # fmt: skip
TOP_KEYS = ["schema_version", "command", "ok", "setting", "model", "out", "seeds", "noise", "arms", "baseline",
            "problems", "mdd", "warm_check", "summaries", "comparisons", "predictions", "seconds", "notes",
            "settings"]  # fmt: skip


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _argv(model, out):
    return ["study", "--quick", "--model", str(model), "--out", str(out), "--json", "--no-progress",
            *(x for s in TINY for x in ("--set", s))]  # fmt: skip


def test_study_quick_end_to_end_and_a_rerun_reuses_the_arms(capsys, tiny_model_dir, tmp_path):
    out = tmp_path / "study"
    code, stdout, err = run(capsys, *_argv(tiny_model_dir, out))
    assert code == 0, err
    doc = json.loads(stdout)
    assert list(doc) == TOP_KEYS and doc["ok"] and doc["command"] == "study" and doc["setting"] == "quick"
    # pooled OOD counts the 2 problems its 7 variant rows perturb
    assert doc["problems"] == {"id": 2, "paraphrase": 2, "noop": 2, "names": 2, "rare_op": 1, "ood": 2}
    assert doc["mdd"]["id"] == pytest.approx(2.801585 * (0.5 / 2) ** 0.5, abs=1e-5)  # 2 problems, 1 seed
    (check,) = doc["warm_check"]
    assert check["ok"] is False and check["prompts"] == 1 and check["samples"] == 2
    assert any(n.startswith("W (seed 0, noise 0) fails its check") for n in doc["notes"])
    summaries = {s["arm"]: s for s in doc["summaries"]}
    assert list(summaries) == ["warm-start", "sft-more", "grpo", "dpo-onpolicy"]
    for arm in ("sft-more", "grpo"):
        s = summaries[arm]
        assert s["status"] == "trained" and s["steps"] == 2 and s["seconds"] > 0
        # tokens trained: GRPO's can be 0 on the tiny model, whose groups' rewards are often all equal (advantage 0:
        # those completions are not trained, `skip_zero_advantage`)
        if arm == "sft-more":
            assert s["tokens"] > 0
        assert set(s["accuracy"]) == {"id", "paraphrase", "noop", "names", "rare_op", "ood"}
        assert set(s["gap"]) == {"paraphrase", "noop", "names", "rare_op"} and set(s["pass_at_k"]) == {"1", "2"}
        assert set(s["accuracy"]["id"]) == {"value", "low", "high"}
        assert set(s["drift"]) == {"kl_task", "kl_task_reverse", "probe_agreement", "kl_probe"}
        assert s["drift"]["kl_task"]["value"] >= 0 and s["drift"]["kl_task"]["low"] is None  # one seed
        assert [round(p["seconds"], 6) for p in s["curve"]][0] == 0 and len(s["curve"]) == 3  # W, then 2 checkpoints
        (r,) = s["runs"]
        assert r["status"] == "trained" and [p["step"] for p in r["points"]] == [1, 2] and r["budget_s"] == 0.01
    assert summaries["dpo-onpolicy"]["status"] == "not run"
    assert "| dpo-onpolicy | not run |" in (out / "report.md").read_text(encoding="utf-8")  # not "nan"
    assert any(n.startswith("dpo-onpolicy, seed 0: only 0 training rows") for n in doc["notes"])
    assert {c["arm"] for c in doc["comparisons"]} == {"warm-start", "grpo"}
    assert {(c["metric"], c["verdict"]) for c in doc["comparisons"] if c["arm"] == "grpo"} >= {("ood", "inconclusive")}
    # a gap's difference between arms is a difference of two differences (clean - variant, each arm): its detectable
    # difference is sqrt(2) times that of one accuracy on as many problems (it was stated as one's)
    by = {(c["arm"], c["metric"]): c for c in doc["comparisons"]}
    assert by[("grpo", "gap:paraphrase")]["mdd"] == pytest.approx(by[("grpo", "paraphrase")]["mdd"] * 2**0.5)
    preds = {p["source"]: p for p in doc["predictions"]}
    assert preds["Chu et al. 2025"]["test"]["metric"] == "ood" and preds["Lin et al. 2025"]["verdict"] == "not measured"
    assert (out / "study.json").is_file() and json.loads((out / "study.json").read_text()) == doc
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.count("<img ") == 4 and "Predictions" in page and (out / "report.md").is_file()
    assert sorted(p.name for p in (out / "report_files").iterdir()) == [
        "accuracy_id.png", "accuracy_ood.png", "ood_accuracy.png", "pass_at_k.png"]  # fmt: skip
    found = images(page)  # self-contained: every image a PNG in a data: URI, and each one decodes in a browser
    for png, w, h in found:
        valid_png(png, (w, h))
    assert loaded_in_browser(chromium(), page, tmp_path) == (4, 4)

    arm_dir = out / "seed-0" / "noise-0" / "arms" / "sft-more"
    stamp = (arm_dir / "run" / "metrics.jsonl").stat().st_mtime_ns
    code, stdout, err = run(capsys, *_argv(tiny_model_dir, out))
    assert code == 0, err
    again = json.loads(stdout)
    assert [r["status"] for s in again["summaries"] for r in s["runs"]] == ["reused", "reused", "reused", "not run"]
    assert (arm_dir / "run" / "metrics.jsonl").stat().st_mtime_ns == stamp  # not trained again
    assert [s["accuracy"] for s in again["summaries"]] == [s["accuracy"] for s in doc["summaries"]]

    # the predictions and the statistics they are judged by were stated before the first arm trained; a study whose
    # stated ones differ from those a run would judge by is refused (an audit changed a finished study's level and
    # power, and two verdicts flipped), before any model loads
    stated = json.loads((out / "predictions.json").read_text(encoding="utf-8"))
    assert stated["statistics"] == {"level": 0.95, "power": 0.8} and stated["stated_at"]
    assert [p["claim"] for p in stated["predictions"]] == [p["claim"] for p in doc["predictions"]]
    stated["statistics"]["power"] = 0.9
    (out / "predictions.json").write_text(json.dumps(stated), encoding="utf-8")
    code, stdout, err = run(capsys, *_argv(tiny_model_dir, out))
    assert code == 2 and "holds the predictions and statistics this study stated before its results" in err
    assert "statistics.power: 0.9 -> 0.8" in err and "run the study in a new --out" in err
    # and every arm's steps were logged, so the budget's time and tokens are read from each of them
    assert (arm_dir / "run" / "config.yaml").read_text(encoding="utf-8").count("log_every: 1") == 1


@pytest.mark.parametrize(("argv", "says"), [
    (["--setting", "nope"], "study setting 'nope': no such file, and not a shipped setting (full, quick, standard)"),
    (["--quick", "--set", "budget.secs=3"], "budget.secs (--set budget.secs=3): unknown key"),
    (["--quick", "--set", "arms=[grpo]"], "baseline 'sft-more' is not one of the arms (grpo)"),
    (["--quick", "--set", "runs.sft.optim.lr=-1"], "optim.lr"),
    (["--quick", "--set", "budget.seconds=0"], "budget.seconds (--set budget.seconds=0): should be greater than 0 (got 0)"),
    (["--quick", "--set", "statistics.power=0.05"], "statistics.power (--set statistics.power=0.05): should be greater than or equal to 0.5"),
    (["--quick", "--set", "runs.common.run.log_every=2"], "runs.common.run.log_every: the study sets it itself"),
    (["--quick"], "no such local model folder"),  # the model is the only thing wrong
])  # fmt: skip
def test_bad_input_is_exit_2_before_any_model_loads(capsys, tmp_path, argv, says):
    code, stdout, err = run(capsys, "study", *argv, "--out", str(tmp_path / "s"), "--model", str(tmp_path / "none"))
    assert code == 2 and says in err and "Traceback" not in err
    assert not (tmp_path / "s").exists()  # nothing written, not even the settings


def test_a_study_folder_with_other_settings_is_refused(capsys, tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    (out / "study.yaml").write_text(yaml.safe_dump({"model": "other", "seeds": [0]}), encoding="utf-8")
    code, _, err = run(capsys, "study", "--quick", "--out", str(out))
    assert code == 2 and "holds a study with other settings" in err and "model: other -> smollm2-135m-instruct" in err
    (tmp_path / "f").write_text("x")
    code, _, err = run(capsys, "study", "--quick", "--out", str(tmp_path / "f"))
    assert code == 2 and "is not a folder" in err
