"""Ready-to-run `posttrain train` configs for each stage of a recommended pipeline.

Each config is a nested dict in the run-config layout (model, technique, data, algorithm, optim, run; see
posttrain/config.py) holding only the fields that matter for its algorithm and technique. Learning rates
follow published recipes, cited beside each. A policy stage (sft, dpo, grpo, ppo) starts from the previous
policy stage's saved model; a reward stage starts from the policy so far (InstructGPT initialises its reward
model from the SFT model) and the PPO stage after it scores samples with it (`algorithm.reward_model`).
"""

from __future__ import annotations

from posttrain.estimator.models import ARCHITECTURES, nearest_arch, normalise_name, parse_size

# (full, LoRA) peak learning rates per method.
LEARNING_RATES = {
    "sft": (2e-5, 2e-4),  # full: Alpaca/Tulu-style SFT 2e-5; LoRA: QLoRA paper's 2e-4 for 7B-13B
    "reward": (1e-5, 1e-4),  # InstructGPT reward model lr ~9e-6
    "dpo": (5e-7, 5e-6),  # Zephyr (Tunstall et al. 2023) DPO 5e-7 full
    "grpo": (1e-6, 1e-5),  # DeepSeekMath GRPO 1e-6
    "ppo": (1e-6, 1e-5),  # InstructGPT PPO ~1e-6 range
}
EMBEDDED_MODEL = "smollm2-135m-instruct"
GLOBAL_BATCH = {
    "sft": 32,
    "reward": 32,
    "dpo": 32,
    "grpo": 16,
    "ppo": 16,
}  # per step: sequences (sft), pairs (reward, dpo), prompts (grpo, ppo; GRPO samples a group for each)
RL = ("grpo", "ppo")
VERIFIER = "verifier.py:reward"  # placeholder for the user's checker, a `file.py:function` reward spec
GIVEN_REWARD_MODEL = "reward_model"  # placeholder folder for a reward model the user already has


def config_model_name(model: str) -> tuple[str, str | None]:
    """The `model.name` a config can load, and a note when it is a stand-in."""
    if "/" in model or model.endswith(".gguf"):
        return model, None  # a hub name or a local path: loadable as given
    key = normalise_name(model)
    if key == "smollm2-135m":
        return EMBEDDED_MODEL, None
    if key in ARCHITECTURES:
        return ARCHITECTURES[key].hf_id, None
    size = parse_size(model)
    if size is not None:
        stand_in = nearest_arch(size).hf_id
        if normalise_name(stand_in.split("/")[-1]) == "smollm2-135m":  # the embedded one loads offline
            return EMBEDDED_MODEL, (f"model {model!r} is a size: the config names the embedded {EMBEDDED_MODEL} (a "
                                    "dequantised 4-bit copy, loaded offline); put your model's name there")  # fmt: skip
        return (
            stand_in,
            f"model {model!r} is a size: the config names {stand_in}; put your model's name there",
        )
    return model, None


def stage_epochs(stage: str) -> float:
    """Passes over the data a stage's config sets, and its time and cost count: 2 for SFT (Tulu 2 trained 2,
    Alpaca 3), 1 for the others (one pass over the pairs or the prompts)."""
    return 2.0 if stage == "sft" else 1.0


def stage_config(
    stage: str,
    *,
    model: str,
    output_dir: str,
    technique: str,
    seq_len: int,
    micro_batch: int,
    data_file: str,
    epochs: float,
    group_size: int,
    gpus: int = 1,
) -> dict:
    """One stage's config; `micro_batch` counts what the estimator sized: sequences, pairs, or RL prompts, per GPU.
    On several GPUs the estimate sized FSDP full shard, so the config shards (`run.sharding: fsdp2`, launched by
    torchrun) and each process's share of the step is a whole number of its micro-batches."""
    full_lr, lora_lr = LEARNING_RATES[stage]
    # The run config counts sequences per step; a GRPO prompt is `group_size` sequences.
    per = group_size if stage == "grpo" else 1
    # Every process takes the same whole number of micro-batches (the run config requires each process's share to
    # be a multiple of micro_batch_size): the step grows to the next multiple of GPUs x micro-batch.
    micro = micro_batch * per
    step = gpus * micro
    batch = max(step, -(-GLOBAL_BATCH[stage] * per // step) * step)
    tech: dict = {"name": technique}
    if technique != "full":
        tech["r"] = 16
    algorithm: dict = {"name": stage}
    if stage in RL:
        # The estimate sized completions of half the sequence length (the other half is the prompt).
        algorithm["rollout"] = {"max_new_tokens": max(1, seq_len // 2)}
    if stage == "grpo":
        algorithm["num_generations"] = group_size
    return {
        "model": {"name": model, "gradient_checkpointing": True},
        "technique": tech,
        "data": {"train": data_file, "max_length": seq_len},
        "algorithm": algorithm,
        "optim": {
            "lr": full_lr if technique == "full" else lora_lr,
            "batch_size": batch,
            "micro_batch_size": micro,
        },
        "run": {"output_dir": output_dir, "epochs": epochs, **({"sharding": "fsdp2"} if gpus > 1 else {})},
    }


def pipeline_configs(
    pipeline: list[str],
    *,
    rewards: dict[str, list[str]],
    model_name: str,
    technique: str,
    seq_len: int,
    micro_batches: list[int],
    data_files: list[str],
    group_size: int,
    gpus: int = 1,
) -> list[dict]:
    """{stage, config, note} for every stage, chained: each policy stage starts from the last one's model.

    `rewards[stage]` lists what an RL stage is rewarded by: "verifier" (the user's checker), "trained" (the
    reward stage's model) or "given" (a reward model the user already has).
    """
    out = []
    start, start_note = model_name, None  # the model the next policy stage starts from
    reward_run = None
    for i, stage in enumerate(pipeline, start=1):
        run_dir = f"runs/{i}-{stage}"
        cfg = stage_config(
            stage, model=start, output_dir=run_dir, technique=technique, seq_len=seq_len,
            micro_batch=micro_batches[i - 1], data_file=data_files[i - 1],
            epochs=stage_epochs(stage), group_size=group_size, gpus=gpus,
        )  # fmt: skip
        notes = [start_note] if start_note else []
        alg = cfg["algorithm"]
        for source in rewards.get(stage, ()):
            if source == "verifier":
                alg["rewards"] = [VERIFIER]
                notes.append(
                    f"algorithm.rewards: {VERIFIER} stands for your checker, a function (prompts, "
                    "completions, **columns) -> list[float] (docs/rewards.md), or name a built-in reward"
                )
            elif source == "trained":
                alg["reward_model"] = reward_run
            else:
                alg["reward_model"] = GIVEN_REWARD_MODEL
                notes.append(f"algorithm.reward_model: put your trained reward model's folder in place of "
                             f"{GIVEN_REWARD_MODEL}")  # fmt: skip
        if stage == "reward":
            reward_run = run_dir
        elif technique == "full":
            start, start_note = f"{run_dir}/final", None
        else:
            # A LoRA or QLoRA run saves only its adapter in final/; the next stage trains a model folder.
            start = f"{run_dir}/merged"
            start_note = f"model.name: first run `posttrain merge {run_dir} --out {start}` "
            start_note += f"({technique} saves an adapter)"
        out.append({"stage": stage, "config": cfg, "note": "; ".join(notes) or None})
    return out
