"""Peak memory per device of one training setup, term by term, in bytes.

Pure functions of a `Setup` (resolved, validated inputs). Sources, cited where each formula is used:
  [ZeRO]   Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models",
           sec. 3.1 (16 bytes/param for mixed-precision Adam) and Fig. 1 (ZeRO-1/2/3 partitioning).
  [QLoRA]  Dettmers et al. 2023, sec. 3 (NF4 with blocks of 64, double quantisation: 4.127 bits/param).
  [8bitOpt] Dettmers et al. 2021, "8-bit Optimizers via Block-wise Quantization" (2 bytes for Adam's m and v).
  [LoRA]   Hu et al. 2021 (r x (d_in + d_out) parameters per adapted matrix).
  [Korth]  Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models"
           (arXiv 2205.05198), sec. 4: activation bytes per layer, 2 s b h per layer under full recomputation.
  [DS]     DeepSpeed `estimate_zero3_model_states_mem_needs`: 4 bytes x the largest layer for gathered params.
  [HF anatomy] Hugging Face transformers docs, "Model training anatomy": 18 bytes per parameter for mixed-precision
           AdamW held as fp32 parameters with a 16-bit copy (fp32 gradients, both weight copies).

What it does not model: CUDA context and allocator fragmentation (left as headroom, see hardware.py), tensor
or pipeline parallelism, CPU offload, temporary buffers of individual kernels.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from posttrain.estimator.models import Arch

GB = 1e9  # decimal gigabytes: what the result reports

# Bytes per frozen weight of the quantised linear layers.
# NF4 [QLoRA sec. 3]: 4 bits + double-quantised block constants (8/64 + 32/(64*256) = 0.127 bit) = 4.127 bits.
NF4_BYTES = (4 + 8 / 64 + 32 / (64 * 256)) / 8
INT8_BYTES = 1.0  # LLM.int8: int8 weights; the per-row fp16 scales are negligible

# Optimizer state bytes per trainable parameter, without a master copy.
# AdamW keeps m and v (2 x 4 bytes in fp32) [ZeRO 3.1]; 8-bit AdamW 1 + 1 byte [8bitOpt]; SGD one momentum.
STATE_BYTES = {"adamw": 8.0, "adamw-8bit": 2.0, "sgd": 4.0}
# Pure 16-bit training keeps AdamW/SGD states in 16 bits too (2 + 2 bytes for m, v; 2 for momentum).
STATE_BYTES_16 = {"adamw": 4.0, "adamw-8bit": 2.0, "sgd": 2.0}

SHARD_STAGE = {"none": 0, "ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3, "fsdp": 3, "fsdp-grad-op": 2}
# Shardings under which posttrain projects the scored rows in one go, through the model's own forward (FSDP2 and
# DeepSpeed ZeRO-3 gather the output layer's weights only inside a forward: `models.sharding.gathers_in_forward`):
# no chunked log-probs (`logits_bytes`).
UNCHUNKED_SHARDINGS = ("fsdp", "fsdp-grad-op", "zero3")

LOGIT_CHUNK_ELEMENTS = 2**24
"""Rows x vocabulary of one chunk of logits in posttrain's log-probs: the value of
`posttrain.models.logprobs.LOGIT_CHUNK_ELEMENTS`, repeated here because the estimator imports no torch layer
(tests/unit/test_estimator.py checks that the two are equal)."""
SOFTMAX_BLOCK_ELEMENTS = 2**21
"""Rows x vocabulary of one block of `_LinearHeadLogps`'s float32 work on a chunk: the value of
`posttrain.models.logprobs.SOFTMAX_BLOCK_ELEMENTS`, repeated as `LOGIT_CHUNK_ELEMENTS` is."""
LORA_TECHNIQUES = ("lora", "qlora", "8bit")
RL_METHODS = ("ppo", "grpo", "rloo")
GROUP_METHODS = ("grpo", "rloo")
"""Methods that sample a group of completions per prompt. RLOO's forward and loss (`algorithms/rloo.py`) keep the
same tensors per completion token as GRPO's (the log-probs and the entropy every RL method logs), so its memory
is GRPO's at the same group size and prompts."""

# Which terms a breakdown always shows (0 where absent); extra terms appear only when non-zero.
CORE_TERMS = (
    "weights",
    "gradients",
    "optimizer_states",
    "activations",
    "logits",
    "reference_model",
    "reward_model",
    "value_model",
    "kv_cache",
    "rollout_buffers",
)


@dataclass(frozen=True)
class Setup:
    """Resolved inputs of one estimate; `core.estimate` builds and validates it."""

    arch: Arch
    method: str = "sft"  # sft | reward | dpo | ppo | grpo | rloo
    technique: str = "full"  # full | lora | qlora | 8bit (LoRA on an int8 base)
    precision: str = "bf16-mixed"  # bf16-mixed | fp16-mixed | bf16 | fp16 | fp32
    optimizer: str = "adamw"  # adamw | adamw-8bit | sgd
    batch_size: int = 4  # sequences (prompts for RL, pairs for DPO/reward) per forward pass per GPU
    seq_len: int = 2048  # tokens per sequence, prompt + response
    gradient_checkpointing: bool = False
    lora_rank: int = 16
    lora_dropout: float = 0.0
    num_gpus: int = 1
    sharding: str = "none"
    group_size: int = 8  # G: completions per prompt (GRPO; k in RLOO)
    completion_len: int = 1024  # generated tokens per sequence (PPO, GRPO), part of seq_len
    reference: str = "none"  # model | adapter | precomputed | none
    reward_arch: Arch | None = None  # a learned reward model held in memory (PPO, GRPO)
    value_arch: Arch | None = None  # the critic (PPO)
    value_head: bool = False  # PPO values from a head on the policy (no critic model; posttrain's own PPO)
    rollout_engine: str = "hf"  # hf (generate, KV cache freed after) | vllm (resident engine)
    attention: str = "flash"  # flash/sdpa (no s^2 scores kept) | eager

    @property
    def act_bytes(self) -> int:
        return 4 if self.precision == "fp32" else 2

    @property
    def sequences(self) -> int:
        """Sequences in one forward pass per GPU: DPO and reward models see chosen and rejected."""
        if self.method in ("dpo", "reward"):
            return 2 * self.batch_size
        if self.method in GROUP_METHODS:
            return self.batch_size * self.group_size
        return self.batch_size

    @property
    def logit_tokens(self) -> int:
        """Positions scored against the vocabulary in one forward pass per GPU (N): posttrain projects only the
        positions that predict a trained token. RL: the completion tokens. SFT and DPO: every position, an
        upper bound (only the response tokens are trained by default, `data.train_on`)."""
        if self.method == "reward":
            return 0  # a scalar head, no LM head [reward models: InstructGPT sec. 3.5]
        if self.method in RL_METHODS:
            return self.sequences * self.completion_len
        return self.sequences * self.seq_len


def _stage(s: Setup) -> int:
    return SHARD_STAGE[s.sharding]


DEEPSPEED_SHARDINGS = ("zero1", "zero2", "zero3")


def trainable_bytes(s: Setup) -> tuple[float, float, float]:
    """(weight, gradient, optimizer) bytes per fully trained parameter.

    Mixed precision, two layouts:
    - DeepSpeed ZeRO (`zero1-3`) [ZeRO 3.1]: 16-bit weights and gradients, an fp32 master copy inside the
      optimizer: 2 + 2 + (4 + states) = 16 for AdamW, the paper's K = 12.
    - Autocast (`posttrain train`, Accelerate, FSDP; [HF anatomy]): the parameters themselves are the fp32 master
      copy, so their gradients are fp32 too, and autocast holds a 16-bit copy of each weight from the forward to
      the backward: (4 + 2) + 4 + states = 18 for AdamW. FSDP gathers those 16-bit copies a layer at a time
      (counted in `gathered_params`), so a sharded run keeps 4 + 4 + states.
    """
    if s.precision == "fp32":
        return 4.0, 4.0, STATE_BYTES[s.optimizer]
    if s.precision in ("bf16", "fp16"):
        return 2.0, 2.0, STATE_BYTES_16[s.optimizer]
    if s.sharding in DEEPSPEED_SHARDINGS:
        return 2.0, 2.0, 4.0 + STATE_BYTES[s.optimizer]
    return (4.0 if _stage(s) >= 3 else 6.0), 4.0, STATE_BYTES[s.optimizer]


def adapter_bytes(s: Setup) -> tuple[float, float, float]:
    """LoRA adapters are kept in fp32 (peft's `autocast_adapter_dtype=True`), so no separate master copy."""
    return 4.0, 4.0, STATE_BYTES[s.optimizer]


def frozen_weight_bytes(s: Setup, arch: Arch, quantised: bool) -> float:
    """Bytes of a frozen copy of `arch`: 16-bit (fp32 when training in fp32); with `quantised` the blocks'
    linear layers are NF4 [QLoRA] or int8, while embeddings, LM head and norms stay 16-bit."""
    dense = 4.0 if s.precision == "fp32" else 2.0
    if not quantised:
        return arch.params * dense
    qbytes = NF4_BYTES if s.technique == "qlora" else INT8_BYTES
    return arch.linear_params * qbytes + (arch.params - arch.linear_params) * dense


def model_states(s: Setup, arch: Arch) -> dict[str, float]:
    """Weights, gradients and optimizer states of one trained model, per GPU after sharding.

    [ZeRO Fig. 1]: ZeRO-1 partitions optimizer states, ZeRO-2 also gradients, ZeRO-3 (= FSDP full shard) also
    weights, each over N data-parallel ranks. A 4-bit/8-bit frozen base is partitioned by FSDP but not by
    DeepSpeed ZeRO-3 (reported for DeepSpeed + QLoRA), so `zero3` keeps it whole.
    """
    n, stage = s.num_gpus, _stage(s)
    if s.technique == "full":
        w, g, k = trainable_bytes(s)
        p = arch.params
        weights = p * w / (n if stage >= 3 else 1)
        if s.sharding == "fsdp-grad-op":
            # FSDP's shard-grad-op is ZeRO-2 [ESTIMATOR_FACTS: "2 Psi + (2 + K) Psi / N"]: the weights in the compute
            # dtype stay whole from the forward to the end of the backward, and the master weights FSDP shards
            # under every strategy (full shard's) are 1/N each: 2 + 4/N in mixed precision, not a whole 4 + 2.
            weights = p * (trainable_bytes(replace(s, sharding="fsdp"))[0] / n + s.act_bytes)
        return {
            "weights": weights,
            "gradients": p * g / (n if stage >= 2 else 1),
            "optimizer_states": p * k / (n if stage >= 1 else 1),
        }
    quantised = s.technique in ("qlora", "8bit")
    base = frozen_weight_bytes(s, arch, quantised)
    if stage >= 3 and not (quantised and s.sharding == "zero3"):
        base /= n
    a = arch.lora_params(s.lora_rank)
    w, g, k = adapter_bytes(s)
    return {
        "weights": base + a * w / (n if stage >= 3 else 1),
        "gradients": a * g / (n if stage >= 2 else 1),
        "optimizer_states": a * k / (n if stage >= 1 else 1),
    }


def layer_activation_bytes_per_token(s: Setup) -> float:
    """Bytes one block saves for backward, per token, without recomputation.

    [Korth sec. 4.1] counts 34 h (+ 5 a s for attention scores) bytes per token for a GPT block in 16 bit. Redone
    for a Llama-style block with the same method, as posttrain trains it (`models.layers.lean_layers`, applied
    to the Llama, Mistral, Qwen2/3 and OLMo2 layers whenever a model is loaded to train): attention keeps Q after
    RoPE, the key and value heads (not their per-query-head copies) and its output (2h + 4 kv_dim + 2h); the
    SwiGLU MLP keeps gate and up (4f: SiLU and the product are rebuilt in backward); the two RMSNorms keep their
    inputs, the residual stream (4h; their normalised outputs, the projections' inputs, are rebuilt): 8h + 4 kv_dim
    + 4f. A config.json of another family (`Arch.lean` False) keeps the eager count: the norms' outputs (+4h),
    SiLU(gate) and the product (+4f). Measured on SmolLM2-135M, SFT full (benchmarks/README.md, "Where SFT full
    fine-tuning's memory goes"): 1.49 GB kept before `lean_layers`, 0.84 GB after, for the same batch.
    FlashAttention/SDPA keeps no s x s scores; eager attention adds [Korth]'s 5 a s. LoRA dropout (p > 0) stores a
    dropped-out copy and a bool mask of each adapted input (q, k, v, o, gate, up read h; down reads f). LoRA keeps
    each adapter's A output for B's gradient (r values per adapted matrix: every linear map of a block, 7 r for
    a Llama block, as `Arch.lora_params` counts them).

    Full fine-tuning in mixed precision under autocast (fp32 weights, `residual_bytes`) carries the residual stream
    in float32: the embeddings' output is float32 and each block adds its bf16 outputs to it, so the two norms'
    inputs are kept at 4 bytes (+4h). What else autocast would keep, a 16-bit copy of each projection's input per
    projection and of each weight, posttrain's layers rebuild in backward. Measured on CPU under bf16 autocast
    with bf16 attention, as on a GPU (SmolLM2-135M, h 576, kv 192, f 1536; benchmarks/README.md, "bf16 runs:
    autocast's copies rebuilt"): full fine-tuning keeps 13.8 KB per token and block, 12h + 4kv + 4f = 13,824 B;
    LoRA over a bf16 base 11.7 KB, 8h + 4kv + 4f + 7 r x 2 = 11,744 B.
    """
    a = s.arch
    h, f, kv = a.hidden, a.intermediate, a.kv_dim
    scale = s.act_bytes / 2  # the constants above are for 16-bit activations
    per = ((8 * h + 4 * kv + 4 * f) if a.lean else (12 * h + 4 * kv + 8 * f)) * scale
    per += 2 * h * (residual_bytes(s) - s.act_bytes)  # the two norms' inputs, in the residual stream's dtype
    if s.attention == "eager":
        per += 5 * a.heads * s.seq_len * scale
    if s.technique in LORA_TECHNIQUES:
        per += len(a.linear_shapes) * s.lora_rank * s.act_bytes
        if s.lora_dropout > 0:
            per += (6 * h + f) * (s.act_bytes + 1)
    return per


def residual_bytes(s: Setup) -> int:
    """Bytes per element of the residual stream (the blocks' inputs): the trained weights' dtype. Full fine-tuning
    in mixed precision under autocast holds fp32 weights, so its embeddings' output and every residual add are
    float32; DeepSpeed's 16-bit weights, a frozen 16-bit base (LoRA, QLoRA) and pure 16-bit runs keep it 16-bit."""
    mixed_autocast = s.precision in ("bf16-mixed", "fp16-mixed") and s.sharding not in DEEPSPEED_SHARDINGS
    return 4 if s.technique == "full" and mixed_autocast else s.act_bytes


def activation_bytes(s: Setup) -> float:
    """Activations kept for backward in one forward pass per GPU (the trained model only).

    With full recomputation (gradient checkpointing) [Korth sec. 4.2] keeps 2 s b h bytes per layer (each block's
    16-bit input; 4 s b h where the residual stream is float32, `residual_bytes`) plus, during backward, one
    block's full activations while it is recomputed.
    """
    tokens = s.sequences * s.seq_len
    per_layer = layer_activation_bytes_per_token(s) * tokens
    if s.gradient_checkpointing:
        return s.arch.layers * s.arch.hidden * residual_bytes(s) * tokens + per_layer
    return s.arch.layers * per_layer


def logit_chunk_rows(s: Setup) -> int:
    """Rows whose vocabulary-sized logits exist at once in posttrain's log-probs: `LOGIT_CHUNK_ELEMENTS // V`
    (341 for a 49,152 vocabulary, 130 for 128,256), as `models.logprobs.head_logps` cuts them."""
    return max(1, LOGIT_CHUNK_ELEMENTS // s.arch.vocab)


def computes_own_logits(s: Setup) -> bool:
    """Whether posttrain computes the chunks' logits itself (`_LinearHeadLogps`): a family whose logits are its output
    layer's product alone (`Arch.lean`), with the output layer whole outside the forward (not FSDP or ZeRO-3)."""
    return s.arch.lean and s.sharding not in UNCHUNKED_SHARDINGS


def logit_block_rows(s: Setup) -> int:
    """Rows of one block of `_LinearHeadLogps`'s float32 work: `SOFTMAX_BLOCK_ELEMENTS // V` (42 for a 49,152
    vocabulary, 16 for 128,256), at most a chunk's."""
    return min(logit_chunk_rows(s), max(1, SOFTMAX_BLOCK_ELEMENTS // s.arch.vocab))


def logit_value_bytes(s: Setup) -> float:
    """Peak bytes per (row, vocabulary) value of a whole chunk while its log-probs are computed and differentiated
    (`models.logprobs`), the larger of two moments.

    For the families posttrain's lean layers cover (`Arch.lean`: Llama, Mistral, Qwen2/3, OLMo 2, SmolLM2), whose
    logits are the output layer's product alone, `_LinearHeadLogps` computes them, and only the chunk's logits in
    the product's dtype are whole-chunk tensors (4 bytes in fp32, 2 in 16-bit): its forward casts, log-softmaxes and
    gathers them a block of rows at a time, and its backward writes their gradient over them a block at a time
    (`logit_block_bytes` counts a block's float32 tensors).

    Other families, and runs whose output layer is gathered inside the forward (FSDP, ZeRO-3: the logits come from
    the model's forward, `gather_logps`), run the model's own forward, under activation checkpointing where
    chunked (their forward may post-process the logits, e.g. Gemma 2's softcapping):
    - forward (and its recomputation in backward): the logits in the compute dtype (2 or 4 bytes), their fp32
      upcast when that is 16-bit (4), the fp32 log-softmax (4); the entropy the RL methods log adds
      4 + 4 + 1 + 4 + 4;
    - backward: the saved log-softmax, its incoming gradient and the gradient it returns (3 x 4 = 12).
    So 12 for SFT and DPO, 25 for GRPO, RLOO and PPO in fp32 (4 + 4 + 17) and 27 in 16-bit (2 + 4 + 4 + 17).
    Measured on CPU (fp32, 341 x 49,152 values, RSS with every large block mmapped): 12.0 for SFT and for PPO
    before it logged the entropy, 25.0 for GRPO. PPO's loss forward now asks `gather_logps`/`head_logps` for the
    entropy as GRPO's and RLOO's do (the same call, so the same bytes; not measured on its own). At a sampling
    temperature other than 1 (posttrain's default), logits / T is one more fp32 copy (+4): 29.0 measured for
    GRPO at T = 0.7.
    """
    if computes_own_logits(s):
        return s.act_bytes
    forward = s.act_bytes + (4.0 if s.act_bytes == 2 else 0.0) + 4.0
    if s.method in RL_METHODS:  # the entropy
        forward += 4.0 + 4.0 + 1.0 + 4.0 + 4.0
    return max(forward, 12.0)


def logit_block_bytes(s: Setup) -> float:
    """Peak bytes per (row, vocabulary) value of one block of `_LinearHeadLogps`'s float32 work (`logit_block_rows`
    rows), beside the chunk's logits; 0 where the model's forward computes the logits (`logit_value_bytes`).
    - forward: a 16-bit block's fp32 upcast (4; an fp32 block is read where it is) and its fp32 log-softmax (4);
      the RL methods' entropy, once the upcast is dropped: the log-softmax, p = exp(log-softmax), p x log-softmax, the p > 0
      mask, zeros and the masked product (4 + 4 + 4 + 1 + 4 + 4 = 21);
    - backward: the log-softmax, then its incoming gradient's zeros beside it, whose kernel writes the block's
      gradient over the log-softmax before it is cast back into the chunk (4 + 4 = 8; a 16-bit block's upcast is
      dropped before the zeros are made).
    So 8 for SFT and DPO and 21 for GRPO, RLOO and PPO (which logs the entropy too), in fp32 and 16-bit alike. Measured (every op's output tracked, a
    341 x 49,152 chunk, blocks of 42 rows): the chunk's logits (67.0 MB fp32, 33.5 MB bf16) and two blocks of
    8.3 MB at the forward's peak (one in fp32), 21 bytes per block value for GRPO's forward
    (benchmarks/README.md, fifteenth session).
    """
    if not computes_own_logits(s):
        return 0.0
    return 21.0 if s.method in RL_METHODS else 8.0


def logits_bytes(s: Setup) -> float:
    """The vocabulary-sized tensors of the loss as posttrain computes them (`models.logprobs`): only the positions
    that are scored are projected onto the vocabulary (`Setup.logit_tokens`), `logit_chunk_rows` of them at a
    time, each chunk's logits freed once reduced to one log-probability per row and recomputed in backward:
    chunk rows x V x `logit_value_bytes`, plus one block's float32 work where posttrain computes the logits itself
    (`logit_block_rows` x V x `logit_block_bytes`), plus the scored positions' hidden states, kept for that
    recomputation (N x h in the activation dtype). Under FSDP (posttrain's `run.sharding=fsdp2`) the scored rows are projected
    in one go inside the sharded forward, so all N rows count.

    A trainer that keeps the full (b, s, V) logits instead (Hugging Face's loss; TRL) holds b x s x V x 10 bytes
    in mixed precision: the logits, their fp32 upcast and the log-softmax kept for backward.
    """
    n = s.logit_tokens
    rows = n if s.sharding in UNCHUNKED_SHARDINGS else min(n, logit_chunk_rows(s))
    block = min(rows, logit_block_rows(s)) * s.arch.vocab * logit_block_bytes(s)
    return rows * s.arch.vocab * logit_value_bytes(s) + block + n * s.arch.hidden * s.act_bytes


def kv_cache_bytes(s: Setup) -> float:
    """KV cache for generating the rollouts: 2 (K, V) x L x kv_heads x head_dim x bytes x tokens x sequences
    (e.g. 128 KiB per token for Llama-3-8B in 16 bit). Only RL methods generate."""
    if s.method not in RL_METHODS:
        return 0.0
    a = s.arch
    return 2 * a.layers * a.kv_dim * s.act_bytes * s.seq_len * s.sequences


def rollout_buffer_bytes(s: Setup) -> float:
    """Per-token rollout tensors: int64 ids and mask, and fp32 old log-probs, reference log-probs, advantages
    (+ values and returns for PPO)."""
    if s.method not in RL_METHODS:
        return 0.0
    floats = 5 if s.method == "ppo" else 3
    return s.sequences * s.seq_len * (8 + 8 + 4 * floats)


def breakdown_bytes(s: Setup) -> dict[str, float]:
    """Every memory term of the setup, per GPU, in bytes."""
    n, stage = s.num_gpus, _stage(s)
    out = dict.fromkeys(CORE_TERMS, 0.0)
    out.update(model_states(s, s.arch))
    out["activations"] = activation_bytes(s)
    out["logits"] = logits_bytes(s)
    if s.reference == "model":
        # A frozen policy-sized copy, forward only; ZeRO-3/FSDP shard it like the policy. Under full fine-tuning
        # with autocast posttrain holds it as the policy is held (fp32), so its forward equals the untrained
        # policy's exactly; under QLoRA or 8-bit it is loaded with the run's technique (`models.reference`), so its
        # blocks are quantised as the policy's base is.
        ref = frozen_weight_bytes(s, s.arch, quantised=s.technique in ("qlora", "8bit"))
        if s.technique == "full" and s.precision == "bf16-mixed" and s.sharding not in DEEPSPEED_SHARDINGS:
            ref = s.arch.params * 4.0
        out["reference_model"] = ref / (n if stage >= 3 else 1)
    if s.reward_arch is not None:
        out["reward_model"] = frozen_weight_bytes(s, s.reward_arch, quantised=False) / (
            n if stage >= 3 else 1
        )
    if s.value_arch is not None:
        out["value_model"] = sum(model_states(s, s.value_arch).values())
    out["kv_cache"] = kv_cache_bytes(s)
    out["rollout_buffers"] = rollout_buffer_bytes(s)
    if stage >= 3 and n > 1 and not (s.technique in ("qlora", "8bit") and s.sharding == "zero3"):
        # [DS]; ZeRO-3 keeps a quantised base whole (`model_states`), so it gathers only the adapters: nothing kept
        out["gathered_params"] = 4 * s.arch.largest_layer_params
    if s.method in RL_METHODS and s.rollout_engine == "vllm":
        # vLLM holds its own 16-bit copy of the policy for generation.
        out["generation_weights"] = s.arch.params * 2.0
    return out


def peak_bytes(s: Setup, terms: dict[str, float] | None = None) -> float:
    """Peak per GPU: everything resident, plus the larger of the two phases of a step.

    Activations and logits live only while training on a batch; a Hugging Face `generate` KV cache only while
    generating, so they are not held together. vLLM keeps its KV cache allocated, so it counts as resident.
    """
    t = breakdown_bytes(s) if terms is None else terms
    train = t["activations"] + t["logits"]
    gen = t["kv_cache"] if s.rollout_engine == "hf" else 0.0
    resident = sum(t.values()) - train - gen
    return resident + max(train, gen)
