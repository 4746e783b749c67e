"""The child side of `trl_compare.py`: one (tool, method) run in this process, its measurements as one JSON line.

    python benchmarks/trl_runners.py posttrain dpo-lora --workdir W --steps 8
    python benchmarks/trl_runners.py trl dpo-lora --workdir W --steps 8     # trl importable (or on PYTHONPATH)

Both tools read the files `trl_compare.write_data` wrote once for the sitting. posttrain runs through its public
`posttrain.train.train` (its timings come from the run's metrics.jsonl); TRL through `SFTTrainer`, `DPOTrainer`
and `GRPOTrainer`, timed by a `TrainerCallback`. Each returns, per step: its duration (`step_s`), its tokens
(SFT/DPO: non-padding tokens of the training forward; RL: generated tokens) and the curve (loss or mean reward),
plus the run's peak RSS at the end of its last step.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from trl_compare import METHODS, step_times  # noqa: E402


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux


# ---------------------------------------------------------------------------------------------------------------
# posttrain


def posttrain_config(method: str, model: str, data: str, steps: int, out: str, s: dict) -> dict:
    """The posttrain run config of a method under the matched settings `s` (`trl_compare.SETTINGS`, `MATCHED`)."""
    spec = METHODS[method]
    lora = {"r": s["lora_r"], "alpha": s["lora_alpha"], "dropout": s["lora_dropout"], "target_modules": "all-linear"}
    rollout = {"batch_size": s["rl_completions"], "max_new_tokens": s["max_new_tokens"],
               "temperature": s["temperature"]}  # fmt: skip
    rewards = [{"name": "task", "args": {"task": "arithmetic"}}]
    algorithm = {
        "sft": {"name": "sft"},
        "dpo": {"name": "dpo", "beta": s["dpo_beta"], "loss_type": "sigmoid", "reference": "adapter"},
        "grpo": {"name": "grpo", "rewards": rewards, "rollout": rollout, "num_generations": s["rl_group"],
                 "loss_type": "dapo", "scale": "group", "beta": 0.0, "log_kl": False},
        "ppo": {"name": "ppo", "rewards": rewards, "rollout": rollout},
    }[spec["kind"]]  # fmt: skip
    rl = spec["kind"] in ("grpo", "ppo")
    return {
        # the dtype said explicitly (float32 unless --dtype): `auto` would autocast to bf16 on a GPU, where TRL
        # runs fp32 with bf16=False
        "model": {"name": model, "dtype": s.get("dtype", "float32"), "gradient_checkpointing": False},
        "technique": {"name": "full"} if spec["technique"] == "full" else {"name": "lora", **lora},
        "data": {"train": data, "max_length": s["max_length"], "shuffle": False},
        "algorithm": algorithm,
        "optim": {"lr": s["lr"], "batch_size": s["rl_completions"] if rl else s["batch_size"],
                  "micro_batch_size": s["batch_size"], "schedule": "constant", "warmup_steps": 0,
                  "weight_decay": 0.0, "max_grad_norm": 1.0},
        "run": {"output_dir": out, "max_steps": steps, "progress": False, "report": False, "seed": s["seed"]},
    }  # fmt: skip


def run_posttrain(method: str, model: str, data: str, steps: int, s: dict, overrides: list[str] = ()) -> dict:
    """One posttrain run; `overrides` are `section.field=value` settings put over the matched config (as
    `posttrain train` takes them, e.g. model.compile=true), for comparing posttrain's own options."""
    from posttrain.algorithms import config_from_dict
    from posttrain.config import apply_overrides
    from posttrain.train import train

    spec = METHODS[method]
    with tempfile.TemporaryDirectory(prefix="trl-compare-posttrain-") as tmp:
        raw = posttrain_config(method, model, data, steps, str(Path(tmp) / "run"), s)
        cfg = config_from_dict(apply_overrides(raw, list(overrides)), source=method)
        result = train(cfg)
        hist = [r for r in map(json.loads, (result.run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    rl = spec["kind"] in ("grpo", "ppo")
    out = {
        "step_s": step_times([r["elapsed_s"] for r in hist], start=0.0),
        # RL: generated tokens (mean completion length x completions); else the forward's non-padding tokens
        "tokens": [r["completion_length_mean"] * s["rl_completions"] if rl else r["tokens"] for r in hist],
        "curve": [r["reward/total_mean"] if rl else r["loss"] for r in hist],
        "peak_rss_gb": hist[-1]["peak_rss_gb"],
    }
    if rl:  # posttrain's own split of the step, and the sampler/trainer gap (absent from a step that trains none)
        out["gen_s"] = [r.get("gen_time_s") for r in hist]
        out["logp_gap"] = [r.get("logp_gap_sampler_trainer") for r in hist]
    if spec["kind"] == "dpo":  # each side's mean summed log-prob: do both tools score the same tokens the same?
        out["chosen_logps"] = [r["chosen_logps"] for r in hist]
        out["rejected_logps"] = [r["rejected_logps"] for r in hist]
    return out


# ---------------------------------------------------------------------------------------------------------------
# TRL


def _trl_task_reward():
    """posttrain's own arithmetic score, wrapped as a TRL reward function (`completions` are message lists)."""
    from posttrain.rewards.builtin import task

    score = task(task="arithmetic")

    def arithmetic(prompts, completions, answer, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return score(prompts, texts, answer=answer)

    return arithmetic


def _trl_clock():
    """A TrainerCallback that keeps the time each optimisation step ends and the process's peak RSS then."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.start, self.ends, self.peak = None, [], 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())
            self.peak = _peak_rss_gb()

    return StepClock()


def trl_arguments(method: str, out: str, steps: int, s: dict) -> dict:
    """The TRL config fields of a method under the matched settings `s` (`trl_compare.SETTINGS`, `MATCHED`)."""
    import torch

    spec = METHODS[method]
    common = {
        "output_dir": out, "max_steps": steps, "learning_rate": s["lr"], "lr_scheduler_type": "constant",
        "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0, "adam_beta1": 0.9, "adam_beta2": 0.999,
        "adam_epsilon": 1e-8, "per_device_train_batch_size": s["batch_size"],
        # transformers 5 renamed gradient_checkpointing (TRL defaults it to True) to activation_checkpointing
        "activation_checkpointing": False,
        "bf16": s.get("dtype") == "bfloat16", "fp16": False, "use_cpu": not torch.cuda.is_available(),
        "seed": s["seed"],
        "logging_steps": 1, "save_strategy": "no", "report_to": "none", "disable_tqdm": True,
        "model_init_kwargs": {"dtype": torch.float32},
    }  # fmt: skip
    kind = spec["kind"]
    if kind == "sft":
        return {**common, "max_length": s["max_length"], "train_sampling_strategy": "sequential", "packing": False}
    if kind == "dpo":
        return {**common, "max_length": s["max_length"], "train_sampling_strategy": "sequential",
                "beta": s["dpo_beta"], "loss_type": ["sigmoid"], "precompute_ref_log_probs": False}  # fmt: skip
    accumulate = s["rl_completions"] // s["batch_size"]
    return {**common, "gradient_accumulation_steps": accumulate, "steps_per_generation": accumulate,
            "num_generations": s["rl_group"], "max_completion_length": s["max_new_tokens"],
            "temperature": s["temperature"], "top_p": 1.0, "top_k": 0, "beta": 0.0, "loss_type": "dapo",
            "scale_rewards": "group", "num_iterations": 1, "epsilon": 0.2, "shuffle_dataset": False}  # fmt: skip


def run_trl(method: str, model: str, data: str, steps: int, s: dict) -> dict:
    import trl
    from datasets import Dataset
    from peft import LoraConfig

    spec = METHODS[method]
    kind = spec["kind"]
    rows = [json.loads(line) for line in Path(data).read_text().splitlines()]
    dataset = Dataset.from_list(rows)
    peft_config = None
    if spec["technique"] == "lora":
        peft_config = LoraConfig(r=s["lora_r"], lora_alpha=s["lora_alpha"], lora_dropout=s["lora_dropout"],
                                 target_modules="all-linear", bias="none", task_type="CAUSAL_LM")  # fmt: skip
    clock = _trl_clock()
    with tempfile.TemporaryDirectory(prefix="trl-compare-trl-") as tmp:
        fields = trl_arguments(method, tmp, steps, s)
        if kind == "sft":
            trainer = trl.SFTTrainer(model=model, args=trl.SFTConfig(**fields), train_dataset=dataset,
                                     peft_config=peft_config, callbacks=[clock])  # fmt: skip
        elif kind == "dpo":
            trainer = trl.DPOTrainer(model=model, args=trl.DPOConfig(**fields), train_dataset=dataset,
                                     peft_config=peft_config, callbacks=[clock])  # fmt: skip
        else:
            trainer = trl.GRPOTrainer(model=model, reward_funcs=[_trl_task_reward()], args=trl.GRPOConfig(**fields),
                                      train_dataset=dataset, peft_config=peft_config, callbacks=[clock])  # fmt: skip
        trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    if kind == "grpo":
        tokens = [h["completions/mean_length"] * s["rl_completions"] for h in logs]
        curve = [h["reward"] for h in logs]
    else:  # `num_tokens`: TRL's running count of the forward's non-padding tokens
        seen = [h["num_tokens"] for h in logs]
        tokens, curve = [b - a for a, b in zip([0, *seen], seen)], [h["loss"] for h in logs]
    out = {"step_s": step_times(clock.ends, clock.start), "tokens": tokens, "curve": curve, "peak_rss_gb": clock.peak}
    if kind == "dpo":
        out["chosen_logps"] = [h["logps/chosen"] for h in logs]
        out["rejected_logps"] = [h["logps/rejected"] for h in logs]
    return out


RUNNERS = {"posttrain": run_posttrain, "trl": run_trl}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tool", choices=list(RUNNERS))
    ap.add_argument("method", choices=list(METHODS))
    ap.add_argument("--workdir", required=True, help="the folder `trl_compare.prepare` wrote (setup.json)")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--posttrain-set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    setup = json.loads((Path(args.workdir) / "setup.json").read_text())
    data = setup["data"][METHODS[args.method]["kind"]]
    extra = {"overrides": args.posttrain_set} if args.tool == "posttrain" else {}
    print(json.dumps(RUNNERS[args.tool](args.method, setup["model"], data, args.steps, setup["settings"], **extra)))


if __name__ == "__main__":
    main()
