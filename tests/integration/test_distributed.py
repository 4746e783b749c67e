"""Two CPU processes (Accelerate over torch.distributed, gloo) train in lockstep and match one process."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from torch.testing import assert_close

from posttrain.config import dump_config
from posttrain.train import train
from posttrain.trainer.metrics import read_metrics

WORKER = Path(__file__).with_name("ddp_worker.py")


def test_two_processes_agree_with_each_other_and_with_one_process(make_cfg, tmp_path):
    overrides = {"run.max_steps": 3, "optim.lr": 1e-3, "optim.micro_batch_size": 2, "data.shuffle": "false"}
    cfg = make_cfg("ddp", **overrides)
    cfg_file = tmp_path / "ddp.yaml"
    dump_config(cfg, cfg_file)
    out_dir = tmp_path / "params"
    out_dir.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        str(WORKER),
        str(cfg_file),
        str(out_dir),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
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
