"""Run reports (`posttrain report`, and the one every `posttrain train` writes at the end) on the tiny model's SFT,
DPO and GRPO runs: the page is self-contained (every image a PNG in a data: URI), each method gets its sections,
several runs overlay with their config differences marked, RL runs keep sampled completions with their rewards,
every step logs its peak memory, and the page renders in headless Chromium with every image loaded.

The browser test needs Debian's `chromium` (`apt-get install chromium`; .ci/run installs it). Without it the test
fails and says so, unless POSTTRAIN_SKIP_BROWSER=1 is set."""

import json
import os
import re
import resource
import shutil
from pathlib import Path

import pytest
from support import browser, chromium, images, loaded_in_browser, valid_png

from posttrain.cli import main
from posttrain.report import IMAGE_DIR, build_report
from posttrain.train import train
from posttrain.trainer.metrics import read_metrics

# LoRA on every linear layer of the tiny model includes lm_head, which peft saves with the adapter and says so.
pytestmark = pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`:UserWarning")

SFT_ROWS = [{"prompt": f"add {a} {b}", "completion": str(a + b)} for a in range(4) for b in range(4)]
PAIRS = [{"prompt": f"add {a} {b}", "chosen": str(a + b), "rejected": f"{a + b + 1} maybe"} for a in range(4) for b in range(2)]
PROMPTS = [{"prompt": f"add {a} {b}", "answer": str(a + b)} for a in range(4) for b in range(4)]
LETTERS = 'def letters(prompts, completions, **kw):\n    return [sum("a" <= ch <= "z" for ch in c) / 8 for c in completions]\n'


def letters(text: str) -> float:
    return sum("a" <= ch <= "z" for ch in text) / 8


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """Four finished tiny runs, each of which wrote its own report at the end (run.report is on by default):
    SFT with held-out data, SFT with another learning rate, DPO with LoRA, GRPO with LoRA and a file reward."""
    from posttrain.algorithms import load_config

    root = tmp_path_factory.mktemp("report-runs")
    sft, pairs, prompts = _jsonl(root / "sft.jsonl", SFT_ROWS), _jsonl(root / "pairs.jsonl", PAIRS), _jsonl(
        root / "prompts.jsonl", PROMPTS)  # fmt: skip
    (root / "rewards.py").write_text(LETTERS, encoding="utf-8")
    base = {"model.name": tiny_model_dir, "technique.name": "full", "data.max_length": 64, "optim.lr": 1e-2,
            "optim.batch_size": 8, "optim.warmup_steps": 0, "run.max_steps": 3, "run.progress": False}  # fmt: skip
    methods = {
        "sft": {"data.train": sft, "data.eval": sft},
        "sft-low-lr": {"data.train": sft, "optim.lr": 1e-3},
        "dpo": {"algorithm.name": "dpo", "data.train": pairs, "technique.name": "lora"},
        "grpo": {"algorithm.name": "grpo", "algorithm.rewards": f"[{root / 'rewards.py'}:letters]", "data.train": prompts,
                 "technique.name": "lora", "algorithm.rollout.max_new_tokens": 8, "optim.batch_size": 16,
                 "algorithm.num_generations": 4},  # fmt: skip
    }
    out = {}
    for name, overrides in methods.items():
        settings = {**base, **overrides, "run.output_dir": root / name}
        train(load_config(None, [f"{k}={v}" for k, v in settings.items()]))
        out[name] = root / name
    yield out
    shutil.rmtree(root, ignore_errors=True)


def _sections(page: str) -> list[str]:
    return re.findall(r"<h2>(.*?)</h2>", page)


EXPECTED = {  # the sections each method's report has (in this order) and some it must not have
    "sft": (["Summary", "Evaluation", "Loss and optimisation", "Throughput and memory", "Config"],
            ["Preference pairs (DPO)", "Rewards", "Sampled completions"]),
    # a run with no held-out scores has an Evaluation section that says how to get them (`posttrain evaluate`)
    "dpo": (["Summary", "Evaluation", "Loss and optimisation", "Preference pairs (DPO)", "Throughput and memory",
             "Config"], ["Rewards", "Sampled completions"]),
    "grpo": (["Summary", "Evaluation", "Loss and optimisation", "Rewards", "Completions", "Policy update",
              "Throughput and memory", "Sampled completions", "Config"], ["Preference pairs (DPO)"]),
}  # fmt: skip


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_every_train_writes_a_self_contained_report_with_its_methods_sections(runs, method):
    run = runs[method]
    page = (run / "report.html").read_text(encoding="utf-8")
    present, absent = EXPECTED[method]
    sections = _sections(page)
    assert [s for s in sections if s in present] == present and not set(absent) & set(sections)
    if method != "sft":  # (the sft run has data.eval)
        assert "No held-out scores in this run folder" in page and f"posttrain evaluate --model {run}" in page
    found = images(page)
    assert found
    for png, w, h in found:
        valid_png(png, (w, h))
    assert "<script" not in page and "<link" not in page and not re.search(r"""(src|href)=["']?(https?:|//)""", page)
    # the Markdown beside it: the same plots as files next to it
    md = (run / "report.md").read_text(encoding="utf-8")
    linked = re.findall(rf"\]\(({IMAGE_DIR}/[^)]+\.png)\)", md)
    assert len(linked) == len(found) == len(list((run / IMAGE_DIR).glob("*.png")))
    assert sorted((run / p).read_bytes() for p in linked) == sorted(png for png, _, _ in found)
    for heading in present:
        assert f"## {heading}" in md
    # the resolved config is shown as it was saved
    assert "algorithm:" in page and f"name: {method}" in page


def test_report_panels_follow_the_logged_metrics(runs):
    page = (runs["grpo"] / "report.html").read_text(encoding="utf-8")
    alts = re.findall(r'alt="([^"]*)"', page)
    for title in ("loss", "learning rate", "gradient norm (before clipping)", "reward: letters", "total reward",
                  "completion length", "truncated share", "KL to the reference", "entropy", "clip fraction",
                  "peak memory (GB)"):  # fmt: skip
        assert f"{title} against step" in alts, title
    sft = (runs["sft"] / "report.html").read_text(encoding="utf-8")
    assert "reward: letters against step" not in sft and "<td>eval_loss</td>" in sft  # eval_loss: table and panel
    last_eval = [r for r in read_metrics(runs["sft"] / "metrics.jsonl") if "eval_loss" in r][-1]
    assert f"<td>{last_eval['eval_loss']:.4g}</td>" in sft


def test_every_step_logs_peak_memory(runs):
    now = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    for run in runs.values():
        peaks = [r["peak_rss_gb"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
        assert len(peaks) == 3 and 0.05 < peaks[0] and peaks == sorted(peaks) and peaks[-1] <= now
        assert not any("peak_cuda_gb" in r for r in read_metrics(run / "metrics.jsonl"))  # CPU runs


def test_grpo_keeps_sampled_completions_with_their_rewards(runs):
    samples = [json.loads(line) for line in (runs["grpo"] / "samples.jsonl").read_text().splitlines()]
    # 3 rollouts of 4 prompts x 4 samples, each kept (a short run): 4 samples each, one per prompt group
    assert [(s["rollout"], s["step"], s["sequence"]) for s in samples] == [
        (r, r + 1, i) for r in range(3) for i in (0, 4, 8, 12)
    ]
    for s in samples:
        assert s["rewards"] == {"letters": letters(s["completion"])}  # each completion with its own reward
        assert s["total"] == pytest.approx(s["rewards"]["letters"], abs=1e-7)  # weight 1, overlong: score
        assert s["prompt"].startswith("add ") and isinstance(s["truncated"], bool) and 1 <= s["length"] <= 8
    page = (runs["grpo"] / "report.html").read_text(encoding="utf-8")
    assert page.count("<details open>") == 3  # first and last rollouts' samples, and the config
    assert re.findall(r"<summary>rollout (\d) \(step (\d)\)", page) == [("0", "1"), ("1", "2"), ("2", "3")]


def test_several_runs_side_by_side_with_their_differences_marked(runs, tmp_path, capsys):
    out = tmp_path / "compare"
    assert main(["report", str(runs["sft"]), str(runs["sft-low-lr"]), "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"report: {out / 'report.html'}\n")
    page = (out / "report.html").read_text(encoding="utf-8")
    one = (runs["sft-low-lr"] / "report.html").read_text(encoding="utf-8")
    assert len(images(page)) == len(images(one))  # the runs overlaid on each panel, not one panel per run
    differences = page[page.index("<h2>Config differences</h2>") : page.index("<h2>", page.index("Config differences") + 30)]
    assert '<table class="marked">' in differences
    rows = re.findall(r"<tr><td>(.*?)</td><td>(.*?)</td><td>(.*?)</td></tr>", differences)
    assert ("optim.lr", "0.01", "0.001") in rows and {r[0] for r in rows} == {"optim.lr", "run.output_dir", "data.eval"}
    assert "<th>sft</th><th>sft-low-lr</th>" in page


def test_report_command_errors_are_one_paragraph(runs, tmp_path, capsys):
    cases = {
        "no such folder": [str(tmp_path / "missing")],
        "is not a run folder": [str(tmp_path)],
        "need a folder for their report: add --out DIR": [str(runs["sft"]), str(runs["dpo"])],
    }
    empty = tmp_path / "empty-run"
    empty.mkdir()
    shutil.copy(runs["sft"] / "config.yaml", empty / "config.yaml")
    (empty / "metrics.jsonl").write_text('{"step": 1, "eval_loss": 2.0}\n{"step": 2, "lo', encoding="utf-8")
    cases["has no training records yet"] = [str(empty)]
    damaged = tmp_path / "damaged-run"  # an audit, nineteenth session: "no training records yet" misled here
    damaged.mkdir()
    shutil.copy(runs["sft"] / "config.yaml", damaged / "config.yaml")
    (damaged / "metrics.jsonl").write_bytes(b'\xff\xfe garbage\n{"step": "one", "loss": 1.0}\n')
    cases["none of its records can be read (2 line(s) are not JSON records with a step"] = [str(damaged)]
    (tmp_path / "a-file").write_text("x")
    cases["cannot write the report into"] = [str(runs["sft"]), "--out", str(tmp_path / "a-file" / "sub")]
    for message, args in cases.items():
        assert main(["report", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_a_report_failure_does_not_fail_the_run(make_cfg, capsys, monkeypatch):
    import posttrain.report as report

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(report, "build_report", broken)
    result = train(make_cfg("r", **{"run.report": True, "run.max_steps": 1}))
    assert (result.final_dir / "config.json").is_file() and not (result.run_dir / "report.html").exists()
    assert "warning: no report written for" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["grpo", "dpo"])
def test_report_renders_in_headless_chromium_with_every_image_loaded(runs, method, tmp_path):
    binary = chromium()
    page = (runs[method] / "report.html").read_text(encoding="utf-8")
    n = len(images(page))
    assert loaded_in_browser(binary, page, tmp_path) == (n, n) and n > 0
    shot = tmp_path / "report.png"
    done = browser(binary, tmp_path / "profile", "--hide-scrollbars", f"--screenshot={shot}",
                    "--window-size=1200,3000", (runs[method] / "report.html").as_uri())  # fmt: skip
    assert shot.is_file(), done.stderr[-2000:]
    valid_png(shot.read_bytes(), (1200, 3000))
    if os.environ.get("POSTTRAIN_REPORT_SCREENSHOTS"):  # a folder to keep the screenshots in, to look at them
        shutil.copy(shot, Path(os.environ["POSTTRAIN_REPORT_SCREENSHOTS"]) / f"{method}.png")


def test_build_report_writes_over_an_earlier_report(runs, tmp_path):
    """Plots of an earlier report that the new one does not have are removed, not left beside it."""
    run = tmp_path / "copy"
    shutil.copytree(runs["dpo"], run)
    (run / IMAGE_DIR / "stale.png").write_bytes(b"old")
    paths = build_report([run])
    assert not (run / IMAGE_DIR / "stale.png").exists() and paths.html == run / "report.html"
    assert sorted(p.name for p in (run / IMAGE_DIR).iterdir()) == sorted(p.name for p in (runs["dpo"] / IMAGE_DIR).iterdir())
    # one run folder given as itself, not in a list (from Python: a string was read as one run per character)
    assert build_report(str(run)).html == build_report(run).html == run / "report.html"


def test_diagnose_report_renders_in_headless_chromium_with_every_image_loaded(tmp_path):
    """`posttrain diagnose`'s report (a stub model: right on clean prompts, wrong on every second variant; its
    samples right on one of two) goes through the same page writer and the same browser check."""
    from posttrain.data import TASKS
    from posttrain.data.tasks import make_perturbed
    from posttrain.diagnose import Settings, run_diagnosis, task_verifier, write_diagnosis_report

    binary = chromium()
    rows = TASKS["arithmetic"].make(6, seed=0, split="heldout")
    variants = make_perturbed("arithmetic", rows, seed=0)
    answers = {r["prompt"]: r["answer"] for r in [*rows, *variants]}
    wrong = {v["prompt"] for v in variants[::2]}

    def answer(batch, temperature, seed):
        return [f"Answer: {answers[r['prompt']] + (r['prompt'] in wrong or (temperature > 0 and i % 2))}"
                for i, r in enumerate(batch)]  # fmt: skip

    result = run_diagnosis(rows, task_verifier("arithmetic"), answer=answer, model_name="stub", variants=variants,
                           variant_source="task arithmetic", settings=Settings(samples=2))  # fmt: skip
    paths = write_diagnosis_report(result, tmp_path / "diagnose")
    page = paths.html.read_text(encoding="utf-8")
    assert _sections(page) == ["Recommendation", "Robustness", "Sampling headroom", "Settings"]
    found = images(page)
    assert loaded_in_browser(binary, page, tmp_path) == (2, 2) and len(found) == 2
    for png, w, h in found:
        valid_png(png, (w, h))
