"""FSDP2 (`run.sharding=fsdp2`): two CPU processes (torchrun, gloo) each hold half of every weight and train
exactly as one process does (SFT; DPO with a frozen copy, sharded too, the adapter disabled or precomputed
log-probs as reference; a reward model, its scalar head sharded too; GRPO sampled so that the samples do not depend
on the process layout; QLoRA, SFT and seeded GRPO, its 4-bit weights halved too and the quantisation state whole
on each process), or as two DDP processes do (GRPO; RLOO with LoRA; PPO, its frozen-copy reference sharded:
rollouts are sampled per process, so one process would draw other samples); with vLLM rollouts (a fake backend per
process), each process pushes the whole gathered weights (merged under LoRA) and trains as with the HF engine, and under
QLoRA pushes each 4-bit layer dequantised plus its delta, as one process does;
checkpoints hold each process's shards (torch.distributed.checkpoint), `final/` the whole weights (a reward model's
head beside them, which PPO then loads as its reward, sharded as it loads, as is the one scoring seeded GRPO,
whose rewards equal one process's); a sharded run killed after step k and resumed from its
sharded checkpoint continues exactly (SFT full, DPO with LoRA, GRPO with LoRA, SFT with QLoRA), and so does one resumed from whole
checkpoints (`run.whole_checkpoints`: PPO, with its value head, Adam state and adaptive KL coefficient); a sharded
run resumed on one process (SFT full, DPO with LoRA) and a one-process run resumed on two sharded processes (SFT
full) get the saved weights and AdamW state back exactly and train on as the uninterrupted run does; the logged
rollout statistics cover both processes' samples (under FSDP2 and DDP); and what would give the processes unequal
numbers of forward passes is skipped rather than left to hang, and a resume on a number of processes the batch does
not split over is refused before the model loads.

All runs share one torchrun launch (`fsdp_worker.py` trains them in turn), to keep the suite short."""

import importlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from posttrain import config as config_module
from posttrain.algorithms import load_config
from posttrain.config import ModelConfig, TechniqueConfig, dump_config
from posttrain.errors import ConfigError, UserError
from posttrain.models.loading import load_model
from posttrain.models.sharding import read_shards, shard_keys
from posttrain.rollout import engines
from posttrain.train import _check_sharding, train
from posttrain.trainer.checkpoint import list_checkpoints, load_checkpoint
from posttrain.trainer.metrics import read_metrics

SOURCE = importlib.import_module("posttrain.rollout.source")
TRAIN = importlib.import_module("posttrain.train")  # the module (`posttrain.train` is also the function)
WORKER = Path(__file__).with_name("fsdp_worker.py")
PromptSeededEngine = importlib.import_module("fsdp_worker").PromptSeededEngine  # the folder is on sys.path: conftest.py
four_bit_held = importlib.import_module("fsdp_worker").four_bit_held
PAIRS = [{"prompt": f"add {a} {b}", "chosen": str(a + b), "rejected": f"{a + b + 1} maybe"} for a in range(4)
         for b in range(2)]  # fmt: skip
PROMPTS = [{"prompt": f"add {a} {b}", "answer": str(a + b)} for a in range(4) for b in range(4)]
LETTERS = 'def letters(prompts, completions, **kwargs):\n    return [sum("a" <= ch <= "z" for ch in c) / 8 for c in completions]\n'
# The runs at AdamW eps 1 (`runs`): weights agree to 4e-9 (measured: reward against one process, PPO and RLOO
# against DDP), float summation order alone.
TOLERANCE = {name: {"rtol": 0, "atol": 1e-7} for name in ("reward", "ppo", "rloo", "grpo", "sft-qlora", "dpo-qlora-copy",
                                                                 "grpo-qlora")}
RM_ATOL = 1e-6  # a few float32 ulps of rewards ~1 (measured: 0, equal bit for bit on this CPU)
# Logged values that measure the machine, not the training.
UNTIMED = ("time", "tokens_per_s", "peak_", "elapsed")
MODES = {"grpo-seeded": "@seeded", "grpo-qlora": "@seeded"}  # how fsdp_worker.py runs a config besides training it
# Runs killed after step k (a copy of the finished run folder, cut back to step k) and resumed: run -> k
KILLED = {"sft": 2, "dpo-lora": 2, "grpo-lora": 1, "sft-qlora": 2}
# Two-process sharded runs killed after step k and resumed on one process (`test_a_sharded_run_resumes_on_one_process`)
ON_ONE = {"sft": 2, "dpo-lora": 2}


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """Run folders and configs of the sharded runs, trained once by two processes, and what each process held."""
    tmp = tmp_path_factory.mktemp("fsdp2")
    sft_rows = [{"prompt": f"add {a} {b}", "completion": str(a + b)} for a in range(4) for b in range(4)]
    (tmp / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft_rows), encoding="utf-8")
    (tmp / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PAIRS), encoding="utf-8")
    (tmp / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PROMPTS), encoding="utf-8")
    (tmp / "rewards.py").write_text(LETTERS, encoding="utf-8")
    rows19 = sft_rows + [{"prompt": f"add {a} 4", "completion": str(a + 4)} for a in range(3)]
    (tmp / "19.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows19), encoding="utf-8")
    (tmp / "eval3.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft_rows[:3]), encoding="utf-8")
    base = {"model.name": str(tiny_model_dir), "technique.name": "full", "data.max_length": 64, "optim.lr": 1e-3,
            "optim.batch_size": 8, "optim.micro_batch_size": 2, "optim.warmup_steps": 0, "data.shuffle": "false",
            "run.max_steps": 3, "run.progress": False, "run.report": False, "run.sharding": "fsdp2"}  # fmt: skip
    dpo = {"algorithm.name": "dpo", "algorithm.beta": 0.5, "data.train": str(tmp / "pairs.jsonl")}
    sft = {"data.train": str(tmp / "sft.jsonl"), "optim.schedule": "constant"}
    # The methods added since, and GRPO: AdamW with eps 1, whose step lr x m / (sqrt(v) + 1) is nearly linear in
    # the gradient, so the runs compare to ~1e-8. At eps 1e-8, g / sqrt(v) turns the last-bit differences of
    # near-zero gradients (the reward model's chosen and rejected rows share their prompt, and their head's bias
    # cancels in the loss) into weight differences of up to 4e-5 after 3 steps (measured), which say nothing;
    # GRPO's loss is ~0 at these steps (GRPO sharded against DDP: 9e-6 at eps 1e-8, measured).
    exact = {"optim.eps": 1.0, "optim.lr": 5e-3, "optim.schedule": "constant"}
    grpo = {**exact, "algorithm.name": "grpo", "algorithm.rewards": f"[{tmp / 'rewards.py'}:letters]",
            "data.train": str(tmp / "prompts.jsonl"), "algorithm.rollout.max_new_tokens": 8,
            "algorithm.num_generations": 4, "optim.batch_size": 16, "optim.micro_batch_size": 4,
            "run.max_steps": 2}  # fmt: skip
    every = {"run.save_every": 1}  # a checkpoint at each step, to resume from (KILLED)
    reward = {**exact, "algorithm.name": "reward", "data.train": str(tmp / "pairs.jsonl")}
    # PPO scored by the reward model the sharded reward run leaves in final/ (sharded as it loads), with
    # a frozen copy as reference (sharded) and the adaptive KL controller, whose state a resume must restore.
    ppo = {**exact, "algorithm.name": "ppo", "algorithm.reward_model": str(tmp / "reward" / "final"),
           "data.train": str(tmp / "prompts.jsonl"), "algorithm.rollout.max_new_tokens": 8, "algorithm.kl_coef": 0.1,
           "algorithm.adaptive_kl": True, "algorithm.target_kl": 0.5}  # fmt: skip
    # LoRA: the reference is the adapter disabled, and sampling runs through peft's wrapper of the sharded LM
    rloo = {**grpo, **exact, "algorithm.name": "rloo", "algorithm.beta": 0.1, "technique.name": "lora"}
    settings = {
        "sft": {**sft, **every},
        "dpo-copy": {**dpo, "algorithm.reference": "copy"},
        "dpo-lora": {**dpo, "algorithm.reference": "adapter", "technique.name": "lora", "optim.lr": 5e-3, **every},
        "grpo": grpo,
        "grpo-ddp": {**grpo, "run.sharding": "none"},
        "reward": reward,
        "ppo": ppo,
        "ppo-ddp": {**ppo, "run.sharding": "none"},
        # whole checkpoints (gathered to the main process), then resumed to step 3 (`@resume`)
        "ppo-resumed": {**ppo, "run.max_steps": 2, "run.whole_checkpoints": "true"},
        "rloo": rloo,
        # sampled through the adapters, as the sharded run must (merged weights are the adapted model to rounding)
        "rloo-ddp": {**rloo, "run.sharding": "none", "algorithm.rollout.merge_adapters": "false"},
        # LoRA, a KL penalty to the adapter disabled
        "grpo-lora": {**grpo, "technique.name": "lora", "algorithm.beta": 0.04, "optim.lr": 5e-3, **every},
        "dpo-precompute": {**dpo, "algorithm.reference": "precompute"},
        # sampled with PromptSeededEngine (`@seeded`): the same samples however the prompts are split, so the
        # sharded run compares with one process
        # and scored by the reward model the sharded reward run leaves in final/ besides `letters`: the reward model
        # sharded too, as it loads (`rewards.builtin.reward_model`)
        "grpo-seeded": {**grpo, "algorithm.reward_model": str(tmp / "reward" / "final")},
        # vLLM's place taken by the fake backend, one per process (fsdp_worker.py): the same runs as "grpo" and
        # "rloo" (LoRA), sampled from the whole weights each process gathers and pushes
        "grpo-vllm": {**grpo, "algorithm.rollout.engine": "vllm"},
        "rloo-vllm": {**rloo, "algorithm.rollout.engine": "vllm"},
        # QLoRA: the 4-bit base weights sharded too, SFT (checkpointed, killed and resumed), DPO (its frozen copy 4-bit
        # and sharded too) and GRPO (sampling on the sharded 4-bit policy, a KL penalty to the adapter disabled), at
        # AdamW eps 1 like the runs above
        "sft-qlora": {**sft, **exact, "technique.name": "qlora", **every},
        "dpo-qlora-copy": {**dpo, **exact, "algorithm.reference": "copy", "technique.name": "qlora"},
        "grpo-qlora": {**grpo, "technique.name": "qlora", "algorithm.beta": 0.04},
        # and sampled by vLLM (the fake backend, per process), to which each 4-bit layer is pushed dequantised
        "grpo-qlora-vllm": {**grpo, "technique.name": "qlora", "algorithm.beta": 0.04, "algorithm.rollout.engine": "vllm"},
        # 19 rows in steps of 8, micro-batches of 1; 3 held-out rows
        "sft-uneven": {**sft, "data.train": str(tmp / "19.jsonl"), "data.eval": str(tmp / "eval3.jsonl"),
                       "optim.micro_batch_size": 1, "run.max_steps": "null", "run.epochs": 1, "run.eval_every": 1},
    }
    cfgs = {}
    for name, overrides in settings.items():
        merged = {**base, "run.output_dir": str(tmp / name), **overrides}
        with mock.patch.object(config_module, "vllm_available", lambda: True):  # the fake backend stands in
            cfgs[name] = load_config(None, [f"{k}={v}" for k, v in merged.items()])
        dump_config(cfgs[name], tmp / f"{name}.yaml")
    resumes = ("ppo-resumed",)
    for name in resumes:
        dump_config(load_config(tmp / f"{name}.yaml", ["run.max_steps=3"]), tmp / f"{name}-3.yaml")
    # One process (unsharded, whole checkpoints), trained here; the worker resumes it after step 2 on two sharded
    # processes (`sft-1proc-on-2`: the same run folder, run.sharding=fsdp2)
    single = {**base, **sft, **every, "run.sharding": "none", "run.output_dir": str(tmp / "sft-1proc")}
    cfgs["sft-1proc"] = load_config(None, [f"{k}={v}" for k, v in single.items()])
    one = train(cfgs["sft-1proc"], return_model=True)
    dump_config(load_config(None, [f"{k}={v}" for k, v in {**single, "run.sharding": "fsdp2"}.items()]),
                tmp / "sft-1proc-on-2.yaml")  # fmt: skip
    out = tmp / "out"
    out.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           str(out), *(str(tmp / f"{n}.yaml") + MODES.get(n, "") for n in settings), *(f"{tmp / n}-3.yaml@resume" for n in resumes),
           *(f"{tmp / n}.yaml@from-{k}" for n, k in KILLED.items()), f"{tmp / 'sft-1proc-on-2'}.yaml@from-2"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stderr[-4000:]
    (tmp / "launch.log").write_text(proc.stdout, encoding="utf-8")
    held = {p.stem: torch.load(p) for p in out.glob("*.pt")}
    held["sft-1proc"] = {"weights": {n: p.detach().clone() for n, p in one.model.named_parameters()}}
    yield cfgs, held
    shutil.rmtree(tmp, ignore_errors=True)  # ~90 MB of checkpoints: CI machines can be short of disk


def _losses(run_dir) -> torch.Tensor:
    return torch.tensor([r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl")])


def _trained(weights: dict, base: dict) -> bool:
    """Whether a full weight left its base value (a scalar-head model's LM is under `policy.`), or a LoRA B left
    zero."""
    return any(not torch.equal(t, base[n.removeprefix("policy.")]) if n.removeprefix("policy.") in base
               else "lora_B" in n and bool(t.any()) for n, t in weights.items())  # fmt: skip


def _one_process(cfg, name, totals: list | None = None):
    """`cfg` trained by this one process, unsharded; each rollout's total rewards appended to `totals`."""
    one = cfg.model_copy(update={"run": cfg.run.model_copy(update={"sharding": "none",
                                                                    "output_dir": cfg.run.output_dir + "-one"})})
    if "skip_zero_advantage" in type(cfg.algorithm).model_fields and cfg.algorithm.beta == 0:
        # Several processes train every completion, those with advantage 0 too (each must run as many forwards):
        # so does the one process they are compared with (with beta > 0 every completion trains anyway).
        one = one.model_copy(update={"algorithm": one.algorithm.model_copy(update={"skip_zero_advantage": False})})
    score = SOURCE.compute_rewards

    def recorded(*args, **kwargs):
        result = score(*args, **kwargs)
        (totals if totals is not None else []).append(list(result.total))
        return result

    with mock.patch.object(SOURCE, "compute_rewards", recorded):
        if name not in MODES:
            return train(one, return_model=True)  # fmt: skip
        with mock.patch.dict(engines.ENGINES, {"hf": lambda cfg: PromptSeededEngine()}):  # as the worker samples
            return train(one, return_model=True)


def _held(name: str) -> str:
    return f"{name}{MODES.get(name, '').replace('@', '-')}"


@pytest.mark.parametrize("name", ["sft", "dpo-copy", "dpo-lora", "dpo-precompute", "reward", "grpo-seeded",
                                  "sft-qlora", "dpo-qlora-copy", "grpo-qlora"])
def test_two_sharded_processes_train_exactly_as_one_process(runs, name):
    """The same weights and losses as one process (GRPO: with samples that do not depend on the process layout,
    `PromptSeededEngine`; its logged rewards, KL and gradient norm too)."""
    cfgs, held = runs
    totals: list[list[float]] = []
    one = _one_process(cfgs[name], name, totals)
    sharded = held[f"{_held(name)}-rank0"]["weights"]
    base = load_file(str(Path(cfgs[name].model.name) / "model.safetensors"))
    assert sharded.keys() == dict(one.model.named_parameters()).keys()
    for n, p in one.model.named_parameters():
        # The same global batch and normaliser; the gradient's float sums run in another order (gloo's
        # reduce-scatter of two halves against one process's sum). For LoRA, Adam's step g / sqrt(v) turns that
        # last-bit difference of a near-zero gradient into a ~1e-6 difference of the update: hence atol 1e-5 there.
        assert_close(sharded[n], p.detach(), **TOLERANCE.get(name, {"rtol": 1e-4, "atol": 1e-5 if "lora" in name
                                                                     else 1e-6}), msg=n)  # fmt: skip
    assert _trained(sharded, base)
    assert_close(_losses(cfgs[name].run.output_dir), _losses(one.run_dir), rtol=1e-5, atol=1e-6)
    if name in MODES:  # GRPO: every logged value, step by step: the training's and the rollouts' statistics
        a = read_metrics(Path(cfgs[name].run.output_dir) / "metrics.jsonl")
        b = read_metrics(one.run_dir / "metrics.jsonl")
        keys = [k for k in b[0] if not any(t in k for t in UNTIMED)]
        assert {"loss_units", "tokens", "grad_norm", "entropy", "ratio_mean", "reward/total_mean", "reward/total_std",
                "completion_length_mean", "completion_length_max", "truncated_fraction", "uniform_group_fraction",
                "reward_std_in_group"} <= set(keys) and len(a) == len(b) == 2  # fmt: skip
        assert_close(torch.tensor([[r[k] for k in keys] for r in a]), torch.tensor([[r[k] for k in keys] for r in b]),
                     rtol=1e-5, atol=1e-6, msg=str(keys))  # fmt: skip
        # Each sample's reward, the sharded reward model's score (grpo-seeded) included: rank r scored prompts r::2
        # of each rollout, one process all of them (G samples each). RM_ATOL: why not 0.
        G = cfgs[name].algorithm.group_size()
        r0, r1 = (held[f"{_held(name)}-rank{r}"]["reward_totals"] for r in (0, 1))
        assert len(totals) == len(r0) == len(r1) == 2
        for whole, s0, s1 in zip(totals, r0, r1, strict=True):
            groups = torch.tensor(whole).view(-1, G)
            assert_close(torch.tensor(s0).view(-1, G), groups[0::2], rtol=0, atol=RM_ATOL)
            assert_close(torch.tensor(s1).view(-1, G), groups[1::2], rtol=0, atol=RM_ATOL)


def test_each_sharded_process_holds_half_of_every_weight(runs):
    _, held = runs
    for name in ("sft", "dpo-copy", "dpo-lora", "dpo-precompute", "grpo", "reward", "ppo", "rloo", "grpo-vllm",
                 "rloo-vllm", "sft-qlora", "dpo-qlora-copy", "grpo-qlora", "grpo-qlora-vllm"):
        r0, r1 = held[f"{_held(name)}-rank0"], held[f"{_held(name)}-rank1"]
        assert r0["sharded"] and r1["sharded"]
        assert r0["local"] + r1["local"] == r0["total"]  # the shards partition the model
        # dim-0 halves: the tiny model's odd-sized rows (e.g. a 259-token vocabulary, a scalar head's one row and
        # its bias) go one more to rank 0
        assert abs(r0["local"] - r0["total"] / 2) < 0.01 * r0["total"], (name, r0["local"], r0["total"])
    for name in ("reward", "ppo"):  # the scalar head is sharded with the rest
        assert held[f"{name}-rank0"]["head"] == (64 + 1, 65) and held[f"{name}-rank1"]["head"] == (0, 65)
    for name in ("dpo-copy", "ppo"):  # so is the frozen-copy reference, the policy's size, half per process
        (m0, l0, t0, s0), (m1, l1, t1, s1) = held[f"{name}-rank0"]["reference"], held[f"{name}-rank1"]["reference"]
        assert m0 == m1 == "copy" and s0 and s1 and l0 + l1 == t0 == t1 == 107_200, (name, l0, l1, t0)
        assert abs(l0 - t0 / 2) < 0.01 * t0
    # QLoRA's frozen copy: the 4-bit base without adapters (its codes halved too), half per process
    (m0, l0, t0, s0), (m1, l1, t1, s1) = held["dpo-qlora-copy-rank0"]["reference"], held["dpo-qlora-copy-rank1"]["reference"]
    adapters = held["dpo-qlora-copy-rank0"]["total"] - t0
    assert m0 == m1 == "copy" and s0 and s1 and l0 + l1 == t0 == t1 and adapters == 32_768, (l0, l1, t0, adapters)
    assert abs(l0 - t0 / 2) < 0.01 * t0
    # The trained reward model scoring the rollouts (GRPO's and PPO's), sharded as it loads: the tiny model and a
    # scalar head, half per process
    for name in ("grpo-seeded", "ppo"):
        (l0, t0, s0), (l1, t1, s1) = (held[f"{_held(name)}-rank{r}"]["reward_model"] for r in (0, 1))
        assert s0 and s1 and l0 + l1 == t0 == t1 == 107_200 + 65, (name, l0, l1, t0)
        assert abs(l0 - t0 / 2) < 0.01 * t0
    for name in ("grpo-ddp", "ppo-ddp", "rloo-ddp"):
        ddp = held[f"{name}-rank0"]
        assert not ddp["sharded"] and ddp["local"] == ddp["total"]  # the unsharded run holds everything


@pytest.mark.parametrize("name", ["sft-qlora", "dpo-qlora-copy", "grpo-qlora"])
def test_each_sharded_qlora_process_holds_half_of_the_4bit_codes_and_the_whole_quantisation_state(runs, name):
    """QLoRA: the 4-bit weights are parameters (bitsandbytes `Params4bit`, two 4-bit codes per uint8 element), cut
    in dim-0 halves like every other weight; the quantisation state (each layer's absmax, code book and
    double-quantisation state) is not, and each process holds all of it, equal bit for bit to what one process
    quantises from the same weights (`models.sharding`)."""
    from bitsandbytes.nn import Linear4bit  # optional dependency (QLoRA)

    cfgs, held = runs
    r0, r1 = held[f"{_held(name)}-rank0"]["four_bit"], held[f"{_held(name)}-rank1"]["four_bit"]
    one = load_model(ModelConfig(name=cfgs[name].model.name), TechniqueConfig(name="qlora"), train=False)
    layers = [m for m in one.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 14  # 2 decoder layers x (q, k, v, o, gate, up, down)
    codes = sum(m.in_features * m.out_features for m in layers) // 2
    assert r0["total"] == r1["total"] == codes
    assert r0["local"] == r1["local"] == codes // 2, (r0["local"], r1["local"], codes)  # each layer's rows even
    whole = four_bit_held(one)["state"]  # the base model's names; the runs' are peft's, around each base layer
    s0, s1 = ({k.removeprefix("base_model.model.").replace(".base_layer.", "."): t for k, t in r["state"].items()}
              for r in (r0, r1))  # fmt: skip
    assert s0.keys() == s1.keys() == whole.keys()
    assert {k.rpartition(".")[2] for k in whole} >= {"absmax", "quant_map", "nested_absmax", "nested_quant_map"}
    for k, t in whole.items():
        assert torch.equal(s0[k], t) and torch.equal(s1[k], t), k


@pytest.mark.parametrize("name", ["grpo", "rloo", "ppo"])
def test_sharded_rl_trains_exactly_as_two_ddp_processes(runs, name):
    cfgs, held = runs
    sharded, ddp = held[f"{name}-rank0"]["weights"], held[f"{name}-ddp-rank0"]["weights"]
    assert sharded.keys() == ddp.keys()
    for n in ddp:
        assert_close(sharded[n], ddp[n], **TOLERANCE.get(name, {"rtol": 1e-4, "atol": 1e-6}), msg=n)  # as above
    a = read_metrics(Path(cfgs[name].run.output_dir) / "metrics.jsonl")
    b = read_metrics(Path(cfgs[f"{name}-ddp"].run.output_dir) / "metrics.jsonl")
    keys = [k for k in b[0] if not any(t in k for t in UNTIMED)]
    assert {"reward/total_mean", "grad_norm", "loss"} <= set(keys)
    assert len(a) == len(b) == cfgs[name].run.max_steps
    for ra, rb in zip(a, b, strict=True):  # the same samples, rewards, KL and gradients at every step
        assert_close(torch.tensor([ra[k] for k in keys]), torch.tensor([rb[k] for k in keys]), rtol=1e-5, atol=1e-6,
                     msg=str(keys))  # fmt: skip
    assert _trained(sharded, load_file(str(Path(cfgs[name].model.name) / "model.safetensors")))
    if name == "ppo":  # the value head learned, from its zero start
        assert sharded["head.weight"].abs().sum() > 0


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_sharded_processes_push_the_whole_weights_to_vllm_and_train_as_with_the_hf_engine(runs, name):
    """Each process's vLLM (the fake backend, sampling with its own whole copy of the model) gets the weights
    gathered whole before each rollout: at the first, the loaded ones (under LoRA each adapted layer's W + 0 delta,
    so W bit for bit), then those after each step, the same on both processes; the wake/push/reset/sample/sleep
    order of colocated vLLM at each rollout; and the run samples, scores and trains exactly as the same run
    sampling on the sharded model with the HF engine (so the sampler's log-probs match the trainer's)."""
    cfgs, held = runs
    steps = cfgs[name].run.max_steps
    base = load_file(str(Path(cfgs[name].model.name) / "model.safetensors"))
    v0, v1 = held[f"{name}-vllm-rank0"]["vllm"], held[f"{name}-vllm-rank1"]["vllm"]
    order = ["wake_up:weights", "load_weights", "reset_prefix_cache", "wake_up:kv_cache", "sample", "sleep"]
    assert v0["calls"] == v1["calls"] == order * steps
    assert len(v0["pushes"]) == len(v1["pushes"]) == steps
    first = v0["pushes"][0]
    lora = name == "rloo"
    adapted = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert first.keys() == ({n for n in base if n.split(".")[-2] in adapted} if lora else base.keys())
    for n, t in first.items():
        assert torch.equal(t, base[n]), n  # whole (base's shape), and bit for bit the loaded weights
    for k in range(steps):
        assert v0["pushes"][k].keys() == first.keys()
        for n in first:
            assert torch.equal(v0["pushes"][k][n], v1["pushes"][k][n]), (k, n)  # gathered: the same everywhere
    assert any(not torch.equal(v0["pushes"][1][n], first[n]) for n in first)  # step 1 trained, and was pushed
    vllm, hf = held[f"{name}-vllm-rank0"]["weights"], held[f"{name}-rank0"]["weights"]
    assert vllm.keys() == hf.keys()
    for n in hf:
        assert_close(vllm[n], hf[n], **TOLERANCE.get(name, {"rtol": 1e-4, "atol": 1e-6}), msg=n)  # as above
    a = read_metrics(Path(cfgs[f"{name}-vllm"].run.output_dir) / "metrics.jsonl")
    b = read_metrics(Path(cfgs[name].run.output_dir) / "metrics.jsonl")
    gaps = [r["logp_gap_sampler_trainer"] for r in a]
    assert len(gaps) == steps and max(gaps) < 1e-5, gaps  # sampled from the weights just trained
    keys = [k for k in b[0] if not any(t in k for t in UNTIMED) and k != "logp_gap_sampler_trainer"]
    assert {"reward/total_mean", "completion_length_mean", "grad_norm", "loss"} <= set(keys)
    assert_close(torch.tensor([[r[k] for k in keys] for r in a]), torch.tensor([[r[k] for k in keys] for r in b]),
                 rtol=1e-5, atol=1e-6, msg=str(keys))  # fmt: skip


def test_sharded_qlora_processes_push_to_vllm_what_one_process_pushes(runs):
    """QLoRA with vLLM (the fake backend, one per process): each 4-bit layer's codes, sharded, are gathered whole
    and dequantised with the quantisation state every process holds, and its LoRA delta, computed on the shards,
    is gathered and added (`policy_weights`). Each push is the same on both processes and is what one process
    pushes for the same weights, bit for bit: the first, the loaded model's (B = 0: each layer's 4-bit W
    dequantised); after training, the trained model's, with the run's gathered adapters loaded into one process.
    And the run samples from the weights it scores with."""
    from bitsandbytes.nn import Linear4bit  # optional dependency (QLoRA)

    from posttrain.rollout.vllm_engine import policy_weights

    cfgs, held = runs
    cfg, name = cfgs["grpo-qlora-vllm"], "grpo-qlora-vllm"
    v0, v1 = held[f"{name}-rank0"]["vllm"], held[f"{name}-rank1"]["vllm"]
    assert len(v0["pushes"]) == len(v1["pushes"]) == cfg.run.max_steps
    one = load_model(cfg.model, cfg.technique)  # B = 0, as the run starts
    layers = {n.removeprefix("base_model.model.").replace(".base_layer", "") for n, m in one.named_modules()
              if isinstance(m, Linear4bit)}  # fmt: skip
    assert len(layers) == 14  # every 4-bit layer, adapted or not
    with policy_weights(one) as weights:
        first = {n: t.clone() for n, t in weights}
    assert first.keys() == {f"{n}.weight" for n in layers}
    pushes = [*zip(v0["pushes"], v1["pushes"], strict=True), (v0["final"], v1["final"])]
    for p0, p1 in pushes:
        assert p0.keys() == p1.keys() == first.keys()
        assert all(torch.equal(p0[n], p1[n]) for n in first)  # gathered: the same on both processes
    assert all(torch.equal(v0["pushes"][0][n], t) for n, t in first.items())
    trained = held[f"{name}-rank0"]["weights"]  # gathered whole (`full_state`)
    params = dict(one.named_parameters())
    with torch.no_grad():
        for n, t in trained.items():
            if "lora_" in n:
                params[n].copy_(t)
    with policy_weights(one) as weights:
        last = {n: t.clone() for n, t in weights}
    assert any(not torch.equal(last[n], first[n]) for n in first)  # the adapters trained
    for n, t in last.items():
        assert torch.equal(v0["final"][n], t), n
    assert any(not torch.equal(v0["pushes"][1][n], first[n]) for n in first)  # step 1 trained, and was pushed
    gaps = [r["logp_gap_sampler_trainer"] for r in read_metrics(Path(cfg.run.output_dir) / "metrics.jsonl")]
    assert len(gaps) == cfg.run.max_steps and max(gaps) < 1e-5, gaps


def test_final_folder_and_checkpoint_hold_the_whole_gathered_weights(runs):
    cfgs, held = runs
    run_dir = Path(cfgs["sft"].run.output_dir)
    gathered = held["sft-rank0"]["weights"]
    final = load_file(str(run_dir / "final" / "model.safetensors"))
    assert final.keys() == gathered.keys()
    for n, t in final.items():
        assert torch.equal(t, gathered[n]), n


def test_a_sharded_qlora_run_saves_its_gathered_adapter(runs):
    """`final/` of a sharded QLoRA run: the adapter, gathered whole, as peft saves it (names without the adapter's
    name), recorded as a QLoRA adapter so that it is loaded onto the same 4-bit base."""
    cfgs, held = runs
    final = Path(cfgs["sft-qlora"].run.output_dir) / "final"
    gathered = {n.replace(".default.", "."): t for n, t in held["sft-qlora-rank0"]["weights"].items() if "lora_" in n}
    saved = load_file(str(final / "adapter_model.safetensors"))
    assert saved.keys() == gathered.keys() and len(saved) == 28
    for n, t in saved.items():
        assert torch.equal(t, gathered[n]), n
    info = json.loads((final / "posttrain_model.json").read_text(encoding="utf-8"))
    assert (info["kind"], info["technique"]) == ("adapter", "qlora")


def test_a_sharded_reward_model_saves_its_gathered_head_beside_the_model(runs):
    cfgs, held = runs
    final = Path(cfgs["reward"].run.output_dir) / "final"
    gathered = held["reward-rank0"]["weights"]
    model, head = load_file(str(final / "model.safetensors")), load_file(str(final / "score_head.safetensors"))
    assert {f"policy.{n}" for n in model} | {f"head.{n}" for n in head} == gathered.keys()
    assert all(torch.equal(t, gathered[f"policy.{n}"]) for n, t in model.items())
    assert all(torch.equal(t, gathered[f"head.{n}"]) for n, t in head.items())
    assert head["weight"].shape == (1, 64)
    ckpt = final.parent / "checkpoints" / "step-000003" / "sharded"  # the head's shards beside the model's
    assert shard_keys(ckpt) == gathered.keys()
    assert all(torch.equal(t, gathered[n]) for n, t in read_shards(ckpt, gathered).items())


def _elements(folder: Path) -> dict[tuple[str, str], int]:
    """(file, "model" or "optimizer") -> tensor elements stored in that file of a torch.distributed.checkpoint
    folder, read from its `.metadata` (which chunk of which tensor lies in which file)."""
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(folder)).read_metadata()
    out: dict[tuple[str, str], int] = {}
    for index, where in meta.storage_data.items():
        tensor = meta.state_dict_metadata[index.fqn]
        if hasattr(tensor, "chunks"):  # a tensor (not a pickled value: a parameter group's settings)
            key = (where.relative_path, index.fqn.split(".")[0])
            out[key] = out.get(key, 0) + math.prod(tensor.chunks[index.index].sizes)
    return out


@pytest.mark.parametrize("name, step, trained", [("sft", 3, 107_200), ("dpo-lora", 3, 32_768), ("grpo-lora", 2, 32_768),
                                                 ("sft-qlora", 3, 32_768)])
def test_a_sharded_checkpoint_holds_each_process_s_shards(runs, name, step, trained):
    """No `trainable.safetensors` or `optimizer.pt` gathered by the main process: a `sharded/` folder in which each
    process wrote its half of the trainable weights (all 107,200 elements of the full model; under LoRA only the
    adapters' 32,768) and of their two AdamW moments, and the index of where each piece lies. Read whole in one
    process, they are the weights the run had at that step (here its last: those it ends with)."""
    cfgs, held = runs
    ckpt = Path(cfgs[name].run.output_dir) / "checkpoints" / f"step-{step:06d}"
    assert {p.name for p in ckpt.iterdir()} == {"sharded", "scheduler.pt", "trainer_state.json", "rng_state_0.pt",
                                                 "rng_state_1.pt"}  # fmt: skip
    assert {p.name for p in (ckpt / "sharded").iterdir()} == {".metadata", "__0_0.distcp", "__1_0.distcp"}
    state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
    assert (state["step"], state["layout"], state["world_size"]) == (step, "sharded", 2)
    elements = _elements(ckpt / "sharded")
    m0, m1 = elements["__0_0.distcp", "model"], elements["__1_0.distcp", "model"]
    assert m0 + m1 == trained and abs(m0 - trained / 2) < 0.01 * trained, (m0, m1)  # dim-0 halves, as held
    # each process's AdamW moments (exp_avg, exp_avg_sq) of its own shard, and one step count per parameter
    # (a plain tensor, the same on both: written once, by one of them)
    steps = len(shard_keys(ckpt / "sharded"))
    o0, o1 = elements["__0_0.distcp", "optimizer"], elements["__1_0.distcp", "optimizer"]
    assert o0 + o1 == 2 * trained + steps and o0 >= 2 * m0 and o1 >= 2 * m1, (o0, o1, m0, m1, steps)
    gathered = held[f"{name}-rank0"]["weights"]
    names = shard_keys(ckpt / "sharded")
    assert names == {n for n in gathered if "lora_" in n or "lora" not in name}  # the trainable ones only
    saved = read_shards(ckpt / "sharded", {n: gathered[n] for n in names})
    assert all(torch.equal(saved[n], gathered[n]) for n in names)


@pytest.mark.parametrize("name", list(KILLED))
def test_a_sharded_run_killed_after_step_k_resumes_exactly_from_its_shards(runs, name):
    """The run folder as a kill after step k leaves it (its checkpoints up to step k; `fsdp_worker._killed_after`),
    resumed: each process reads back its own shards of the weights and AdamW state, its RNG state, the schedule
    and the data position (GRPO: the next rollout, sampled from the restored LoRA weights, with the adapter
    disabled as reference). The same weights, bit for bit, and the same logged values at every step as the
    uninterrupted run."""
    cfgs, held = runs
    k = KILLED[name]
    resumed, straight = held[f"{name}-from-{k}-rank0"]["weights"], held[f"{name}-rank0"]["weights"]
    assert resumed.keys() == straight.keys()
    for n in straight:
        assert torch.equal(resumed[n], straight[n]), n
    a = read_metrics(Path(f"{cfgs[name].run.output_dir}-from-{k}") / "metrics.jsonl")
    b = read_metrics(Path(cfgs[name].run.output_dir) / "metrics.jsonl")
    keys = [key for key in b[0] if not any(t in key for t in UNTIMED)]
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, cfgs[name].run.max_steps + 1))
    assert [[r[key] for key in keys] for r in a] == [[r[key] for key in keys] for r in b]
    log = (Path(cfgs[name].run.output_dir).parent / "launch.log").read_text(encoding="utf-8")
    assert f"resuming {cfgs[name].run.output_dir}-from-{k} from step-{k:06d}" in log
    assert len(held[f"{name}-from-{k}-rank0"]["reward_totals"]) == (cfgs[name].run.max_steps - k if "grpo" in name
                                                                       else 0)  # fmt: skip


def test_a_resumed_sharded_run_with_whole_checkpoints_continues_exactly(runs):
    """`run.whole_checkpoints`: PPO for 2 steps, its checkpoint gathered whole (weights, Adam state keyed by
    name), then resumed to step 3 (re-sharded; the value head and adaptive KL coefficient too): the same weights
    and logged values as the uninterrupted sharded run."""
    cfgs, held = runs
    resumed, straight = held["ppo-resumed-3-resume-rank0"]["weights"], held["ppo-rank0"]["weights"]
    assert resumed.keys() == straight.keys()
    for n in straight:
        assert torch.equal(resumed[n], straight[n]), n
    a = read_metrics(Path(cfgs["ppo-resumed"].run.output_dir) / "metrics.jsonl")
    b = read_metrics(Path(cfgs["ppo"].run.output_dir) / "metrics.jsonl")
    keys = [k for k in b[0] if not any(t in k for t in UNTIMED)]
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]
    assert len({r["kl_coef"] for r in b}) == 3  # the controller moved at every rollout
    ckpt = Path(cfgs["ppo-resumed"].run.output_dir) / "checkpoints" / "step-000003"
    whole = load_file(str(ckpt / "trainable.safetensors"))  # gathered: the whole layout, not `sharded/`
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[n], resumed[n]) for n in whole)
    assert (ckpt / "optimizer.pt").is_file() and not (ckpt / "sharded").exists()


@pytest.mark.parametrize("name", ["grpo", "grpo-ddp"])
def test_logged_rollout_statistics_cover_both_processes_samples(runs, name):
    """FSDP2 and DDP: each step's logged mean and standard deviation of the rewards are those of all 16 samples,
    process 0's 8 and process 1's 8 (as each process scored them), not process 0's alone, which differ."""
    cfgs, held = runs
    records = read_metrics(Path(cfgs[name].run.output_dir) / "metrics.jsonl")
    mine, theirs = held[f"{name}-rank0"]["reward_totals"], held[f"{name}-rank1"]["reward_totals"]
    assert len(records) == len(mine) == len(theirs) == 2  # one rollout per step
    for record, r0, r1 in zip(records, mine, theirs, strict=True):
        assert len(r0) == len(r1) == 8
        assert record["reward/total_mean"] == statistics.fmean(r0 + r1)
        assert record["reward/total_std"] == statistics.pstdev(r0 + r1)
    assert any(r["reward/total_mean"] != statistics.fmean(r0) for r, r0 in zip(records, mine, strict=True))


def _cut_after(run_dir, k: int, to: Path) -> Path:
    """A copy of finished run folder `run_dir` at `to`, as a run killed after step `k` would have left it."""
    shutil.copytree(run_dir, to)
    for ckpt in list_checkpoints(to):
        if int(ckpt.name.removeprefix("step-")) > k:
            shutil.rmtree(ckpt)
    shutil.rmtree(to / "final")
    return to


def _resumed_as(cfg, run_dir: Path, sharding: str):
    return cfg.model_copy(update={"run": cfg.run.model_copy(update={"sharding": sharding, "output_dir": str(run_dir)})})


@pytest.mark.parametrize("name", list(ON_ONE))
def test_a_sharded_run_resumes_on_one_process(runs, name, tmp_path, capsys):
    """A two-process sharded run killed after step k, resumed by one process (unsharded: run.sharding=none): the
    trainable weights and the AdamW state (step, exp_avg, exp_avg_sq of every parameter) right after the load
    equal, bit for bit, what the two processes saved (read whole by torch's own converter, `dcp_to_torch_save`);
    the run says what differs from the uninterrupted one, and ends with its weights and losses."""
    cfgs, held = runs
    k = ON_ONE[name]
    run_dir = _cut_after(cfgs[name].run.output_dir, k, tmp_path / name)
    after_load = {}

    def load_and_record(accelerator, path, model, optimizer, *args, **kwargs):
        step = load_checkpoint(accelerator, path, model, optimizer, *args, **kwargs)
        unwrapped = accelerator.unwrap_model(model)
        names = {id(p): n for n, p in unwrapped.named_parameters()}
        state = optimizer.state_dict()["state"]  # keyed by position in the optimizer's groups; cloned: AdamW
        order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]  # updates it in place
        after_load["optimizer"] = {order[i]: {key: t.clone() for key, t in s.items()} for i, s in state.items()}
        after_load["weights"] = {n: p.detach().clone() for n, p in unwrapped.named_parameters() if p.requires_grad}
        return step

    with mock.patch.object(TRAIN, "load_checkpoint", load_and_record):
        one = train(_resumed_as(cfgs[name], run_dir, "none"), resume=True, return_model=True)
    out = capsys.readouterr().out
    assert f"note: resuming 2-process state on 1 process (step-{k:06d})" in out
    assert "the random state of rank 0 is restored, that of rank 1 dropped" in out
    dcp_to_torch_save(run_dir / "checkpoints" / f"step-{k:06d}" / "sharded", tmp_path / "saved.pt")
    saved = torch.load(tmp_path / "saved.pt")
    assert after_load["weights"].keys() == saved["model"].keys() == saved["optimizer"]["state"].keys()
    for n, t in saved["model"].items():
        assert torch.equal(after_load["weights"][n], t), n
    assert after_load["optimizer"].keys() == saved["optimizer"]["state"].keys()
    for n, moments in saved["optimizer"]["state"].items():
        assert moments.keys() == after_load["optimizer"][n].keys() == {"step", "exp_avg", "exp_avg_sq"}, n
        assert moments["step"].item() == k
        for key, t in moments.items():
            assert torch.equal(after_load["optimizer"][n][key], t), (n, key)
    # Steps 1..k are the two processes' own (restored bit for bit); step k+1, one process sums each gradient in
    # another order than gloo's reduce-scatter of two halves, the only difference. Measured: 7.5e-9 (full) and
    # 1.5e-8 (LoRA, lr 5e-3) largest weight difference after that step, hence atol 1e-7; its loss is computed
    # from the restored weights, so it agrees to the summation order of the loss alone (measured: equal).
    straight = held[f"{name}-rank0"]["weights"]
    assert dict(one.model.named_parameters()).keys() == straight.keys()
    for n, p in one.model.named_parameters():
        assert_close(p.detach(), straight[n], rtol=0, atol=1e-7, msg=n)
    assert _trained(straight, load_file(str(Path(cfgs[name].model.name) / "model.safetensors")))
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == list(range(1, cfgs[name].run.max_steps + 1))
    assert_close(_losses(run_dir), _losses(cfgs[name].run.output_dir), rtol=1e-6, atol=0)


def test_a_one_process_run_resumes_on_two_sharded_processes(runs):
    """One unsharded process for 2 steps (whole checkpoints: its AdamW state keyed by position), resumed by two
    sharded processes: right after the load, the weights and AdamW state gathered whole equal the saved ones bit
    for bit; the new rank re-derives its random state, and says so; the run ends with the weights and losses of
    the uninterrupted one-process run."""
    cfgs, held = runs
    run_dir = Path(cfgs["sft-1proc"].run.output_dir)
    ckpt = run_dir / "checkpoints" / "step-000002"
    weights, optim = load_file(str(ckpt / "trainable.safetensors")), torch.load(ckpt / "optimizer.pt")
    # The positions `optimizer.pt` numbers: trainer.optim.build_optimizer's groups, the matrices (weight decay)
    # then the 1-D gains, each in the model's parameter order.
    params = list(AutoModelForCausalLM.from_pretrained(cfgs["sft-1proc"].model.name).named_parameters())
    order = [n for n, p in params if p.ndim >= 2] + [n for n, p in params if p.ndim < 2]
    loaded = held["sft-1proc-on-2-from-2-rank0"]["loaded"]
    assert loaded["weights"].keys() == weights.keys() == set(order)
    for n, t in weights.items():
        assert torch.equal(loaded["weights"][n], t), n
    assert loaded["optimizer"]["state"].keys() == set(order) and len(optim["state"]) == len(order)
    for i, moments in optim["state"].items():
        assert moments.keys() == {"step", "exp_avg", "exp_avg_sq"} and moments["step"].item() == 2
        for key, t in moments.items():
            assert torch.equal(loaded["optimizer"]["state"][order[i]][key], t), (order[i], key)
    log = (run_dir.parent / "launch.log").read_text(encoding="utf-8")
    assert f"resuming {run_dir}-from-2 from step-000002" in log
    assert ("note: resuming 1-process state on 2 processes (step-000002)" in log
            and "that of rank 1 re-derived from (run.seed, step, rank)" in log)  # fmt: skip
    resumed, straight = held["sft-1proc-on-2-from-2-rank0"]["weights"], held["sft-1proc"]["weights"]
    assert resumed.keys() == straight.keys()
    for n in straight:  # step 3 summed in another order, as above (measured: 7.5e-9 largest difference)
        assert_close(resumed[n], straight[n], rtol=0, atol=1e-7, msg=n)
    assert_close(_losses(f"{run_dir}-from-2"), _losses(run_dir), rtol=1e-6, atol=0)


def test_a_resume_on_processes_the_batch_does_not_split_over_is_refused_naming_both(runs, tmp_path):
    """optim.batch_size 8, written by 2 processes, resumed by 3: refused before the model loads, naming both
    numbers and what to launch instead (the launch of 3 stood in for: only the process count is read first)."""
    cfgs, _ = runs
    run_dir = _cut_after(cfgs["sft"].run.output_dir, 2, tmp_path / "sft")
    from accelerate.utils import DistributedType

    three = SimpleNamespace(num_processes=3, process_index=0, is_main_process=True,
                            distributed_type=DistributedType.MULTI_CPU, device=torch.device("cpu"))
    with mock.patch.object(TRAIN, "_accelerator", return_value=three), \
            mock.patch.object(TRAIN, "_load_model", side_effect=AssertionError("the model loaded")):  # fmt: skip
        with pytest.raises(UserError, match=r"step-000002 was written by 2 processes and this run has 3, which "
                                             r"cannot continue it: optim.batch_size \(8\) must be a multiple of the "
                                             r"number of processes \(3\).*--nproc_per_node 2"):  # fmt: skip
            train(_resumed_as(cfgs["sft"], run_dir, "fsdp2"), resume=True)


def test_a_sharded_run_skips_what_would_give_the_processes_unequal_forwards(runs):
    """19 rows in steps of 8 over 2 processes, micro-batches of 1: the last step's 3 rows would give one process 2
    forwards and the other 1 (DDP runs that step: test_distributed.py), and the one with fewer would leave the
    other waiting in an all-gather. Sharded, those 3 rows are skipped (`data.order.plan_batches`) and said so, and
    the last of 3 held-out rows is not evaluated: 2 steps, each with its evaluation, and the run ends."""
    cfgs, _ = runs
    run_dir = Path(cfgs["sft-uneven"].run.output_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert [r["step"] for r in records if "eval_loss" in r] == [1, 2]
    log = (run_dir.parent / "launch.log").read_text(encoding="utf-8")
    assert "3 of 19 examples are not trained in each epoch" in log and "different numbers of micro-batches" in log
    assert "eval3.jsonl: its last row is not evaluated" in log


# A torchrun worker that fails on process 1 only, as an out-of-memory error would, while process 0 waits for it in a
# collective; then the real CLI. `reward`: its reward model's second call (rollout 2); `backward`: its third
# backward (step 2's first micro-batch).
FAILING_WORKER = """import os, sys
from posttrain.models import heads
from posttrain.trainer import loop
where, calls = sys.argv[2], []
def failing(real, n, error):
    def call(*args, **kwargs):
        calls.append(1)
        if len(calls) == n and os.environ["RANK"] == "1":
            raise error
        return real(*args, **kwargs)
    return call
if where == "reward":
    heads.RewardModelScorer.__call__ = failing(heads.RewardModelScorer.__call__, 2,
                                               RuntimeError("out of memory (injected by the test)"))
else:
    loop._backward = failing(loop._backward, 3, RuntimeError(
        "DefaultCPUAllocator: can't allocate memory: you tried to allocate 123 bytes (injected by the test)"))
from posttrain.cli import main
sys.exit(main(["train", sys.argv[1]]))
"""


def _launch_failing(cfg, tmp_path, where: str):
    """`cfg` (3 steps, a checkpoint after each) launched on 2 processes by torchrun with FAILING_WORKER."""
    run_dir = tmp_path / where
    failing = cfg.model_copy(update={"run": cfg.run.model_copy(update={"output_dir": str(run_dir), "save_every": 1,
                                                                        "max_steps": 3})})  # fmt: skip
    dump_config(failing, tmp_path / f"{where}.yaml")
    (tmp_path / "worker.py").write_text(FAILING_WORKER, encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(tmp_path / "worker.py"), str(tmp_path / f"{where}.yaml"), where]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    return proc, run_dir


def test_a_sharded_reward_model_failing_on_one_process_stops_the_run_instead_of_hanging(runs, tmp_path):
    """GRPO scored by a reward model sharded over 2 processes, whose forward raises on process 1 only in rollout 2.
    Before, `rewards.compute` gave that process's samples the fallback reward and went on, while process 0 waited in
    the forward's all-gather: the run hung (measured: still running at a 150 s limit). Now process 1 stops with
    one clear paragraph (exit 2, no traceback of ours) naming the reward and the checkpoint kept, torchrun stops
    process 0 (measured: the launch ends in 12 s), and step 1's checkpoint is kept."""
    cfgs, _ = runs
    proc, run_dir = _launch_failing(cfgs["grpo-seeded"], tmp_path, "reward")
    assert proc.returncode != 0
    err = proc.stderr
    assert "error: The reward 'reward_model' failed (RuntimeError: out of memory (injected by the test))" in err
    assert f"The last checkpoint, {run_dir / 'checkpoints' / 'step-000001'}, is kept" in err
    assert "this is a bug in posttrain" not in err
    assert [c.name for c in list_checkpoints(run_dir)] == ["step-000001"]
    assert not (run_dir / "final").exists()


def test_a_sharded_run_out_of_memory_on_one_process_stops_every_process(runs, tmp_path):
    """SFT sharded over 2 processes, process 1's backward of step 2 failing with the CPU allocator's error while
    process 0's backward waits in its reduce-scatter: process 1 ends with the out-of-memory paragraph (exit 2), the
    launcher stops process 0 (measured: the launch ends in ~10 s), and step 1's checkpoint is kept. Process 0's
    collective may fail first (gloo: "Connection closed by peer"): it then says in one line that another process
    stopped (`errors.PeerStopped`), not "a bug in posttrain" with a traceback, which it did before (seen once in a
    full run of the suite)."""
    cfgs, _ = runs
    proc, run_dir = _launch_failing(cfgs["sft"], tmp_path, "backward")
    assert proc.returncode != 0
    err = proc.stderr
    assert "error: Out of memory at step 2 (process 1 of 2, cpu): can't allocate memory: you tried to allocate 123" in err
    # the micro-batch each process runs: batch 8 over 2 processes, 2 rows each (the config's micro_batch_size)
    assert (f"The last checkpoint, {run_dir / 'checkpoints' / 'step-000001'}, is kept: continue from it with "
            "--resume and a smaller optim.micro_batch_size (now 2 per process;") in err
    # process 0, if its collective fails before the launcher stops it, says its peer stopped, in one line
    assert "this is a bug in posttrain" not in err
    assert not [line for line in err.splitlines() if line.strip().startswith('File "') and "/posttrain/" in line]
    assert [c.name for c in list_checkpoints(run_dir)] == ["step-000001"]


def test_fsdp2_is_refused_in_one_process_before_anything_loads(make_cfg):
    cfg = make_cfg("one", **{"run.sharding": "fsdp2"})
    with pytest.raises(ConfigError, match="torchrun --nproc_per_node N"):
        train(cfg)
    assert not Path(cfg.run.output_dir).exists()


def test_fsdp2_refuses_a_second_sharding_from_accelerate(make_cfg, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="both would shard"):
        _check_sharding(make_cfg("y", **{"run.sharding": "fsdp2"}), 2)
