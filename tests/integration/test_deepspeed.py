"""DeepSpeed ZeRO-2 and ZeRO-3 (configs/accelerate/deepspeed_zero{2,3}.yaml under `accelerate launch`, 2 CPU
processes: DeepSpeed's CPU accelerator over gloo), through `posttrain train`, against one process without DeepSpeed:

- every method trains as one process does on the same global batch (the same losses, gradient norms and final
  weights): SFT full, LoRA and QLoRA, DPO with each reference (a frozen copy, the adapter disabled, precomputed), reward
  modelling, GRPO (LoRA), RLOO (LoRA), PPO (full, with a frozen-copy reference). Each step has 2 micro-batches per
  process, so DeepSpeed must step once per step, not once per micro-batch (`trainer.loop._micro_batch`); RL is
  sampled so that the samples do not depend on the process layout (`PromptSeededEngine`);
- ZeRO-3: each process holds half of every weight, the trained model's, a frozen-copy reference's and a trained
  reward model's scoring GRPO's rollouts (each partitioned by an inference engine of its own,
  `models.sharding.zero3_inference`), the reward model giving each sample the reward one process gives it, and a
  sample it cannot render on one process only its failure (no hang); ZeRO-2: the whole weights;
- `final/` and the checkpoint hold the whole trained weights (ZeRO-3's gathered) and DeepSpeed's own engine
  checkpoint; an SFT run killed after step 2 resumes from it to the uninterrupted run's weights and losses bit for
  bit; on another number of processes (2 -> 1 under ZeRO-2, 1 -> 2 under ZeRO-3; also SFT with LoRA and QLoRA,
  DPO with LoRA, with a frozen copy and precomputed, a reward model, GRPO and RLOO with LoRA and PPO, one
  direction each: `RESHARDED`) it resumes through DeepSpeed's universal checkpoint, the weights and AdamW state back bit for bit and the run within 1e-8 of the uninterrupted
  one; a resume without DeepSpeed is refused;
- a step whose loss (with finite gradients) or gradient (with a finite loss) became NaN/inf on one process stops
  the run on every process before the engine steps, its checkpoint of the step before holding that step's weights
  and AdamW state bit for bit (2 processes and 1);
- with a vLLM engine (`FakeVLLM` in vLLM's place, one per process) under ZeRO-3, each process pushes the whole
  weights (gathered module by module; under LoRA each adapted layer's W + delta; under QLoRA every 4-bit layer,
  its partitioned codes gathered, dequantised, plus its delta where it has one) before the first step and after
  each step, not when nothing changed, the same on both processes, equal to those one process trains.

Skipped where deepspeed is not installed (scripts/setup.sh installs it for development and CI, without its
dependencies: constraints.txt). One launch per ZeRO stage runs every 2-process job in turn (`deepspeed_worker.py`),
and one more per stage the 1-process jobs."""

import importlib
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support import free_port
from torch.testing import assert_close

from posttrain.algorithms import load_config
from posttrain.config import OptimConfig, deepspeed_zero_stage, dump_config
from posttrain.errors import ConfigError, UserError
from posttrain.rollout import engines
from posttrain.rollout.vllm_engine import policy_weights
from posttrain.train import train
from posttrain.trainer.checkpoint import check_resumable
from posttrain.trainer.metrics import read_metrics
from posttrain.trainer.optim import build_optimizer

pytest.importorskip("deepspeed")
WORKER = Path(__file__).with_name("deepspeed_worker.py")
worker = importlib.import_module("deepspeed_worker")  # the folder is on sys.path: conftest.py
PromptSeededEngine = importlib.import_module("fsdp_worker").PromptSeededEngine
ROOT = Path(__file__).parents[2]
STAGES = (2, 3)
PAIRS = [{"prompt": f"add {a} {b}", "chosen": str(a + b), "rejected": f"{a + b + 1} maybe"} for a in range(4)
         for b in range(2)]  # fmt: skip
PROMPTS = [{"prompt": f"add {a} {b}", "answer": str(a + b)} for a in range(4) for b in range(4)]
SFT_ROWS = [{"prompt": f"add {a} {b}", "completion": str(a + b)} for a in range(4) for b in range(4)]
LETTERS = 'def letters(prompts, completions, **kwargs):\n    return [sum("a" <= ch <= "z" for ch in c) / 8 for c in completions]\n'
# the tiny model's parameter elements; with LoRA's adapters; 4-bit (two weights a byte) with them; a scalar head
FULL = {"sft": 107_200, "lora": 139_968, "qlora": 103_104, "head": 107_265}
# the ZeRO-3 push jobs' models (`deepspeed_worker.build`, LoRA at r=4) and their parameter elements: 107,200 whole;
# 8,192 more with the adapters; QLoRA's 73,728 linear weights stored two to a byte
PUSHED = {"full": 107_200, "lora": 115_392, "qlora": 115_392 - 73_728 // 2}


def _settings(tmp: Path) -> dict[str, dict]:
    """The runs. AdamW at eps 1, whose step lr x m / (sqrt(v) + 1) is nearly linear in the gradient: a gradient
    scaled wrongly (e.g. a step per micro-batch, or a loss normalised twice) moves the weights visibly, where at eps
    1e-8 Adam's g / sqrt(v) would hide it, and float summation order leaves < 1e-8 (measured). SFT full keeps the
    default cosine schedule with a warmup step: posttrain's scheduler must drive the learning rate DeepSpeed uses."""
    exact = {"optim.eps": 1.0, "optim.lr": 5e-3, "optim.schedule": "constant"}
    dpo = {**exact, "algorithm.name": "dpo", "algorithm.beta": 0.5, "data.train": str(tmp / "pairs.jsonl")}
    sft = {"data.train": str(tmp / "sft.jsonl")}
    rl = {**exact, "algorithm.rewards": f"[{tmp / 'rewards.py'}:letters]", "data.train": str(tmp / "prompts.jsonl"),
          "algorithm.rollout.max_new_tokens": 8, "optim.batch_size": 16, "optim.micro_batch_size": 4,
          "run.max_steps": 2}  # fmt: skip
    grpo = {**rl, "algorithm.name": "grpo", "algorithm.num_generations": 4}
    return {
        "sft": {**sft, "optim.eps": 1.0, "optim.warmup_steps": 1},
        "sft-lora": {**sft, **exact, "technique.name": "lora"},
        "sft-qlora": {**sft, **exact, "technique.name": "qlora"},
        "dpo-copy": {**dpo, "algorithm.reference": "copy"},
        "dpo-adapter": {**dpo, "algorithm.reference": "adapter", "technique.name": "lora"},
        "dpo-precompute": {**dpo, "algorithm.reference": "precompute"},
        "reward": {**exact, "algorithm.name": "reward", "data.train": str(tmp / "pairs.jsonl")},
        "grpo-lora": {**grpo, "technique.name": "lora", "algorithm.beta": 0.04},  # KL to the adapter disabled
        "rloo": {**grpo, "algorithm.name": "rloo", "algorithm.beta": 0.1, "technique.name": "lora"},
        # advantages whitened over all samples, not per process (which would differ from one process by design);
        # the adaptive KL coefficient (updated from the KL summed over processes) at a short horizon, so that one
        # rollout moves it visibly (3.2% for a KL of 0): a resume must bring it back (`RESHARDED`)
        "ppo": {**rl, "algorithm.name": "ppo", "algorithm.kl_coef": 0.1, "algorithm.whiten_advantages": False,
                "algorithm.adaptive_kl": True, "algorithm.kl_horizon": 100},  # fmt: skip
    }


def _launch(stage: int, processes: int, held: Path, jobs: list[str]) -> None:
    """One `accelerate launch` of the worker under stage `stage`'s config, running `jobs` in turn."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "accelerate" / f"deepspeed_zero{stage}.yaml"), "--num_processes", str(processes),
           "--mixed_precision", "no", "--main_process_port", str(free_port()),  # not 29500: other launches'
           str(WORKER), str(held), *jobs]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def launched(tiny_model_dir, tmp_path_factory):
    """stage -> (run configs by name, what each process saved by job), each stage's 2-process jobs in one launch.
    Besides, one launch of 1 process per stage: for ZeRO-2 after the 2-process launch (resuming its SFT and LoRA
    runs), for ZeRO-3 before it (writing the SFT, GRPO and reward runs the 2-process launch resumes, `RESHARDED`);
    each with the SFT run diverging at step 3 in both launches (`test_a_diverged_step_leaves_the_last_finite_weights`)."""
    tmp = tmp_path_factory.mktemp("deepspeed")
    for name, rows in (("sft", SFT_ROWS), ("pairs", PAIRS), ("prompts", PROMPTS)):
        (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (tmp / "rewards.py").write_text(LETTERS, encoding="utf-8")
    base = {"model.name": str(tiny_model_dir), "technique.name": "full", "data.max_length": 64, "optim.lr": 1e-3,
            "optim.batch_size": 8, "optim.micro_batch_size": 2, "optim.warmup_steps": 0, "data.shuffle": "false",
            "run.max_steps": 3, "run.progress": False, "run.report": False}  # fmt: skip
    out = {}
    for stage in STAGES:
        cfgs, folder = {}, tmp / f"zero{stage}"
        (folder / "held").mkdir(parents=True)
        for name, overrides in _settings(tmp).items():
            merged = {**base, **overrides, "run.output_dir": str(folder / name)}
            cfgs[name] = load_config(None, [f"{k}={v}" for k, v in merged.items()])
            dump_config(cfgs[name], folder / f"{name}.yaml")
        sft = folder / "sft.yaml"
        diverging = [f"diverge:{sft}:loss", f"diverge:{sft}:grad"]
        jobs = [str(folder / f"{name}.yaml") for name in cfgs] + [f"resume:{sft}", *diverging]
        # the runs resumed on another number of processes, written with a checkpoint every step (`base:`) by the
        # launch before (ZeRO-2's SFT run: by `resume:`)
        wrote = {name: folder / f"{name}-base-{w}p" for (st, name), (w, _) in RESHARDED.items() if st == stage}
        wrote["sft"] = folder / ("sft-resumed" if stage == 2 else "sft-base-1p")
        bases = [f"base:{folder / name}.yaml" for name in wrote if name != "sft"]
        reshards = [f"reshard:{folder / name}.yaml:{run}" for name, run in wrote.items()]
        if stage == 3:  # GRPO scored by the reward run's model too, partitioned as it loads; one sample fails
            merged = {**base, **_settings(tmp)["grpo-lora"], "technique.name": "full", "algorithm.beta": 0.0,
                      "algorithm.reward_model": str(folder / "reward" / "final"),
                      "run.output_dir": str(folder / "grpo-rm")}  # fmt: skip
            cfgs["grpo-rm"] = load_config(None, [f"{k}={v}" for k, v in merged.items()])
            dump_config(cfgs["grpo-rm"], folder / "grpo-rm.yaml")
            jobs.append(f"odd:{folder / 'grpo-rm.yaml'}")  # after the reward run, which writes the model
            jobs += [f"push:{tiny_model_dir}:{technique}" for technique in PUSHED]
            _launch(stage, 1, folder / "held", [f"base:{sft}", *bases, *diverging])
            jobs += reshards  # 1 process's runs resumed on 2
        _launch(stage, 2, folder / "held", jobs + (bases if stage == 2 else []))
        if stage == 2:  # 2 processes' runs resumed on 1
            _launch(stage, 1, folder / "held", [f"base:{sft}", *diverging, *reshards])
        out[stage] = cfgs, {p.stem: torch.load(p) for p in (folder / "held").glob("*.pt")}
    yield out
    shutil.rmtree(tmp, ignore_errors=True)  # ~300 MB of checkpoints: CI machines can be short of disk


# (stage, run) -> (processes that wrote it, processes that resume it): each method once, in one direction
RESHARDED = {(2, "sft"): (2, 1), (3, "sft"): (1, 2), (2, "sft-lora"): (2, 1), (3, "grpo-lora"): (1, 2),
             (3, "reward"): (1, 2), (2, "dpo-adapter"): (2, 1), (3, "dpo-copy"): (1, 2),
             (3, "ppo"): (1, 2), (2, "sft-qlora"): (2, 1), (2, "dpo-precompute"): (2, 1),
             (3, "rloo"): (1, 2)}  # fmt: skip
_ONE: dict[str, object] = {}


def _one_process(cfg, name: str):
    """The same run in this process, without DeepSpeed (RL sampled as the worker samples); once per run."""
    if name not in _ONE:
        one = cfg.model_copy(update={"run": cfg.run.model_copy(update={"output_dir": cfg.run.output_dir + "-one"})})
        engines_before = dict(engines.ENGINES)
        engines.ENGINES["hf"] = lambda c: PromptSeededEngine()
        try:
            _ONE[name] = train(one, return_model=True)
        finally:
            engines.ENGINES.update(engines_before)
    return _ONE[name]


def _metric(run_dir, key: str) -> torch.Tensor:
    return torch.tensor([r[key] for r in read_metrics(Path(run_dir) / "metrics.jsonl")], dtype=torch.float64)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("name", ["sft", "sft-lora", "sft-qlora", "dpo-copy", "dpo-adapter", "dpo-precompute", "reward",
                                  "grpo-lora", "rloo", "ppo"])  # fmt: skip
def test_two_deepspeed_processes_train_exactly_as_one_process(launched, name, stage):
    cfgs, held = launched[stage]
    one = _one_process(cfgs[name], name)
    r0, r1 = held[f"{name}-rank0"], held[f"{name}-rank1"]
    assert "error" not in r0, r0.get("error")
    whole = FULL["lora" if name in ("sft-lora", "dpo-adapter", "grpo-lora", "rloo") else "qlora" if name == "sft-qlora"
                 else "head" if name in ("reward", "ppo") else "sft"]  # fmt: skip
    assert r0["elements"][1] == r1["elements"][1] == whole
    if stage == 3:  # half of every weight each (ZeRO-3 pads each partition to an even split)
        assert r0["elements"][0] == r1["elements"][0] == (whole + 1) // 2
    else:  # ZeRO-2 splits the gradients and optimizer state only
        assert r0["elements"][0] == r1["elements"][0] == whole
    if name in ("dpo-copy", "ppo"):  # the frozen-copy reference: partitioned as the policy under ZeRO-3
        assert r0["reference"] == (FULL["sft"] // 2 if stage == 3 else FULL["sft"], FULL["sft"], stage == 3)
    trained = dict(one.model.named_parameters())
    assert r0["weights"].keys() == trained.keys()
    moved = 0.0
    for n, p in trained.items():
        # the same global batch, normaliser and steps; the gradient's float sums run in another order (each
        # process's micro-batches, averaged by DeepSpeed's reduce(-scatter)): measured <= 7.5e-9 at AdamW eps 1
        assert_close(r0["weights"][n], p.detach(), rtol=0, atol=1e-7, msg=n)
        moved = max(moved, float((p.detach() - load_file_weight(cfgs[name], n, p)).abs().max()))
    assert moved > 100 * 1e-7  # the runs trained, by far more than the tolerance (PPO least: 9e-5)
    for key in ("loss", "grad_norm"):
        assert_close(_metric(cfgs[name].run.output_dir, key), _metric(one.run_dir, key), rtol=1e-5, atol=1e-6)
    assert len(_metric(one.run_dir, "loss")) == cfgs[name].run.max_steps


def test_a_zero3_reward_model_is_partitioned_and_scores_as_one_process_through_an_unrenderable_sample(launched):
    """GRPO scored by a trained reward model (the reward run's `final/`) besides `letters`, under ZeRO-3: the reward
    model is partitioned as it loads (`models.sharding.zero3_inference`), each process holding half of its
    elements, and gives each sample the reward one process (unpartitioned) gives it: rank r scored prompts r::2 of
    each rollout. In the second rollout the last process's first sample fails to render: it gets the fallback
    (0.0), counted as one failure in the logged metrics, and the run ends (a retry sample by sample on that
    process alone would have run 8 forwards against the other's 1, and hung)."""
    cfgs, held = launched[3]
    r0, r1 = held["grpo-rm-rank0"], held["grpo-rm-rank1"]
    assert "error" not in r0, r0.get("error")
    # ZeRO-3 pads each weight's partition to an even split: ceil(numel / 2) per weight
    assert r0["reward_model"] == r1["reward_model"] == ((FULL["head"] + 1) // 2, FULL["head"], True)
    rewards = []
    score = importlib.import_module("posttrain.rollout.source").compute_rewards

    def recorded(*args, **kwargs):
        result = score(*args, **kwargs)
        rewards.append(result.per_function["reward_model"])
        return result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("posttrain.rollout.source.compute_rewards", recorded)
        _one_process(cfgs["grpo-rm"], "grpo-rm")
    G = cfgs["grpo-rm"].algorithm.group_size()
    assert len(rewards) == len(r0["rewards"]) == len(r1["rewards"]) == 2
    for k, whole in enumerate(rewards):
        groups = torch.tensor(whole).view(-1, G)
        mine, theirs = (torch.tensor(r["rewards"][k]["per_function"]["reward_model"]).view(-1, G) for r in (r0, r1))
        if k == 1:  # the sample that failed to render: the fallback, its neighbours scored as usual
            assert theirs[0, 0] == 0.0 and groups[1, 0] != 0.0
            theirs[0, 0] = groups[1, 0]
        # the same weights (gathered whole) and rows; batched with other rows than one process's batches, whose
        # padding is masked: float32 summation order at most (measured: 0, equal bit for bit on this CPU)
        assert_close(mine, groups[0::2], rtol=0, atol=1e-6)
        assert_close(theirs, groups[1::2], rtol=0, atol=1e-6)
    assert [r["failures"]["reward_model"] for r in r1["rewards"]] == [0, 1]
    assert [r["failures"]["reward_model"] for r in r0["rewards"]] == [0, 0]
    assert _metric(cfgs["grpo-rm"].run.output_dir, "reward/failures_reward_model").tolist() == [0.0, 1.0]


_BASE: dict[str, dict] = {}


def load_file_weight(cfg, name: str, p: torch.Tensor) -> torch.Tensor:
    """Weight `name` before training: the base model's (a scalar-head model's LM under `policy.`), a LoRA B's zero
    start; p itself for what has no known start (LoRA A, a scalar head: random; a frozen 4-bit weight)."""
    base = _BASE.setdefault(cfg.model.name, load_file(str(Path(cfg.model.name) / "model.safetensors")))
    key = name.removeprefix("policy.").removeprefix("base_model.model.").replace(".base_layer", "")
    if key in base and base[key].shape == p.shape:
        return base[key]
    return torch.zeros_like(p) if "lora_B" in name else p.detach()


@pytest.mark.parametrize("stage", STAGES)
def test_final_folder_and_checkpoint_hold_the_whole_weights_and_a_killed_run_resumes_exactly(launched, stage):
    """`final/` and the last checkpoint's trainable.safetensors hold the whole trained weights (ZeRO-3: gathered
    from the partitions), a reward model's head beside its model; no optimizer.pt (ZeRO splits it) but the
    engine's own checkpoint. A run killed after step 2 and resumed from it ends with the uninterrupted run's
    weights bit for bit; a resume without DeepSpeed is refused before anything loads."""
    cfgs, held = launched[stage]
    assert "error" not in held["sft-rank0"] and "error" not in held["reward-rank0"]
    sft = Path(cfgs["sft"].run.output_dir)
    weights = held["sft-rank0"]["weights"]
    final = load_file(str(sft / "final" / "model.safetensors"))
    assert final.keys() == weights.keys()
    for n, t in final.items():
        assert torch.equal(t, weights[n]), n
    ckpt = sft / "checkpoints" / "step-000003"
    saved = load_file(str(ckpt / "trainable.safetensors"))
    assert saved.keys() == weights.keys() and all(torch.equal(t, weights[n]) for n, t in saved.items())
    assert not (ckpt / "optimizer.pt").exists() and (ckpt / "deepspeed").is_dir()
    check_resumable(ckpt, deepspeed=True)
    with pytest.raises(UserError, match="written under DeepSpeed.*not launched with an Accelerate DeepSpeed"):
        check_resumable(ckpt, deepspeed=False)
    assert "error" not in held["sft-resumed-rank0"], held["sft-resumed-rank0"].get("error")
    for rank in (0, 1):
        again = held[f"sft-resumed-rank{rank}"]["weights"]
        assert again.keys() == weights.keys()
        for n, t in again.items():
            assert torch.equal(t, weights[n]), (rank, n)
    resumed = Path(str(sft) + "-resumed")
    assert _metric(resumed, "loss").tolist() == _metric(sft, "loss").tolist()
    reward = held["reward-rank0"]["weights"]
    model = load_file(str(Path(cfgs["reward"].run.output_dir) / "final" / "model.safetensors"))
    head = load_file(str(Path(cfgs["reward"].run.output_dir) / "final" / "score_head.safetensors"))
    assert {f"policy.{n}" for n in model} | {f"head.{n}" for n in head} == reward.keys()
    assert all(torch.equal(t, reward[f"policy.{n}"]) for n, t in model.items())
    assert all(torch.equal(t, reward[f"head.{n}"]) for n, t in head.items())


def _pushed_by_one_process(model_dir, technique: str) -> tuple[dict, dict]:
    """What one process pushes for the same model before training and after `worker.STEPS` steps on all 4 rows,
    clipped at 1.0 (as the worker's DeepSpeed engine)."""
    model = worker.build(str(model_dir), technique)
    with policy_weights(model) as weights:
        first = {n: t.clone() for n, t in weights}
    optimizer = build_optimizer(model, OptimConfig(lr=worker.LR, warmup_steps=0))
    for _ in range(worker.STEPS):
        model(**worker.batch(slice(0, 4))).loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad()
    with policy_weights(model) as weights:
        return first, {n: t.clone() for n, t in weights}


@pytest.mark.parametrize("technique", PUSHED)
def test_zero3_processes_push_the_whole_weights_one_process_trains(launched, tiny_model_dir, technique):
    """Under QLoRA the 4-bit codes are partitioned like every weight (each process holds half of them), and
    `GatheredParameters` gives each layer its whole codes back, beside the quantisation state the layer keeps: each
    4-bit layer is pushed dequantised plus its delta, as one process pushes it."""
    _, held = launched[3]
    r0, r1 = held[f"push-{technique}-rank0"], held[f"push-{technique}-rank1"]
    assert "error" not in r0, r0.get("error")
    assert r0["zero3"] and r1["zero3"]  # every weight partitioned by ZeRO-3, QLoRA's 4-bit codes too
    assert r0["local"] == r1["local"] == r0["total"] // 2 == PUSHED[technique] // 2  # half of every weight each
    # a push before the first step and after each (DeepSpeed's writes bump no version counter: `_before_deepspeed`
    # does), none when nothing changed
    assert r0["synced"] == r1["synced"] == [True] * (worker.STEPS + 1) + [False]
    assert r0["calls"] == ["load_weights", "reset_prefix_cache"] * (worker.STEPS + 1)
    first, last = _pushed_by_one_process(tiny_model_dir, technique)
    pushes = r0["pushes"]
    assert pushes[0].keys() == first.keys() and first
    for n in first:
        assert torch.equal(pushes[0][n], first[n]), n  # gathered whole: bit for bit what one process pushes
        assert all(torch.equal(a[n], b[n]) for a, b in zip(pushes, r1["pushes"], strict=True)), n  # same everywhere
        # the same global batch and step; the gradient's float sums run in another order (each process's mean
        # over its 2 rows, averaged by DeepSpeed's reduce-scatter): measured 4.6e-7 (full), 2.1e-7 (LoRA),
        # 1.2e-7 (QLoRA) on an Intel VM; 5.6e-7 (full), 3.6e-6 (LoRA), 1.2e-7 (QLoRA) on an AMD EPYC one. Adam's
        # step g / sqrt(v) turns a last-bit difference of a near-zero adapter gradient into a ~1e-6 difference of
        # the update, which the push multiplies by the other factor (s B A): atol 1e-5 for the adapters, as
        # test_sharding allows for LoRA, 2e-6 for full weights.
        assert_close(pushes[-1][n], last[n], rtol=0, atol=2e-6 if technique == "full" else 1e-5, msg=n)
    assert any(not torch.equal(pushes[1][n], pushes[0][n]) for n in first)  # step 1 trained, and was pushed


def test_models_load_whole_under_deepspeed_and_partitioned_loading_is_refused(monkeypatch):
    """Accelerate registers its DeepSpeed config with transformers whatever `zero3_init_flag` says, and under ZeRO-3
    transformers then loads every model partitioned (which broke the frozen-copy reference and DPO's precompute):
    `_whole_loads` clears the registration, and refuses a config that asks for partitioned loading. It also puts
    the stage DeepSpeed runs into the environment (a DeepSpeed JSON file's stage is not exported by `accelerate
    launch`): ZeRO-3's forwards are collectives, and the run must be planned so."""
    from transformers.integrations import HfDeepSpeedConfig, is_deepspeed_zero3_enabled

    from posttrain.train import _whole_loads

    registered = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    assert is_deepspeed_zero3_enabled()  # as Accelerate leaves it
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", raising=False)
    assert deepspeed_zero_stage() == 2  # Accelerate's default, when nothing says otherwise
    plugin = types.SimpleNamespace(zero3_init_flag=False, deepspeed_config={"zero_optimization": {"stage": 3}})
    _whole_loads(types.SimpleNamespace(state=types.SimpleNamespace(deepspeed_plugin=plugin)))
    assert not is_deepspeed_zero3_enabled()
    assert deepspeed_zero_stage() == 3
    plugin.zero3_init_flag = True
    with pytest.raises(ConfigError, match="zero3_init_flag: true.*Set zero3_init_flag: false"):
        _whole_loads(types.SimpleNamespace(state=types.SimpleNamespace(deepspeed_plugin=plugin)))
    del registered


def _written_module(run: Path, step: int) -> dict[str, torch.Tensor]:
    """The module state (every weight, frozen ones too) of ZeRO-2 run `run`'s engine checkpoint at `step`."""
    state = run / "checkpoints" / f"step-{step:06d}" / "deepspeed" / "state" / "mp_rank_00_model_states.pt"
    return torch.load(state, weights_only=False)["module"]  # DeepSpeed's own pickle, written by this test's run


def _engine_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint's DeepSpeed optimizer files (each process's ZeRO partitions of the fp32 weights
    and AdamW moments), keyed by file and place."""
    found: dict[str, torch.Tensor] = {}

    def walk(key: str, value) -> None:
        if isinstance(value, torch.Tensor):
            found[key] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{key}/{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{key}/{i}", v)

    for path in sorted((ckpt / "deepspeed" / "state").glob("*optim_states.pt")):
        walk(path.name, torch.load(path, weights_only=False)["optimizer_state_dict"])
    return found


@pytest.mark.parametrize("processes", [2, 1])
@pytest.mark.parametrize("mode", ["loss", "grad"])
@pytest.mark.parametrize("stage", STAGES)
def test_a_diverged_step_leaves_the_last_finite_weights(launched, stage, mode, processes):
    """Step 3's last micro-batch on the last process diverges: a NaN added to its loss (whose gradient stays finite:
    Accelerate's DeepSpeed backward used to step the engine with it before the guard saw the loss, and the
    checkpoint then named step 2 held step 3's weights), or an infinite gradient under a finite loss (caught in
    each process's reduced ZeRO partitions, a MAX over processes). Every process stops before the engine steps,
    saying which; the checkpoint it keeps holds the weights and DeepSpeed's AdamW state of step 2 bit for bit, as
    the same run checkpointing every step wrote them (the 2-process run `resume:` writes, the 1-process `base:`)."""
    cfgs, held = launched[stage]
    what = "the loss" if mode == "loss" else "a gradient"
    for rank in range(processes):
        got = held[f"sft-diverge-{mode}-{processes}p-rank{rank}"]
        assert "error" not in got, got.get("error")
        assert got["message"].startswith(f"step 3: {what} became NaN or infinite, so the run stopped before updating "
                                         "the weights; the last good checkpoint is "), got["message"]  # fmt: skip
        assert "step-000002" in got["message"]
    run = Path(cfgs["sft"].run.output_dir)
    kept = run.with_name(f"sft-diverge-{mode}-{processes}p") / "checkpoints"
    straight = run.with_name("sft-resumed" if processes == 2 else "sft-base-1p") / "checkpoints" / "step-000002"
    assert [p.name for p in kept.iterdir()] == ["step-000002"]
    weights, expected = (load_file(str(c / "trainable.safetensors")) for c in (kept / "step-000002", straight))
    assert weights.keys() == expected.keys()
    for n, t in weights.items():
        assert torch.equal(t, expected[n]), n
    state, expected = _engine_tensors(kept / "step-000002"), _engine_tensors(straight)
    assert state.keys() == expected.keys() and any("exp_avg_sq" in k for k in state)
    for k, t in state.items():
        assert torch.equal(t, expected[k]), k


@pytest.mark.parametrize(("stage", "name"), RESHARDED)
def test_a_deepspeed_run_resumes_on_another_number_of_processes(launched, stage, name):
    """A run killed after its last step but one resumed on another number of processes (`RESHARDED`): SFT 2 -> 1
    under ZeRO-2 and 1 -> 2 under ZeRO-3; SFT with LoRA 2 -> 1 (ZeRO-2: only the adapters in DeepSpeed's optimizer,
    under peft's names); GRPO with LoRA and a KL penalty 1 -> 2 (ZeRO-3, the rollouts sampled layout-free,
    `deepspeed_worker.RolloutSeededEngine`; a real run says in one line that it re-derives the random state,
    `checkpoint.reshard_note`); a reward model 1 -> 2 (ZeRO-3, its scalar head beside the LM); DPO with LoRA and
    the adapter-disabled reference 2 -> 1 (ZeRO-2); SFT with QLoRA 2 -> 1 (ZeRO-2: the adapters in DeepSpeed's
    optimizer; the frozen 4-bit codes, which DeepSpeed's converter copies as float32 but its ZeRO-2 universal load
    never reads, quantised again from the base model, the writing run's bit for bit); DPO with precomputed
    reference log-probs 2 -> 1 (ZeRO-2: the run folder's cache, every row's keyed by the row, read back unchanged;
    the resumed step's reward margin the uninterrupted run's); RLOO with LoRA 1 -> 2 (ZeRO-3, sampled as GRPO);
    DPO (full) with a frozen-copy reference 1 -> 2 and PPO 1 -> 2
    (ZeRO-3: PPO's value head beside the LM, its adaptive KL coefficient, the batch source's state, logged as the
    uninterrupted run's; the frozen-copy reference of each, a ZeRO-3 engine of its own, not in the universal
    checkpoint). The checkpoint's
    engine state is converted once into DeepSpeed's universal checkpoint, in the checkpoint folder; each trained
    weight's fp32 value and AdamW moments come back bit for bit as the writing run held them there (read through
    DeepSpeed's own API), the frozen weights are the base model's, and the run ends within 1e-8 of the
    uninterrupted one: the last step's gradient is summed over another number of processes (measured: SFT 9.3e-10
    ZeRO-2, 1.2e-10 ZeRO-3; LoRA 1.2e-10; QLoRA 1.2e-10; GRPO 1.5e-11; RLOO 1.5e-11; reward 3.7e-9; DPO 1.2e-10
    (LoRA), 1.9e-9 (frozen copy), 1.9e-9 (precomputed); PPO 3.7e-9; SFT, LoRA, QLoRA, GRPO and reward also run
    once in the other stage's direction, the same figures, outside CI). Without posttrain's fix of DeepSpeed 0.19.8's ZeRO-3 universal load (one AdamW step count shared by
    both parameter groups, `checkpoint._own_step_counts`) SFT's norm weights were 2.4e-7 off."""
    cfgs, held = launched[stage]
    wrote, on = RESHARDED[stage, name]
    run = Path(cfgs[name].run.output_dir)
    source = run.with_name("sft-resumed" if (stage, name) == (2, "sft") else f"{name}-base-{wrote}p")
    last = cfgs[name].run.max_steps
    saved = held[f"{source.name}-rank0"]["saved"][last - 1]
    uninterrupted = load_file(str(source / "checkpoints" / f"step-{last:06d}" / "trainable.safetensors"))
    copy = run.with_name(f"{name}-from-{wrote}p-on-{on}p")
    universal = copy / "checkpoints" / f"step-{last - 1:06d}" / "deepspeed-universal"
    if stage == 3:  # each trained weight's folder, no other: not a frozen-copy reference's (PPO's, an engine apart)
        assert {p.name for p in (universal / "state" / "zero").iterdir() if p.is_dir()} == uninterrupted.keys()
    else:  # ZeRO-2's engine checkpoint holds the frozen weights too (LoRA's base), which the converter copies
        assert uninterrupted.keys() <= {p.name for p in (universal / "state" / "zero").iterdir() if p.is_dir()}
    for rank in range(on):
        got = held[f"{copy.name}-rank{rank}"]
        assert "error" not in got, got.get("error")
        assert got["loaded"].keys() == saved.keys() == uninterrupted.keys() and saved
        for n, state in saved.items():
            for key in ("fp32", "exp_avg", "exp_avg_sq"):
                assert torch.equal(got["loaded"][n][key], state[key]), (rank, n, key)
        for n, t in got["weights"].items():
            if n in uninterrupted:
                assert_close(t, uninterrupted[n], rtol=0, atol=1e-8, msg=n)
            elif t.dtype == torch.uint8:  # QLoRA's frozen 4-bit codes: quantised again as the writing run had them
                assert torch.equal(t, _written_module(source, last - 1)[n]), n
            else:  # frozen: LoRA's base weights
                assert torch.equal(t, load_file_weight(cfgs[name], n, t)), n
        if name == "sft-qlora":  # still 4-bit: every adapted linear layer's codes
            assert sum(t.dtype == torch.uint8 for t in got["weights"].values()) == 14
    metrics = ("loss", "grad_norm") + (("reward_margin",) if name.startswith("dpo") else ())
    for key in metrics:  # the steps before as written, the last one resumed
        assert_close(_metric(copy, key), _metric(source, key), rtol=1e-6, atol=0)
    if name == "dpo-precompute":  # the reference log-probs the writing run computed, read back, not computed again
        cache = "reference_logps.pt"
        assert (copy / cache).read_bytes() == (source / cache).read_bytes()
    if name == "ppo":  # the adaptive KL coefficient the resumed rollout used: the one the writing run had reached
        kl_coef = _metric(copy, "kl_coef")
        assert kl_coef[-1] < kl_coef[0]  # moved by the first rollout
        assert torch.equal(kl_coef, _metric(source, "kl_coef"))


@pytest.mark.parametrize("stage", STAGES)
def test_a_deepspeed_resume_under_another_zero_stage_is_refused(launched, stage):
    """A checkpoint records the ZeRO stage that wrote it; resumed under the other stage it is refused before the
    model loads, naming both stages and what to do (DeepSpeed 0.19.8 reads neither its engine checkpoint nor its
    universal checkpoint across stages: `checkpoint.check_resumable`). The same stage, on any number of processes,
    passes."""
    cfgs, _ = launched[stage]
    ckpt = Path(cfgs["sft"].run.output_dir) / "checkpoints" / "step-000003"
    assert json.loads((ckpt / "trainer_state.json").read_text())["zero_stage"] == stage
    check_resumable(ckpt, deepspeed=True, stage=stage)
    other = 5 - stage
    with pytest.raises(ConfigError, match=f"written under DeepSpeed ZeRO-{stage} and this run is launched under "
                                          f"ZeRO-{other}.*Resume it under ZeRO-{stage}.*deepspeed_zero{stage}.yaml"):
        check_resumable(ckpt, deepspeed=True, stage=other)
