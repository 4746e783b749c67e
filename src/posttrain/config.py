"""Typed run configuration: the sections every run shares, the base of every method's own section, YAML and
dotted command-line overrides, and validation.

A run is described by one `RunConfig` (model, technique, data, algorithm, optimisation, run folder). Its
`algorithm` section is a union told apart by `name`: each method declares its own section next to its loss
(`posttrain.algorithms.<method>.Config`, a subclass of `AlgorithmSection`), and `posttrain.algorithms` builds
`RunConfig` from the methods it finds, so adding a method changes nothing here. This module holds what does not
depend on the method: the shared sections, the `RunBase` they sit in and its checks, the sections the RL methods
share (`RLSection`, `RolloutSection`), reading YAML (a key written twice is an error), dotted overrides, writing
the resolved `config.yaml`, and `--help-config`'s field list. Unknown keys, wrong types, impossible values and
settings the chosen method and technique would not read (`config_rules`) raise `ConfigError` with the dotted
field name and what to change.

This module does not load models or data; it only describes and checks them.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
import shlex
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from posttrain.config_names import other_name
from posttrain.config_rules import When, is_, is_not, unread_settings
from posttrain.errors import ConfigError
from posttrain.files import write_whole
from posttrain.yamlfile import line_of, load_yaml, yaml_problem


class FieldError(ValueError):
    """A section's check that is about one of its fields: `format_validation_error` names that field (pydantic
    locates a section's own check at the section)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class _Section(BaseModel):
    # extra="forbid": an unknown key is an error, never silently ignored (a typo like `optim.l_r`).
    # use_attribute_docstrings: the docstring under each field is its description (shown by --help-config).
    # allow_inf_nan=False: inf and nan are refused in every number field (optim.lr=inf trained into a NaN loss at
    # step 2, blamed on the data; run.epochs=inf and a nan reward_fallback raised tracebacks).
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True,
                              allow_inf_nan=False)  # fmt: skip

    @model_validator(mode="before")
    @classmethod
    def _no_boolean_numbers(cls, data):
        """A number field refuses a boolean, which pydantic would take as 1 or 0: YAML reads yes, no, on, off, true
        and false as booleans, so `lr: yes` would train at lr 1.0 and `max_steps: on` run one step. (A section's
        check, not a field's: a wildcard field validator would also run on the method's discriminator.)"""
        if isinstance(data, dict):
            for name, value in data.items():
                field = cls.model_fields.get(name) if isinstance(name, str) else None
                if isinstance(value, bool) and field is not None and _numbers_only(field.annotation):
                    raise FieldError(name, f"{name} needs a number, got {str(value).lower()} (YAML reads yes, no, "
                                           "on, off, true and false as booleans)")  # fmt: skip
        return data


def _numbers_only(annotation) -> bool:
    """Whether a field's type takes numbers and not booleans (int, float, optional or in a union with None).

    >>> _numbers_only(float), _numbers_only(int | None), _numbers_only(bool), _numbers_only(str)
    (True, True, False, False)
    """
    kinds = set(typing.get_args(annotation)) or {annotation}
    kinds.discard(type(None))
    return bool(kinds) and kinds <= {int, float}


class ModelConfig(_Section):
    name: str = Field("smollm2-135m-instruct", min_length=1)
    """The embedded default `smollm2-135m-instruct`, a local Hugging Face folder, a `.gguf` file, or a hub name."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Compute dtype; `auto` is float32 on CPU and bfloat16 on a GPU that supports it. bfloat16 trains in mixed
    precision, the standard way: weights that train stay float32 (the master copy, with float32 gradients and
    AdamW state) and the forward autocasts to bfloat16 through Accelerate; a frozen base (LoRA/QLoRA) is held in
    bfloat16. float16 is refused for training (it needs loss scaling); see `pure_bf16` for bfloat16 weights."""
    pure_bf16: bool = False
    """With dtype bfloat16: hold the trained weights, their gradients and AdamW's state in bfloat16 too, with no
    float32 master copy. Half the memory of the trained weights' states (8 instead of 16-18 bytes per parameter
    under full fine-tuning), but an update smaller than about 1/256 of a weight rounds to nothing, so small
    learning rates train little or nothing (docs/models.md has the measurement)."""
    dropout: Literal["auto", "keep", "off"] = "auto"
    """The model's own dropout (attention, residual, embedding dropout from its config; LoRA's is
    `technique.dropout`) while training. `off` sets every dropout of the architecture to 0, `keep` leaves it as the
    model ships it. `auto`: off for reward, dpo, grpo and ppo (as preference and RL trainers do: dropout makes the
    policy's log-probs noisy, so a DPO step-1 loss is not log 2 and the PPO/GRPO ratio of an unchanged policy is
    not 1), keep for sft. Most recent LLMs ship 0 anyway; GPT-2, OPT and Phi-1/2 ship 0.1. Reference and old
    log-prob forwards always run in eval mode (no dropout). `keep` or `off` on a model whose every rate is 0
    is said as the model loads. YAML reads a bare `off` as false, which means `off` here."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 33% more compute."""
    rebuild_pointwise: bool = True
    """Rebuild cheap pointwise results in backward instead of keeping them (Llama, Mistral, Qwen2/3, OLMo2 layers:
    the MLP product, each RMSNorm's output, the per-head key/value copies; `models.layers.lean_layers`): the same
    results bit for bit, about 40% fewer activations kept (SmolLM2-135M SFT full: peak 4.1 -> 3.4 GB), for no
    extra matrix products but a few percent more step time (benchmarks/README.md). `false` keeps them. Off under
    DeepSpeed ZeRO-3, with a note (its partitioned norm weights are not gathered where the rebuild runs)."""
    compile: bool = False
    """Compile each decoder layer with `torch.compile` (inductor) for training: fused pointwise kernels, faster
    steps once compiled (SmolLM2-135M on 2 CPU cores: SFT full 64-65% -> 73-76% of the GEMM rate, LoRA steps
    7-13% shorter; benchmarks/README.md), for a compile of 12-32 s at the first step. Forwards without gradients
    (sampling, reference scoring, evaluation) run uncompiled. Results are within float rounding of the uncompiled
    run, not bit for bit. The compiler chooses what backward keeps (`compile_memory_budget`) in place of
    `rebuild_pointwise`, which is then not read. One process, every method, full or LoRA, float32; other
    combinations are refused (not tried)."""
    compile_memory_budget: float | None = Field(default=None, gt=0, le=1)
    """With `compile`: the share (0-1] of a layer's activation memory backward may keep (torch's
    `activation_memory_budget`); lower recomputes more of the cheap pointwise work in backward instead (SFT LoRA
    on SmolLM2-135M, batch 8: 2.7 GB at 1, 1.9 GB at 0.3, the uncompiled step time). null: 1, the fastest."""
    trust_remote_code: bool = False
    """Allow model code from the hub repository (only for models you trust)."""

    @field_validator("dropout", mode="before")
    @classmethod
    def _bare_off(cls, value):
        # YAML 1.1 reads `dropout: off` (and `model.dropout=off` on the command line) as the boolean false
        return "off" if value is False else value


class TechniqueConfig(_Section):
    name: Literal["full", "lora", "qlora"] = "lora"
    """`full` trains every weight; `lora` trains low-rank adapters; `qlora` adds a 4-bit NF4 frozen base."""
    r: int = Field(16, gt=0)
    """LoRA rank."""
    alpha: float = Field(32.0, gt=0)
    """LoRA scaling numerator: the update is scaled by alpha / r."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the LoRA input. 0 lets peft skip a dropped-out copy of every adapted layer's input (measured
    here: ~0.7 GB less peak memory for SmolLM2-135M at 8 x 140 tokens, and faster); the QLoRA paper used
    0.05-0.1 to regularise small datasets."""
    target_modules: str | list[str] = "all-linear"
    """Modules that get adapters: `all-linear` (every linear layer but the LM head), a list of names, or one
    regular expression that a module's full name must match (peft's reading of a string)."""

    @field_validator("target_modules")
    @classmethod
    def _a_pattern_compiles(cls, value):
        if isinstance(value, str) and value != "all-linear":
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(f"a single name is read as a regular expression, and {value!r} is not one ({err}); "
                                 "write a list of module names, e.g. [q_proj, v_proj]") from None  # fmt: skip
        return value
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """QLoRA 4-bit data type."""
    double_quant: bool = True
    """QLoRA double quantisation of the block constants (about 0.37 bit/param saved)."""


class DataConfig(_Section):
    train: str | None = None
    """Training file (.jsonl, .json, .csv, .parquet or a `datasets` folder)."""
    eval: str | None = None
    """Optional held-out file (sft, reward, dpo): its loss is evaluated every `run.eval_every` steps and at the
    end; without `run.eval_every`, at the end only."""
    max_length: int = Field(512, gt=0)
    """Examples are truncated to this many tokens (a counted warning says how many were)."""
    train_on: Literal["completion", "all"] = "completion"
    """Which tokens the loss counts: only the assistant/completion tokens, or every token."""
    packing: bool = False
    """Pack several examples into one row of `max_length` tokens; examples never attend to each other."""
    share_prompt: bool = True
    """dpo, grpo, rloo: score the sequences that begin with the same prompt (a preference pair; a group's
    completions) in one row each, the prompt once, then every continuation, under an attention mask that lets each
    continuation see the prompt and its own tokens only (Wang & Hegde 2024, prefix sharing): the same log-probs
    and gradients (float rounding aside) from fewer tokens. For the policy, reference and old log-prob forwards.
    Inside a run, models whose attention runs one example at a time (`logprobs.packed_rows`) take every group in
    one row with no mask, attention per sequence, where that keeps less for backward (`logprobs._one_row_pays`). Models whose attention cannot take such a mask (flash-attention,
    flex attention, a sliding window shorter than the row) run the padded rows instead, with a note; so do training
    forwards while dropout is on (LoRA's `technique.dropout`, `model.dropout: keep`), where each row must draw its
    own masks. false: always padded rows (docs/preference.md).
    sft: the tokens every row of a micro-batch begins with (a system prompt, shared instructions) run once, where
    the rows run as one packed row (models of the packable families with sdpa attention; not while dropout is
    on), each example attending to them and its own tokens (docs/data.md)."""
    shuffle: bool = True
    """Shuffle examples every epoch (deterministically from `run.seed`)."""
    columns: dict[str, str | list[str]] = Field(default_factory=dict)
    """The file's own column names for the fields posttrain reads, field: column, e.g. `{prompt: question,
    completion: answer}` (applied to `data.train` and `data.eval`); a list of text columns is joined in order by a
    blank line, e.g. Alpaca's `{prompt: [instruction, input], completion: output}` (an empty one left out). Refused
    before the model loads: a field the method's rows do not read, and a column that no row of `data.train` has
    (`data.eval` may lack one; docs/data.md)."""
    ignore_columns: list[str] = []
    """Columns of the file to leave out, e.g. `[source, category]`: SFT and preference rows refuse columns they do
    not read, and prompts rows pass every column to the reward functions. `COLUMN.KEY` leaves a key out of every
    message of COLUMN (ShareGPT's `conversations.weight`). A name no row of `data.train` has is refused."""
    message_keys: dict[str, str] = Field(default_factory=dict)
    """The keys the file's messages hold a role and a text under, key: the file's key, e.g. ShareGPT's
    `{role: from, content: value}`; for every message list (messages, prompt, completion, chosen, rejected). A key no
    message of `data.train` has is refused."""
    roles: dict[str, str] = Field(default_factory=dict)
    """The file's names for the roles, role: the file's name, e.g. ShareGPT's `{user: human, assistant: gpt}`
    (system, user, assistant). A name no message of `data.train` has is refused."""
    turns: dict[str, str] = Field(default_factory=dict)
    """The text that opens each role's turn in a transcript string, role: marker, e.g. Anthropic HH's `{user:
    "\\n\\nHuman:", assistant: "\\n\\nAssistant:"}` (double quotes in YAML read \\n as a newline). A string in a
    message field (messages, prompt, completion, chosen, rejected) that holds a marker reads as its turns; a
    prompt's closing `"\\n\\nAssistant:"` with nothing after it is the cue to answer and is left out. Needs the
    user's and the assistant's markers; a marker no text of `data.train` holds is refused (docs/data.md)."""
    skip_bad_rows: bool = False
    """Rows that cannot be read as the method's rows (a missing field, an empty response, a pair with no
    preference) are left out instead of refusing the file, and the run says how many and which, with their
    problems: for a downloaded dataset with a few malformed rows (Anthropic HH holds pairs with an empty response).
    A problem of the file or of the settings (a column no row has) still refuses it, and so does a file with no
    usable row."""
    chat_template_kwargs: dict[str, bool | int | float | str] = Field(default_factory=dict)
    """Values for the chat template's own variables, e.g. `{enable_thinking: false}` for Qwen3 (its generation
    prompt then ends with an empty think block and answers follow it). Written into the template
    (`data.render.set_template_variables`), so training rows, sampled prompts, evaluation and the tokenizer saved
    with the model all render with them. Refused before the model loads for a tokenizer without a chat template
    and for a name the template never mentions."""


# The fields each kind of file reads (data/schema.py's row shapes and their optional keys); prompts files keep
# every other column too, for the reward functions, so any name may be a rename's target there.
DATA_FIELDS: dict[str, tuple[str, ...]] = {
    "sft": ("messages", "prompt", "completion", "system", "text", "id", "answer", "metadata"),
    "preference": ("prompt", "chosen", "rejected", "system", "rejected_kind", "margin", "id", "answer", "metadata"),
    "prompts": ("prompt", "system", "id", "answer"),
}


def column_problems(rename: Mapping[str, str | list[str]], ignore: Iterable[str], kind: str | None,
                    source: tuple[str, str] = ("data.columns", "data.ignore_columns")) -> list[str]:  # fmt: skip
    """What is wrong with the settings themselves (checked with the config, before any file is read).
    `kind`: the kind of file the run reads (None: not known, the field names are not checked).

    >>> column_problems({"prompt": "q", "completion": "q"}, [], "sft")
    ["data.columns: prompt and completion both read column 'q': a column can be read as one field"]
    >>> column_problems({"response": "output"}, ["output"], "sft")
    ["data.columns: 'response' is not a field of sft rows (they read: messages, prompt, completion, system, text, id, answer, metadata)", "column 'output' is both renamed (data.columns) and left out (data.ignore_columns)"]
    """
    out: list[str] = []
    by_column: dict[str, list[str]] = {}
    for ours, theirs in rename.items():
        for column in [theirs] if isinstance(theirs, str) else theirs:
            by_column.setdefault(column, []).append(ours)
    out += [f"{source[0]}: {ours!r} joins no column" for ours, theirs in rename.items() if not theirs]
    out += [f"{source[0]}: {' and '.join(fs)} both read column {c!r}: a column can be read as one field"
            if len(set(fs)) > 1 else f"{source[0]}: {fs[0]} reads column {c!r} twice"
            for c, fs in by_column.items() if len(fs) > 1]  # fmt: skip
    if kind is not None and kind != "prompts":
        out += [f"{source[0]}: {ours!r} is not a field of {kind} rows (they read: {', '.join(DATA_FIELDS[kind])})"
                for ours in rename if ours not in DATA_FIELDS[kind]]  # fmt: skip
    out += [f"{source[0]}: {ours!r} -> {theirs!r} renames a column to itself" for ours, theirs in rename.items()
            if ours == theirs]  # fmt: skip
    out += [f"column {c!r} is both renamed ({source[0]}) and left out ({source[1]})" for c in ignore if c in by_column]
    return out


def message_problems(message_keys: Mapping[str, str], roles: Mapping[str, str],
                     source: tuple[str, str] = ("data.message_keys", "data.roles")) -> list[str]:  # fmt: skip
    """What is wrong with `data.message_keys` (role/content -> the file's key) and `data.roles` (system, user,
    assistant -> the file's role name), checked with the config.

    >>> message_problems({"role": "from", "text": "value"}, {"user": "human", "bot": "gpt"})
    ["data.message_keys: 'text' is not a key of a message (they read: role, content)", "data.roles: 'bot' is not a role (they are: system, user, assistant)"]
    >>> message_problems({"role": "x", "content": "x"}, {"user": "human", "assistant": "human"})
    ["data.message_keys: role and content both read the key 'x'", "data.roles: user and assistant both read the role 'human'"]
    """
    out: list[str] = []
    for name, mapping, valid, what, noun in ((source[0], message_keys, ("role", "content"), "a key of a message (they read", "key"),
                                             (source[1], roles, ("system", "user", "assistant"), "a role (they are", "role")):  # fmt: skip
        out += [f"{name}: {ours!r} is not {what}: {', '.join(valid)})" for ours in mapping if ours not in valid]
        by: dict[str, list[str]] = {}
        for ours, theirs in mapping.items():
            by.setdefault(theirs, []).append(ours)
        out += [f"{name}: {' and '.join(fs)} both read the {noun} {t!r}" for t, fs in by.items() if len(fs) > 1]
    return out


# A backslash and n or t in a setting's text, where a newline or a tab was meant: YAML's single quotes (and plain
# scalars) keep \n as two characters (\n\n, \nQuestion:). Followed by a lowercase letter it is LaTeX's (\nabla,
# \text, \tag); tests/unit/test_config.py holds both kinds.
_LITERAL_ESCAPE = re.compile(r"\\[nt](?=$|[\\\sA-Z0-9:#*_-])")


def turn_problems(turns: Mapping[str, str], source: str = "data.turns") -> list[str]:
    """What is wrong with `data.turns` (system, user, assistant -> the text that opens its turn in a transcript).

    >>> turn_problems({"user": "Human:", "bot": "Bot:", "assistant": " "})
    ["data.turns: 'bot' is not a role (they are: system, user, assistant)", 'data.turns: the marker of assistant is blank']
    >>> turn_problems({"user": "A:", "assistant": "A:"}), turn_problems({"user": "Human:"})
    (["data.turns: user and assistant both open with 'A:'"], ["data.turns: a transcript needs the user's and the assistant's markers (assistant's is missing)"])
    """
    out = [f"{source}: {role!r} is not a role (they are: system, user, assistant)" for role in turns
           if role not in ("system", "user", "assistant")]  # fmt: skip
    out += [f"{source}: the marker of {role} is blank" for role, marker in turns.items() if not marker.strip()]
    out += [f"{source}: the marker of {role}, {marker!r}, holds a backslash and a letter, not a newline: YAML's "
            'single quotes keep \\n as two characters; write it in double quotes ("\\n\\nHuman:")'
            for role, marker in turns.items() if _LITERAL_ESCAPE.search(marker)]  # fmt: skip
    by: dict[str, list[str]] = {}
    for role, marker in turns.items():
        if marker.strip():
            by.setdefault(marker.strip(), []).append(role)
    out += [f"{source}: {' and '.join(rs)} both open with {m!r}" for m, rs in by.items() if len(rs) > 1]
    if turns and (missing := [f"{r}'s" for r in ("user", "assistant") if r not in turns]):
        out.append(f"{source}: a transcript needs the user's and the assistant's markers "
                   f"({' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing)")
    return out


def vllm_available() -> bool:
    """Whether the optional vllm package can be imported (looked up, not imported: it is heavy)."""
    return importlib.util.find_spec("vllm") is not None


class RolloutSection(_Section):
    engine: Literal["hf", "vllm", "vllm-server"] = "hf"
    """Sampling engine: `hf`, transformers `generate` (any machine); `vllm`, vLLM in the training process on a GPU
    (`pip install "posttrain[vllm]"`); `vllm-server`, a separate generation process started with `posttrain
    vllm-serve` (e.g. on its own GPU) at `vllm_server_url`, which the run pushes its weights to (vLLM is needed
    there, not in the training process). Both vLLM modes: designed for, not yet run on a GPU (docs/scale.md)."""
    vllm_gpu_memory_utilization: float = Field(0.3, gt=0, lt=1)
    """`engine: vllm`: the share of the GPU's memory vLLM takes for its weights and KV cache (the rest is
    training's)."""
    vllm_sleep: bool = True
    """`engine: vllm`: put vLLM to sleep between rollouts (weights to CPU memory, KV cache freed), so training gets
    its GPU memory back."""
    vllm_server_url: str | None = None
    """`engine: vllm-server`: the address `posttrain vllm-serve` printed, `http://HOST:PORT` (required)."""
    vllm_server_timeout: float = Field(300.0, gt=0)
    """`engine: vllm-server`: seconds to wait at the start of training for the server to answer (it may still be
    loading its model); then the run stops with what to check. Finite (.inf is refused): 1e9 waits as long."""
    batch_size: int | None = Field(None, gt=0)
    """Completions sampled per rollout (over all processes). Default: `optim.batch_size`."""
    epochs: int = Field(1, gt=0)
    """Optimisation passes over each rollout batch (GRPO's mu, PPO's epochs); old log-probs are kept."""
    max_new_tokens: int = Field(128, gt=0)
    """Longest completion, in tokens."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature; the loss scores tokens with the same temperature."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling threshold."""
    stop: list[str] = []
    """Stop strings: a completion ends with the first one (kept, and trained on; cut from the text the rewards
    see). An empty one would end every completion at its first token: refused."""

    @field_validator("stop")
    @classmethod
    def _stop_strings_that_can_stop(cls, value):
        if any(not s for s in value):
            raise ValueError("an empty stop string would end every completion at its first token; remove it")
        if literal := next((s for s in value if _LITERAL_ESCAPE.search(s)), None):
            raise ValueError(f"{literal!r} holds a backslash and a letter, not a newline or a tab: YAML's single "
                             "quotes keep \\n as two characters, which a model never writes, so it would never stop "
                             'there; write it in double quotes ("\\n\\n")')  # fmt: skip
        return value
    generation_batch_size: int | None = Field(None, gt=0)
    """Sequences per `generate` call (memory bound); default: the whole rollout."""
    merge_adapters: bool | None = None
    """LoRA, `hf` engine: sample from a merged copy of each adapted weight, W + (alpha / r) B A, with the adapters
    off: one matrix product per adapted layer instead of three and an add (a GRPO rollout of the embedded model
    ~10% faster on CPU, benchmarks/README.md), the same distribution up to float rounding. The copies are held
    while sampling only: one copy of the adapted weights (0.42 GB for the embedded model in fp32; ~13 GB for a 7B
    model in bf16). null: on CPU, not on a GPU, where that memory is scarcer (merged sampling on a GPU is designed
    for, not measured); true: wherever the model runs; false: never."""
    dtype: Literal["bfloat16"] | None = None
    """`hf` engine, a float32 run: sample from a bfloat16 copy of the weights (and a bfloat16 KV cache) while
    training stays in float32. On a CPU with bfloat16 instructions (AVX512-BF16, AMX) decoding is 1.8-2.1x faster
    (the embedded model, benchmarks/README.md); on one without them it is likely slower (a note says so at
    launch). The samples then come from the bfloat16 model's distribution, not exactly the trained one: the losses
    score them with the float32 weights, the rollout logs the gap between the two (`logp_gap_sampler_trainer`),
    and `tis_cap` can correct for it (docs/rl.md). The copy costs the weights' size in bfloat16 while sampling.
    null: sample in the run's own dtype. Refused where the run already computes in bfloat16, with QLoRA, and for a
    sharded model."""
    overlong: Literal["score", "fixed", "filter", "soft"] = "score"
    """What a truncated completion (`max_new_tokens` reached with no EOS or stop string) gets (docs/rl.md):
    `score` its rewards, like a finished one (reward functions see a `truncated` column; a reward model scores it
    with the assistant turn left open); `fixed` the total reward `overlong_reward` instead (Huang et al. 2024);
    `filter` no loss, while its reward still counts in GRPO's group mean and std (DAPO's overlong filtering);
    `soft` DAPO's soft overlong punishment, added to every completion's reward: 0 up to `max_new_tokens -
    overlong_cache` tokens, then down linearly to -1 at `max_new_tokens`."""
    overlong_reward: float = -1.0
    """`overlong: fixed`: the total reward of every truncated completion, in place of the scored one."""
    overlong_cache: int | None = Field(None, gt=0)
    """`overlong: soft`: L_cache, the last tokens before `max_new_tokens` over which the penalty goes from 0 to -1;
    null: max_new_tokens // 5, at least 1 (DAPO: 4096 of 20480)."""
    tis_cap: float | None = Field(None, ge=1)
    """Truncated importance sampling (Yao et al. 2025; docs/rl.md): weight each token's policy-gradient term by
    min(pi_old(y_t) / pi_sampler(y_t), tis_cap), the trainer's probability of the token under the sampling weights
    over the one the engine reported, to correct for an engine (vLLM) whose probabilities differ from the
    trainer's. null: off (weight 1). A cap of 2 is common."""

    @model_validator(mode="after")
    def _check_overlong_cache(self) -> RolloutSection:
        if self.overlong_cache is not None and self.overlong_cache > self.max_new_tokens:
            raise ConfigError(
                f"algorithm.rollout.overlong_cache ({self.overlong_cache}) must be at most "
                f"algorithm.rollout.max_new_tokens ({self.max_new_tokens}): the penalty starts that many tokens "
                "before the limit"
            )
        return self


class AlgorithmSection(_Section):
    """The `algorithm:` section of a run: each method subclasses it next to its loss
    (`posttrain.algorithms.<method>.Config`) with `name` fixed to its own name and the settings it reads.

    What a method declares here is what the rest of the run needs to know about it, so nothing else names it:
    `run_fields`, the run-level settings that only some methods read, which this one does (`config_rules`);
    `rules`, its own settings that are read only under a condition on the run; `model_dropout`, whether training
    keeps the model's own dropout by default; `check`, the combinations it cannot run.
    """

    name: str
    """The training method."""

    run_fields: ClassVar[frozenset[str]] = frozenset()
    """Run-level settings read by some methods only (`config_rules.METHOD_FIELDS`) that this method reads."""
    rules: ClassVar[dict[str, When]] = {}
    """This section's own fields that are read only under a condition: field name -> when (`config_rules`)."""
    run_rules: ClassVar[dict[str, When]] = {}
    """Shared run settings of its `run_fields` that this method reads only under a condition on its own settings
    (PPO's `optim.head_lr`, the value head's learning rate, only while `vf_coef` trains that head)."""
    model_dropout: ClassVar[bool] = False
    """Whether `model.dropout: auto` keeps the model's own dropout for this method (SFT) or turns it off."""
    data_kind: ClassVar[str] = "sft"
    """The kind of file `data.train` is (`DATA_FIELDS`): sft, preference or prompts."""

    def check(self, run: RunBase) -> None:
        """Raise ValueError (its message names the fields and what to change) for what this method cannot run
        with the rest of `run`. The default: nothing to check."""

    def check_launch(self, world_size: int) -> None:
        """Raise ConfigError for what this method cannot run over `world_size` processes (checked when the run
        starts, before anything is written). The default: nothing to check."""


# Whether the run is not a DeepSpeed ZeRO-3 launch (read from the environment when the rule is checked).
NOT_ZERO3 = When(lambda cfg: deepspeed_zero_stage() != 3, "the run is not a DeepSpeed ZeRO-3 launch")

# Whether one rollout feeds more than one optimisation step. With one, the policy that sampled is the policy
# trained: the importance ratio is exactly 1 (the old log-probs are the trained ones, detached) and PPO's values are
# the rollout's own, so no clip of the ratio or of the values can bind.
SEVERAL_STEPS = When(
    lambda cfg: cfg.algorithm.steps_per_rollout(cfg.optim.batch_size) > 1,
    "a rollout feeds more than one optimisation step (algorithm.rollout.epochs above 1, or "
    "algorithm.rollout.batch_size twice optim.batch_size or more)",
    ("algorithm.rollout.epochs", "algorithm.rollout.batch_size", "optim.batch_size"),
    advice="With one step per rollout the policy that sampled is the one trained, so the importance ratio is "
    "exactly 1 and no clip binds.",
)
# Old log-probs (and PPO's values) that come from a forward of their own, in eval mode: with the model's dropout
# kept in training (model.dropout), the first step's ratio and values differ from them, and the clips act.
DROPOUT_KEPT = When(lambda cfg: cfg.keeps_model_dropout(), "the model's dropout is kept in training (model.dropout)",
                    ("model.dropout",))  # fmt: skip
SEVERAL_STEPS_OR_DROPOUT = (SEVERAL_STEPS | DROPOUT_KEPT).because(SEVERAL_STEPS.advice)


class RLSection(AlgorithmSection):
    """The settings every reinforcement-learning method shares: what scores the samples and how they are drawn."""

    data_kind: ClassVar[str] = "prompts"

    rewards: list[str | dict] = []
    """Reward functions: built-in names, `file.py:function`, or {name, weight, args} (docs/rewards.md)."""
    reward_model: str | None = None
    """A trained reward model folder (an `algorithm.name=reward` run's final/), added to the rewards."""
    reward_fallback: float = 0.0
    """Value a reward function's output takes for a sample it failed on (raised, or gave NaN, inf or a non-number);
    it is weighted like any other value. A reward spec's own `fallback` overrides it for that function (one with a
    negative weight needs its highest value here, not its lowest). Failures are counted per function in the
    metrics."""
    rollout: RolloutSection = RolloutSection()
    """Sampling settings."""

    rules: ClassVar[dict[str, When]] = {
        "rollout.overlong_reward": is_("algorithm.rollout.overlong", "fixed"),
        "rollout.overlong_cache": is_("algorithm.rollout.overlong", "soft"),
        "rollout.vllm_gpu_memory_utilization": is_("algorithm.rollout.engine", "vllm"),
        "rollout.vllm_sleep": is_("algorithm.rollout.engine", "vllm"),
        "rollout.vllm_server_url": is_("algorithm.rollout.engine", "vllm-server"),
        "rollout.vllm_server_timeout": is_("algorithm.rollout.engine", "vllm-server"),
        "rollout.generation_batch_size": is_("algorithm.rollout.engine", "hf").because(
            "vLLM schedules its own batches: the whole rollout goes to it in one call."
        ),
        # a sharded model (FSDP2, ZeRO-3) samples through its adapters: `rollout.engine.HFEngine`
        "rollout.merge_adapters": is_("technique.name", "lora") & is_("algorithm.rollout.engine", "hf")
        & is_("run.sharding", "none") & NOT_ZERO3,
        # `rollout.engine.HFEngine`: a sharded model's forwards are collectives over its float32 shards; QLoRA's
        # 4-bit layers compute in their own dtype; a bfloat16 run samples in bfloat16 already (`train` refuses
        # `auto` where it resolves to bfloat16, on a GPU)
        "rollout.dtype": is_("algorithm.rollout.engine", "hf") & is_("model.dtype", "auto", "float32")
        & is_not("technique.name", "qlora") & is_("run.sharding", "none") & NOT_ZERO3,
    }

    def group_size(self) -> int:
        """Completions sampled per prompt (GRPO's G); 1 for methods that sample one."""
        return 1

    def steps_per_rollout(self, optim_batch_size: int) -> int:
        """Optimisation steps one rollout feeds: `rollout.epochs` x (rollout sequences / sequences per step)."""
        return self.rollout.epochs * ((self.rollout.batch_size or optim_batch_size) // optim_batch_size)

    def reward_specs(self) -> list:
        """`rewards`, plus the trained reward model of `reward_model` when one is set."""
        specs = list(self.rewards)
        if self.reward_model:
            specs.append({"name": "reward_model", "args": {"path": self.reward_model}})
        return specs

    def reward_where(self, run: RunBase) -> list[str]:
        """How errors name each of `reward_specs()`: its field, with the file line or override that set it."""
        where = [run.locate(f"algorithm.rewards.{i}", f"algorithm.rewards[{i}]") for i in range(len(self.rewards))]
        return where + ([run.locate("algorithm.reward_model")] if self.reward_model else [])

    def check(self, run: RunBase) -> None:
        if not self.rewards and not self.reward_model:
            raise ValueError(
                f"algorithm.rewards: {self.name} needs at least one reward function (e.g. "
                "algorithm.rewards=[task]) or algorithm.reward_model"
            )
        rollout, step, group = self.rollout.batch_size or run.optim.batch_size, run.optim.batch_size, self.group_size()
        if rollout % group:
            raise ValueError(
                f"algorithm.rollout.batch_size ({rollout}) must be a multiple of algorithm.num_generations ({group}), "
                "the completions sampled per prompt: whole groups per rollout"
            )
        if rollout % step:
            raise ValueError(
                f"algorithm.rollout.batch_size ({rollout}) must be a multiple of optim.batch_size ({step}): each "
                "rollout is split into whole optimisation steps"
            )
        if self.rollout.top_p < 1.0:
            raise ValueError(
                f"algorithm.rollout.top_p < 1 is not supported for {self.name}: the losses score the untruncated "
                "distribution softmax(logits / temperature), so nucleus sampling would make the samples come "
                "from another policy than the one scored; lower algorithm.rollout.temperature instead"
            )
        if run.technique.dropout > 0:
            raise ValueError(
                f"technique.dropout ({run.technique.dropout}) must be 0 for {self.name}: rollouts and old "
                "log-probs are computed without dropout, so dropout in the loss would make the importance "
                "ratio differ from 1 by noise alone"
            )
        if self.rollout.engine == "vllm" and not vllm_available():
            raise ValueError(
                "algorithm.rollout.engine=vllm needs the vllm package, which is not installed here; on a CUDA "
                "machine `pip install \"posttrain[vllm]\"` (vLLM pins its own torch: docs/scale.md), or set "
                "algorithm.rollout.engine=hf"
            )
        if self.rollout.engine == "vllm-server":
            _check_server_url(self.rollout.vllm_server_url)


def _check_server_url(url: str | None) -> None:
    """`algorithm.rollout.vllm_server_url` must be an http address with a host and a port.

    >>> _check_server_url("http://127.0.0.1:8000")
    """
    start = "start the server with `posttrain vllm-serve --model MODEL --port PORT` and pass the address it prints"
    if not url:
        raise ValueError(
            "algorithm.rollout.engine=vllm-server needs algorithm.rollout.vllm_server_url, the generation server's "
            f"address (e.g. http://127.0.0.1:8000): {start} (docs/scale.md), or set algorithm.rollout.engine=hf"
        )
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        parts, port = None, None
    if parts is None or parts.scheme != "http" or not parts.hostname or port is None or parts.path not in ("", "/"):
        raise ValueError(
            f"algorithm.rollout.vllm_server_url ({url!r}) must be http://HOST:PORT, with nothing after the port "
            f"(e.g. http://127.0.0.1:8000): {start}"
        )


class OptimConfig(_Section):
    lr: float = Field(2e-4, gt=0)
    """Peak learning rate."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas, each in [0, 1)."""

    @field_validator("betas", mode="before")
    @classmethod
    def _betas_in_range(cls, value):
        # AdamW refuses a beta outside [0, 1) only once the model has loaded and the run folder holds a config
        # (whose presence then refused the corrected rerun); YAML's true and false are no betas
        if isinstance(value, list | tuple) and any(isinstance(b, bool) for b in value):
            raise ValueError(f"must be two numbers in [0, 1), e.g. [0.9, 0.999]; got {list(value)}")
        return value

    @field_validator("betas")
    @classmethod
    def _betas_below_one(cls, value):
        # after parsing: YAML reads 2e0 as a string, which becomes 2.0 here
        if not all(0 <= b < 1 for b in value):
            raise ValueError(f"each must be in [0, 1) (AdamW's decay rates), e.g. [0.9, 0.999]; got {list(value)}")
        return value
    eps: float = Field(1e-8, gt=0)
    """AdamW epsilon."""
    batch_size: int = Field(8, gt=0)
    """Examples per optimisation step, over all processes and micro-batches."""
    micro_batch_size: int | None = Field(None, gt=0)
    """Examples per forward pass per process; gradients accumulate up to `batch_size`. Default: `batch_size`."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warmup steps from 0 to `lr`."""
    schedule: Literal["cosine", "constant", "linear"] = "cosine"
    """Learning-rate decay after warmup."""
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    """Final learning rate as a fraction of `lr` (cosine schedule)."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm to this value (null: no clipping)."""
    head_lr: float | None = Field(None, gt=0)
    """Peak learning rate of the scalar head (the PPO value head, the reward model's score head); null: `lr`.
    A head that starts from zero often wants a higher rate than the LoRA adapters, as separate critic rates do in
    other PPO implementations. Follows the same warmup and schedule."""


def deepspeed_zero_stage() -> int | None:
    """The ZeRO stage of an Accelerate DeepSpeed launch (configs/accelerate/deepspeed_zero*.yaml), read from the
    environment `accelerate launch` sets from its config file; None outside one."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        return None
    return int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))  # Accelerate's own default stage: 2


class RunSection(_Section):
    output_dir: str = Field("runs/run", min_length=1)
    """Run folder: config.yaml, metrics.jsonl, checkpoints/, final/."""
    max_steps: int | None = Field(None, gt=0)
    """Optimisation steps; if null, `epochs` decides."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the training data when `max_steps` is null (refused together with `max_steps`). Every example
    is used once per epoch; the last step of an epoch takes the remainder (see docs/data.md)."""
    seed: int = 0
    """Seed for shuffling, dropout and initialisation: equal seeds give equal runs."""
    save_every: int | None = Field(None, gt=0)
    """Checkpoint every N steps (always at the end); null: only at the end."""
    keep_checkpoints: int = Field(2, gt=0)
    """How many most recent checkpoints to keep."""
    eval_every: int | None = Field(None, gt=0)
    """Evaluate on `data.eval` every N steps (and at the end); needs `data.eval`."""
    log_every: int = Field(1, gt=0)
    """Write metrics every N steps."""
    tensorboard: bool = False
    """Also write TensorBoard event files to the run folder (needs the `tensorboard` package)."""
    progress: bool = True
    """Show a progress bar."""
    report: bool = True
    """At the end, write report.html and report.md into the run folder: config, curves, evaluation, samples
    (`posttrain report` makes one at any time, also of several runs side by side)."""
    sharding: Literal["none", "fsdp2"] = "none"
    """How the processes of a multi-process launch hold the model: `none`, each its whole copy (one process, or
    DDP under `accelerate launch`; also what to keep with an Accelerate FSDP/DeepSpeed config, which shards for
    itself); `fsdp2`, each 1/N of every weight, gradient and optimizer state (torch `fully_shard`), launched with
    `torchrun --nproc_per_node N -m posttrain.cli train ...`, on GPUs or CPUs (docs/scale.md). Every method and
    technique (QLoRA's 4-bit weights sharded too); rollout engine hf. May change on `--resume`: a checkpoint
    resumes on any number of processes, sharded or not (`trainer.checkpoint`)."""
    whole_checkpoints: bool = False
    """Under `run.sharding=fsdp2`: write each checkpoint's weights and optimizer state gathered whole by the main
    process (`trainable.safetensors`, `optimizer.pt`), as an unsharded run does, instead of each process writing
    its own shards (`sharded/`, torch.distributed.checkpoint; the default, which never holds more than a shard on
    any process: whole, a 7B model's float32 weights and AdamW state are ~84 GB in the main process's memory).
    Either layout resumes, on any number of processes. `final/` is whole either way (docs/scale.md)."""

    @property
    def collective_forwards(self) -> bool:
        """Whether every forward of the trained model is a collective (it all-gathers each layer's weights), so
        that every process must run as many: the model sharded by `sharding=fsdp2` or by DeepSpeed ZeRO-3."""
        return self.sharding == "fsdp2" or deepspeed_zero_stage() == 3


class RunBase(_Section):
    """Everything one training run needs but the method: `posttrain.algorithms.RunConfig` adds the `algorithm`
    section, a union of every method's own section told apart by `name`. The YAML file mirrors it section by
    section."""

    default_method: ClassVar[str] = "sft"
    """The method of a run whose `algorithm` section gives no `name`."""

    _origin: tuple[str, dict[str, int], dict[str, str]] | None = PrivateAttr(default=None)
    """Where the values came from (`validate_config`): the source, its key lines and the overrides."""

    def __eq__(self, other: object) -> bool:  # the settings alone, not where they were read from (`_origin`)
        return type(other) is type(self) and self.__dict__ == other.__dict__

    __hash__ = None  # as pydantic's own models: mutable, so not hashable

    def locate(self, field: str, shown: str | None = None) -> str:
        """`shown` (default: dotted `field`) named with where `field` was set, for a check made after validation
        (e.g. the reward specs, resolved before the model loads): `run.yaml:12: algorithm.rewards[1]`, or
        `algorithm.rewards[1] (command line: algorithm.rewards=[...])`."""
        shown = shown or field
        if self._origin is None:
            return shown
        source, lines, overrides = self._origin
        if (given := overridden(field, overrides)) is not None:
            return f"{shown} (command line: {given})"
        line = line_of(field, lines)
        return f"{source}:{line}: {shown}" if line is not None else f"{source}: {shown}"

    model: ModelConfig = ModelConfig()
    technique: TechniqueConfig = TechniqueConfig()
    data: DataConfig = DataConfig()
    algorithm: AlgorithmSection
    optim: OptimConfig = OptimConfig()
    run: RunSection = RunSection()

    @classmethod
    def methods(cls) -> dict[str, type[AlgorithmSection]]:
        """Every method's section class by name, from the `algorithm` field's union (in declaration order)."""
        annotation = cls.model_fields["algorithm"].annotation
        if typing.get_origin(annotation) is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        members = typing.get_args(annotation) or (annotation,)
        return {m.model_fields["name"].default: m for m in members if m.model_fields["name"].default}

    def keeps_model_dropout(self) -> bool:
        """Whether training keeps the model's own dropout (`model.dropout`; `auto`: as the method declares)."""
        if self.model.dropout != "auto":
            return self.model.dropout == "keep"
        return type(self.algorithm).model_dropout

    @model_validator(mode="after")
    def _check_combinations(self) -> RunBase:
        # Settings this run would not read (config_rules), then impossible values, then the method's own checks.
        unread = unread_settings(self)
        if unread:
            raise ValueError("\n".join(unread))
        mb = self.optim.micro_batch_size
        if mb is not None and mb > self.optim.batch_size:
            raise ValueError(
                f"optim.micro_batch_size ({mb}) is larger than optim.batch_size ({self.optim.batch_size}); "
                "set it to a divisor of batch_size"
            )
        if mb is not None and self.optim.batch_size % mb:
            raise ValueError(
                f"optim.batch_size ({self.optim.batch_size}) is not a multiple of optim.micro_batch_size ({mb})"
            )
        if self.model.dtype == "float16":
            raise ValueError(
                "model.dtype=float16 is not supported for training: float16 gradients underflow without loss "
                "scaling, which posttrain does not do; use model.dtype=bfloat16 (mixed precision on GPUs from "
                "Ampere on and on CPUs) or float32"
            )
        if self.model.pure_bf16 and self.model.dtype != "bfloat16":
            raise ValueError(
                f"model.pure_bf16 holds the trained weights in bfloat16, so it needs model.dtype=bfloat16 "
                f"(got {self.model.dtype}); set both, or remove model.pure_bf16"
            )
        if self.data.max_length < 8:
            raise ValueError(
                f"data.max_length ({self.data.max_length}) leaves no room for a prompt and a response"
            )
        if columns := column_problems(self.data.columns, self.data.ignore_columns, type(self.algorithm).data_kind) + \
                message_problems(self.data.message_keys, self.data.roles) + turn_problems(self.data.turns):
            raise ValueError("\n".join(columns))
        if self.model.compile:
            self._check_compile()
        self.algorithm.check(self)
        return self

    def _check_compile(self) -> None:
        """`model.compile` runs what its tests cover (tests/integration/test_compile.py); the rest is refused, not tried."""
        untried = [
            (self.technique.name == "qlora", "technique.name=qlora (bitsandbytes' 4-bit layers)"),
            (self.model.gradient_checkpointing, "model.gradient_checkpointing=true"),
            (self.model.dtype not in ("auto", "float32"), f"model.dtype={self.model.dtype}"),
            (self.run.sharding != "none", f"run.sharding={self.run.sharding}"),
        ]  # fmt: skip
        refused = [why for bad, why in untried if bad]
        if refused:
            raise ValueError(
                f"model.compile is tested for one process training SFT, DPO, a reward model, GRPO, RLOO or PPO, full "
                f"or LoRA, in "
                f"float32; not with {', '.join(refused)}. Remove model.compile (the uncompiled run is the same "
                "math), or change those settings"
            )


def _section_at(schema: type[BaseModel], loc: tuple, data: Any) -> type[BaseModel] | None:
    """The section class that holds the field at `loc` (the chosen method's class under `algorithm`)."""
    node: Any = schema
    for part in loc[:-1]:
        if not (isinstance(node, type) and issubclass(node, BaseModel)) or part not in node.model_fields:
            return None
        if node is schema and part == "algorithm":
            algorithm = data.get("algorithm") if isinstance(data, dict) else None
            name = algorithm.get("name") if isinstance(algorithm, dict) else None
            node = schema.methods().get(name)
            continue
        node = node.model_fields[part].annotation
    return node if isinstance(node, type) and issubclass(node, BaseModel) else None


def _unknown_key(schema: type[BaseModel], loc: tuple, data: Any) -> str:
    """Why `loc` is not a key, in our words: the closest valid key, or the methods that do have it."""
    section, key = _section_at(schema, loc, data), str(loc[-1])
    if section is None:
        return "unknown key (`posttrain train --help-config` lists every field)"
    if issubclass(section, AlgorithmSection):
        if key in schema.methods():  # the layout of older posttrain versions: algorithm.dpo.beta
            example = next((f for f in schema.methods()[key].model_fields if f != "name"), "name")
            return (f"not a section: a method's settings sit directly under `algorithm` (e.g. algorithm.{example} "
                    f"for {key}, not algorithm.{key}.{example})")  # fmt: skip
        owners = [n for n, m in schema.methods().items() if key in m.model_fields]
        if owners:
            return (f"not a setting of algorithm.name={section.model_fields['name'].default}; it belongs to "
                    f"{', '.join(owners)}")  # fmt: skip
    # another tool's name for one of our settings (`train_file`): its meaning, not the nearest spelling
    # (difflib's `data.train_on` for `data.train_file` is another setting)
    if (advice := other_name(key)) is not None:
        return f"unknown key; {advice} (`posttrain train --help-config` lists every field)"
    close = difflib.get_close_matches(key, list(section.model_fields), n=1, cutoff=0.6)
    prefix = ".".join(str(p) for p in loc[:-1])
    if not close and len(loc) <= 2:  # a shared section's field written under another section, or at the top level
        homes = [name for name, f in schema.model_fields.items() if name != loc[0] and isinstance(f.annotation, type)
                 and issubclass(f.annotation, BaseModel) and key in f.annotation.model_fields]  # fmt: skip
        if homes:
            here = f"a setting of `{loc[0]}`" if len(loc) == 2 else "a top-level key"
            return (f"not {here}; it belongs to {' and '.join(f'`{h}` ({h}.{key})' for h in homes)}"
                    " (`posttrain train --help-config` lists every field)")  # fmt: skip
    hint = f"did you mean `{prefix + '.' if prefix else ''}{close[0]}`?" if close else "check the spelling."
    return f"unknown key; {hint} (`posttrain train --help-config` lists every field)"


def _not_a_section(schema: type[BaseModel], loc: tuple, data: Any, value: Any) -> str | None:
    """What to write where a section (`loc`) was given a value (`model: tiny`, `model=tiny`): the value as the
    section's `name` where it has one and the value could be a name, else the section's fields; None when `loc` is
    not a section."""
    where = ".".join(str(p) for p in loc)
    section = AlgorithmSection if loc == ("algorithm",) else _section_at(schema, (*loc, "?"), data)
    if section is None:
        return None
    if value is None or value == "":  # `model:` with nothing under it, or `model=`
        return (f"{where} is a section, and it is empty here: give its fields under it "
                f"({', '.join(section.model_fields)}), or remove it")  # fmt: skip
    if "name" in section.model_fields and isinstance(value, str | int | float) and not isinstance(value, bool):
        return (f"{where} is a section, not a value: did you mean {where}.name: {_flow(value)} (command line: "
                f"{_shell(f'{where}.name={_flow(value)}')})?")  # fmt: skip
    return (f"{where} is a section, not a value: set its fields, {where}.FIELD: VALUE (command line: "
            f"{where}.FIELD=VALUE); its fields are {', '.join(section.model_fields)}")  # fmt: skip


def _not_a_list(schema: type[BaseModel], loc: tuple, data: Any, value: Any) -> str | None:
    """What to write where a list field (`loc`) was given one item (`algorithm.rewards=numeric_answer`): the item in
    a list, on the command line and in YAML; None where `loc` is not a field of its own (a union's list member,
    `technique.target_modules.list[str]`) or nothing was given."""
    section = _section_at(schema, loc, data)
    if section is None or str(loc[-1]) not in section.model_fields or value is None:
        return None
    where, item = ".".join(str(p) for p in loc), _flow([value])
    return f"must be a list: {_shell(f'{where}={item}')} (YAML: {loc[-1]}: {item})"


def _flow(value: Any) -> str:
    """`value` as YAML writes it on one line, as the config and its overrides read it back.

    >>> _flow("tiny"), _flow(["numeric_answer"]), _flow([{"name": "task"}]), _flow(["a: b"])
    ('tiny', '[numeric_answer]', '[{name: task}]', "['a: b']")
    """
    text = yaml.safe_dump(value, default_flow_style=True, width=2**31, allow_unicode=True).strip()
    return text.removesuffix("...").strip()  # a plain scalar's document end marker


def _shell(override: str) -> str:
    """`override` as typed in a shell: quoted where a shell would split or change it.

    >>> _shell("model.name=tiny"), _shell("algorithm.rewards=[numeric_answer]")
    ('model.name=tiny', "'algorithm.rewards=[numeric_answer]'")

    Brackets are quoted too: zsh (macOS's shell) reads them as a file pattern and stops with "no matches found".
    """
    return override if re.fullmatch(r"[\w.,:/=+@%-]+", override) else shlex.quote(override)


def _message(e: dict) -> str:
    """pydantic's message without its library wording ("Value error, ...", "Input should be ...")."""
    msg = e["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    return msg.replace("Input should be", "should be")


def format_validation_error(schema: type[BaseModel], err: ValidationError, source: str, data: Any,
                            overrides: dict[str, str] | None = None,
                            lines: dict[str, int] | None = None) -> str:  # fmt: skip
    """Every problem pydantic found, one line (or paragraph) each, named by its dotted field, and by the
    command-line override that set it (`overrides`: dotted key -> the override as given) or else by the file's
    line that wrote it (`lines`: dotted key -> line, `yamlfile.load_yaml`)."""
    out = [f"{source}: invalid configuration:"]
    methods = list(schema.methods())
    for e in err.errors():
        if not e["loc"] and e["type"] == "value_error":  # a combination check: its message names the fields
            out.extend(f"  {_located(paragraph, overrides, lines)}" for paragraph in str(e["ctx"]["error"]).splitlines())
            continue
        loc = tuple(e["loc"])
        if isinstance(cause := e.get("ctx", {}).get("error"), FieldError):
            loc = (*loc, cause.field)  # the field named by the location, so not again in the message
            e = {**e, "msg": str(cause).removeprefix(f"{cause.field} ")}
        if len(loc) > 1 and loc[0] == "algorithm" and loc[1] in methods:
            loc = loc[:1] + loc[2:]  # pydantic puts the union's tag in the path: algorithm.dpo.beta
        where = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            msg = _unknown_key(schema, loc, data)
        elif e["type"] == "union_tag_invalid":
            msg = f"unknown method {e['input'].get('name')!r}; choose one of {', '.join(methods)}"
            where = "algorithm.name"
        elif e["type"] == "value_error" and loc:
            msg = _message(e)
        elif e["type"] in ("model_type", "model_attributes_type") and (
            better := _not_a_section(schema, loc, data, e.get("input"))
        ):
            msg = better
        elif e["type"] == "list_type" and (better := _not_a_list(schema, loc, data, e.get("input"))):
            msg = better
        else:
            msg = _message(e)
            if "input" in e and e["type"] != "missing" and not isinstance(e["input"], dict):
                msg = f"{msg} (got {e['input']!r})"
        out.append(f"  {set_by(where, overrides, lines, unknown=e['type'] == 'extra_forbidden')}: {msg}")
    return "\n".join(out)


def set_by(where: str, overrides: dict[str, str] | None, lines: dict[str, int] | None,
           via: str = "command line:", *, unknown: bool = False) -> str:  # fmt: skip
    """Dotted field `where`, named with what set it: the override (`overrides`, from `override_keys`; `via`
    names where overrides come from; an `unknown` key also by one that set a key under it), else the line of the
    file (`lines`, from `yamlfile.load_yaml`).

    >>> set_by("optim.lr", {"optim.lr": "optim.lr=abc"}, {"optim.lr": 4}), set_by("optim.lr", None, {"optim": 3})
    ('optim.lr (command line: optim.lr=abc)', 'optim.lr (line 3)')
    """
    if (given := overridden(where, overrides, inside=unknown)) is not None:
        return f"{where} ({via} {given})"
    line = line_of(where, lines)
    return where if line is None else f"{where} (line {line})"


_FIELD = re.compile(r"[a-z_]+(\.[a-z_0-9]+)+")


def _located(paragraph: str, overrides: dict[str, str] | None, lines: dict[str, int] | None) -> str:
    """A combination check's paragraph, which begins with the field it is about (`optim.head_lr = 0.001 would be
    ignored ...`), led by where that field was set: the override, or the file's line.

    >>> _located("optim.head_lr = 0.001 would be ignored", None, {"optim": 3, "optim.head_lr": 5})
    'line 5: optim.head_lr = 0.001 would be ignored'
    >>> _located("optim.head_lr = 0.001 would be ignored", {"optim.head_lr": "optim.head_lr=1e-3"}, {})
    'on the command line (optim.head_lr=1e-3): optim.head_lr = 0.001 would be ignored'

    The other fields it names that the command line set are said too (the override may be what broke the check):

    >>> _located("a.b (4) must be a multiple of a.c (3)", {"a.c": "a.c=3"}, {"a.b": 7})
    'line 7: a.b (4) must be a multiple of a.c (3) (a.c set on the command line: a.c=3)'
    """
    field = _FIELD.match(paragraph)
    if field is None:
        return paragraph
    named = dict.fromkeys(m.group(0) for m in _FIELD.finditer(paragraph) if m.group(0) != field.group(0))
    also = [f"{name} set on the command line: {given}" for name in named
            if (given := overridden(name, overrides)) is not None]  # fmt: skip
    paragraph += f" ({'; '.join(also)})" if also else ""
    if (given := overridden(field.group(0), overrides)) is not None:
        return f"on the command line ({given}): {paragraph}"
    line = line_of(field.group(0), lines)
    return paragraph if line is None else f"line {line}: {paragraph}"


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form dotted.key=value (e.g. optim.lr=1e-4)")
    key, raw = item.split("=", 1)
    path = key.strip().split(".")
    if not key.strip():
        raise ConfigError(f"override {item!r} has an empty key")
    if not all(path):
        raise ConfigError(f"override {item!r}: the key {key.strip()!r} has an empty part; write section.field=value "
                          "(e.g. optim.lr=1e-4)")  # fmt: skip
    # YAML parsing gives numbers, booleans, null and lists ([a, b]) their natural types.
    try:
        value = load_yaml(raw, f"override {item!r}", prefix=".".join(path)) if raw != "" else ""
    except yaml.YAMLError as err:
        # a list or mapping cut short (its brackets unbalanced), never a plain string; `[qv]_proj` is a pattern
        if raw.lstrip().startswith(("[", "{")) and (raw.count("[") != raw.count("]") or raw.count("{") != raw.count("}")):
            mark = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"override {item!r}: the value is not a complete YAML list or mapping ({mark}); "
                              "e.g. technique.target_modules=[q_proj,v_proj]") from None  # fmt: skip
        value = raw
    # PyYAML (YAML 1.1) reads `1e-4` as a string; users mean the number.
    if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        value = float(value)
    return path, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set dotted keys in a nested dict. An override wins over the file; the same key given twice: the last wins.
    A mapping sets the keys it names and keeps the section's others, as the same keys given one by one would
    (``optim={lr: 0.05}`` replaced the whole section, silently dropping the file's batch size and weight decay);
    one that names another `name` (``algorithm={name: sft}``, another method or technique) replaces the section,
    whose other keys belong to the name it had.

    >>> apply_overrides({"optim": {"lr": 1}}, ["optim.lr=1e-4", "run.seed=3"])
    {'optim': {'lr': 0.0001}, 'run': {'seed': 3}}
    >>> apply_overrides({"optim": {"lr": 1, "batch_size": 4}}, ["optim={lr: 0.05}"])
    {'optim': {'lr': 0.05, 'batch_size': 4}}
    >>> apply_overrides({"algorithm": {"name": "grpo", "beta": 0.1}}, ["algorithm={name: sft}"])
    {'algorithm': {'name': 'sft'}}
    """
    for item in overrides:
        path, value = _parse_override(item)
        node = data
        for part in path[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
            node = nxt
        _set(node, path[-1], value)
    return data


_NAMED_SECTIONS = ("algorithm", "technique")  # sections whose `name` decides which other keys they may hold


def _set(node: dict, key: str, value: Any) -> None:
    """`node[key] = value`, a mapping merged key by key into a mapping already there, unless it is a section whose
    `name` picks its fields (`algorithm`, `technique`) and both name another one."""
    old = node.get(key)
    if not (isinstance(value, dict) and isinstance(old, dict)):
        node[key] = value
    elif key in _NAMED_SECTIONS and "name" in value and "name" in old and value["name"] != old["name"]:
        node[key] = value
    else:
        for k, v in value.items():
            _set(old, k, v)


def validate_config(schema: type[RunBase], data: Any, *, source: str = "config",
                    overrides: dict[str, str] | None = None, lines: dict[str, int] | None = None) -> RunBase:  # fmt: skip
    """Validate a nested dict into `schema` (a `RunConfig`), raising `ConfigError` with every problem found, each
    named by its field and by the override or file line that set it. An `algorithm` section without a `name` is
    SFT's, the default method."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections (model, data, optim, ...)")
    algorithm = data.get("algorithm")
    if algorithm is None or (isinstance(algorithm, dict) and "name" not in algorithm):
        data = {**data, "algorithm": {"name": schema.default_method, **(algorithm or {})}}
    try:
        cfg = schema.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(schema, err, source, data, overrides, lines)) from None
    if lines or overrides:  # values from a file (the command line alone needs no naming: `locate`)
        cfg._origin = (source, dict(lines or {}), dict(overrides or {}))
    return cfg


QUICKSTART_CONFIGS = Path(__file__).parent / "configs" / "quickstart"
"""The quickstart recipes' settings, one YAML per method (in a clone also at configs/quickstart/: the repository's
configs/ is this package's)."""


def quickstart_methods() -> list[str]:
    """The methods with a quickstart recipe, one per YAML in `QUICKSTART_CONFIGS`: sft (structured output,
    `posttrain.quickstart`) first, then the arithmetic recipes (`posttrain.recipes`)."""
    return sorted((p.stem for p in QUICKSTART_CONFIGS.glob("*.yaml")), key=lambda m: (m != "sft", m))


def read_config_file(path: str | Path, lines: dict[str, int] | None = None) -> dict:
    """A YAML run file as a nested dict (a key written twice is an error naming its lines). `lines`, when given,
    receives the line of each dotted key, for errors about the values (`format_validation_error`)."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{p}: a folder, not a run config file (a YAML file such as configs/sft_lora.yaml)")
    if not p.is_file():
        shipped = Path(__file__).parent / "configs"  # a clone's configs/ is this folder
        example = shipped / p.name if (shipped / p.name).is_file() else shipped
        raise ConfigError(f"{p}: config file not found; posttrain's example configs are in {shipped} (a clone's "
                          f"configs/): e.g. posttrain train {example if example != shipped else shipped / 'sft_lora.yaml'}")  # fmt: skip
    try:
        loaded = load_yaml(p.read_text(encoding="utf-8"), str(p), lines=lines,
                           hint=" (to change a setting for one run, give it as an override on the command line instead)")  # fmt: skip
    except yaml.YAMLError as err:
        raise ConfigError(yaml_problem(err, str(p))) from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text") from None
    except RecursionError:
        raise ConfigError(f"{p}: nested too deeply to read; a run file is a mapping of sections") from None
    data = loaded or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections (model, data, optim, ...)")
    return data


def load_run_config(schema: type[RunBase], path: str | Path | None, overrides: list[str] | None = None) -> RunBase:
    """Read a YAML run file (or start from defaults when `path` is None), apply dotted overrides, validate."""
    lines: dict[str, int] = {}
    data = read_config_file(path, lines) if path is not None else {}
    data = apply_overrides(data, list(overrides or []))
    if path is None:  # every value from the command line: the source says so
        return validate_config(schema, data, source="command line")
    return validate_config(schema, data, source=str(path), overrides=override_keys(overrides), lines=lines)


def override_keys(overrides: list[str] | None) -> dict[str, str]:
    """Dotted key -> the override as given, for the errors that name where a value came from (`overridden`). A
    mapping names each key it sets (`apply_overrides` merges it), not the whole section.

    >>> override_keys(["optim.lr=abc", "run.max_steps = 3"])
    {'optim.lr': 'optim.lr=abc', 'run.max_steps': 'run.max_steps = 3'}
    >>> override_keys(["optim={lr: 0.05, betas: [0.9, 0.95]}"])
    {'optim.lr': 'optim={lr: 0.05, betas: [0.9, 0.95]}', 'optim.betas': 'optim={lr: 0.05, betas: [0.9, 0.95]}'}
    """
    out: dict[str, str] = {}
    for o in overrides or []:
        if "=" not in o:
            continue
        try:
            path, value = _parse_override(o)
        except ConfigError:  # said where it is applied
            out[o.split("=", 1)[0].strip()] = o
            continue
        for key in _leaf_keys(".".join(path), value):
            out[key] = o
        if path[-1] in _NAMED_SECTIONS and isinstance(value, dict) and "name" in value:
            out[".".join(path)] = o  # it may replace the section: what it leaves unset is the override's doing
    return out


def _leaf_keys(key: str, value: Any) -> list[str]:
    if isinstance(value, dict) and value:
        return [k for sub, v in value.items() for k in _leaf_keys(f"{key}.{sub}", v)]
    return [key]


def overridden(where: str, overrides: dict[str, str] | None, *, inside: bool = False) -> str | None:
    """The override (`override_keys`) that set the field at dotted path `where`, itself or a section above it;
    with `inside` (an unknown key: `nope.x=1` makes the unknown section `nope`), also one that set a key under it.

    >>> overridden("warm_start.pass_range.0", {"warm_start.pass_range": "warm_start.pass_range=[2, 1]"})
    'warm_start.pass_range=[2, 1]'
    >>> overridden("optim.lr", {"optim.eps": "optim.eps=1"}) is None
    True
    >>> overridden("optim.nope", {"optim.nope.x": "optim.nope.x=1"}, inside=True)
    'optim.nope.x=1'
    """
    for key, given in (overrides or {}).items():
        if where == key or where.startswith(key + ".") or (inside and key.startswith(where + ".")):
            return given
    return None


def dump_config(cfg: RunBase, path: str | Path) -> None:
    """Write the resolved config as YAML (every field, defaults included)."""
    write_whole(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))  # never a truncated config.yaml


def describe_fields(schema: type[BaseModel], prefix: str = "", method: str | None = None) -> list[tuple]:
    """(dotted name, default, description, method) for every field: the source of `--help-config`. `method` is
    None for the shared sections and the method's name for the fields of its own algorithm section."""
    rows: list[tuple] = []
    for name, field in schema.model_fields.items():
        ann = field.annotation
        if prefix == "" and name == "algorithm" and issubclass(schema, RunBase):
            for m, section in schema.methods().items():
                rows.extend(describe_fields(section, "algorithm.", m))
        elif isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(describe_fields(ann, f"{prefix}{name}.", method))
        else:
            default = field.get_default(call_default_factory=True)  # a `default_factory` field's value, not a marker
            rows.append((f"{prefix}{name}", repr(default), field.description or "", method))
    return rows
