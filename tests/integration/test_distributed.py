"""Two CPU processes (Accelerate over torch.distributed, gloo) train in lockstep and match one process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import free_port
from torch.testing import assert_close

from posttrain.config import dump_config
from posttrain.train import train
from posttrain.trainer.metrics import read_metrics

WORKER = Path(__file__).with_name("ddp_worker.py")


def _two_processes(cfg, tmp_path) -> Path:
    """Train `cfg` in 2 processes under torchrun (ddp_worker.py); the folder of each rank's saved parameters."""
    cfg_file = tmp_path / "ddp.yaml"
    dump_config(cfg, cfg_file)
    out_dir = tmp_path / "params"
    out_dir.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(WORKER), str(cfg_file), str(out_dir)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out_dir


def test_two_processes_agree_with_each_other_and_with_one_process(make_cfg, tmp_path):
    overrides = {"run.max_steps": 3, "optim.lr": 1e-3, "optim.micro_batch_size": 2, "data.shuffle": "false"}
    cfg = make_cfg("ddp", **overrides)
    out_dir = _two_processes(cfg, tmp_path)
    r0, r1 = torch.load(out_dir / "rank0.pt"), torch.load(out_dir / "rank1.pt")
    for name in r0:
        assert torch.equal(r0[name], r1[name]), name  # DDP keeps replicas identical

    single = train(make_cfg("single", **overrides), return_model=True)
    for name, p in single.model.named_parameters():
        # Same global batch and normaliser; only the float summation order differs between 1 and 2 processes.
        assert_close(r0[name], p.detach(), rtol=1e-4, atol=1e-6)
    ddp_losses = [r["loss"] for r in read_metrics(Path(cfg.run.output_dir) / "metrics.jsonl")]
    one_losses = [r["loss"] for r in read_metrics(single.run_dir / "metrics.jsonl")]
    assert_close(torch.tensor(ddp_losses), torch.tensor(one_losses), rtol=1e-5, atol=1e-6)
    # the step's time and the run's clock come from one reading: on a process's first step they are the same to a
    # millisecond, however long the collectives after it (how the report finds a resumed run's stretches; 3 ms
    # apart on 2 processes hid a restart: a review), and later steps' clocks hold the steps before them
    first, second = read_metrics(Path(cfg.run.output_dir) / "metrics.jsonl")[:2]
    assert 0 <= first["elapsed_s"] - first["step_time_s"] < 1e-3
    assert second["elapsed_s"] - second["step_time_s"] >= first["step_time_s"]


def test_two_processes_share_an_uneven_last_step_and_match_one_process(make_cfg, tmp_path):
    """19 rows in steps of 8: the last step's 3 rows split 2 + 1 over the processes, with micro-batches of 1, so
    one process accumulates two micro-batches and the other one; no process waits, every row trains once, and the
    result is the one-process run's."""
    import json

    rows = tmp_path / "19.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"add {a} {b}", "completion": str(a + b)}) + "\n"
                            for a in range(4) for b in range(5) if a + b < 7))  # fmt: skip
    overrides = {"data.train": str(rows), "run.max_steps": "null", "run.epochs": 1, "optim.lr": 1e-3,
                 "optim.micro_batch_size": 1}  # fmt: skip
    cfg = make_cfg("ddp-uneven", **overrides)
    out_dir = _two_processes(cfg, tmp_path)
    r0, r1 = torch.load(out_dir / "rank0.pt"), torch.load(out_dir / "rank1.pt")
    single = train(make_cfg("single-uneven", **overrides), return_model=True)
    for name, p in single.model.named_parameters():
        assert torch.equal(r0[name], r1[name]), name
        assert_close(r0[name], p.detach(), rtol=1e-4, atol=1e-6)  # summation order differs, as above
    ddp = read_metrics(Path(cfg.run.output_dir) / "metrics.jsonl")
    one = read_metrics(single.run_dir / "metrics.jsonl")
    assert [r["step"] for r in ddp] == [1, 2, 3]
    assert [r["loss_units"] for r in ddp] == [r["loss_units"] for r in one]
    assert_close(torch.tensor([r["loss"] for r in ddp]), torch.tensor([r["loss"] for r in one]), rtol=1e-5, atol=1e-6)


def test_grpo_on_two_processes_samples_and_trains_as_one_with_an_uneven_last_rollout(rl_cfg, tmp_path):
    """Two processes sampled other completions than one (each numbered its rows from 0, seeded by its rank), and
    `algorithm.scale: batch` aborted in gloo when an epoch's last rollout split unevenly (7 prompts, 4 a rollout:
    the last 3 split 2 + 1; a tensor gather of unequal lengths): an audit. Each row now draws from its place in the
    whole rollout, and the batch's rewards are gathered whatever the shares' sizes: the run is the one-process
    run's, to float summation order."""
    import json

    prompts = tmp_path / "seven.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"add {a} 1", "answer": str(a + 1)}) + "\n" for a in range(7)),
                       encoding="utf-8")  # fmt: skip
    overrides = {"data.train": str(prompts), "run.max_steps": None, "run.epochs": 1, "algorithm.scale": "batch",
                 "algorithm.rollout.batch_size": 16, "optim.micro_batch_size": 2, "algorithm.rollout.temperature": 1.0,
                 "data.shuffle": "false", "optim.lr": 1e-3}  # fmt: skip
    cfg = rl_cfg("ddp-grpo", **overrides)
    out_dir = _two_processes(cfg, tmp_path)
    single = train(rl_cfg("single-grpo", **overrides), return_model=True)
    r0 = torch.load(out_dir / "rank0.pt")
    for name, p in single.model.named_parameters():
        assert_close(r0[name], p.detach(), rtol=1e-4, atol=1e-6)
    ddp = read_metrics(Path(cfg.run.output_dir) / "metrics.jsonl")
    one = read_metrics(single.run_dir / "metrics.jsonl")
    assert [r["step"] for r in ddp] == [r["step"] for r in one] and len(one) >= 3
    for key in ("reward/total_mean", "truncated_fraction"):  # the same samples, so the same rewards and lengths
        assert [r[key] for r in ddp if key in r] == pytest.approx([r[key] for r in one if key in r], abs=1e-6)


def test_ppo_whitens_over_both_processes_as_one_process_does(rl_cfg, tmp_path):
    """Each process whitened its own share of a rollout's advantages: 2 processes trained other advantages than
    1 (an audit; with identical samples, weights 2.3e-4 apart). Over every process's tokens, the run is one
    process's to float summation order (3.3e-7 here; 3.0e-3 with each share whitened alone: a review)."""
    overrides = {"algorithm.name": "ppo", "algorithm.num_generations": None, "algorithm.kl_coef": 0.1,
                 "algorithm.whiten_advantages": "true", "optim.micro_batch_size": 2, "data.shuffle": "false",
                 "algorithm.rollout.temperature": 1.0, "optim.lr": 1e-3, "run.max_steps": 2}  # fmt: skip
    cfg = rl_cfg("ddp-ppo", **overrides)
    out_dir = _two_processes(cfg, tmp_path)
    single = train(rl_cfg("single-ppo", **overrides), return_model=True)
    r0 = torch.load(out_dir / "rank0.pt")
    for name, p in single.model.named_parameters():
        assert_close(r0[name], p.detach(), rtol=0, atol=1e-5)
