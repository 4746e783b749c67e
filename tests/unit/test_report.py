"""Reports from hand-written run folders: any subset of the files gives a report (what is missing is left out and
said), quickstart results become before/after and paired tables, run text is escaped, and the RL sample log keeps
every Nth rollout and replaces what a resumed run samples again. End-to-end reports of real runs:
tests/integration/test_report.py."""

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from posttrain.quickstart import format_before_after
from posttrain.report import build_report
from posttrain.report.document import Table, to_html, to_markdown
from posttrain.rollout.samples import SampleLog


def _write(path: Path, records) -> None:
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in records), encoding="utf-8")


def test_a_folder_with_only_metrics_gets_a_report_of_what_it_has(tmp_path):
    run = tmp_path / "bare"
    run.mkdir()
    _write(run / "metrics.jsonl", [
        {"step": 1, "loss": 2.0, "lr": 1e-3, "foo_rate": 0.25, "explained_variance": float("nan")},
        {"step": 2, "loss": 1.5, "lr": 1e-3, "foo_rate": 0.5, "explained_variance": 0.5},
        '{"step": 3, "loss": 1.',  # a line cut by a kill
    ])  # fmt: skip
    page = build_report([run]).html.read_text(encoding="utf-8")
    sections = re.findall(r"<h2>(.*?)</h2>", page)
    assert sections == ["Summary", "Evaluation", "Loss and optimisation", "Value head (PPO)", "Other metrics", "Notes",
                        "Config"]
    assert "<td>foo_rate</td><td>0.25</td><td>0.5</td><td>0.25</td><td>0.5</td>" in page  # first last min max
    # the NaN is left out of the numbers (and the plot): one finite value
    assert "<td>explained_variance</td><td>0.5</td><td>0.5</td><td>0.5</td><td>0.5</td>" in page
    assert "1 line(s) were not JSON records" in page and "no config.yaml in the run folder" in page
    assert "<td>bare</td><td>unknown</td>" in page  # method unknown without a config


RESULTS = {
    "method": "dpo",
    "before": {"n": 200.0, "correct": 0.225, "formatted": 0.225, "pairs_implicit_margin": 0.0,
               "pairs_mean_logp_accuracy": 0.4333, "judge_score_mean": 0.5},
    "after": {"n": 200.0, "correct": 0.295, "formatted": 0.92, "pairs_implicit_margin": 12.305,
              "pairs_mean_logp_accuracy": 0.45, "judge_score_mean": 0.75},
    "changes": {"correct": {"gained": 43, "lost": 29, "p_value": 0.1247, "low": -0.0123, "high": 0.1517}},
    "steps": 1,
}


def test_quickstart_results_give_before_after_and_paired_tables(tmp_path):
    run = tmp_path / "qs"
    run.mkdir()
    _write(run / "metrics.jsonl", [{"step": 1, "loss": 0.69}])
    (run / "config.yaml").write_text("algorithm:\n  name: dpo\n", encoding="utf-8")
    (run / "results.json").write_text(json.dumps(RESULTS), encoding="utf-8")
    md = build_report([run]).markdown.read_text(encoding="utf-8")
    assert "Held-out scores before and after training (results.json; 200 prompts)." in md
    assert "| correct | 22.5% | 29.5% | +7.0 pts |" in md
    assert "| formatted | 22.5% | 92.0% | +69.5 pts |" in md
    # as the terminal's table (quickstart.format_before_after): a margin and a mean of scores are numbers, not
    # rates, and an accuracy whose name holds "mean" is a rate (it read 0.4333 | 0.45 | +0.01667 on the page)
    assert "| pairs_implicit_margin | +0.000 | +12.305 | +12.305 |" in md
    assert "| judge_score_mean | 0.5 | 0.75 | +0.25 |" in md
    assert "| pairs_mean_logp_accuracy | 43.3% | 45.0% | +1.7 pts |" in md
    table = format_before_after(RESULTS["before"], RESULTS["after"])
    assert all(line in md for line in table.splitlines()[2:])
    assert "| correct | 43 | 29 | -1.2 to +15.2 pts | 0.12 |" in md and "Warning" not in md
    # results.json scored at step 1, and the run continued to step 2 without scoring again: said, not shown as current
    _write(run / "metrics.jsonl", [{"step": 1, "loss": 0.69}, {"step": 2, "loss": 0.5}])
    md = build_report([run]).markdown.read_text(encoding="utf-8")
    assert "the scores after training are of the model at step 1, but the run has since logged steps up to 2" in md
    # before training finishes, only the base model's scores exist
    (run / "results.json").unlink()
    (run / "eval_base.json").write_text(json.dumps(RESULTS["before"]), encoding="utf-8")
    md = build_report([run]).markdown.read_text(encoding="utf-8")
    assert "| held-out metric | base model |\n|---|---|\n| correct | 22.5% |" in md and "| after training |" not in md
    # the sft quickstart keeps its base scores with what made them (`evaluation.cache`): the same table
    made_from = {"model": {"sha256": "ab"}, "rows": {"sha256": "cd"}, "decoding": {"max_new_tokens": 96}}
    (run / "eval_base.json").write_text(json.dumps({"scores": RESULTS["before"], "made_from": made_from}))
    keyed = build_report([run]).markdown.read_text(encoding="utf-8")
    assert "| held-out metric | base model |\n|---|---|\n| correct | 22.5% |" in keyed and "sha256" not in keyed


def test_run_text_is_escaped_in_both_formats(tmp_path):
    run = tmp_path / "rl"
    run.mkdir()
    _write(run / "metrics.jsonl", [{"step": 1, "loss": 0.0, "reward/r_mean": 1.0}])
    (run / "config.yaml").write_text("algorithm:\n  name: grpo\n", encoding="utf-8")
    text = "<script>alert(1)</script> a|b *x*\n\x00end"
    _write(run / "samples.jsonl", [{"step": 1, "rollout": 0, "sequence": 0, "prompt": "p", "completion": text,
                                    "rewards": {"r": 1.0}, "total": 1.0, "truncated": False, "length": 9}])  # fmt: skip
    paths = build_report([run])
    page = paths.html.read_text(encoding="utf-8")
    assert "<script" not in page
    assert '<td class="txt">&lt;script&gt;alert(1)&lt;/script&gt; a|b *x*\n\\x00end</td>' in page
    md = paths.markdown.read_text(encoding="utf-8")
    assert "| p | &lt;script&gt;alert(1)&lt;/script&gt; a\\|b \\*x\\*<br>\\\\x00end | r 1 | 1 | no | 9 |" in md


def test_document_blocks_render_alike():
    blocks = [Table(["a", "b"], [["`x`", "1"]], marked=True)]
    assert '<table class="marked">\n<tr><th>a</th><th>b</th></tr>\n<tr><td><code>x</code></td><td>1</td></tr>' in (
        to_html("t", blocks)
    )
    assert to_markdown(blocks, "img") == ("| a | b |\n|---|---|\n| **`x`** | **1** |\n", {})


def _rollout(n: int, tag: str):
    return SimpleNamespace(texts=[f"{tag}{i}" for i in range(n)], truncated=torch.zeros(n, dtype=torch.bool),
                           lengths=torch.full((n,), 3))  # fmt: skip


def _log(path: Path, **kw) -> SampleLog:
    return SampleLog(path, every=2, last=4, steps_per_rollout=3, enabled=True, k=2, **kw)


def test_sample_log_keeps_every_nth_rollout_and_the_last_and_replaces_resampled_ones(tmp_path):
    path = tmp_path / "samples.jsonl"
    examples = [SimpleNamespace(prompt=f"q{i}") for i in range(8)]
    result = SimpleNamespace(per_function={"f": [float(i) for i in range(8)]})
    log = _log(path)
    for index in range(5):  # rollouts 0..4: 0, 2 (every 2nd) and 4 (the last) are kept
        log.write(index, examples, _rollout(8, "a"), result, torch.arange(8.0) * 2)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert [(r["rollout"], r["step"], r["sequence"], r["completion"]) for r in rows] == [
        (0, 1, 0, "a0"), (0, 1, 4, "a4"), (2, 7, 0, "a0"), (2, 7, 4, "a4"), (4, 13, 0, "a0"), (4, 13, 4, "a4"),
    ]  # fmt: skip
    assert rows[1]["prompt"] == "q4" and rows[1]["rewards"] == {"f": 4.0} and rows[1]["total"] == 8.0
    # resumed at rollout 2: what was sampled from rollout 2 on is sampled again, by the restored weights
    _log(path).write(2, examples, _rollout(8, "b"), result, torch.zeros(8))
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert [(r["rollout"], r["completion"]) for r in rows] == [(0, "a0"), (0, "a4"), (2, "b0"), (2, "b4")]
    SampleLog(path, every=1, last=9, steps_per_rollout=1, enabled=False).write(1, examples, _rollout(8, "c"),
                                                                                result, torch.zeros(8))  # fmt: skip
    assert len(path.read_text().splitlines()) == 4  # not the main process: nothing written


def test_importing_posttrain_and_its_report_package_does_not_import_matplotlib():
    code = "import sys, posttrain, posttrain.report, posttrain.cli; sys.exit('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_a_run_stopped_before_its_end_says_so(tmp_path):
    """A run killed at step 121 of 3000 read as finished: the summary showed "last step 121" (an audit)."""
    run = tmp_path / "cut"
    run.mkdir()
    _write(run / "metrics.jsonl", [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)])
    (run / "config.yaml").write_text("algorithm:\n  name: sft\nrun:\n  max_steps: 10\n", encoding="utf-8")
    (run / "checkpoints" / "step-000002").mkdir(parents=True)
    md = build_report([run]).markdown.read_text(encoding="utf-8")
    assert "| 3 of 10 |" in md
    assert ("the run stopped at step 3 of 10: its latest checkpoint is step 2, which `posttrain train` with its "
            "config and --resume continues from (training step 3 again)") in md
    (run / "config.yaml").write_text("algorithm:\n  name: sft\nrun:\n  max_steps: 3\n", encoding="utf-8")
    md = build_report([run]).markdown.read_text(encoding="utf-8")
    assert "stopped at step" not in md and "| 3 of" not in md
