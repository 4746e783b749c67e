"""Ready-to-run `posttrain train` configs for each stage of a recommended pipeline.

Each config is a nested dict in the run-config layout (model, technique, data, algorithm, optim, run; see
posttrain/config.py). Learning rates follow published recipes, cited beside each. Later stages start from the
previous stage's output folder.
"""

from __future__ import annotations

from posttrain.estimator.models import ARCHITECTURES, normalise_name, parse_size

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
}  # examples (prompts for RL) per step


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
        from posttrain.estimator.models import nearest_arch

        stand_in = nearest_arch(size).hf_id
        return (
            stand_in,
            f"model {model!r} is a size: the config names {stand_in}; put your model's name there",
        )
    return model, None


def stage_config(
    stage: str,
    *,
    index: int,
    previous: str | None,
    model_name: str,
    technique: str,
    seq_len: int,
    micro_batch: int,
    data_file: str | None,
    epochs: float,
) -> dict:
    full_lr, lora_lr = LEARNING_RATES[stage]
    batch = GLOBAL_BATCH[stage]
    micro = min(micro_batch, batch)
    while batch % micro:  # the run config requires batch_size to be a multiple of micro_batch_size
        micro -= 1
    tech: dict = {"name": technique}
    if technique != "full":
        tech["r"] = 16
    return {
        "model": {
            # A later stage starts from the folder the previous stage saved its final model in.
            "name": f"runs/{index - 1}-{previous}/final" if previous else model_name,
            "gradient_checkpointing": True,
        },
        "technique": tech,
        "data": {"train": data_file or f"data/{stage}.jsonl", "max_length": seq_len},
        "algorithm": {"name": stage},
        "optim": {
            "lr": full_lr if technique == "full" else lora_lr,
            "batch_size": batch,
            "micro_batch_size": micro,
        },
        "run": {"output_dir": f"runs/{index}-{stage}", "epochs": epochs},
    }
