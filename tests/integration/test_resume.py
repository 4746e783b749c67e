"""Resuming: a run stopped after a checkpoint (in-process, or by kill -9) continues to the same losses."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from posttrain.config import dump_config
from posttrain.train import train
from posttrain.trainer.metrics import read_metrics


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

    import posttrain.trainer.loop as loop

    real_save = loop.save_checkpoint

    def save_then_die(accelerator, run_dir, step, *a, **kw):
        path = real_save(accelerator, run_dir, step, *a, **kw)
        if step == 4:
            raise KeyboardInterrupt  # the process "dies" right after checkpoint 4
        return path

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    cfg = make_cfg("interrupted", **overrides)
    try:
        train(cfg)
    except KeyboardInterrupt:
        pass
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
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
