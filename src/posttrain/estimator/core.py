"""`estimate(...)`: peak memory per GPU, the GPUs it fits, FLOPs, hours and cost of one post-training setup.

The arithmetic lives in `memory.py` and `compute.py` (each formula cites its source) and the inputs, their
validation and defaults in `inputs.py`; this module picks the GPU, counts the GPUs a setup needs, and states
every assumption it made in the result.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from posttrain.estimator import compute, memory
from posttrain.estimator.hardware import GPU, custom_gpu, find_gpu, load_gpu_table
from posttrain.estimator.inputs import DEFAULT_TOKENS, METHODS, EstimateInputs

__all__ = ["METHODS", "Estimate", "EstimateInputs", "estimate", "estimate_for"]

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


def estimate(model: str | float = "7b", **options) -> Estimate:
    """Estimate memory, compute, time and cost of training `model`; `options` are `EstimateInputs` fields
    (method, technique, batch_size, seq_len, gradient_checkpointing, num_gpus, gpu, tokens, ...).

    `batch_size` is the micro-batch per GPU: sequences for SFT, pairs for DPO and reward models, prompts for PPO
    and GRPO (GRPO generates `group_size` completions for each). `seq_len` counts prompt plus response;
    `completion_len` is the generated part (RL). `tokens` are the sequence tokens trained on in total.

    >>> e = estimate("7b", technique="full", batch_size=1, seq_len=512)
    >>> round(sum(e.breakdown_gb[k] for k in ("weights", "gradients", "optimizer_states")), 1)  # 18 B x 7e9
    126.0
    """
    return estimate_for(EstimateInputs(model=model, **options))


def estimate_for(inputs: EstimateInputs) -> Estimate:
    """The estimate of one validated setup: memory, the GPU it is priced on, FLOPs, hours and cost."""
    s, notes = inputs.to_setup()
    tokens = inputs.tokens
    if tokens is None:
        tokens = DEFAULT_TOKENS
        notes.append(f"tokens not given: {DEFAULT_TOKENS:.0e} trained tokens assumed for time and cost")
    table = inputs.gpu_table if isinstance(inputs.gpu_table, dict) else load_gpu_table(inputs.gpu_table)
    terms = memory.breakdown_bytes(s)
    peak = memory.peak_bytes(s, terms)
    fits = sorted((g for g in table.values() if peak <= g.memory_gb * memory.GB), key=lambda g: g.memory_gb)
    chosen = _choose_gpu(inputs, table, fits, notes)
    used, needed = _gpu_count(s, chosen, terms, peak, notes)
    flops = compute.flops_breakdown(s, tokens)
    hrs = compute.hours(s, flops, tokens, chosen, used, mfu=inputs.mfu)
    notes.append(
        f"utilisation {inputs.mfu:.0%} of dense bf16 peak for training FLOPs; generation bandwidth-bound"
    )
    if s.method != "reward":
        notes.append("logits materialised in full (no chunked or fused cross-entropy)")
    return Estimate(
        model=s.arch.name,
        method=s.method,
        technique=s.technique,
        params=s.arch.params,
        trainable_params=s.arch.params if s.technique == "full" else s.arch.lora_params(s.lora_rank),
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
        mfu=inputs.mfu,
        assumptions=notes,
        inputs=_resolved_inputs(inputs, s),
    )


def _choose_gpu(inputs: EstimateInputs, table: dict[str, GPU], fits: list[GPU], notes: list[str]) -> GPU:
    """The GPU time and cost are computed for: the one named, else the smallest (then cheapest) that fits."""
    if inputs.gpu_memory_gb is not None:
        chosen = custom_gpu(inputs.gpu_memory_gb, table)
        notes.append(f"{chosen.name}: throughput and price of the cheapest table GPU at least as large")
        return chosen
    if inputs.gpu is not None:
        return find_gpu(inputs.gpu, table)
    if fits:
        return min(fits, key=lambda g: (g.memory_gb, g.usd_per_hour))
    return table.get(DEFAULT_COUNTING_GPU) or max(table.values(), key=lambda g: g.memory_gb)


def _gpu_count(
    s: memory.Setup, gpu: GPU, terms: dict[str, float], peak: float, notes: list[str]
) -> tuple[int, int | None]:
    """(GPUs time and cost are computed for, fewest GPUs of `gpu` that hold the setup)."""
    if peak <= gpu.memory_gb * memory.GB:
        return s.num_gpus, s.num_gpus
    needed, sharding = _gpus_needed(s, gpu)
    if needed is None:
        notes.append(
            f"does not fit any number of {gpu.name}: activations and logits of one micro-batch per GPU need "
            f"{terms['activations'] / memory.GB + terms['logits'] / memory.GB:.1f} GB; use gradient checkpointing, "
            f"a smaller batch_size or seq_len. Time and cost are for {s.num_gpus} GPU(s)"
        )
        return s.num_gpus, None
    if needed > s.num_gpus:
        notes.append(
            f"does not fit {s.num_gpus} x {gpu.name} ({peak / memory.GB:.1f} GB per GPU); time and cost are "
            f"for {needed} of them with {sharding} sharding"
        )
        return needed, needed
    return s.num_gpus, needed


def _resolved_inputs(inputs: EstimateInputs, s: memory.Setup) -> dict:
    """The inputs as resolved (defaults filled in), for the result's `inputs`."""
    keys = (
        "method technique precision optimizer batch_size seq_len gradient_checkpointing lora_rank num_gpus "
        "sharding group_size completion_len reference rollout_engine"
    ).split()
    return {"model": str(inputs.model), **{k: getattr(s, k) for k in keys}}
