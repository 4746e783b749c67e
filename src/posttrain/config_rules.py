"""Which run settings each method and technique reads: so that no setting silently does nothing.

The rule: every field a user sets to a value other than its default either changes what the run does, or the
run is refused by config validation, before any model loads and before anything is written to the run folder.
Two tables say when each field is read; the conditions were found by reading the code that consumes each field
(algorithms/*.py, rollout/, models/loading.py, models/adapters.py, trainer/*.py, train.py), not guessed:
- `APPLIES` here, for the shared sections (model, technique, data, optim, run). A few of their fields are read by
  some methods only (`METHOD_FIELDS`); each method says which of those it reads in its section's `run_fields`.
- each method's own section (`posttrain.algorithms.<method>.Config.rules`), for its fields that are read only
  under a condition (DPO's `label_smoothing` only with the sigmoid loss). A field of another method cannot be set
  at all: the algorithm section of a run is the chosen method's, and an unknown key is an error.
`tests/unit/test_config_rules.py` checks that every shared field has a row, so a new field cannot be added without
deciding, and holds one refused and one accepted case per conditional row.

"Set" is judged on the value, not on which keys a file spells out: a field equal to its default is never
refused, so a resolved ``config.yaml`` (which writes every field) loads again.

This module only describes and checks; it reads a config through attribute access and imports no method.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any


def value_of(cfg: Any, dotted: str) -> Any:
    """The value of a dotted field, e.g. ``value_of(cfg, "algorithm.beta")``."""
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
    """A value as it would be written in YAML: null, true, 0.1, [a, b]; a string YAML would not read back as it is
    (a newline in it, blank ends) in double quotes.

    >>> print(show({"user": "\\n\\nHuman:", "n": [1, "a b"]}))
    {user: "\\n\\nHuman:", n: [1, a b]}
    """
    if isinstance(value, str) and not _plain(value):
        return json.dumps(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {show(v)}" for k, v in value.items()) + "}"
    return str(value)


def _plain(text: str) -> bool:
    """Whether YAML reads `text` back as itself unquoted, inside a flow list as `show` writes it (``### Human:`` is
    a comment there, ``USER:`` a mapping, ``\\n`` a space).

    >>> _plain("a b"), _plain("USER:"), _plain("### Human:"), _plain(" x"), _plain("[q]")
    (True, False, False, False, False)
    """
    import yaml

    if not text or text != text.strip() or any(c in text for c in "\n\r\t"):
        return False
    try:
        return yaml.safe_load(f"[{text}]") == [text]
    except yaml.YAMLError:
        return False


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

    def __or__(self, other: When) -> When:
        return When(
            lambda cfg: self.test(cfg) or other.test(cfg), f"{self.text}, or {other.text}", self.fields + other.fields
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
ADAPTERS = is_("technique.name", "lora", "qlora")
QLORA = is_("technique.name", "qlora")


def method_reads(field: str) -> When:
    """The chosen method declares that it reads `field` (its section's `run_fields`)."""
    return When(lambda cfg: field in type(cfg.algorithm).run_fields, "the method reads it", ("algorithm.name",))


# Shared fields that only some methods read; each method lists those it reads in its section's `run_fields`.
METHOD_FIELDS = ("data.eval", "data.train_on", "data.packing", "data.share_prompt", "optim.head_lr")

# field -> when the code reads it. Where to look: technique.* models/loading.py and adapters.py (LoRA config only
# under lora/qlora, bitsandbytes only under qlora); data.train_on and data.packing algorithms/sft.py only (DPO and
# reward render pairs, RL renders prompts); data.share_prompt algorithms/sft.py, dpo.py, grpo.py, rloo.py; optim.* trainer/optim.py; run.* train.py and trainer/loop.py.
APPLIES: dict[str, When] = {
    "model.name": ALWAYS,
    "model.dtype": ALWAYS,
    "model.pure_bf16": ALWAYS,  # only valid with dtype bfloat16 (RunBase checks that)
    "model.dropout": ALWAYS,
    "model.gradient_checkpointing": ALWAYS,
    "model.rebuild_pointwise": is_("model.compile", False).because(
        "Compiled layers keep what the compiler chooses; model.compile_memory_budget sets how much."
    ),
    "model.compile": ALWAYS,
    "model.compile_memory_budget": is_("model.compile", True),
    "model.trust_remote_code": ALWAYS,
    "technique.name": ALWAYS,
    "technique.r": ADAPTERS,
    "technique.alpha": ADAPTERS,
    "technique.dropout": ADAPTERS,
    "technique.target_modules": ADAPTERS,
    "technique.quant_type": QLORA,
    "technique.double_quant": QLORA,
    "data.train": ALWAYS,
    "data.eval": method_reads("data.eval").because(
        "RL has no fixed evaluation batches: score held-out prompts with "
        "`posttrain evaluate --data FILE --task ...` (or --reward ...) instead."
    ),
    "data.max_length": ALWAYS,
    "data.train_on": method_reads("data.train_on").because(
        "Preference pairs always score the responses; RL scores the completions."
    ),
    "data.packing": method_reads("data.packing"),
    "data.share_prompt": method_reads("data.share_prompt").because(
        "Only SFT, DPO, GRPO and RLOO run several sequences that begin alike."
    ),
    "data.shuffle": ALWAYS,
    "data.columns": ALWAYS,
    "data.ignore_columns": ALWAYS,
    "data.message_keys": ALWAYS,
    "data.roles": ALWAYS,
    "data.turns": ALWAYS,
    "data.skip_bad_rows": ALWAYS,
    "data.chat_template_kwargs": ALWAYS,  # every method renders its rows with the template
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
    "optim.head_lr": method_reads("optim.head_lr").because(
        "It is the learning rate of a scalar head, which only methods that train one have (a reward model's "
        "score head, PPO's value head)."
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
    "run.sharding": ALWAYS,
    "run.whole_checkpoints": is_("run.sharding", "fsdp2").because(
        "Without sharding every checkpoint is whole already."
    ),
}


def _readers(schema: Any, field: str) -> list[str]:
    """The methods that read a `METHOD_FIELDS` field."""
    return [name for name, section in schema.methods().items() if field in section.run_fields]


def rules_of(cfg_or_schema: Any) -> dict[str, When]:
    """Every conditional rule of a run (or, given a `RunConfig` class, of no method): the shared table and the
    chosen method's own rules, by dotted field."""
    section = getattr(cfg_or_schema, "algorithm", None)
    own = {f"algorithm.{k}": w for k, w in type(section).rules.items()} if section is not None else {}
    # a shared field the method reads only under a condition of its own (`AlgorithmSection.run_rules`)
    run = type(section).run_rules if section is not None else {}
    return {**APPLIES, **own, **run}


def reads(field: str, schema: Any, method: str | None = None) -> str:
    """Which runs read `field`, for --help-config: "every method and technique" or "only when ..."."""
    if method is not None:  # a field of that method's own section
        when = schema.methods()[method].rules.get(field.removeprefix("algorithm."))
        return f"algorithm.name={method}" + (f", only when {when.text}" if when is not None else "")
    when = APPLIES.get(field)
    if when is None:
        return "(not in the table: config_rules.APPLIES)"
    if field in METHOD_FIELDS:
        methods = schema.methods()
        readers = [f"{name} (when {methods[name].run_rules[field].text})" if field in methods[name].run_rules else name
                   for name in _readers(schema, field)]  # fmt: skip
        return f"only when algorithm.name is {' or '.join(readers)}"
    return when.text if when is ALWAYS else f"only when {when.text}"


def unread_settings(cfg: Any) -> list[str]:
    """One paragraph per field set to a non-default value that this run would not read (empty: none)."""
    found = []
    for field, when in rules_of(cfg).items():
        if when is ALWAYS:
            continue
        value, default = value_of(cfg, field), default_of(cfg, field)
        if value == default or when.test(cfg):
            continue
        context = dict.fromkeys(("algorithm.name", "technique.name", *when.fields))
        this_run = ", ".join(f"{f}={show(value_of(cfg, f))}" for f in context)
        text = (f"algorithm.name is {' or '.join(_readers(type(cfg), field))}"
                if field in METHOD_FIELDS and field not in type(cfg.algorithm).run_rules else when.text)  # fmt: skip
        advice = f" {when.advice}" if when.advice else ""
        found.append(
            f"{field} = {show(value)} would be ignored: it is read only when {text}, and this run has "
            f"{this_run}.{advice} Remove {field} (or set it back to its default, {show(default)}), or change the "
            "run so that it applies."
        )
    return found
