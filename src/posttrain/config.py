"""Typed run configuration: the YAML file of a run, its dotted command-line overrides, and validation.

A run is described by one `RunConfig` (model, technique, data, algorithm, optimisation, run folder). YAML is
only its serialisation: `load_config` reads a file, applies overrides such as ``optim.lr=1e-4``, and validates
everything before any model or tokenizer loads. Unknown keys, keys written twice in a file, wrong types,
impossible values and settings the chosen method and technique would not read (the table in `config_rules`)
raise `ConfigError` with the dotted field name and what to change. Every run saves its resolved config as
``config.yaml`` in its run folder (`dump_config`).

This module does not load models or data; it only describes and checks them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from posttrain.config_rules import unread_settings
from posttrain.errors import ConfigError


class _Section(BaseModel):
    # extra="forbid": an unknown key is an error, never silently ignored (a typo like `optim.l_r`).
    # use_attribute_docstrings: the docstring under each field is its description (shown by --help-config).
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class ModelConfig(_Section):
    name: str = "smollm2-135m-instruct"
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
    log-prob forwards always run in eval mode (no dropout)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 33% more compute."""
    trust_remote_code: bool = False
    """Allow model code from the hub repository (only for models you trust)."""


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
    """Modules that get adapters: `all-linear` (every linear layer but the LM head) or a list of names."""
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
    shuffle: bool = True
    """Shuffle examples every epoch (deterministically from `run.seed`)."""


class DPOSection(_Section):
    beta: float = Field(0.1, gt=0)
    """Strength of the KL anchor to the reference: implicit reward = beta * (log pi - log pi_ref)."""
    loss_type: Literal["sigmoid", "ipo", "hinge", "simpo"] = "sigmoid"
    """`sigmoid` (DPO), `ipo`, `hinge` (SLiC), or `simpo` (reference-free: no reference model at all)."""
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    """Conservative DPO: the assumed share of flipped labels (sigmoid loss only)."""
    ipo_logps: Literal["mean", "sum"] = "mean"
    """How IPO (loss_type=ipo) reduces each response's token log-probabilities before the loss: `mean`
    (length-averaged, the form the IPO authors' results rest on, so beta values from the IPO literature carry
    over) or `sum` (the sequence log-probability: the target 1/(2 beta) is then spread over the whole answer and
    the loss grows with length squared). See docs/preference.md."""
    simpo_gamma: float = Field(0.5, ge=0.0)
    """SimPO target reward margin gamma (loss_type=simpo)."""
    reference: Literal["auto", "adapter", "precompute", "copy"] = "auto"
    """How the frozen reference is held. `adapter`: the base with the LoRA adapter disabled (lora/qlora, no
    extra memory); `precompute`: reference log-probs computed in one pass before training and cached in the
    run folder (one model in memory); `copy`: a second frozen model. `auto`: adapter under lora/qlora, else
    precompute."""


class RolloutSection(_Section):
    engine: Literal["hf", "vllm"] = "hf"
    """Sampling engine: `hf`, transformers `generate` (any machine). `vllm` is reserved for a vLLM engine on GPU
    machines and not implemented yet (see docs/rl.md)."""
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
    """Stop strings: a completion ends with the first one (kept, and trained on)."""
    generation_batch_size: int | None = Field(None, gt=0)
    """Sequences per `generate` call (memory bound); default: the whole rollout."""
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

    @model_validator(mode="after")
    def _check_overlong_cache(self) -> RolloutSection:
        if self.overlong_cache is not None and self.overlong_cache > self.max_new_tokens:
            raise ConfigError(
                f"algorithm.rollout.overlong_cache ({self.overlong_cache}) must be at most "
                f"algorithm.rollout.max_new_tokens ({self.max_new_tokens}): the penalty starts that many tokens "
                "before the limit"
            )
        return self


class GRPOSection(_Section):
    num_generations: int = Field(8, ge=2)
    """G: completions per prompt; advantages are normalised within each group of G."""
    loss_type: Literal["grpo", "dapo", "dr_grpo"] = "dapo"
    """Aggregation over tokens (see docs/rl.md on length bias): `grpo` per-sequence mean, `dapo` token mean,
    `dr_grpo` sum / (sequences x max_new_tokens)."""
    scale: Literal["group", "batch", "none"] = "group"
    """Divide advantages by the group std, the batch std, or nothing (Dr. GRPO)."""
    beta: float = Field(0.0, ge=0)
    """KL penalty (k3 estimator) to the reference; 0 skips the reference forward entirely."""
    clip_eps: float = Field(0.2, gt=0, lt=1)
    """Lower clip of the importance ratio: 1 - clip_eps."""
    clip_eps_high: float | None = Field(None, gt=0)
    """Upper clip (DAPO clip-higher): 1 + clip_eps_high; default clip_eps."""
    log_kl: bool | None = None
    """Log the KL to the reference (k3) when beta is 0 too, at the cost of one no-grad reference forward per
    rollout. null (default): on under lora/qlora (the reference is the adapter disabled: no extra memory), off
    under full fine-tuning (it would load a second full model only for a log line); true or false forces it.
    With beta > 0 the KL is always computed and logged (the loss needs it)."""
    drop_uniform_groups: bool = False
    """Skip groups whose rewards are all equal (zero advantage: they only add compute)."""


class PPOSection(_Section):
    kl_coef: float = Field(0.05, ge=0)
    """Initial per-token KL penalty coefficient folded into the rewards."""
    adaptive_kl: bool = False
    """Adapt kl_coef towards `target_kl` (Ziegler et al. 2019)."""
    target_kl: float = Field(6.0, gt=0)
    """Target KL (nats per sequence) of the adaptive controller."""
    kl_horizon: int = Field(10000, gt=0)
    """Horizon of the adaptive controller, in samples."""
    gamma: float = Field(1.0, gt=0, le=1)
    """Discount."""
    lam: float = Field(0.95, ge=0, le=1)
    """GAE lambda."""
    clip_eps: float = Field(0.2, gt=0, lt=1)
    """Policy ratio clip."""
    clip_eps_value: float = Field(0.2, gt=0)
    """Value clip around the rollout's values."""
    vf_coef: float = Field(0.1, ge=0)
    """Weight of the value loss."""
    whiten_advantages: bool = True
    """Normalise advantages over the rollout batch."""


class AlgorithmConfig(_Section):
    name: Literal["sft", "reward", "dpo", "grpo", "ppo"] = "sft"
    """Training method: `sft`, `reward` (Bradley-Terry reward model), `dpo`, `grpo`, `ppo`."""
    dpo: DPOSection = DPOSection()
    """DPO settings (algorithm.name=dpo)."""
    reward_margin: bool = False
    """Reward model: use a `margin` column of the pairs in the Bradley-Terry loss (Llama 2)."""
    rewards: list[str | dict] = []
    """GRPO/PPO reward functions: built-in names, `file.py:function`, or {name, weight, args} (docs/rewards.md)."""
    reward_model: str | None = None
    """PPO/GRPO: a trained reward model folder (`algorithm.name=reward` run's final/), added to the rewards."""
    reward_fallback: float = 0.0
    """Value a reward function's output takes for a sample it failed on (raised, or gave NaN, inf or a non-number);
    it is weighted like any other value. Failures are counted per function in the metrics."""
    rollout: RolloutSection = RolloutSection()
    """Sampling settings for GRPO and PPO."""
    grpo: GRPOSection = GRPOSection()
    """GRPO settings (algorithm.name=grpo)."""
    ppo: PPOSection = PPOSection()
    """PPO settings (algorithm.name=ppo)."""


class OptimConfig(_Section):
    lr: float = Field(2e-4, gt=0)
    """Peak learning rate."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
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


class RunSection(_Section):
    output_dir: str = "runs/run"
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


class RunConfig(_Section):
    """Everything one training run needs; the YAML file mirrors it section by section."""

    model: ModelConfig = ModelConfig()
    technique: TechniqueConfig = TechniqueConfig()
    data: DataConfig = DataConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    optim: OptimConfig = OptimConfig()
    run: RunSection = RunSection()

    def keeps_model_dropout(self) -> bool:
        """Whether training keeps the model's own dropout (`model.dropout`; `auto`: only for sft)."""
        if self.model.dropout != "auto":
            return self.model.dropout == "keep"
        return self.algorithm.name == "sft"

    @model_validator(mode="after")
    def _check_combinations(self) -> RunConfig:
        # Settings this run would not read (config_rules.APPLIES: one row per field), then impossible values.
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
        alg = self.algorithm
        if alg.name in ("grpo", "ppo"):
            if not alg.rewards and not alg.reward_model:
                raise ValueError(
                    f"algorithm.rewards: {alg.name} needs at least one reward function (e.g. "
                    "algorithm.rewards=[task]) or algorithm.reward_model"
                )
            rollout = alg.rollout.batch_size or self.optim.batch_size
            group = alg.grpo.num_generations if alg.name == "grpo" else 1
            if rollout % group:
                raise ValueError(
                    f"algorithm.rollout.batch_size ({rollout}) must be a multiple of "
                    f"algorithm.grpo.num_generations ({group}): whole groups per rollout"
                )
            if rollout % self.optim.batch_size:
                raise ValueError(
                    f"algorithm.rollout.batch_size ({rollout}) must be a multiple of optim.batch_size "
                    f"({self.optim.batch_size}): each rollout is split into whole optimisation steps"
                )
            if alg.rollout.top_p < 1.0:
                raise ValueError(
                    "algorithm.rollout.top_p < 1 is not supported for grpo/ppo: the losses score the untruncated "
                    "distribution softmax(logits / temperature), so nucleus sampling would make the samples come "
                    "from another policy than the one scored; lower algorithm.rollout.temperature instead"
                )
            if self.technique.dropout > 0:
                raise ValueError(
                    f"technique.dropout ({self.technique.dropout}) must be 0 for {alg.name}: rollouts and old "
                    "log-probs are computed without dropout, so dropout in the loss would make the importance "
                    "ratio differ from 1 by noise alone"
                )
            if alg.rollout.engine == "vllm":
                raise ValueError(
                    "algorithm.rollout.engine=vllm is not implemented yet; use algorithm.rollout.engine=hf"
                )
        if alg.name == "ppo" and alg.ppo.adaptive_kl and alg.ppo.kl_coef == 0:
            raise ValueError(
                "algorithm.ppo.adaptive_kl multiplies algorithm.ppo.kl_coef by a factor near 1 each rollout, so a "
                "coefficient that starts at 0 stays 0 and the controller never acts; set algorithm.ppo.kl_coef > 0 "
                "(e.g. 0.05) or algorithm.ppo.adaptive_kl=false"
            )
        if alg.name == "dpo" and alg.dpo.reference == "adapter" and self.technique.name == "full":
            raise ValueError(
                "algorithm.dpo.reference=adapter needs technique lora or qlora (full fine-tuning has no "
                "adapter to disable); use precompute or copy"
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
        return self


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration:"]
    for e in err.errors():
        if not e["loc"] and e["type"] == "value_error":  # a combination check: its message names the fields
            lines.extend(f"  {paragraph}" for paragraph in str(e["ctx"]["error"]).splitlines())
            continue
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; `posttrain train --help-config` lists every field)"
        elif "input" in e and e["type"] != "missing" and not isinstance(e["input"], dict):
            msg = f"{msg} (got {e['input']!r})"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form dotted.key=value (e.g. optim.lr=1e-4)")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {item!r} has an empty key")
    # YAML parsing gives numbers, booleans, null and lists ([a, b]) their natural types.
    try:
        value = _load_yaml(raw, f"override {item!r}", prefix=".".join(path)) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    # PyYAML (YAML 1.1) reads `1e-4` as a string; users mean the number.
    if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        value = float(value)
    return path, value


_MERGE = "tag:yaml.org,2002:merge"  # `<<: *anchor` is not a setting of its own


def _duplicate_keys(node: yaml.Node, path: str, source: str, seen_nodes: set[int]) -> None:
    """Raise for the first mapping key written twice under `node` (PyYAML itself keeps the last one silently)."""
    if id(node) in seen_nodes:  # an alias of a node already checked (or a recursive structure)
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE:
                _duplicate_keys(value_node, path, source, seen_nodes)
                continue
            key, line = str(key_node.value), key_node.start_mark.line + 1
            dotted = f"{path}.{key}" if path else key
            if key in lines:
                raise ConfigError(
                    f"{source}:{line}: {dotted} is given twice (lines {lines[key]} and {line}); YAML would "
                    "silently keep only the second one. Delete one of them (to change a setting for one run, "
                    "give it as an override on the command line instead)"
                )
            lines[key] = line
            _duplicate_keys(value_node, dotted, source, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _duplicate_keys(item, f"{path}[{i}]", source, seen_nodes)


def _load_yaml(text: str, source: str, prefix: str = "") -> Any:
    """`yaml.safe_load`, but a key written twice in any mapping is a `ConfigError` naming both lines and the
    dotted key (`prefix` starts it: an override's own key)."""
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    if node is not None:
        _duplicate_keys(node, prefix, source, set())
    return yaml.safe_load(text)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set dotted keys in a nested dict. An override wins over the file; the same key given twice: the last wins.

    >>> apply_overrides({"optim": {"lr": 1}}, ["optim.lr=1e-4", "run.seed=3"])
    {'optim': {'lr': 0.0001}, 'run': {'seed': 3}}
    """
    for item in overrides:
        path, value = _parse_override(item)
        node = data
        for part in path[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
            node = nxt
        node[path[-1]] = value
    return data


def config_from_dict(data: dict, *, source: str = "config") -> RunConfig:
    """Validate a nested dict into a `RunConfig`, raising `ConfigError` with every problem found."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections (model, data, optim, ...)")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run file (or start from defaults when `path` is None) and apply dotted overrides."""
    data: dict = {}
    source = "command line"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found (see configs/ for examples)")
        try:
            loaded = _load_yaml(p.read_text(encoding="utf-8"), str(p))
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{p}{where}: not valid YAML: {getattr(err, 'problem', err)}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{p}: not UTF-8 text") from None
        data = loaded or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections (model, data, optim, ...)")
    data = apply_overrides(data, list(overrides or []))
    return config_from_dict(data, source=source)


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (every field, defaults included)."""
    # Temporary file then rename: a kill mid-write never leaves a truncated config.yaml behind.
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)


def describe_fields(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted name, default, description) for every field: the source of `--help-config`."""
    rows: list[tuple[str, str, str]] = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(describe_fields(ann, f"{prefix}{name}."))
        else:
            rows.append((f"{prefix}{name}", repr(field.default), field.description or ""))
    return rows
