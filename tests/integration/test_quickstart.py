"""`posttrain quickstart` (sft) end to end on the tiny model: the per-stage timing line, the base scores cached
with what made them and read back on the next run."""

import json
import re

from posttrain.quickstart import _is_quickstart_folder, run_quickstart
from posttrain.trainer.fingerprint import file_digest

STAGES = ["data", "model set-up", "base scoring", "training", "adapter scoring"]


def test_quickstart_times_its_stages_and_scores_the_base_model_once(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "qs"
    report = run_quickstart(str(out), steps=2, n_eval=4, model=str(tiny_model_dir))
    printed = capsys.readouterr().out
    last = printed.rstrip().splitlines()[-1]
    stage = r"{} \d+ s \(\d+%\)"
    assert re.fullmatch(r"time: " + ", ".join(stage.format(s) for s in STAGES)
                        + r"; \d+\.\d min in all; peak RSS \d+\.\d GB", last), last  # fmt: skip
    assert list(report["seconds"]) == STAGES and all(v >= 0 for v in report["seconds"].values())
    assert json.loads((out / "results.json").read_text())["seconds"] == report["seconds"]
    cached = json.loads((out / "eval_base.json").read_text())
    rates = {k: v for k, v in cached["scores"].items() if not k.startswith("per_row_")}
    assert rates == report["before"] and cached["scores"]["n"] == 4.0
    # each row's verdicts are kept with the base's scores, so every 0/1 metric's change is tested on the same rows
    assert len(cached["scores"]["per_row_exact"]) == 4 and {"exact", "json_valid", "schema_match"} <= set(report["changes"])
    assert all(set(c) == {"gained", "lost", "p_value", "low", "high"} for c in report["changes"].values())
    assert re.search(r"\nexact: \d+ prompts gained, \d+ lost of 4; change [-+]\d+\.\d to [-+]\d+\.\d pts", printed)
    assert not re.search(r"^field_\w+: \d+ prompts gained", printed, re.M)  # each field's: in results.json only
    assert any(k.startswith("field_") for k in report["changes"])
    assert cached["made_from"]["model"]["sha256"] == file_digest(tiny_model_dir)
    assert cached["made_from"]["rows"]["sha256"] == file_digest(out / "data" / "heldout.jsonl")
    assert cached["made_from"]["decoding"]["batch_size"] == 100
    assert "Held-out scores before and after training" in (out / "report.md").read_text(encoding="utf-8")

    again = run_quickstart(str(out), steps=2, n_eval=4, model=str(tiny_model_dir))
    printed = capsys.readouterr().out
    assert f"base-model scores reused from {out / 'eval_base.json'}" in printed
    assert "scoring the base model" not in printed
    assert again["before"] == report["before"] and again["after"] == report["after"]
    assert _is_quickstart_folder(out)  # --fresh may delete it: everything in it is the quickstart's


def test_quickstart_writes_nothing_into_a_file_or_another_runs_folder(tiny_model_dir, tmp_path):
    """--output-dir a file was a NotADirectoryError; another run's folder got the quickstart's data and base scores
    before its --resume check failed (an audit, nineteenth session). Both refused before anything is written."""
    import pytest

    from posttrain.errors import UserError
    from posttrain.recipes import run_recipe

    afile = tmp_path / "rows.jsonl"
    afile.write_text("{}\n")
    with pytest.raises(UserError, match="is a file; give a folder"):
        run_quickstart(str(afile), steps=1, n_eval=2, model=str(tiny_model_dir))
    other = tmp_path / "other-run"
    other.mkdir()
    for name in ("config.yaml", "metrics.jsonl", "notes.txt"):
        (other / name).write_text("x")
    for call in (lambda: run_quickstart(str(other), steps=1, n_eval=2, model=str(tiny_model_dir)),
                 lambda: run_recipe("dpo", str(other), steps=1, model=str(tiny_model_dir))):  # fmt: skip
        with pytest.raises(UserError, match="not an earlier quickstart.* run folder"):
            call()
    assert sorted(p.name for p in other.iterdir()) == ["config.yaml", "metrics.jsonl", "notes.txt"]


def test_a_quickstart_killed_mid_run_is_rerun_over_its_leftovers(tiny_model_dir, tmp_path):
    """A run killed by SIGKILL leaves its lock file and temporary files: the folder is still the quickstart's
    (a review, nineteenth session: the folder check refused it, so a killed quickstart could not resume)."""
    out = tmp_path / "qs"
    run_quickstart(str(out), steps=1, n_eval=2, model=str(tiny_model_dir))
    (out / ".posttrain.lock").write_text("99999\n")
    (out / ".report.md.tmp").write_text("")
    again = run_quickstart(str(out), steps=1, n_eval=2, model=str(tiny_model_dir))
    assert again["after"] is not None
