"""Training FLOPs, wall-clock hours and cost of one setup.

Sources:
  [Kaplan]  Kaplan et al. 2020, "Scaling Laws for Neural Language Models", sec. 2.1: C ~ 6 N D
            (forward 2 N D, backward 4 N D), attention FLOPs neglected.
  [TM101]   EleutherAI, "Transformer Math 101" (2023): the same accounting; 2 N per token for inference.
  [Korth]   Korthikanti et al. 2022: full recomputation adds one forward (2 N D), about 33% more compute.
  [LoRA]    Frozen weights need no weight-gradient GEMMs: backward costs ~2 N D (input gradients only).
  [OpenRLHF] Hu et al. 2024, "OpenRLHF": generation is ~80% of RLHF time; it is memory-bandwidth bound, each
            decoding step reads every weight once, so tokens/s <= batch x bandwidth / weight bytes.

Utilisation is an assumption, stated in the result: well-tuned dense training reaches ~40-55% of peak on
A100/H100-class GPUs (GPT-NeoX reports 150-180 TFLOP/s per A100); the default 40% is the low end.
"""

from __future__ import annotations

from posttrain.estimator.hardware import GPU
from posttrain.estimator.memory import LORA_TECHNIQUES, RL_METHODS, Setup

DEFAULT_MFU = 0.40
# Decoding reaches a fraction of peak bandwidth (kernel launch and sampling overheads); an assumption.
DEFAULT_BANDWIDTH_UTIL = 0.50
# vLLM's continuous batching keeps many sequences in flight; HF generate decodes only the rollout batch.
VLLM_CONCURRENCY = 256


def train_flops_per_token(s: Setup, params: float, technique: str | None = None) -> float:
    """FLOPs per token to train a model of `params`: 6 N [Kaplan], 4 N with frozen base weights [LoRA],
    + 2 N when activations are recomputed [Korth]."""
    technique = s.technique if technique is None else technique
    per = 4.0 * params if technique in LORA_TECHNIQUES else 6.0 * params
    if s.gradient_checkpointing:
        per += 2.0 * params
    return per


def flops_breakdown(s: Setup, tokens: float) -> dict[str, float]:
    """FLOPs by part for `tokens` trained sequence tokens (prompt + response; chosen + rejected for DPO).

    RL methods generate `completion_len / seq_len` of those tokens first (2 N per generated token [TM101]), then
    score them with forward-only passes (2 N per token) of the reference, reward and (PPO) value models.
    """
    p = s.arch.params
    out = {"policy_training": train_flops_per_token(s, p) * tokens}
    forward = 2.0 * tokens  # per parameter, for one forward-only pass over the tokens
    if s.method == "dpo" and s.reference != "none":
        # precomputed: the same forward over the pairs, once before training (one epoch's worth: an upper bound
        # when the run makes several passes)
        out["reference_forward"] = forward * p
    if s.method in RL_METHODS:
        generated = tokens * s.completion_len / s.seq_len
        out["generation"] = 2.0 * p * generated
        if s.reference != "none":
            out["reference_forward"] = forward * p
        if s.reward_arch is not None:
            out["reward_forward"] = forward * s.reward_arch.params
    if s.method == "ppo":
        out["old_logprobs_forward"] = forward * p  # with a value head, this pass also gives the values
    if s.method == "ppo" and not s.value_head:
        c = s.value_arch.params if s.value_arch is not None else p
        out["value_forward"] = forward * c
        out["value_training"] = train_flops_per_token(s, c) * tokens
    return out


def generated_tokens(s: Setup, tokens: float) -> float:
    return tokens * s.completion_len / s.seq_len if s.method in RL_METHODS else 0.0


def hours(
    s: Setup,
    flops: dict[str, float],
    tokens: float,
    gpu: GPU,
    num_gpus: int,
    mfu: float = DEFAULT_MFU,
    bandwidth_util: float = DEFAULT_BANDWIDTH_UTIL,
) -> float:
    """Wall-clock hours on `num_gpus` of `gpu`: matmul time at `mfu`, plus generation at the slower of its
    compute bound and its bandwidth bound (every decoding step reads the policy's weights once [OpenRLHF])."""
    dense = sum(v for k, v in flops.items() if k != "generation")
    seconds = dense / (num_gpus * gpu.bf16_tflops * 1e12 * mfu)
    gen = generated_tokens(s, tokens)
    if gen:
        in_flight = max(s.sequences, VLLM_CONCURRENCY) if s.rollout_engine == "vllm" else s.sequences
        steps = gen / (num_gpus * in_flight)
        weight_bytes = s.arch.params * (4.0 if s.precision == "fp32" else 2.0)
        step_memory = weight_bytes / (gpu.bandwidth_gbs * 1e9 * bandwidth_util)
        step_compute = 2.0 * s.arch.params * in_flight / (gpu.bf16_tflops * 1e12 * mfu)
        seconds += steps * max(step_memory, step_compute)
    return seconds / 3600.0
