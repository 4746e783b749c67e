"""`estimate(...)`: peak memory per GPU, the GPUs it fits, FLOPs, hours and cost of one post-training setup.

The arithmetic lives in `memory.py` and `compute.py` (each formula cites its source); this module validates the
inputs, resolves names (models, GPUs), picks the GPU and states every assumption it made in the result.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from posttrain.errors import UserError
from posttrain.estimator import compute, memory
from posttrain.estimator.hardware import GPU, custom_gpu, find_gpu, load_gpu_table
from posttrain.estimator.models import resolve_model

METHODS = ("sft", "reward", "dpo", "ppo", "grpo")
TECHNIQUES = ("full", "lora", "qlora", "8bit")
PRECISIONS = ("bf16-mixed", "fp16-mixed", "bf16", "fp16", "fp32")
OPTIMIZERS = ("adamw", "adamw-8bit", "sgd")
REFERENCES = ("model", "adapter", "precomputed", "none")
ENGINES = ("hf", "vllm")
ALIASES = {
    "mixed": "bf16-mixed",
    "amp": "bf16-mixed",
    "float32": "fp32",
    "bfloat16": "bf16",
    "adam": "adamw",
    "adamw8bit": "adamw-8bit",
    "adamw_8bit": "adamw-8bit",
    "8bit-adamw": "adamw-8bit",
    "paged_adamw_8bit": "adamw-8bit",
    "int8": "8bit",
    "lora-8bit": "8bit",
    "deepspeed-zero3": "zero3",
    "fsdp-full-shard": "fsdp",
    "full_shard": "fsdp",
    "shard_grad_op": "fsdp-grad-op",
    "sdpa": "flash",
}
DEFAULT_TOKENS = 1e8
DEFAULT_COUNTING_GPU = "H100-80GB"  # used to count GPUs when nothing in the table fits one


@dataclass
class Estimate:
    """What one setup needs. Memory is per GPU in decimal GB (1e9 bytes)."""

    model: str
    method: str
    technique: str
    params: float
    trainable_params: float
    peak_memory_gb: float
    breakdown_gb: dict[str, float]
    fits: list[str]  # GPUs (from the table) whose memory holds `peak_memory_gb`, smallest first
    gpu: str  # the GPU time and cost are computed for
    num_gpus: int  # GPUs the time and cost are computed for
    gpus_needed: int | None  # fewest GPUs of `gpu` that hold the setup (None: not within 1024)
    flops: float
    flops_breakdown: dict[str, float]
    tokens: float
    generated_tokens: float
    hours: float
    cost_usd: float
    mfu: float
    assumptions: list[str] = field(default_factory=list)
    inputs: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _choice(name: str, value, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        raise UserError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    key = value.strip().lower()
    key = ALIASES.get(key, key)
    if key not in allowed:
        close = difflib.get_close_matches(key, allowed, n=2, cutoff=0.5)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise UserError(f"{name} {value!r} is not known{hint}; choose one of {', '.join(allowed)}")
    return key


def _positive(name: str, value, *, allow_zero: bool = False) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise UserError(
            f"{name} must be a {'non-negative' if allow_zero else 'positive'} integer; got {value!r}"
        )
    return value


def _setup(
    model,
    method,
    technique,
    precision,
    optimizer,
    batch_size,
    seq_len,
    gradient_checkpointing,
    lora_rank,
    lora_dropout,
    num_gpus,
    sharding,
    group_size,
    completion_len,
    reference,
    reward_model,
    reward_function,
    value_model,
    rollout_engine,
    attention,
) -> tuple[memory.Setup, list[str]]:
    arch, notes = resolve_model(model)
    method = _choice("method", method, METHODS)
    technique = _choice("technique", technique, TECHNIQUES)
    s = memory.Setup(
        arch=arch,
        method=method,
        technique=technique,
        precision=_choice("precision", precision, PRECISIONS),
        optimizer=_choice("optimizer", optimizer, OPTIMIZERS),
        batch_size=_positive("batch_size", batch_size),
        seq_len=_positive("seq_len", seq_len),
        gradient_checkpointing=bool(gradient_checkpointing),
        lora_rank=_positive("lora_rank", lora_rank),
        lora_dropout=float(lora_dropout),
        num_gpus=_positive("num_gpus", num_gpus),
        sharding=_choice("sharding", sharding, tuple(memory.SHARD_STAGE)),
        group_size=_positive("group_size", group_size),
        rollout_engine=_choice("rollout_engine", rollout_engine, ENGINES),
        attention=_choice("attention", attention, ("flash", "eager")),
    )
    if method in memory.RL_METHODS:
        if completion_len is None:
            completion_len = s.seq_len // 2
            notes.append(f"completion_len not given: half of seq_len ({completion_len} generated tokens)")
        if _positive("completion_len", completion_len) >= s.seq_len:
            raise UserError(
                f"completion_len ({completion_len}) must be smaller than seq_len ({s.seq_len}): seq_len counts "
                "the prompt plus the completion"
            )
        s = replace(s, completion_len=completion_len)
    elif reward_model is not None or value_model is not None:
        raise UserError(f"reward_model and value_model apply to ppo and grpo only, not to {method}")

    # The reference model: DPO, PPO and GRPO (KL penalty) need reference log-probs.
    if method in ("dpo", "ppo", "grpo"):
        if reference is None:
            reference = "adapter" if technique != "full" else "model"
            notes.append(
                f"reference log-probs from {'the base with adapters disabled' if reference == 'adapter' else 'a frozen copy of the policy'}"
                + (" (GRPO with a KL term; pass reference='none' for beta = 0)" if method == "grpo" else "")
            )
        reference = _choice("reference", reference, REFERENCES)
        if reference == "adapter" and technique == "full":
            raise UserError(
                "reference='adapter' needs a LoRA technique (lora, qlora, 8bit): full fine-tuning has no adapters to disable"
            )
        if reference == "precomputed" and method != "dpo":
            raise UserError(
                f"reference='precomputed' works for dpo only: {method} needs log-probs of fresh samples"
            )
        s = replace(s, reference=reference)
    elif reference not in (None, "none"):
        raise UserError(f"reference={reference!r}: {method} uses no reference model")

    if method == "ppo":
        if reward_model is None and not reward_function:
            raise UserError(
                "ppo needs a reward source: pass reward_model (a learned reward model held in memory, e.g. "
                "reward_model='7b') or reward_function=True (a program computes the reward). With a program "
                "and no critic budget, grpo is the usual choice."
            )
        if value_model == "head":  # posttrain's own PPO: a scalar head on the policy's last hidden state
            s = replace(s, value_arch=None, value_head=True)
            notes.append("PPO value head on the policy backbone: no separate critic in memory or compute")
        else:
            value_arch, _ = resolve_model(value_model) if value_model is not None else (arch, [])
            s = replace(s, value_arch=value_arch)
            notes.append(f"PPO critic: {value_arch.name}, trained with the policy's technique ({technique})")
    if method in memory.RL_METHODS:
        if reward_model is not None:
            s = replace(s, reward_arch=resolve_model(reward_model)[0])
        else:
            notes.append(f"{method}: reward computed by a program, no reward model in memory")
    return s, notes


def _gpus_needed(s: memory.Setup, gpu: GPU) -> tuple[int | None, str]:
    """Fewest GPUs (powers of two) that hold the setup; unsharded setups are counted with FSDP full shard."""
    sharding = s.sharding if memory.SHARD_STAGE[s.sharding] > 0 else "fsdp"
    if memory.activation_bytes(s) + memory.logits_bytes(s) > gpu.memory_gb * memory.GB:
        return None, sharding  # activations are per GPU: sharding the model states cannot help
    n = 1
    while n <= 1024:
        trial = replace(s, num_gpus=n, sharding=sharding if n > 1 else s.sharding)
        if memory.peak_bytes(trial) <= gpu.memory_gb * memory.GB:
            return n, trial.sharding
        n *= 2
    return None, sharding


def estimate(
    model: str | float = "7b",
    method: str = "sft",
    technique: str = "full",
    precision: str = "bf16-mixed",
    optimizer: str = "adamw",
    batch_size: int = 4,
    seq_len: int = 2048,
    gradient_checkpointing: bool = False,
    lora_rank: int = 16,
    num_gpus: int = 1,
    sharding: str = "none",
    group_size: int = 8,
    completion_len: int | None = None,
    *,
    tokens: float | None = None,
    gpu: str | None = None,
    gpu_memory_gb: float | None = None,
    gpu_table: str | Path | dict[str, GPU] | None = None,
    reference: str | None = None,
    reward_model: str | None = None,
    reward_function: bool = False,
    value_model: str | None = None,
    rollout_engine: str = "hf",
    attention: str = "flash",
    lora_dropout: float = 0.0,
    mfu: float = compute.DEFAULT_MFU,
) -> Estimate:
    """Estimate memory, compute, time and cost of training `model` with `method` and `technique`.

    `batch_size` is the micro-batch per GPU: sequences for SFT, pairs for DPO and reward models, prompts for PPO
    and GRPO (GRPO generates `group_size` completions for each). `seq_len` counts prompt plus response;
    `completion_len` is the generated part (RL). `tokens` are the sequence tokens trained on in total.

    >>> e = estimate("7b", technique="full", batch_size=1, seq_len=512)
    >>> round(sum(e.breakdown_gb[k] for k in ("weights", "gradients", "optimizer_states")), 1)  # 18 B x 7e9
    126.0
    """
    s, notes = _setup(
        model,
        method,
        technique,
        precision,
        optimizer,
        batch_size,
        seq_len,
        gradient_checkpointing,
        lora_rank,
        lora_dropout,
        num_gpus,
        sharding,
        group_size,
        completion_len,
        reference,
        reward_model,
        reward_function,
        value_model,
        rollout_engine,
        attention,
    )
    if tokens is None:
        tokens = DEFAULT_TOKENS
        notes.append(f"tokens not given: {DEFAULT_TOKENS:.0e} trained tokens assumed for time and cost")
    if isinstance(tokens, bool) or not isinstance(tokens, (int, float)) or tokens <= 0:
        raise UserError(f"tokens must be a positive number of training tokens; got {tokens!r}")
    if not 0 < mfu <= 1:
        raise UserError(f"mfu must be a fraction in (0, 1]; got {mfu!r}")
    table = gpu_table if isinstance(gpu_table, dict) else load_gpu_table(gpu_table)

    terms = memory.breakdown_bytes(s)
    peak = memory.peak_bytes(s, terms)
    fits = sorted((g for g in table.values() if peak <= g.memory_gb * memory.GB), key=lambda g: g.memory_gb)
    if gpu_memory_gb is not None:
        chosen = custom_gpu(gpu_memory_gb, table)
        notes.append(f"{chosen.name}: throughput and price of the cheapest table GPU at least as large")
    elif gpu is not None:
        chosen = find_gpu(gpu, table)
    elif fits:
        chosen = min(fits, key=lambda g: (g.memory_gb, g.usd_per_hour))
    else:
        chosen = table.get(DEFAULT_COUNTING_GPU) or max(table.values(), key=lambda g: g.memory_gb)

    needed, needed_sharding = (
        _gpus_needed(s, chosen) if peak > chosen.memory_gb * memory.GB else (s.num_gpus, s.sharding)
    )
    used = s.num_gpus
    if needed is not None and needed > s.num_gpus:
        used = needed
        notes.append(
            f"does not fit {s.num_gpus} x {chosen.name} ({peak / memory.GB:.1f} GB per GPU); time and cost are "
            f"for {needed} of them with {needed_sharding} sharding"
        )
    elif needed is None:
        notes.append(
            f"does not fit any number of {chosen.name}: activations and logits of one micro-batch per GPU need "
            f"{terms['activations'] / memory.GB + terms['logits'] / memory.GB:.1f} GB; use gradient checkpointing, "
            f"a smaller batch_size or seq_len. Time and cost are for {s.num_gpus} GPU(s)"
        )

    flops = compute.flops_breakdown(s, tokens)
    hrs = compute.hours(s, flops, tokens, chosen, used, mfu=mfu)
    notes.append(f"utilisation {mfu:.0%} of dense bf16 peak for training FLOPs; generation bandwidth-bound")
    if s.method != "reward":
        notes.append("logits materialised in full (no chunked or fused cross-entropy)")

    trainable = s.arch.params if s.technique == "full" else s.arch.lora_params(s.lora_rank)
    return Estimate(
        model=s.arch.name,
        method=s.method,
        technique=s.technique,
        params=s.arch.params,
        trainable_params=trainable,
        peak_memory_gb=peak / memory.GB,
        breakdown_gb={k: v / memory.GB for k, v in terms.items()},
        fits=[g.name for g in fits],
        gpu=chosen.name,
        num_gpus=used,
        gpus_needed=needed,
        flops=sum(flops.values()),
        flops_breakdown=flops,
        tokens=float(tokens),
        generated_tokens=compute.generated_tokens(s, tokens),
        hours=hrs,
        cost_usd=hrs * used * chosen.usd_per_hour,
        mfu=mfu,
        assumptions=notes,
        inputs={
            "model": str(model),
            "method": s.method,
            "technique": s.technique,
            "precision": s.precision,
            "optimizer": s.optimizer,
            "batch_size": s.batch_size,
            "seq_len": s.seq_len,
            "gradient_checkpointing": s.gradient_checkpointing,
            "lora_rank": s.lora_rank,
            "num_gpus": s.num_gpus,
            "sharding": s.sharding,
            "group_size": s.group_size,
            "completion_len": s.completion_len,
            "reference": s.reference,
            "rollout_engine": s.rollout_engine,
        },
    )
