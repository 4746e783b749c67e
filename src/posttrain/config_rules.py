"""Which run settings each method and technique reads: one table, so that no setting silently does nothing.

The rule: every field a user sets to a value other than its default either changes what the run does, or the
run is refused by config validation, before any model loads and before anything is written to the run folder.
`APPLIES` maps every leaf field of `RunConfig` to the condition under which the code reads it; the conditions
were found by reading the code that consumes each field (algorithms/*.py, rollout/source.py, models/loading.py,
models/adapters.py, trainer/*.py, train.py), not guessed. `ALWAYS` marks the fields that every run reads.
`tests/unit/test_config_rules.py` checks that every field of `RunConfig` has a row, so a new field cannot be
added without deciding, and holds one refused and one accepted case per conditional row.

Adding a field is one row here, e.g. ``"algorithm.grpo.my_switch": GRPO,`` (conditions combine with ``&``;
``.because("...")`` adds advice to the refusal), plus a case in the test.

"Set" is judged on the value, not on which keys a file spells out: a field equal to its default is never
refused, so a resolved ``config.yaml`` (which writes every field) loads again.

This module only describes and checks; it reads a config through attribute access and knows no pydantic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any


def value_of(cfg: Any, dotted: str) -> Any:
    """The value of a dotted field, e.g. ``value_of(cfg, "algorithm.dpo.beta")``."""
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def default_of(cfg: Any, dotted: str) -> Any:
    """The declared default of a dotted field (from the pydantic section that holds it)."""
    parent, _, leaf = dotted.rpartition(".")
    section = value_of(cfg, parent) if parent else cfg
    return type(section).model_fields[leaf].default


def show(value: Any) -> str:
    """A value as it would be written in YAML: null, true, 0.1, [a, b]."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(show(v) for v in value) + "]"
    return str(value)


@dataclass(frozen=True)
class When:
    """A condition on the config under which a field is read, with its wording for messages and --help-config."""

    test: Callable[[Any], bool]
    text: str
    fields: tuple[str, ...] = ()
    """The fields the condition looks at: the refusal shows their values in this run."""
    advice: str = ""
    """What else to say when a field is refused under this condition (e.g. the command that does it instead)."""

    def __and__(self, other: When) -> When:
        return When(
            lambda cfg: self.test(cfg) and other.test(cfg), f"{self.text} and {other.text}", self.fields + other.fields
        )

    def because(self, advice: str) -> When:
        return replace(self, advice=advice)


def is_(field: str, *values: Any) -> When:
    """`field` has one of `values`."""
    return When(lambda cfg: value_of(cfg, field) in values, f"{field} is {' or '.join(map(show, values))}", (field,))


def is_not(field: str, *values: Any, text: str | None = None) -> When:
    """`field` has none of `values`."""
    shown = text or f"{field} is not {' or '.join(map(show, values))}"
    return When(lambda cfg: value_of(cfg, field) not in values, shown, (field,))


ALWAYS = When(lambda cfg: True, "every method and technique")
SFT, REWARD, DPO, GRPO, PPO = (is_("algorithm.name", m) for m in ("sft", "reward", "dpo", "grpo", "ppo"))
RL = is_("algorithm.name", "grpo", "ppo")
DATASET = is_("algorithm.name", "sft", "reward", "dpo")
ADAPTERS = is_("technique.name", "lora", "qlora")
QLORA = is_("technique.name", "qlora")

# field -> when the code reads it. Where to look: technique.* models/loading.py and adapters.py (LoRA config only
# under lora/qlora, bitsandbytes only under qlora); data.train_on and data.packing algorithms/sft.py only (DPO and
# reward render pairs, RL renders prompts); algorithm.* each method's module; optim.* trainer/optim.py;
# run.* train.py and trainer/loop.py.
APPLIES: dict[str, When] = {
    "model.name": ALWAYS,
    "model.dtype": ALWAYS,
    "model.pure_bf16": ALWAYS,  # only valid with dtype bfloat16 (RunConfig checks that)
    "model.dropout": ALWAYS,
    "model.gradient_checkpointing": ALWAYS,
    "model.trust_remote_code": ALWAYS,
    "technique.name": ALWAYS,
    "technique.r": ADAPTERS,
    "technique.alpha": ADAPTERS,
    "technique.dropout": ADAPTERS,
    "technique.target_modules": ADAPTERS,
    "technique.quant_type": QLORA,
    "technique.double_quant": QLORA,
    "data.train": ALWAYS,
    "data.eval": DATASET.because(
        "RL has no fixed evaluation batches: score held-out prompts with "
        "`posttrain evaluate --task ... --data FILE` instead."
    ),
    "data.max_length": ALWAYS,
    "data.train_on": SFT.because("Preference pairs always score the responses; RL scores the completions."),
    "data.packing": SFT,
    "data.shuffle": ALWAYS,
    "algorithm.name": ALWAYS,
    "algorithm.dpo.beta": DPO,
    "algorithm.dpo.loss_type": DPO,
    "algorithm.dpo.label_smoothing": DPO & is_("algorithm.dpo.loss_type", "sigmoid"),
    "algorithm.dpo.ipo_logps": DPO & is_("algorithm.dpo.loss_type", "ipo"),
    "algorithm.dpo.simpo_gamma": DPO & is_("algorithm.dpo.loss_type", "simpo"),
    "algorithm.dpo.reference": (DPO & is_not("algorithm.dpo.loss_type", "simpo")).because(
        "SimPO is reference-free: no reference model is used at all."
    ),
    "algorithm.reward_margin": REWARD,
    "algorithm.rewards": RL,
    "algorithm.reward_model": RL,
    "algorithm.reward_fallback": RL,
    "algorithm.rollout.engine": RL,
    "algorithm.rollout.batch_size": RL,
    "algorithm.rollout.epochs": RL,
    "algorithm.rollout.max_new_tokens": RL,
    "algorithm.rollout.temperature": RL,
    "algorithm.rollout.top_p": RL,
    "algorithm.rollout.stop": RL,
    "algorithm.rollout.generation_batch_size": RL,
    "algorithm.rollout.overlong": RL,
    "algorithm.rollout.overlong_reward": RL & is_("algorithm.rollout.overlong", "fixed"),
    "algorithm.rollout.overlong_cache": RL & is_("algorithm.rollout.overlong", "soft"),
    "algorithm.grpo.num_generations": GRPO,
    "algorithm.grpo.loss_type": GRPO,
    "algorithm.grpo.scale": GRPO,
    "algorithm.grpo.beta": GRPO,
    "algorithm.grpo.clip_eps": GRPO,
    "algorithm.grpo.clip_eps_high": GRPO,
    "algorithm.grpo.log_kl": (GRPO & is_("algorithm.grpo.beta", 0.0)).because(
        "With beta > 0 the KL penalty needs the reference forward, and its KL is always logged."
    ),
    "algorithm.grpo.drop_uniform_groups": GRPO,
    "algorithm.ppo.kl_coef": PPO,
    "algorithm.ppo.adaptive_kl": PPO,
    "algorithm.ppo.target_kl": PPO & is_("algorithm.ppo.adaptive_kl", True),
    "algorithm.ppo.kl_horizon": PPO & is_("algorithm.ppo.adaptive_kl", True),
    "algorithm.ppo.gamma": PPO,
    "algorithm.ppo.lam": PPO,
    "algorithm.ppo.clip_eps": PPO,
    "algorithm.ppo.clip_eps_value": PPO,
    "algorithm.ppo.vf_coef": PPO,
    "algorithm.ppo.whiten_advantages": PPO,
    "optim.lr": ALWAYS,
    "optim.weight_decay": ALWAYS,
    "optim.betas": ALWAYS,
    "optim.eps": ALWAYS,
    "optim.batch_size": ALWAYS,
    "optim.micro_batch_size": ALWAYS,
    "optim.warmup_steps": ALWAYS,
    "optim.schedule": ALWAYS,
    "optim.min_lr_ratio": is_("optim.schedule", "cosine"),
    "optim.max_grad_norm": ALWAYS,
    "optim.head_lr": is_("algorithm.name", "ppo", "reward").because(
        "It is the learning rate of a scalar head, which only ppo (value head) and reward (score head) have."
    ),
    "run.output_dir": ALWAYS,
    "run.max_steps": ALWAYS,
    "run.epochs": is_("run.max_steps", None).because("run.max_steps decides the length; keep one of the two."),
    "run.seed": ALWAYS,
    "run.save_every": ALWAYS,
    "run.keep_checkpoints": ALWAYS,
    "run.eval_every": is_not("data.eval", None, text="data.eval is set"),
    "run.log_every": ALWAYS,
    "run.tensorboard": ALWAYS,
    "run.progress": ALWAYS,
    "run.report": ALWAYS,
}


def reads(field: str) -> str:
    """Which runs read `field`, for --help-config: "every method and technique" or "only when ..."."""
    when = APPLIES.get(field)
    if when is None:
        return "(not in the table: config_rules.APPLIES)"
    return when.text if when is ALWAYS else f"only when {when.text}"


def unread_settings(cfg: Any) -> list[str]:
    """One paragraph per field set to a non-default value that this run would not read (empty: none)."""
    found = []
    for field, when in APPLIES.items():
        if when is ALWAYS:
            continue
        value, default = value_of(cfg, field), default_of(cfg, field)
        if value == default or when.test(cfg):
            continue
        context = dict.fromkeys(("algorithm.name", "technique.name", *when.fields))
        this_run = ", ".join(f"{f}={show(value_of(cfg, f))}" for f in context)
        advice = f" {when.advice}" if when.advice else ""
        found.append(
            f"{field} = {show(value)} would be ignored: it is read only when {when.text}, and this run has "
            f"{this_run}.{advice} Remove {field} (or set it back to its default, {show(default)}), or change the "
            "run so that it applies."
        )
    return found
