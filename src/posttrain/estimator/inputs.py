"""`EstimateInputs`: everything one estimate needs, validated once, with its defaults in one place.

Built once and passed through: by `posttrain estimate` from its flags, by the advisor from a task profile, by
`estimate(...)` from its keywords. Constructing one normalises names (aliases such as `amp` or `int8`) and
checks every value that can be checked without reading a model; `to_setup()` then resolves the model and the
method's companions (reference, reward model, critic) into a `memory.Setup`, stating each assumption it made.
A bad value raises `UserError` naming the input and what to choose instead.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, replace
from pathlib import Path

from posttrain.errors import UserError
from posttrain.estimator import memory
from posttrain.estimator.compute import DEFAULT_MFU
from posttrain.estimator.hardware import GPU
from posttrain.estimator.models import resolve_model

METHODS = ("sft", "reward", "dpo", "ppo", "grpo", "rloo")
TECHNIQUES = ("full", "lora", "qlora", "8bit")
PRECISIONS = ("bf16-mixed", "fp16-mixed", "bf16", "fp16", "fp32")
OPTIMIZERS = ("adamw", "adamw-8bit", "sgd")
REFERENCES = ("model", "adapter", "precomputed", "none")
ENGINES = ("hf", "vllm")
REFERENCE_METHODS = ("dpo", "ppo", "grpo", "rloo")
ATTENTIONS = ("flash", "eager")
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
# Defaults that depend on the method or technique, shared with the advisor (which sizes every stage with them)
# and stated in every result that used them.
# Micro-batch per GPU: sequences (sft), pairs (reward, dpo: two sequences each), prompts (ppo; grpo and rloo
# sample `group_size` completions for each, so 1 prompt is already 8 sequences at GRPO's default group size).
DEFAULT_MICRO_BATCH = {"sft": 4, "reward": 4, "dpo": 2, "ppo": 4, "grpo": 1, "rloo": 2}
# Completions per prompt when `group_size` is not given: GRPO's 8 (DeepSeekMath sampled 64; TRL and posttrain
# default to 8) and RLOO's k = 4 (Ahmadian et al. 2024 used k = 2 and 4; posttrain's `num_generations` default).
DEFAULT_GROUP_SIZE = {"grpo": 8, "rloo": 4}
# Gradient checkpointing: on for a quantised base, as peft's `prepare_model_for_kbit_training` (its
# `use_gradient_checkpointing=True` default) and the QLoRA paper's training script set it, since a k-bit base is
# chosen to save memory; off for full and LoRA, as `posttrain train` (`model.gradient_checkpointing: false`)
# and transformers' `TrainingArguments` default to.
DEFAULT_CHECKPOINTING = {"full": False, "lora": False, "qlora": True, "8bit": True}
_CHECKPOINTING_WHY = {
    True: "peft's prepare_model_for_kbit_training and the QLoRA paper's script turn it on",
    False: "as `posttrain train` defaults to",
}


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


def _rl_names() -> str:
    return ", ".join(memory.RL_METHODS[:-1]) + " and " + memory.RL_METHODS[-1]


def _positive(name: str, value) -> int:
    if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        raise UserError(f"{name} must be a positive integer; got {value!r}")
    return value


# Inputs chosen from a fixed list, and the values allowed.
_CHOICES = {
    "method": METHODS,
    "technique": TECHNIQUES,
    "precision": PRECISIONS,
    "optimizer": OPTIMIZERS,
    "sharding": tuple(memory.SHARD_STAGE),
    "rollout_engine": ENGINES,
    "attention": ATTENTIONS,
}
_COUNTS = ("batch_size", "seq_len", "lora_rank", "num_gpus", "group_size")


@dataclass(frozen=True)
class EstimateInputs:
    """One post-training setup and the hardware to price it on.

    >>> EstimateInputs(method="DPO", precision="amp").precision
    'bf16-mixed'
    """

    model: str | float = "7b"
    """A size (`7b`, `135m`, `7e9`), a known name (`llama-3-8b`), a hub name, or a local config.json (folder)."""
    method: str = "sft"
    """sft | reward | dpo | ppo | grpo | rloo."""
    technique: str = "full"
    """full | lora | qlora (NF4 base) | 8bit (LoRA on an int8 base)."""
    precision: str = "bf16-mixed"
    """bf16-mixed | fp16-mixed | bf16 | fp16 (pure 16-bit, no fp32 master) | fp32."""
    optimizer: str = "adamw"
    """adamw | adamw-8bit | sgd (with momentum)."""
    batch_size: int | None = None
    """Micro-batch per GPU: sequences (SFT), pairs (DPO, reward), prompts (PPO, GRPO); None: by method."""
    seq_len: int = 2048
    """Tokens per sequence, prompt + response."""
    gradient_checkpointing: bool | None = None
    """Full activation recomputation (each block keeps only its input; one more forward); None: by technique."""
    lora_rank: int = 16
    """LoRA rank; adapters on every linear layer of every block."""
    lora_dropout: float = 0.0
    """LoRA dropout; above 0 it stores a dropped-out copy of each adapted input."""
    num_gpus: int = 1
    """Data-parallel GPUs."""
    sharding: str = "none"
    """none/ddp | zero1 | zero2 | zero3 | fsdp (= ZeRO-3) | fsdp-grad-op (= ZeRO-2)."""
    group_size: int | None = None
    """Completions per prompt (GRPO's G, RLOO's k); None: by method (`DEFAULT_GROUP_SIZE`)."""
    completion_len: int | None = None
    """Generated tokens per sequence (PPO, GRPO), part of `seq_len`; None: half of `seq_len`."""
    tokens: float | None = None
    """Sequence tokens trained on in total, for time and cost; None: `DEFAULT_TOKENS`."""
    gpu: str | None = None
    """The GPU time and cost are computed for (a table name); None: the smallest that holds the setup."""
    gpu_memory_gb: float | None = None
    """A GPU known only by its memory (throughput and price of the cheapest table GPU at least as large)."""
    gpu_table: str | Path | dict[str, GPU] | None = None
    """A YAML/JSON file changing or adding GPUs, or a table already loaded."""
    reference: str | None = None
    """DPO/PPO/GRPO reference: model | adapter | precomputed (DPO) | none (GRPO, beta = 0); None: by technique."""
    reward_model: str | None = None
    """A learned reward model (size or name) held in memory (PPO, GRPO)."""
    reward_function: bool = False
    """The reward is computed by a program (PPO, GRPO)."""
    value_model: str | None = None
    """PPO critic: `head`, a value head on the policy (posttrain's PPO; the default, None), or a separate critic's
    size or name (`policy`: the policy's own)."""
    rollout_engine: str = "hf"
    """hf (generate; KV cache freed before training) | vllm (a resident engine with its own weights)."""
    attention: str = "flash"
    """flash/sdpa (no s x s scores kept) | eager."""
    mfu: float = DEFAULT_MFU
    """Assumed fraction of the dense bf16 peak reached by training matmuls."""

    def __post_init__(self):
        for name, allowed in _CHOICES.items():
            object.__setattr__(self, name, _choice(name, getattr(self, name), allowed))
        for name in _COUNTS:
            if not (name in ("batch_size", "group_size") and getattr(self, name) is None):  # None: by method
                _positive(name, getattr(self, name))
        if self.tokens is not None and (
            isinstance(self.tokens, bool) or not isinstance(self.tokens, (int, float)) or self.tokens <= 0
        ):
            raise UserError(f"tokens must be a positive number of training tokens; got {self.tokens!r}")
        if not 0 < self.mfu <= 1:
            raise UserError(f"mfu must be a fraction in (0, 1]; got {self.mfu!r}")
        if not 0 <= self.lora_dropout < 1:
            raise UserError(f"lora_dropout must be in [0, 1); got {self.lora_dropout!r}")
        if self.gpu is not None and self.gpu_memory_gb is not None:
            raise UserError(f"gpu={self.gpu!r} and gpu_memory_gb={self.gpu_memory_gb!r} both name the GPU; give one "
                            "(gpu_memory_gb prices the cheapest table GPU at least that large)")  # fmt: skip
        if self.gpu_memory_gb is not None and not self.gpu_memory_gb > 0:
            raise UserError(f"gpu_memory_gb must be a positive size in GB; got {self.gpu_memory_gb!r}")
        self._check_rl()
        self._check_reference()
        if self.group_size is not None and self.method not in memory.GROUP_METHODS:
            raise UserError(f"group_size={self.group_size!r} applies to {' and '.join(memory.GROUP_METHODS)} only (they "
                            f"sample a group of completions per prompt), not to {self.method}")  # fmt: skip
        if self.group_size is not None and self.group_size < 2:
            raise UserError(f"group_size={self.group_size} gives no baseline: {self.method} compares each completion "
                            "with the others of its group, so it needs at least 2 (posttrain train refuses fewer)")  # fmt: skip

    def _check_rl(self) -> None:
        if self.method not in memory.RL_METHODS:
            if self.reward_model is not None or self.value_model is not None:
                raise UserError(
                    f"reward_model and value_model apply to {_rl_names()} only, not to {self.method}"
                )
            given = [f"{k}={getattr(self, k)!r}" for k, default in (("completion_len", None),
                     ("rollout_engine", "hf"), ("reward_function", False)) if getattr(self, k) != default]  # fmt: skip
            if given:
                verb = "applies" if len(given) == 1 else "apply"
                raise UserError(f"{', '.join(given)} {verb} to {_rl_names()} only (they generate), not to "
                                f"{self.method}")  # fmt: skip
            return
        if self.value_model is not None and self.method != "ppo":
            raise UserError(f"value_model={self.value_model!r} applies to ppo only: {self.method} has no critic (its "
                            "baseline comes from the sampled group)")  # fmt: skip
        if (
            self.completion_len is not None
            and _positive("completion_len", self.completion_len) >= self.seq_len
        ):
            raise UserError(
                f"completion_len ({self.completion_len}) must be smaller than seq_len ({self.seq_len}): seq_len "
                "counts the prompt plus the completion"
            )
        if self.method == "ppo" and self.reward_model is None and not self.reward_function:
            raise UserError(
                "ppo needs a reward source: pass reward_model (a learned reward model held in memory, e.g. "
                "reward_model='7b') or reward_function=True (a program computes the reward). With a program "
                "and no critic budget, grpo is the usual choice."
            )

    def _check_reference(self) -> None:
        if self.reference is None:
            return
        if self.method not in REFERENCE_METHODS:
            if self.reference != "none":
                raise UserError(f"reference={self.reference!r}: {self.method} uses no reference model")
            return
        ref = _choice("reference", self.reference, REFERENCES)
        object.__setattr__(self, "reference", ref)
        if ref == "adapter" and self.technique == "full":
            raise UserError(
                "reference='adapter' needs a LoRA technique (lora, qlora, 8bit): full fine-tuning has no "
                "adapters to disable"
            )
        if ref == "precomputed" and self.method != "dpo":
            raise UserError(
                f"reference='precomputed' works for dpo only: {self.method} needs log-probs of fresh samples"
            )

    def to_setup(self) -> tuple[memory.Setup, list[str]]:
        """The resolved `memory.Setup`, and every assumption made on the way, in words."""
        arch, notes = resolve_model(self.model)
        s = memory.Setup(
            arch=arch,
            method=self.method,
            technique=self.technique,
            precision=self.precision,
            optimizer=self.optimizer,
            batch_size=self._batch_size(notes),
            seq_len=self.seq_len,
            gradient_checkpointing=self._checkpointing(notes),
            lora_rank=self.lora_rank,
            lora_dropout=float(self.lora_dropout),
            num_gpus=self.num_gpus,
            sharding=self.sharding,
            group_size=self._group_size(notes),
            rollout_engine=self.rollout_engine,
            attention=self.attention,
        )
        if s.method in memory.RL_METHODS:
            completion = self.completion_len
            if completion is None:
                completion = s.seq_len // 2
                notes.append(f"completion_len not given: half of seq_len ({completion} generated tokens)")
            s = replace(s, completion_len=completion)
        s = self._with_reference(s, notes)
        return self._with_reward_and_critic(s, notes), notes

    def _batch_size(self, notes: list[str]) -> int:
        if self.batch_size is not None:
            return self.batch_size
        n = DEFAULT_MICRO_BATCH[self.method]
        unit = {"reward": "pairs", "dpo": "pairs", "ppo": "prompts", "grpo": "prompt", "rloo": "prompts"}.get(
            self.method, "sequences"
        )
        advise = "" if self.method == "rloo" else " (as `posttrain advise` sizes it)"  # advise plans no RLOO stage
        notes.append(f"batch_size not given: micro-batch {n} {unit} per GPU, the {self.method} default{advise}; set "
                     "batch_size (--batch-size) to change it")  # fmt: skip
        return n

    def _group_size(self, notes: list[str]) -> int:
        if self.method not in memory.GROUP_METHODS:
            return memory.Setup.group_size  # not read
        if self.group_size is not None:
            return self.group_size
        n = DEFAULT_GROUP_SIZE[self.method]
        notes.append(f"group_size not given: {n} completions per prompt, the {self.method} default; set group_size "
                     "(--group-size) to change it")  # fmt: skip
        return n

    def _checkpointing(self, notes: list[str]) -> bool:
        if self.gradient_checkpointing is not None:
            return bool(self.gradient_checkpointing)
        on = DEFAULT_CHECKPOINTING[self.technique]
        flag = (
            "gradient_checkpointing=False (--no-gradient-checkpointing)"
            if on
            else ("gradient_checkpointing=True (--gradient-checkpointing)")
        )
        notes.append(
            f"gradient checkpointing {'on' if on else 'off'}: the default for {self.technique} "
            f"({_CHECKPOINTING_WHY[on]}); {flag} to change it"
        )
        return on

    def _with_reference(self, s: memory.Setup, notes: list[str]) -> memory.Setup:
        """DPO, PPO, GRPO and RLOO (their KL terms) need reference log-probs. By default the source `posttrain train`
        picks at its algorithm's defaults (`reference_mode` in algorithms/dpo.py and rl.py): the base with the
        adapters disabled under a LoRA technique; under full fine-tuning DPO precomputes them, GRPO (beta 0 by
        default, its KL logged only when the adapter gives it for free) needs none, and PPO and RLOO (KL
        coefficients 0.05) hold a frozen copy."""
        if s.method not in REFERENCE_METHODS:
            return s
        reference = self.reference
        if reference is None:
            if s.technique != "full":
                reference = "adapter"
            else:
                reference = {"dpo": "precomputed", "grpo": "none"}.get(s.method, "model")
            source = {
                "adapter": "the base with adapters disabled",
                "model": "a frozen copy of the policy",
                "precomputed": "a pass over the pairs before training (no second model held), as `posttrain train` "
                               "does for full fine-tuning",
                "none": "nowhere: GRPO's default beta = 0 needs no reference under full fine-tuning, as `posttrain "
                        "train` runs it; pass reference='model' for a KL term",
            }[reference]  # fmt: skip
            notes.append(f"reference log-probs from {source}")
        return replace(s, reference=reference)

    def _with_reward_and_critic(self, s: memory.Setup, notes: list[str]) -> memory.Setup:
        if s.method == "ppo":
            # value_model="head" is posttrain's own PPO: a scalar head on the policy's last hidden state.
            if self.value_model in (None, "head"):
                s = replace(s, value_arch=None, value_head=True)
                why = ("value_model not given: " if self.value_model is None else "") + (
                    "a value head on the policy backbone, as posttrain train's PPO holds it: no separate critic in "
                    "memory or compute")
                notes.append(why + ("; --value-model SIZE (or policy) for a separate critic" if self.value_model is None
                                    else ""))  # fmt: skip
            else:
                value_arch = s.arch if self.value_model == "policy" else resolve_model(self.value_model)[0]
                s = replace(s, value_arch=value_arch)
                notes.append(
                    f"PPO critic: {value_arch.name}, trained with the policy's technique ({s.technique})"
                )
        if s.method in memory.RL_METHODS:
            if self.reward_model is not None:
                s = replace(s, reward_arch=resolve_model(self.reward_model)[0])
            else:
                notes.append(f"{s.method}: reward computed by a program, no reward model in memory")
        return s
