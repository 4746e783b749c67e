"""Resuming: a run stopped after a checkpoint (in-process, or by kill -9) continues to the same losses."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from posttrain.config import dump_config
from posttrain.errors import ConfigError
from posttrain.train import train
from posttrain.trainer.metrics import read_metrics


@contextlib.contextmanager
def _dies_after_checkpoint(monkeypatch, at: int):
    """Within: the run "dies" (KeyboardInterrupt, expected) right after writing checkpoint `at`."""
    import posttrain.trainer.loop as loop

    real_save = loop.save_checkpoint

    def save_then_die(accelerator, run_dir, step, *a, **kw):
        path = real_save(accelerator, run_dir, step, *a, **kw)
        if step == at:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        monkeypatch.setattr(loop, "save_checkpoint", real_save)


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "loss" in r}


def test_resumed_run_equals_uninterrupted_run(make_cfg, monkeypatch):
    # LoRA with dropout: resuming must also restore the random-number generators to replay the dropout masks.
    overrides = {
        "technique.name": "lora",
        "technique.dropout": 0.2,
        "run.max_steps": 6,
        "run.save_every": 2,
        "optim.lr": 5e-3,
    }
    reference = _losses(train(make_cfg("uninterrupted", **overrides)).run_dir)
    cfg = make_cfg("interrupted", **overrides)
    with _dies_after_checkpoint(monkeypatch, 4):  # the process "dies" right after checkpoint 4
        train(cfg)
    assert set(_losses(cfg.run.output_dir)) == {1, 2, 3, 4}
    resumed = _losses(train(cfg, resume=True).run_dir)
    assert resumed == reference  # exact: same data, same RNG, same optimiser state


def test_kill_9_mid_run_then_resume(make_cfg, tmp_path):
    overrides = {"run.max_steps": 300, "run.save_every": 5, "optim.lr": 1e-3, "data.max_length": 48}
    reference_cfg = make_cfg("reference", **overrides)
    cfg = make_cfg("killed", **overrides)
    cfg_file = tmp_path / "killed.yaml"
    dump_config(cfg, cfg_file)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "posttrain.cli", "train", str(cfg_file)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpts = Path(cfg.run.output_dir) / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not (ckpts / "step-000010").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = _losses(cfg.run.output_dir)
    assert 10 <= max(done) < 300, "the run should have been killed part-way"
    out = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "resuming" in out.stdout
    reference = _losses(train(reference_cfg).run_dir)
    assert _losses(cfg.run.output_dir) == reference
    assert yaml.safe_load((Path(cfg.run.output_dir) / "config.yaml").read_text())["run"]["max_steps"] == 300


def test_resume_refuses_changed_data_and_names_the_file(make_cfg, sft_file):
    import pytest

    from posttrain.errors import ConfigError

    cfg = make_cfg(**{"run.max_steps": 2, "run.save_every": 1})
    train(cfg)
    sft_file.write_text(sft_file.read_text().replace('"completion": "3"', '"completion": "three"'))
    with pytest.raises(ConfigError) as err:
        train(make_cfg(**{"run.max_steps": 3}), resume=True)
    assert f"--resume: data.train ({sft_file}) changed since" in str(err.value)
    assert not (Path(cfg.run.output_dir) / "checkpoints" / "step-000003").exists()


def test_resume_names_each_changed_setting_with_its_old_and_new_value(make_cfg):
    import pytest

    from posttrain.errors import ConfigError

    train(make_cfg(**{"run.max_steps": 1}))
    with pytest.raises(ConfigError) as err:
        train(make_cfg(**{"run.max_steps": 2, "optim.lr": 1e-3, "data.max_length": 48}), resume=True)
    assert "data.max_length: 64 -> 48; optim.lr: 0.01 -> 0.001. Only run length" in str(err.value)


def test_resume_refuses_a_run_folder_whose_config_is_missing(make_cfg):
    """Without config.yaml the change check was skipped: the run resumed with a new learning rate, silently (an
    audit, nineteenth session). Refused, and the checkpoints are kept."""
    import shutil

    cfg = make_cfg(**{"run.max_steps": 2, "run.save_every": 1})
    train(cfg)
    run_dir = Path(cfg.run.output_dir)
    shutil.rmtree(run_dir / "final")
    (run_dir / "config.yaml").unlink()
    kept = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    with pytest.raises(ConfigError, match="has checkpoints but no config.yaml"):
        train(make_cfg(**{"run.max_steps": 3, "optim.lr": 0.5}), resume=True)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == kept and kept


@pytest.mark.parametrize("damage, says", [
    (lambda c: (c / "trainer_state.json").unlink(), "trainer_state.json is missing"),
    (lambda c: (c / "trainer_state.json").write_text('{"step": "x"}'), "trainer_state.json is unreadable"),
    (lambda c: (c / "optimizer.pt").unlink(), "optimizer.pt is missing"),
    (lambda c: (c / "optimizer.pt").write_bytes((c / "optimizer.pt").read_bytes()[:100]), "optimizer.pt is cut short"),
    (lambda c: (c / "trainable.safetensors").write_bytes((c / "trainable.safetensors").read_bytes()[:300]),
     "trainable.safetensors is cut short or corrupt"),
])  # fmt: skip
def test_a_damaged_checkpoint_is_named_before_the_model_loads(make_cfg, damage, says):
    """Each was a traceback (FileNotFoundError, ValueError, SafetensorError, RuntimeError: an audit, nineteenth
    session). The message names the checkpoint and the one a resume would fall back to."""
    import shutil

    cfg = make_cfg(**{"run.max_steps": 2, "run.save_every": 1})
    train(cfg)
    run_dir = Path(cfg.run.output_dir)
    shutil.rmtree(run_dir / "final")
    damage(run_dir / "checkpoints" / "step-000002")
    with pytest.raises(ConfigError) as err:
        train(make_cfg(**{"run.max_steps": 3}), resume=True)
    assert (f"--resume: checkpoint {run_dir / 'checkpoints' / 'step-000002'} is damaged: {says}" in str(err.value)
            and "Remove that folder to resume from the one before (step-000001)" in str(err.value))  # fmt: skip


def test_a_run_resumes_with_less_memory_and_ends_as_the_uninterrupted_run(make_cfg, tmp_path):
    """What a run that ran out of memory continues with (`trainer.loop`'s message): smaller micro-batches and
    gradient checkpointing may change on --resume (the same math: the loss is normalised over the whole step), and
    the run ends with the uninterrupted run's weights within float summation order. AdamW eps 1 keeps its step
    nearly linear in the gradient, so last-bit differences of near-zero gradients stay last-bit (as in the
    process-count resumes)."""
    # a constant rate: the cut run's first two steps must follow the 4-step run's schedule
    exact = {"optim.eps": 1.0, "run.save_every": 1, "technique.name": "lora", "optim.schedule": "constant"}
    whole = train(make_cfg("whole", **{**exact, "run.max_steps": 4}), return_model=True)
    train(make_cfg("cut", **{**exact, "run.max_steps": 2}))
    resumed = train(make_cfg("cut", **{**exact, "run.max_steps": 4, "optim.micro_batch_size": 2,
                                       "model.gradient_checkpointing": "true"}), resume=True, return_model=True)  # fmt: skip
    assert resumed.steps_trained == 2
    want = dict(whole.model.named_parameters())
    for name, p in resumed.model.named_parameters():
        torch.testing.assert_close(p.detach(), want[name].detach(), rtol=1e-5, atol=1e-7)
    with pytest.raises(ConfigError, match=r"optim.lr: 0.01 -> 0.001\. Only run length"):
        train(make_cfg("cut", **{**exact, "run.max_steps": 5, "optim.lr": 1e-3}), resume=True)


def test_another_micro_batch_under_dropout_is_said_on_resume(make_cfg, capsys):
    """Dropout draws its masks per micro-batch forward, over tensors that micro-batch shapes: another split draws
    other masks (an audit measured step 3's loss 5.01636 -> 5.02463 under LoRA dropout 0.2), so the resume says
    the run is no longer the uninterrupted one. Without dropout, only the summation order changes: no note; nor when
    the micro-batch is named but the same as the run's (its batch of 8 on one process)."""
    train(make_cfg("same", **{"technique.name": "lora", "technique.dropout": 0.2, "run.max_steps": 1}))
    capsys.readouterr()
    train(make_cfg("same", **{"technique.name": "lora", "technique.dropout": 0.2, "run.max_steps": 2,
                              "optim.micro_batch_size": 8}), resume=True)  # fmt: skip
    assert "micro-batches of" not in capsys.readouterr().out
    for name, dropout in (("plain", 0.0), ("dropping", 0.2)):
        settings = {"technique.name": "lora", "technique.dropout": dropout, "run.save_every": 1}
        train(make_cfg(name, **{**settings, "run.max_steps": 1}))
        capsys.readouterr()
        train(make_cfg(name, **{**settings, "run.max_steps": 2, "optim.micro_batch_size": 2}), resume=True)
        out = capsys.readouterr().out
        said = "note: micro-batches of 2 rows where the run had 8 (optim.micro_batch_size, or the batch over the " \
               "processes) on this resume: the loss is the same, but dropout draws"  # fmt: skip
        assert (said in out) == (dropout > 0), out
        assert ("lora_dropout" in out and "the run is not bit for bit the uninterrupted one" in out) == (dropout > 0)


def test_done_counts_this_invocation_and_a_finished_run_trains_nothing(make_cfg, tmp_path, capsys):
    from posttrain.cli import main

    cfg = make_cfg(**{"run.max_steps": 2})
    cfg_file = tmp_path / "run.yaml"
    dump_config(cfg, cfg_file)
    assert main(["train", str(cfg_file)]) == 0
    assert "done: 2 steps; last loss" in capsys.readouterr().out
    assert main(["train", str(cfg_file), "run.max_steps=3", "--resume"]) == 0
    assert "done: 1 step (step 3 of 3); last loss" in capsys.readouterr().out

    final = Path(cfg.run.output_dir) / "final"
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in final.iterdir()}
    folder = {p.name: p.stat().st_mtime_ns for p in Path(cfg.run.output_dir).iterdir()}
    assert main(["train", str(cfg_file), "run.max_steps=3", "--resume"]) == 0
    out = capsys.readouterr().out
    assert f"{cfg.run.output_dir}: finished at step 3; nothing to train" in out and "done: 0 steps" in out
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in final.iterdir()} == before
    assert {p.name: p.stat().st_mtime_ns for p in Path(cfg.run.output_dir).iterdir()} == folder  # nothing written

    # Asked for the model (as the quickstart does on a re-run), a finished run loads its last checkpoint and still
    # writes nothing.
    from safetensors.torch import load_file

    from posttrain.algorithms import load_config

    again = train(load_config(cfg_file, ["run.max_steps=3"]), resume=True, return_model=True)
    assert again.steps_trained == 0 and again.steps == 3
    saved = load_file(str(Path(cfg.run.output_dir) / "checkpoints" / "step-000003" / "trainable.safetensors"))
    for name, p in again.model.named_parameters():
        assert torch.equal(p.detach(), saved[name]), name
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in final.iterdir()} == before
    assert {p.name: p.stat().st_mtime_ns for p in Path(cfg.run.output_dir).iterdir()} == folder


def test_a_resume_compares_only_the_settings_the_run_reads():
    """A config.yaml saved by an older posttrain may hold a setting that run never read (LoRA dropout under full
    fine-tuning); the same run, now without it, is no change. Under LoRA it is one."""
    from posttrain.algorithms import load_config
    from posttrain.train import _config_changes

    for technique, expected in (("full", []), ("lora", ["technique.dropout: 0.1 -> 0.0"])):
        cfg = load_config(None, [f"technique.name={technique}", "optim.lr=1e-3"])
        old = cfg.model_dump(mode="json")
        old["technique"]["dropout"] = 0.1
        del old["optim"]["head_lr"]  # a field the older config lacks counts as its default
        assert _config_changes(old, cfg) == expected


def test_a_resume_that_drops_adds_or_changes_chat_template_kwargs_is_refused():
    """The values are one setting: a resume without them rendered every later row with the template's defaults,
    silently (the dict flattened to nothing, and only the new config's keys were compared)."""
    from posttrain.algorithms import load_config
    from posttrain.train import _config_changes

    thinking = load_config(None, ["data.chat_template_kwargs.enable_thinking=false"])
    plain = load_config(None, [])
    assert _config_changes(thinking.model_dump(mode="json"), plain) == [
        "data.chat_template_kwargs: {enable_thinking: false} -> {}"]
    assert _config_changes(plain.model_dump(mode="json"), thinking) == [
        "data.chat_template_kwargs: {} -> {enable_thinking: false}"]
    on = load_config(None, ["data.chat_template_kwargs.enable_thinking=true"])
    assert _config_changes(thinking.model_dump(mode="json"), on) == [
        "data.chat_template_kwargs: {enable_thinking: false} -> {enable_thinking: true}"]
    assert _config_changes(thinking.model_dump(mode="json"), thinking) == []


def test_a_config_saved_in_an_older_layout_is_refused_as_such_not_as_changed_settings(make_cfg):
    """A run folder started by an older posttrain, whose config.yaml kept a method's settings in their own section
    (`algorithm.sft.*`), cannot be compared field by field: it is refused for its layout, naming the keys that no
    longer read, and nothing in the folder changes."""
    import pytest

    from posttrain.errors import ConfigError

    cfg = make_cfg(**{"run.max_steps": 1})
    train(cfg)
    run_dir = Path(cfg.run.output_dir)
    saved = run_dir / "config.yaml"
    old = yaml.safe_load(saved.read_text())
    old["algorithm"]["sft"] = {"completion_only": True}  # the pre-0.x nested layout
    saved.write_text(yaml.safe_dump(old))
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    with pytest.raises(ConfigError) as err:
        train(make_cfg(**{"run.max_steps": 2}), resume=True)
    msg = str(err.value)
    assert msg.startswith(f"--resume: {saved} is not a config this posttrain version reads")
    assert "algorithm.sft: not a section" in msg and "Only run length" not in msg
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before


def test_a_resume_on_another_machine_or_software_is_said_and_recorded(make_cfg, monkeypatch, capsys):
    """environment.json keeps what each segment of the run computed on; a resume on another CPU instruction set
    (or library release) trains on, with a note naming what differs from the steps before it; a folder with no
    record, or one that cannot be read, starts the record at that resume, saying nothing it cannot know."""
    import json

    import posttrain.train as train_module

    cfg = make_cfg("moved", **{"run.max_steps": 2, "run.save_every": 1})
    record = Path(cfg.run.output_dir) / "environment.json"
    train(cfg)
    first = json.loads(record.read_text())["segments"]
    assert [s["step"] for s in first] == [0] and first[0]["cpu"] == torch.backends.cpu.get_cpu_capability()
    assert (first[0]["device"], first[0]["posttrain"]) == ("cpu", __import__("posttrain").__version__)
    assert first[0]["torch"] == torch.__version__ and first[0]["vllm"] is None  # not installed here
    assert first[0]["threads"] == torch.get_num_threads() and first[0]["tokenizers"] and first[0]["jinja2"]
    capsys.readouterr()
    train(make_cfg("moved", **{"run.max_steps": 3, "run.save_every": 1}), resume=True)  # the same machine
    assert "another machine or software" not in capsys.readouterr().out
    assert json.loads(record.read_text())["segments"] == first
    real = train_module.run_environment
    monkeypatch.setattr(train_module, "run_environment", lambda device: {**real(device), "cpu": "AVX2-elsewhere"})
    train(make_cfg("moved", **{"run.max_steps": 4, "run.save_every": 1}), resume=True)
    assert (f"note: this resume computes on another machine or software than steps 1-3 ran on (cpu "
            f"{first[0]['cpu']} -> AVX2-elsewhere; environment.json): the loss is the same function, but float "
            "rounding differs, so the steps after step 3 are not bit for bit") in capsys.readouterr().out
    assert [(s["step"], s["cpu"]) for s in json.loads(record.read_text())["segments"]] == [
        (0, first[0]["cpu"]), (3, "AVX2-elsewhere")]
    # that segment abandoned (resumed again from step 3, back on this machine): it is dropped, and the steps up to 3
    # ran here, so nothing is said
    from posttrain.trainer.fingerprint import record_environment

    assert record_environment(Path(cfg.run.output_dir), real("cpu"), resumed_at=3) is None
    assert [s["step"] for s in json.loads(record.read_text())["segments"]] == [0]
    monkeypatch.setattr(train_module, "run_environment", real)
    for steps, unreadable in enumerate(('{"start": null}', '{"segments": {}}', "[1, 2"), start=5):
        record.write_text(unreadable)  # edited by hand, cut, or a record of another shape
        train(make_cfg("moved", **{"run.max_steps": steps, "run.save_every": 1}), resume=True)
        assert "another machine or software" not in capsys.readouterr().out
        assert [s["step"] for s in json.loads(record.read_text())["segments"]] == [steps - 1]
    old = json.loads(record.read_text())  # a record from before `threads` was kept: nothing to compare it with
    old["segments"][-1].pop("threads")
    record.write_text(json.dumps(old))
    train(make_cfg("moved", **{"run.max_steps": steps + 1, "run.save_every": 1}), resume=True)
    assert "another machine or software" not in capsys.readouterr().out
    record.unlink()  # a run folder from before the record
    train(make_cfg("moved", **{"run.max_steps": 9, "run.save_every": 1}), resume=True)
    assert [s["step"] for s in json.loads(record.read_text())["segments"]] == [8]


def test_an_interrupted_run_says_what_resume_will_do_and_resume_says_when_it_starts_again(make_cfg, monkeypatch,
                                                                                        capsys):  # fmt: skip
    """Ctrl-C names the checkpoint `--resume` continues from, or says there is none (the CLI said "a run can be
    continued" even then, and `--resume` silently started again at step 1); `--resume` into a folder that does not
    exist, or holds a run with no checkpoint, says it starts a new run."""
    import posttrain.train as train_module

    real_start = train_module._start_run_dir

    def start_then_die(*a, **kw):
        real_start(*a, **kw)
        raise KeyboardInterrupt

    cfg = make_cfg("nockpt", **{"run.max_steps": 3})
    monkeypatch.setattr(train_module, "_start_run_dir", start_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    assert (f"interrupted before {cfg.run.output_dir} had a checkpoint (run.save_every is null: a checkpoint is "
            "written only at the end); `posttrain train RUN.yaml --resume` would start again at step 1"
            ) in capsys.readouterr().err
    monkeypatch.setattr(train_module, "_start_run_dir", real_start)
    train(cfg, resume=True)
    assert (f"note: {cfg.run.output_dir} holds a run that stopped before its first checkpoint; it starts again at "
            "step 1") in capsys.readouterr().out
    saving = make_cfg("ckpt", **{"run.max_steps": 3, "run.save_every": 1})
    with _dies_after_checkpoint(monkeypatch, 2):
        train(saving)
    assert (f"interrupted: the last checkpoint of {saving.run.output_dir} is step-000002; `posttrain train RUN.yaml "
            "--resume` continues from it") in capsys.readouterr().err
    capsys.readouterr()
    train(saving, resume=True)
    assert "--resume:" not in capsys.readouterr().out  # it continued
    typo = make_cfg("no-such-run", **{"run.max_steps": 1})
    train(typo, resume=True)
    assert (f"note: --resume: {typo.run.output_dir} does not exist, so there is nothing to resume; a new run starts "
            "there") in capsys.readouterr().out


def test_a_resume_that_lengthens_the_run_follows_the_new_schedule_from_its_first_step(make_cfg, capsys):
    """run.max_steps raised on --resume: a cosine schedule then spans more steps. The optimiser's saved state held
    the old schedule's rate, so the first resumed step ran at it and the next ones jumped back up (7.2e-5,
    5.0e-5, 1.28e-4 in the audit); now every resumed step has the rate a run of the new length has there."""
    schedule = {"optim.schedule": "cosine", "optim.warmup_steps": 0, "optim.lr": 1e-3, "run.save_every": 4}

    def lrs(cfg):
        return {r["step"]: r["lr"] for r in read_metrics(Path(cfg.run.output_dir) / "metrics.jsonl") if "loss" in r}

    fresh = make_cfg("fresh", **schedule, **{"run.max_steps": 8})
    train(fresh)
    short = make_cfg("short", **schedule, **{"run.max_steps": 4})
    train(short)
    capsys.readouterr()
    train(make_cfg("short", **schedule, **{"run.max_steps": 8}), resume=True)
    resumed = lrs(short)
    assert [resumed[s] for s in range(5, 9)] == [lrs(fresh)[s] for s in range(5, 9)]
    assert ("note: the learning-rate schedule spans another number of steps than when step 4 was saved "
            f"(run.max_steps or run.epochs changed): step 5 runs at lr {lrs(fresh)[5]:.4g}") in capsys.readouterr().out


def test_a_final_model_of_an_earlier_step_is_not_taken_for_the_last_ones(make_cfg, monkeypatch, capsys):
    """A run ends at step 6 (final/ is step 6); a resume to 10 is stopped after checkpoint 8; resumed with
    run.max_steps=8 it said "finished at step 8; nothing to train" and kept step 6's final/ (an audit, twenty-third
    session). Now final/ says its step, and one of an earlier step is written again from the last checkpoint."""
    from safetensors.torch import load_file

    from posttrain.train import final_step

    overrides = {"technique.name": "lora", "run.max_steps": 6, "run.save_every": 2, "optim.lr": 5e-3}
    cfg = make_cfg("stale", **overrides)
    final = Path(train(cfg).run_dir) / "final"
    assert final_step(final) == 6
    at_six = load_file(str(final / "adapter_model.safetensors"))
    with _dies_after_checkpoint(monkeypatch, 8):
        train(make_cfg("stale", **{**overrides, "run.max_steps": 10}), resume=True)
    capsys.readouterr()
    result = train(make_cfg("stale", **{**overrides, "run.max_steps": 8}), resume=True)
    assert "nothing to train" not in capsys.readouterr().out and result.steps_trained == 0
    assert final_step(final) == 8
    saved = load_file(str(Path(cfg.run.output_dir) / "checkpoints" / "step-000008" / "trainable.safetensors"))
    adapter = load_file(str(final / "adapter_model.safetensors"))
    assert len(adapter) == len(saved) > 0  # every adapter weight is step 8's (names differ between the two files)
    assert all(any(torch.equal(v, w) for w in saved.values()) for v in adapter.values())
    assert any(not torch.equal(adapter[k], at_six[k]) for k in adapter)


def test_sigterm_stops_a_run_as_ctrl_c_does_and_tensorboard_shows_each_step_once(make_cfg, monkeypatch, capsys):
    """SIGTERM (SLURM, Kubernetes, `timeout`) ended the process silently and left the run folder's lock; TensorBoard
    showed the steps after the last checkpoint twice once resumed (an audit, twenty-third session)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import posttrain.trainer.loop as loop

    overrides = {"run.max_steps": 6, "run.save_every": 2, "run.tensorboard": "true"}
    cfg = make_cfg("term", **overrides)
    real_log = loop.MetricsLogger.log

    def log_then_term(self, record):
        real_log(self, record)
        if record.get("step") == 3 and "loss" in record:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(loop.MetricsLogger, "log", log_then_term)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(loop.MetricsLogger, "log", real_log)
    assert "interrupted: the last checkpoint of" in capsys.readouterr().err
    assert not (Path(cfg.run.output_dir) / ".posttrain.lock").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is the run's only
    result = train(cfg, resume=True)
    events = EventAccumulator(str(result.run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4, 5, 6]


def test_a_base_model_whose_weights_changed_is_refused_on_resume(make_cfg, tiny_model_dir, tmp_path, monkeypatch):
    """A LoRA run on model.name=A/final, stopped; A trained further (final/ rewritten); the resume continued with
    no message on the other base weights, its losses off the uninterrupted run's (an audit, twenty-third
    session). The run records a digest of the weights it starts from and refuses a resume on others."""
    import shutil

    from safetensors.torch import load_file, save_file


    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    cfg = make_cfg("on_base", **{"model.name": str(base), "technique.name": "lora", "run.max_steps": 4,
                                 "run.save_every": 2})  # fmt: skip
    with _dies_after_checkpoint(monkeypatch, 2):
        train(cfg)
    recorded = yaml.safe_load((Path(cfg.run.output_dir) / "data_fingerprint.json").read_text())
    assert recorded["model.name"]["path"] == str(base)
    weights = next(base.glob("*.safetensors"))
    original = weights.read_bytes()
    state = load_file(str(weights))
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}, str(weights))
    with pytest.raises(ConfigError, match=r"--resume: the weights of model.name \(.*base\) changed since"):
        train(cfg, resume=True)
    weights.write_bytes(original)  # the weights restored: the run resumes
    assert train(cfg, resume=True).steps_trained == 2


def test_the_models_a_run_starts_from_are_fingerprinted_where_they_are(tmp_path, tiny_model_dir):
    """A reward model given as a run folder was digested as its top folder, which holds no weights (the sha256 of
    nothing), so its retraining went unnoticed; a `reward_model` reward's path was not read at all (a review)."""
    import shutil
    from types import SimpleNamespace

    from posttrain.trainer.fingerprint import weights_fingerprint

    run = tmp_path / "rm_run"
    shutil.copytree(tiny_model_dir, run / "final")
    (run / "config.yaml").write_text("{}\n")
    cfg = SimpleNamespace(model=SimpleNamespace(name=str(tiny_model_dir)), algorithm=SimpleNamespace(
        reward_model=str(run), rewards=["numeric_answer", {"name": "reward_model", "args": {"path": str(run)}}]))  # fmt: skip
    got = weights_fingerprint(cfg)
    assert set(got) == {"model.name", "algorithm.reward_model", "algorithm.rewards[1]"}
    empty = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"  # sha256 of nothing
    assert got["algorithm.reward_model"]["sha256"] == got["model.name"]["sha256"] != empty
    weights = next((run / "final").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8] + b"\x01" * 8)
    assert weights_fingerprint(cfg)["algorithm.rewards[1]"]["sha256"] != got["algorithm.rewards[1]"]["sha256"]


def test_tensorboard_restarted_from_step_one_shows_each_step_once(make_cfg, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import posttrain.trainer.loop as loop

    cfg = make_cfg("tb0", **{"run.max_steps": 4, "run.tensorboard": "true"})  # no checkpoint before the end
    real_log = loop.MetricsLogger.log

    def log_then_stop(self, record):
        real_log(self, record)
        if record.get("step") == 2 and "loss" in record:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop.MetricsLogger, "log", log_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(loop.MetricsLogger, "log", real_log)
    events = EventAccumulator(str(train(cfg, resume=True).run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]


def test_a_disk_that_fills_up_while_saving_is_said_and_the_run_continues_after(make_cfg, monkeypatch):
    """A full disk while a checkpoint or the final model was written read as a bug of ours (a traceback, exit 1,
    naming a failed write position or an iostream error) and left the half-written folder. It is a user error now
    that names the disk and the last complete checkpoint, the half-written folder is gone, and --resume finishes
    the run once there is room, with the weights of an uninterrupted run."""
    import errno

    import posttrain.train as train_module
    import posttrain.trainer.checkpoint as checkpoint
    from posttrain.errors import UserError

    cfg = make_cfg("full-disk", **{"run.max_steps": 6, "run.save_every": 2, "run.keep_checkpoints": 5})
    real_save = checkpoint.save_file

    def full_at_step_four(weights, path, *args, **kwargs):
        if "step-000004" in str(path):
            Path(path).write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(weights, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", full_at_step_four)
    with pytest.raises(UserError, match=r"checkpoint step-000004 .* failed: the disk is full .* the last complete "
                                        r"checkpoint is step-000002, which --resume continues from"):  # fmt: skip
        train(cfg)
    root = Path(cfg.run.output_dir) / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-000002"]
    monkeypatch.setattr(checkpoint, "save_file", real_save)
    real_model = train_module.save_model

    def full_on_final(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(train_module, "save_model", full_on_final)
    with pytest.raises(UserError, match=r"writing the final model into .* failed: the disk is full"):
        train(cfg, resume=True)
    assert not (Path(cfg.run.output_dir) / ".tmp-final").exists() and not (Path(cfg.run.output_dir) / "final").exists()
    monkeypatch.setattr(train_module, "save_model", real_model)
    resumed = train(cfg, resume=True, return_model=True)
    whole = train(make_cfg("whole", **{"run.max_steps": 6, "run.save_every": 2}), return_model=True)
    for (name, a), b in zip(resumed.model.named_parameters(), whole.model.parameters(), strict=True):
        assert torch.equal(a, b), name
