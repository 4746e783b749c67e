"""FSDP2 (`run.sharding=fsdp2`): two CPU processes (torchrun, gloo) each hold half of every weight and train
exactly as one process does (SFT; DPO with a frozen copy or the adapter disabled as reference), or as two DDP
processes do (GRPO: rollouts are sampled per process, so one process would draw other samples); checkpoints and
`final/` hold the whole weights, and a resumed sharded run continues exactly.

All runs share one torchrun launch (`fsdp_worker.py` trains them in turn), to keep the suite short."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from posttrain.algorithms import load_config
from posttrain.config import dump_config
from posttrain.errors import ConfigError
from posttrain.train import _check_sharding, train
from posttrain.trainer.metrics import read_metrics

WORKER = Path(__file__).with_name("fsdp_worker.py")
PAIRS = [{"prompt": f"add {a} {b}", "chosen": str(a + b), "rejected": f"{a + b + 1} maybe"} for a in range(4)
         for b in range(2)]  # fmt: skip
PROMPTS = [{"prompt": f"add {a} {b}", "answer": str(a + b)} for a in range(4) for b in range(4)]
LETTERS = 'def letters(prompts, completions, **kwargs):\n    return [sum("a" <= ch <= "z" for ch in c) / 8 for c in completions]\n'
# Logged values that measure the machine, not the training.
UNTIMED = ("time", "tokens_per_s", "peak_", "elapsed")


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """Run folders and configs of the sharded runs, trained once by two processes, and what each process held."""
    tmp = tmp_path_factory.mktemp("fsdp2")
    sft_rows = [{"prompt": f"add {a} {b}", "completion": str(a + b)} for a in range(4) for b in range(4)]
    (tmp / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft_rows), encoding="utf-8")
    (tmp / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PAIRS), encoding="utf-8")
    (tmp / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PROMPTS), encoding="utf-8")
    (tmp / "rewards.py").write_text(LETTERS, encoding="utf-8")
    base = {"model.name": str(tiny_model_dir), "technique.name": "full", "data.max_length": 64, "optim.lr": 1e-3,
            "optim.batch_size": 8, "optim.micro_batch_size": 2, "optim.warmup_steps": 0, "data.shuffle": "false",
            "run.max_steps": 3, "run.progress": False, "run.report": False, "run.sharding": "fsdp2"}  # fmt: skip
    dpo = {"algorithm.name": "dpo", "algorithm.beta": 0.5, "data.train": str(tmp / "pairs.jsonl")}
    grpo = {"algorithm.name": "grpo", "algorithm.rewards": f"[{tmp / 'rewards.py'}:letters]",
            "data.train": str(tmp / "prompts.jsonl"), "algorithm.rollout.max_new_tokens": 8,
            "algorithm.num_generations": 4, "optim.batch_size": 16, "optim.micro_batch_size": 4,
            "run.max_steps": 2}  # fmt: skip
    sft = {"data.train": str(tmp / "sft.jsonl"), "optim.schedule": "constant"}
    settings = {
        "sft": sft,
        "dpo-copy": {**dpo, "algorithm.reference": "copy"},
        "dpo-lora": {**dpo, "algorithm.reference": "adapter", "technique.name": "lora", "optim.lr": 5e-3},
        "grpo": grpo,
        "grpo-ddp": {**grpo, "run.sharding": "none"},
        "sft-resumed": {**sft, "run.max_steps": 2},  # then resumed to step 3 (`@resume`)
    }
    cfgs = {}
    for name, overrides in settings.items():
        merged = {**base, "run.output_dir": str(tmp / name), **overrides}
        cfgs[name] = load_config(None, [f"{k}={v}" for k, v in merged.items()])
        dump_config(cfgs[name], tmp / f"{name}.yaml")
    resumed = load_config(tmp / "sft-resumed.yaml", ["run.max_steps=3"])
    dump_config(resumed, tmp / "sft-resumed-3.yaml")
    out = tmp / "out"
    out.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           str(out), *(str(tmp / f"{n}.yaml") for n in settings), f"{tmp / 'sft-resumed-3.yaml'}@resume"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stderr[-4000:]
    held = {p.stem: torch.load(p) for p in out.glob("*.pt")}
    return cfgs, held


def _losses(run_dir) -> torch.Tensor:
    return torch.tensor([r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl")])


def _one_process(cfg, name):
    one = cfg.model_copy(update={"run": cfg.run.model_copy(update={"sharding": "none",
                                                                    "output_dir": cfg.run.output_dir + "-one"})})
    return train(one, return_model=True)  # fmt: skip


@pytest.mark.parametrize("name", ["sft", "dpo-copy", "dpo-lora"])
def test_two_sharded_processes_train_exactly_as_one_process(runs, name):
    cfgs, held = runs
    one = _one_process(cfgs[name], name)
    sharded = held[f"{name}-rank0"]["weights"]
    base = load_file(str(Path(cfgs[name].model.name) / "model.safetensors"))
    moved = 0
    for n, p in one.model.named_parameters():
        # The same global batch and normaliser; the gradient's float sums run in another order (gloo's
        # reduce-scatter of two halves against one process's sum). For LoRA, Adam's step g / sqrt(v) turns that
        # last-bit difference of a near-zero gradient into a ~1e-6 difference of the update: hence atol 1e-5 there.
        assert_close(sharded[n], p.detach(), rtol=1e-4, atol=1e-5 if "lora" in name else 1e-6, msg=n)
        if p.requires_grad:  # a full weight left its base value, or a LoRA B left zero
            moved += not torch.equal(p.detach(), base[n]) if n in base else "lora_B" in n and bool(p.any())
    assert moved > 0  # the runs trained something
    assert_close(_losses(cfgs[name].run.output_dir), _losses(one.run_dir), rtol=1e-5, atol=1e-6)


def test_each_sharded_process_holds_half_of_every_weight(runs):
    _, held = runs
    for name in ("sft", "dpo-copy", "dpo-lora", "grpo"):
        r0, r1 = held[f"{name}-rank0"], held[f"{name}-rank1"]
        assert r0["sharded"] and r1["sharded"]
        assert r0["local"] + r1["local"] == r0["total"]  # the shards partition the model
        # dim-0 halves: the tiny model's odd-sized rows (e.g. a 259-token vocabulary) go one more to rank 0
        assert abs(r0["local"] - r0["total"] / 2) < 0.01 * r0["total"], (name, r0["local"], r0["total"])
    ddp = held["grpo-ddp-rank0"]
    assert not ddp["sharded"] and ddp["local"] == ddp["total"]  # the unsharded run holds everything


def test_sharded_grpo_trains_exactly_as_two_ddp_processes(runs):
    cfgs, held = runs
    sharded, ddp = held["grpo-rank0"]["weights"], held["grpo-ddp-rank0"]["weights"]
    assert sharded.keys() == ddp.keys()
    for n in ddp:
        assert_close(sharded[n], ddp[n], rtol=1e-4, atol=1e-6, msg=n)  # summation order only, as above
    a = read_metrics(Path(cfgs["grpo"].run.output_dir) / "metrics.jsonl")
    b = read_metrics(Path(cfgs["grpo-ddp"].run.output_dir) / "metrics.jsonl")
    keys = [k for k in b[0] if not any(t in k for t in UNTIMED)]
    assert {"reward/total_mean", "entropy", "grad_norm", "loss"} <= set(keys)
    for ra, rb in zip(a, b, strict=True):  # the same samples, rewards, entropies and gradients at every step
        assert_close(torch.tensor([ra[k] for k in keys]), torch.tensor([rb[k] for k in keys]), rtol=1e-5, atol=1e-6)
    base = load_file(str(Path(cfgs["grpo"].model.name) / "model.safetensors"))
    assert any(not torch.equal(sharded[n], base[n]) for n in ddp)  # it trained


def test_final_folder_and_checkpoint_hold_the_whole_gathered_weights(runs):
    cfgs, held = runs
    run_dir = Path(cfgs["sft"].run.output_dir)
    gathered = held["sft-rank0"]["weights"]
    final = load_file(str(run_dir / "final" / "model.safetensors"))
    assert final.keys() == gathered.keys()
    for n, t in final.items():
        assert torch.equal(t, gathered[n]), n
    ckpt = load_file(str(run_dir / "checkpoints" / "step-000003" / "trainable.safetensors"))
    assert ckpt.keys() == gathered.keys() and all(torch.equal(ckpt[n], gathered[n]) for n in ckpt)


def test_a_resumed_sharded_run_continues_exactly(runs):
    """2 steps, then resumed from the step-2 checkpoint (weights and Adam state gathered, then re-sharded) to step
    3: the same weights and losses as the uninterrupted sharded run."""
    cfgs, held = runs
    resumed, straight = held["sft-resumed-3-resume-rank0"]["weights"], held["sft-rank0"]["weights"]
    for n in straight:
        assert torch.equal(resumed[n], straight[n]), n
    assert torch.equal(_losses(cfgs["sft-resumed"].run.output_dir), _losses(cfgs["sft"].run.output_dir))


def test_fsdp2_is_refused_in_one_process_before_anything_loads(make_cfg):
    cfg = make_cfg("one", **{"run.sharding": "fsdp2"})
    with pytest.raises(ConfigError, match="torchrun --nproc_per_node N"):
        train(cfg)
    assert not Path(cfg.run.output_dir).exists()


@pytest.mark.parametrize("overrides, says", [
    ({"technique.name": "qlora"}, "technique.name=qlora"),
    ({"algorithm.name": "reward"}, "algorithm.name=reward"),
])  # fmt: skip
def test_fsdp2_refuses_what_it_cannot_shard(make_cfg, overrides, says, monkeypatch):
    with pytest.raises(ConfigError, match=says):
        _check_sharding(make_cfg("x", **{"run.sharding": "fsdp2", **overrides}), 2)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="both would shard"):
        _check_sharding(make_cfg("y", **{"run.sharding": "fsdp2"}), 2)
