"""The infrastructure reality check: every method x technique for one model, side by side.

For each row: peak memory on one GPU, how many GPUs of the reference type hold it (FSDP full shard across
them, each filled to at most `hardware.USABLE_FRACTION` of its memory), memory per GPU at that count, and cost
relative to full SFT on the same number of trained tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from posttrain.estimator.core import Estimate, estimate_for
from posttrain.estimator.hardware import USABLE_FRACTION
from posttrain.estimator.inputs import METHODS, EstimateInputs

TABLE_TECHNIQUES = ("full", "lora", "8bit", "qlora")
TABLE_METHODS = tuple(m for m in METHODS if m != "rloo")
"""RLOO's rows would be GRPO's at the same group size (`memory.GROUP_METHODS`): the table leaves them out."""


@dataclass
class Row:
    method: str
    technique: str
    memory_one_gpu_gb: float
    gpus_needed: int | None
    memory_per_gpu_gb: float
    hours: float | None  # None: not within 1024 GPUs (no cost for a setup that does not fit)
    cost_usd: float | None
    relative_cost: float | None


def reality_check(
    model: str = "7b",
    gpu: str = "H100-80GB",
    *,
    seq_len: int = 2048,
    batch_size: int = 1,
    gradient_checkpointing: bool = True,
    group_size: int = 8,
    completion_len: int = 1024,
    tokens: float = 1e8,
    gpu_table=None,
) -> tuple[list[Row], list[str]]:
    """Rows for every method x technique, and the shared settings in words."""
    common = EstimateInputs(
        model=model, seq_len=seq_len, batch_size=batch_size, gradient_checkpointing=gradient_checkpointing,
        tokens=tokens, gpu=gpu, gpu_table=gpu_table,
    )  # fmt: skip
    rows: list[Row] = []
    for method in TABLE_METHODS:
        extra: dict = {}
        if method in ("ppo", "grpo"):
            extra = dict(completion_len=completion_len)
        if method == "grpo":
            extra.update(group_size=group_size)
        if method == "ppo":
            # A learned reward model the size of the policy (as in InstructGPT), and as many prompts per
            # micro-batch as GRPO has completions, so both generate the same number of sequences at once.
            extra.update(reward_model=model, value_model="policy", batch_size=group_size * batch_size)
        for technique in TABLE_TECHNIQUES:
            inputs = replace(common, method=method, technique=technique, **extra)
            one: Estimate = estimate_for(inputs)
            n = one.gpus_needed
            many = one if n in (None, 1) else estimate_for(replace(inputs, num_gpus=n, sharding="fsdp"))
            rows.append(
                Row(
                    method,
                    technique,
                    one.peak_memory_gb,
                    n,
                    many.peak_memory_gb,
                    many.hours,
                    many.cost_usd,
                    0.0,
                )
            )
    base = rows[0].cost_usd  # sft + full
    for r in rows:
        r.relative_cost = None if r.cost_usd is None or not base else r.cost_usd / base
    settings = [
        f"model {model}, {seq_len} tokens per sequence, micro-batch {batch_size} per GPU, "
        f"gradient checkpointing {'on' if gradient_checkpointing else 'off'}, bf16 mixed precision, AdamW",
        f"GRPO (and RLOO at the same k): {group_size} completions of {completion_len} tokens per prompt; PPO: critic and reward model "
        f"the size of the policy, {group_size * batch_size} prompts per micro-batch; the reference as `posttrain train` holds it: adapters "
        "disabled (LoRA); under full fine-tuning DPO's precomputed, none for GRPO (beta 0), a frozen copy for PPO",
        f"GPUs needed: {gpu} with FSDP full shard, each filled to at most {USABLE_FRACTION:.0%} of its memory; "
        f"relative cost: same {tokens:.0e} trained tokens, 1.00 = full SFT",
    ]
    return rows, settings


def format_table(rows: list[Row], settings: list[str], gpu: str) -> str:
    head = f"| method | technique | memory on 1 GPU (GB) | {gpu} needed | memory per GPU then (GB) | relative cost |"
    lines = [head, "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        n = str(r.gpus_needed) if r.gpus_needed is not None else "> 1024"
        lines.append(
            f"| {r.method} | {r.technique} | {r.memory_one_gpu_gb:.1f} | {n} | {r.memory_per_gpu_gb:.1f} "
            f"| {'n/a' if r.relative_cost is None else f'{r.relative_cost:.2f}x'} |"
        )
    return "\n".join(lines + [""] + [f"- {s}" for s in settings])
