"""`estimate(...)`: peak memory per GPU, the GPUs it fits, FLOPs, hours and cost of one post-training setup.

The arithmetic lives in `memory.py` and `compute.py` (each formula cites its source) and the inputs, their
validation and defaults in `inputs.py`; this module picks the GPU, decides whether the setup fits it (with the
headroom `hardware.USABLE_FRACTION` keeps free), and states every assumption it made in the result. A setup
that does not fit gets no hours or cost, only what would make it fit: more GPUs, gradient checkpointing, a
smaller micro-batch, a lighter technique or a larger GPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from posttrain.estimator import compute, memory
from posttrain.estimator.hardware import GPU, USABLE_FRACTION, custom_gpu, find_gpu, load_gpu_table
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
    fits: list[str]  # GPUs (from the table) whose usable memory holds `peak_memory_gb`, smallest first
    gpu: str  # the GPU the setup is checked against and priced on
    usable_memory_gb: float  # of one `gpu`: `USABLE_FRACTION` of its memory
    fits_gpu: bool  # the peak per GPU is within `usable_memory_gb`: the setup as given can run
    num_gpus: int  # GPUs of the setup
    gpus_needed: int | None  # fewest GPUs of `gpu` that hold the setup (None: not within 1024)
    flops: float
    flops_breakdown: dict[str, float]
    tokens: float
    generated_tokens: float
    hours: float | None  # None when the setup does not fit: no time or cost for a setup that cannot run
    cost_usd: float | None
    mfu: float
    would_fit: list[dict] = field(default_factory=list)  # if it does not fit: {change, peak_memory_gb, says}
    assumptions: list[str] = field(default_factory=list)
    inputs: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _holds(s: memory.Setup, gpu: GPU) -> bool:
    return memory.peak_bytes(s) <= gpu.usable_gb * memory.GB


def _gpus_needed(s: memory.Setup, gpu: GPU) -> tuple[int | None, str]:
    """Fewest GPUs (powers of two) that hold the setup; unsharded setups are counted with FSDP full shard."""
    sharding = s.sharding if memory.SHARD_STAGE[s.sharding] > 0 else "fsdp"
    if memory.activation_bytes(s) + memory.logits_bytes(s) > gpu.usable_gb * memory.GB:
        return None, sharding  # activations are per GPU: sharding the model states cannot help
    n = 1
    while n <= 1024:
        trial = replace(s, num_gpus=n, sharding=sharding if n > 1 else s.sharding)
        if _holds(trial, gpu):
            return n, trial.sharding
        n *= 2
    return None, sharding


def estimate(model: str | float = "7b", **options) -> Estimate:
    """Estimate memory, compute, time and cost of training `model`; `options` are `EstimateInputs` fields
    (method, technique, batch_size, seq_len, gradient_checkpointing, num_gpus, gpu, tokens, ...).

    `batch_size` is the micro-batch per GPU: sequences for SFT, pairs for DPO and reward models, prompts for PPO,
    GRPO and RLOO (those two generate `group_size` completions for each). `seq_len` counts prompt plus response;
    `completion_len` is the generated part (RL). `tokens` are the sequence tokens trained on in total.

    >>> e = estimate("7b", technique="full", batch_size=1, seq_len=512)
    >>> round(sum(e.breakdown_gb[k] for k in ("weights", "gradients", "optimizer_states")), 1)  # 18 B x 7e9
    126.0
    """
    return estimate_for(EstimateInputs(model=model, **options))


def estimate_for(inputs: EstimateInputs) -> Estimate:
    """The estimate of one validated setup: memory, whether it fits the GPU, FLOPs, and if it fits hours and cost."""
    s, notes = inputs.to_setup()
    tokens = inputs.tokens
    if tokens is None:
        tokens = DEFAULT_TOKENS
        notes.append(f"tokens not given: {DEFAULT_TOKENS:.0e} trained tokens assumed for time and cost")
    table = inputs.gpu_table if isinstance(inputs.gpu_table, dict) else load_gpu_table(inputs.gpu_table)
    terms = memory.breakdown_bytes(s)
    peak = memory.peak_bytes(s, terms)
    fits = sorted((g for g in table.values() if peak <= g.usable_gb * memory.GB), key=lambda g: g.memory_gb)
    chosen = _choose_gpu(inputs, table, fits, notes)
    fit = peak <= chosen.usable_gb * memory.GB
    needed = s.num_gpus if fit else _gpus_needed(s, chosen)[0]
    if needed is None:
        notes.append(
            f"does not fit any number of {chosen.name}: activations and logits of one micro-batch per GPU need "
            f"{terms['activations'] / memory.GB + terms['logits'] / memory.GB:.1f} GB; use gradient checkpointing, "
            "a smaller batch_size or seq_len"
        )
    notes.append(
        f"fits: a peak of at most {USABLE_FRACTION:.0%} of a GPU's memory ({chosen.usable_gb:.1f} of "
        f"{chosen.memory_gb:g} GB on {chosen.name}); the rest is kept for the CUDA context, allocator "
        "fragmentation and kernels' workspaces, which the estimate does not count"
    )
    flops = compute.flops_breakdown(s, tokens)
    hrs = compute.hours(s, flops, tokens, chosen, s.num_gpus, mfu=inputs.mfu) if fit else None
    notes.append(
        f"utilisation {inputs.mfu:.0%} of dense bf16 peak for training FLOPs; generation bandwidth-bound"
    )
    if s.method != "reward":
        notes.append(_logits_note(s))
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
        usable_memory_gb=chosen.usable_gb,
        fits_gpu=fit,
        num_gpus=s.num_gpus,
        gpus_needed=needed,
        flops=sum(flops.values()),
        flops_breakdown=flops,
        tokens=float(tokens),
        generated_tokens=compute.generated_tokens(s, tokens),
        hours=hrs,
        cost_usd=None if hrs is None else hrs * s.num_gpus * chosen.usd_per_hour,
        mfu=inputs.mfu,
        would_fit=[] if fit else would_fit(inputs, s, chosen, fits),
        assumptions=notes,
        inputs=_resolved_inputs(inputs, s),
    )


def _logits_note(s: memory.Setup) -> str:
    """How the `logits` term was counted (`memory.logits_bytes`), in words."""
    scored = ("the completion positions are scored" if s.method in memory.RL_METHODS else
              "every position counted as scored (an upper bound: by default only response tokens are)")  # fmt: skip
    if s.sharding in memory.UNCHUNKED_SHARDINGS:
        how = f"all {s.logit_tokens:,} projected in one go ({'ZeRO-3' if s.sharding == 'zero3' else 'FSDP'})"
    else:
        how = (f"{min(s.logit_tokens, memory.logit_chunk_rows(s)):,} of the {s.logit_tokens:,} at a time, "
               "recomputed in backward")  # fmt: skip
    blocks = ""
    if memory.logit_block_bytes(s):
        blocks = (f", and {memory.logit_block_bytes(s):g} for {memory.logit_block_rows(s):,} rows of it at a time "
                  "(the float32 work)")  # fmt: skip
    return (f"logits as posttrain computes them: {scored}; {how}; {memory.logit_value_bytes(s):g} bytes per "
            f"vocabulary value of a chunk at the peak{blocks}")


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


# Lighter techniques to try, lightest last: LoRA on a 16-bit base, then on a 4-bit one.
LIGHTER = {"full": ("lora", "qlora"), "lora": ("qlora",), "8bit": ("qlora",), "qlora": ()}


def would_fit(inputs: EstimateInputs, s: memory.Setup, gpu: GPU, fits: list[GPU]) -> list[dict]:
    """Changes to a setup that does not fit `gpu` that each make it fit: {change, peak_memory_gb, says}. Each is
    one change (more GPUs, gradient checkpointing, micro-batch 1, a lighter technique, a larger GPU), or
    checkpointing with micro-batch 1 where neither alone is enough.

    `change` holds `EstimateInputs` fields: `estimate(**{**asked, **change})` is the setup that fits.
    """
    out: list[dict] = []

    def fits_with(change: dict, says: str, on: GPU = gpu) -> bool:
        trial, _ = replace(inputs, **change).to_setup()
        if not _holds(trial, on):
            return False
        out.append({"change": change, "peak_memory_gb": memory.peak_bytes(trial) / memory.GB, "says": says})
        return True

    n, sharding = _gpus_needed(s, gpu)
    if n is not None:
        fits_with({"num_gpus": n, "sharding": sharding}, f"{n} x {gpu.name} with {sharding} sharding")
    accumulate = "(with gradient accumulation for the same global batch)"
    ckpt = not s.gradient_checkpointing and fits_with(
        {"gradient_checkpointing": True}, "gradient checkpointing"
    )
    micro = s.batch_size > 1 and fits_with({"batch_size": 1}, f"micro-batch 1 {accumulate}")
    if not (ckpt or micro) and not s.gradient_checkpointing and s.batch_size > 1:  # neither alone: both?
        fits_with({"gradient_checkpointing": True, "batch_size": 1}, f"gradient checkpointing and micro-batch 1 {accumulate}")  # fmt: skip
    for technique in LIGHTER[s.technique]:
        if fits_with({"technique": technique}, f"technique {technique}"):
            break
    if fits:  # `fits` holds the per-GPU peak as set up, so the same number of these GPUs holds it
        count = "one" if s.num_gpus == 1 else f"{s.num_gpus} x"
        fits_with({"gpu": fits[0].name, "gpu_memory_gb": None}, f"{count} {fits[0].name}", on=fits[0])
    return out


def _resolved_inputs(inputs: EstimateInputs, s: memory.Setup) -> dict:
    """The inputs as resolved (defaults filled in), for the result's `inputs`."""
    keys = (
        "method technique precision optimizer batch_size seq_len gradient_checkpointing lora_rank num_gpus "
        "sharding group_size completion_len reference rollout_engine"
    ).split()
    return {"model": str(inputs.model), **{k: getattr(s, k) for k in keys}}
