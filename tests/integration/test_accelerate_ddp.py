"""configs/accelerate/ddp.yaml launched as users launch it, `accelerate launch --config_file ddp.yaml`, on this
CPU-only machine (docs/scale.md, "Accelerate configs"):

- as shipped (no `--cpu`): Accelerate's multi-GPU launcher starts 2 processes through torchrun, and posttrain's
  processes find no GPU and talk over gloo; they train as one process does on the same global batch (the same
  losses, gradient norms and final weights), and the main process says once that the file's `mixed_precision:
  bf16` is not what this run uses (float32 on a CPU, from `model.dtype: auto`);
- with `--cpu --num_processes 2`: Accelerate's single-process launcher starts one process, which says so;
- configs/accelerate/fsdp2.yaml the same way: 2 processes over gloo, but not sharded (Accelerate shards only on
  GPUs and other accelerators): each holds the whole model, and the main process says so.

`test_distributed.py` launches the same worker with torchrun; this file checks Accelerate's launcher in front of it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from support import free_port
from torch.testing import assert_close

from posttrain.config import dump_config
from posttrain.train import train
from posttrain.trainer.metrics import read_metrics

ROOT = Path(__file__).parents[2]
DDP = ROOT / "configs" / "accelerate" / "ddp.yaml"
FSDP2 = ROOT / "configs" / "accelerate" / "fsdp2.yaml"
WORKER = Path(__file__).with_name("ddp_worker.py")
PRECISION_NOTE = "note: the launch asked for mixed_precision bf16, but posttrain takes the precision from model.dtype"
ALONE_NOTE = "note: accelerate launch was asked for several processes but started this one alone"
FSDP_NOTE = "note: the launch asked for FSDP (an Accelerate FSDP config), but Accelerate shards only on GPUs"
TINY_MODEL_ELEMENTS = 107_200  # the tiny model's parameters (as test_deepspeed.py counts them)


def _launch(*args: str, config: Path = DDP) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           "--main_process_port", str(free_port()), *args]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _series(run_dir, key: str) -> torch.Tensor:
    return torch.tensor([r[key] for r in read_metrics(Path(run_dir) / "metrics.jsonl")], dtype=torch.float64)


def test_the_ddp_config_runs_two_gloo_processes_on_cpu_that_match_one_process(make_cfg, tmp_path):
    # AdamW at eps 1 (as test_deepspeed.py): its step lr * m / (sqrt(v) + 1) is nearly linear in the gradient, so a
    # gradient scaled wrongly over the processes (e.g. summed, not averaged) moves the weights by ~1e-4, where at
    # eps 1e-8 Adam's g / sqrt(v) would hide the scale. Measured: weights within 1.9e-9 of one process's (they move
    # up to 1.1e-3), losses within 2e-8 and gradient norms within 8e-8 relative (float summation order).
    overrides = {"run.max_steps": 3, "optim.lr": 5e-3, "optim.eps": 1.0, "optim.micro_batch_size": 2,
                 "data.shuffle": "false"}  # fmt: skip
    cfg = make_cfg("accelerate-ddp", **overrides)
    dump_config(cfg, tmp_path / "run.yaml")
    out = tmp_path / "params"
    out.mkdir()
    proc = _launch(str(WORKER), str(tmp_path / "run.yaml"), str(out))

    worlds = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert worlds == [{"rank": r, "world_size": 2, "backend": "gloo"} for r in (0, 1)]
    assert proc.stdout.count(PRECISION_NOTE) == 1, proc.stdout[-2000:]  # said once, by the main process
    assert "(auto: float32 on cpu), so this run uses mixed_precision no" in proc.stdout
    assert ALONE_NOTE not in proc.stdout
    r0, r1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    single = train(make_cfg("accelerate-one", **overrides), return_model=True)
    for name, p in single.model.named_parameters():
        assert torch.equal(r0[name], r1[name]), name  # DDP keeps the replicas identical
        assert_close(r0[name], p.detach(), rtol=0, atol=1e-8)
    for key in ("loss", "grad_norm"):
        assert_close(_series(cfg.run.output_dir, key), _series(single.run_dir, key), rtol=1e-6, atol=0)
    assert (_series(cfg.run.output_dir, "loss_units") == _series(single.run_dir, "loss_units")).all()


def test_the_ddp_config_with_cpu_flag_starts_one_process_and_says_so(make_cfg, tmp_path):
    cfg = make_cfg("accelerate-cpu-flag", **{"run.max_steps": 1})
    dump_config(cfg, tmp_path / "run.yaml")
    proc = _launch("--cpu", "--num_processes", "2", "-m", "posttrain.cli", "train", str(tmp_path / "run.yaml"))

    assert proc.stdout.count(ALONE_NOTE) == 1, proc.stdout[-2000:]
    assert proc.stdout.count(PRECISION_NOTE) == 1
    state = json.loads((Path(cfg.run.output_dir) / "checkpoints" / "step-000001" / "trainer_state.json").read_text())
    assert state["world_size"] == 1


def test_the_fsdp2_config_on_cpu_runs_two_unsharded_processes_and_says_so(make_cfg, tmp_path):
    cfg = make_cfg("accelerate-fsdp2", **{"run.max_steps": 1})
    dump_config(cfg, tmp_path / "run.yaml")
    out = tmp_path / "params"
    out.mkdir()
    proc = _launch("--mixed_precision", "no", str(WORKER), str(tmp_path / "run.yaml"), str(out), config=FSDP2)

    worlds = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert worlds == [{"rank": r, "world_size": 2, "backend": "gloo"} for r in (0, 1)]
    assert proc.stdout.count(FSDP_NOTE) == 1, proc.stdout[-2000:]
    assert PRECISION_NOTE not in proc.stdout and ALONE_NOTE not in proc.stdout
    r0, r1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    assert sum(t.numel() for t in r0.values()) == sum(t.numel() for t in r1.values()) == TINY_MODEL_ELEMENTS
    for name in r0:
        assert torch.equal(r0[name], r1[name]), name  # whole replicas, as DDP keeps them
