"""Other tools' names for posttrain's settings (Hugging Face `TrainingArguments`, TRL, axolotl, LLaMA-Factory), so
that an unknown key written in one of them is answered with the setting it means rather than with the nearest
spelling: difflib turned `data.train_file` into `data.train_on`, a different setting (an audit).

`config._unknown_key` asks `other_name` before difflib, wherever the key was written (the top level or any section).
Most names map to one field; a few have no one-to-one field here and map to a sentence saying what to set instead.
Every field named must exist (tests/unit/test_config.py checks them against `--help-config`'s list).

This module does not validate anything; it only knows names.
"""

from __future__ import annotations

# The settings that gradient accumulation is made of here (trainer/launch.py says the same of an Accelerate launch).
_ACCUMULATION = ("posttrain accumulates micro-batches itself: optim.batch_size is the examples per optimisation step "
                 "over all processes, optim.micro_batch_size the examples per forward pass per process, and the "
                 "micro-batches accumulated per step follow (batch_size / (micro_batch_size x processes)); set those "
                 "two instead")  # fmt: skip

OTHER_NAMES: dict[str, str] = {
    **dict.fromkeys(("train_file", "train_path", "train_data", "dataset"), "data.train"),
    **dict.fromkeys(("eval_file", "validation_file", "eval_data", "test_file"), "data.eval"),
    **dict.fromkeys(("max_seq_length", "max_seq_len", "max_len", "seq_len", "sequence_len", "cutoff_len"),
                    "data.max_length"),  # fmt: skip
    "learning_rate": "optim.lr",
    "batch": "optim.batch_size",
    "train_batch_size": "optim.batch_size",  # DeepSpeed's: the examples per step over every process and micro-batch
    "lr_scheduler_type": "optim.schedule",
    **dict.fromkeys(("num_train_epochs", "num_epochs"), "run.epochs"),
    **dict.fromkeys(("model_name_or_path", "model_name", "base_model"), "model.name"),
    **dict.fromkeys(("lora_r", "lora_rank"), "technique.r"),
    "lora_alpha": "technique.alpha",
    "lora_dropout": "technique.dropout",
    "lora_target_modules": "technique.target_modules",
    "output_dir": "run.output_dir",
    "seed": "run.seed",
    "save_steps": "run.save_every",
    "eval_steps": "run.eval_every",
    "logging_steps": "run.log_every",
    "save_total_limit": "run.keep_checkpoints",
}
"""Another tool's name -> posttrain's dotted field of the same meaning."""

ADVICE: dict[str, str] = {
    "gradient_accumulation_steps": _ACCUMULATION,
    # Hugging Face's per-device batch is a forward pass's, not a step's: the step is it x accumulation x devices
    "per_device_train_batch_size": (
        "posttrain's optim.micro_batch_size is the examples per forward pass per process (a per-device batch), and "
        "optim.batch_size the examples per optimisation step over all processes and accumulated micro-batches"
    ),
    "warmup_ratio": (
        "posttrain has optim.warmup_steps only, a number of steps: a ratio of 0.1 over a 500-step run is "
        "optim.warmup_steps=50"
    ),
    "bf16": "posttrain takes the precision from model.dtype: model.dtype=bfloat16 trains in bfloat16 mixed precision",
}
"""Another tool's name for what posttrain sets otherwise -> what to set instead."""


def other_name(key: str) -> str | None:
    """What to write for `key` when it is another tool's name for a setting (None when it is not one): the
    did-you-mean of an unknown key.

    >>> other_name("train_file"), other_name("trian")
    ('did you mean `data.train`?', None)
    >>> other_name("warmup_ratio")
    'posttrain has optim.warmup_steps only, a number of steps: a ratio of 0.1 over a 500-step run is optim.warmup_steps=50'
    """
    if key in OTHER_NAMES:
        return f"did you mean `{OTHER_NAMES[key]}`?"
    return ADVICE.get(key)
