"""The settings of `posttrain study`, as typed sections read from a YAML file (src/posttrain/configs/study/).

A setting names the model, the seeds and noise levels, the arms, the task's sizes, the warm start, the budget in
seconds each arm gets, how the arms' on-policy data is sampled, how models are scored and the statistics, and the
run-config fragments every training is built from (`runs`: posttrain train's own sections, validated as a run
config before anything loads). `quick.yaml`, `standard.yaml` and `full.yaml` are the three shipped settings;
any other YAML of the same shape works, and dotted overrides (`task.eval_problems=40`) change a field.

Unknown keys, wrong types and impossible values raise `ConfigError` naming the dotted field, before any model loads.
This module reads and checks settings; it runs nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from posttrain.config import _message, apply_overrides, override_keys, read_config_file, set_by
from posttrain.errors import ConfigError

STUDY_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "study"
"""The shipped settings, one YAML each (in a clone also at configs/study/)."""

ARM_NAMES = ("sft-more", "sft-diverse", "grpo", "dpo-onpolicy", "sft-self", "grpo-random")
"""Every arm the study knows (`study.arms.ARMS` says what each trains)."""


class _Section(BaseModel):
    # extra="forbid": a misspelt key is an error, never ignored; field docstrings document each setting.
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)


class TaskSettings(_Section):
    max_value: int = Field(50, ge=3)
    """Largest starting count and amount (arithmetic's `max_value`), the same in every split."""
    add_share: float = Field(0.8, ge=0.0, le=1.0)
    """Share of additions ("buys more", "a friend gives") among the training problems; the rest subtract."""
    train_rows: int = Field(320, ge=8)
    """One-step training problems per seed: the fixed-template SFT pairs, the RL prompts, the pairs' prompts."""
    eval_problems: int = Field(60, ge=2)
    """In-distribution problems per seed, half additions and half subtractions (even); each gets a paraphrased,
    a no-op and a renamed variant, and each subtraction one with its operation told in an unseen wording."""

    @model_validator(mode="after")
    def _even(self) -> TaskSettings:
        if self.eval_problems % 2:
            raise ValueError(f"task.eval_problems ({self.eval_problems}) must be even: half additions, half "
                             "subtractions")  # fmt: skip
        return self


class WarmSettings(_Section):
    steps: int = Field(10, gt=0)
    """SFT steps of the warm start W on the fixed-template pairs (batch and rate: `runs.warm`)."""
    pass_range: tuple[float, float] = (0.2, 0.8)
    """W is checked for sampled pass@1 inside this range (RL needs a model that is right sometimes)."""

    @field_validator("pass_range")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0 <= low <= high <= 1:
            raise ValueError(f"must be [low, high] with 0 <= low <= high <= 1, got [{low}, {high}]")
        return value
    min_mixed: float = Field(0.4, ge=0.0, le=1.0)
    """...and at least this share of prompts with some samples right and some wrong."""


class BudgetSettings(_Section):
    seconds: float = Field(75.0, gt=0)
    """Wall-clock seconds each arm gets on this machine: its generation before training (DPO pairs, own samples)
    plus its training steps, rollouts included."""
    calibration_steps: int = Field(2, ge=1)
    """Steps each arm runs first to measure its seconds per step; its step count follows from them."""
    checkpoints: int = Field(3, ge=1)
    """Checkpoints scored per arm, evenly spaced (accuracy against compute)."""


class OnPolicySettings(_Section):
    prompts: int = Field(48, gt=0)
    """Training prompts W samples on, for the DPO pairs and for SFT on its own verified samples."""
    samples: int = Field(4, ge=2)
    """Samples per prompt."""
    temperature: float = Field(0.7, gt=0)
    """Sampling temperature."""


class EvalSettings(_Section):
    max_new_tokens: int = Field(24, gt=0)
    """Longest answer scored (a one-step worked answer takes about 17 tokens)."""
    batch_size: int = Field(64, gt=0)
    """Sequences per generate call."""
    temperature: float = Field(0.7, gt=0)
    """Sampling temperature for pass@k and W's check."""
    samples: int = Field(8, ge=1)
    """Samples per prompt for pass@k."""
    ks: list[int] = [1, 2, 4, 8]
    """The k of pass@k reported (each at most `samples`)."""
    pass_problems: int = Field(24, gt=0)
    """In-distribution problems sampled for pass@k (the first ones)."""
    curve_problems: int = Field(16, gt=0)
    """Problems per split scored at the checkpoints before the last (the first ones; the last is scored on all)."""
    drift: bool = True
    """Measure forward KL from the base on the task and top-1 agreement on the unrelated probe."""
    base: bool = False
    """Also score the untrained base model (one more full evaluation per seed)."""

    @model_validator(mode="after")
    def _ks(self) -> EvalSettings:
        bad = [k for k in self.ks if not 1 <= k <= self.samples]
        if bad or not self.ks:
            raise ValueError(f"evaluation.ks must be non-empty, each k in 1..evaluation.samples ({self.samples}); "
                             f"got {self.ks}")  # fmt: skip
        return self


class StatsSettings(_Section):
    level: float = Field(0.95, gt=0, lt=1)
    """Confidence level of every interval."""
    power: float = Field(0.8, ge=0.5, lt=1)
    """Power at which the minimum detectable difference is stated (at least 0.5: below it a difference of that size
    is missed more often than found, and below (1 - level) / 2 the stated difference is negative, so every
    difference would pass the size test)."""
    resamples: int = Field(2000, ge=100)
    """Bootstrap resamples."""


STUDY_SETS = {
    "model": {"name": "from the setting's model"},
    "data": {"train": "each arm's own data"},
    "run": {"output_dir": "each arm's folder under the study's", "seed": "from the setting's seeds",
            "max_steps": "from the budget", "save_every": "from the budget's checkpoints",
            "keep_checkpoints": "as the arms need them", "progress": "off", "report": "off",
            "log_every": "1: the budget's time and tokens are read from every step's record"},
}
"""The run settings `study.arms.run_config` fills in for every training, with where each comes from."""


class RunFragments(_Section):
    """Run-config fragments (posttrain train's sections) every training is built from: `common`, then the kind's.
    The study fills in the model, data file, run folder, steps, checkpoints and seed."""

    common: dict = {}
    warm: dict = {}
    sft: dict = {}
    grpo: dict = {}
    dpo: dict = {}

    @model_validator(mode="after")
    def _not_what_the_study_sets(self) -> RunFragments:
        # `study.arms.run_config` writes these over the fragments: a value given here would be replaced silently
        for kind in ("common", "warm", "sft", "grpo", "dpo"):
            for section, fields in STUDY_SETS.items():
                given = getattr(self, kind).get(section)
                for name in fields if isinstance(given, dict) else ():
                    if name in given:
                        raise ValueError(f"runs.{kind}.{section}.{name}: the study sets it itself ({fields[name]}), "
                                         "so a value here would be replaced; remove it")  # fmt: skip
        return self


class StudyConfig(_Section):
    model: str = "smollm2-135m-instruct"
    """The base model: the embedded default, a local folder, or a hub name."""
    seeds: list[int] = Field([0], min_length=1)
    """Training seeds; each has its own data, evaluation problems, warm start and arms."""
    noise: list[float] = [0.0]
    """Shares of wrong demonstrations in the SFT data (W's and the SFT arms'), each a condition of its own."""
    arms: list[Literal[ARM_NAMES]] = Field(["sft-more", "sft-diverse", "grpo", "dpo-onpolicy"], min_length=1)
    """The arms trained from W (study.arms.ARMS)."""
    baseline: Literal[ARM_NAMES] = "sft-more"
    """The arm every other is compared with."""
    task: TaskSettings = TaskSettings()
    warm_start: WarmSettings = WarmSettings()
    budget: BudgetSettings = BudgetSettings()
    onpolicy: OnPolicySettings = OnPolicySettings()
    evaluation: EvalSettings = EvalSettings()
    statistics: StatsSettings = StatsSettings()
    runs: RunFragments = RunFragments()

    @model_validator(mode="after")
    def _consistent(self) -> StudyConfig:
        if len(set(self.seeds)) != len(self.seeds) or len(set(self.arms)) != len(self.arms):
            raise ValueError("seeds and arms must not repeat")
        if any(not 0 <= n < 1 for n in self.noise) or len(set(self.noise)) != len(self.noise) or not self.noise:
            raise ValueError(f"noise must list distinct shares in [0, 1), got {self.noise}")
        if self.baseline not in self.arms:
            raise ValueError(f"baseline {self.baseline!r} is not one of the arms ({', '.join(self.arms)})")
        return self


def load_study_config(setting: str | Path, overrides: list[str] | None = None) -> tuple[StudyConfig, str]:
    """A shipped setting by name (quick, standard, full) or a YAML file, with dotted overrides applied; returns
    (the checked settings, the setting's name)."""
    path = STUDY_CONFIGS / f"{setting}.yaml" if (STUDY_CONFIGS / f"{setting}.yaml").is_file() else Path(setting)
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in STUDY_CONFIGS.glob("*.yaml")))
        raise ConfigError(f"study setting {str(setting)!r}: no such file, and not a shipped setting ({shipped})")
    lines: dict[str, int] = {}
    data = apply_overrides(read_config_file(path, lines), list(overrides or []))
    return validate_study(data, source=str(path), overrides=override_keys(overrides), lines=lines), path.stem


def validate_study(data: dict, *, source: str = "study settings", overrides: dict[str, str] | None = None,
                   lines: dict[str, int] | None = None) -> StudyConfig:  # fmt: skip
    """`data` as a `StudyConfig`, or a `ConfigError` listing every problem by dotted field, and by the `--set`
    that gave it (`overrides`: dotted key -> the override as given) or else the file's line (`lines`)."""
    try:
        return StudyConfig.model_validate(data)
    except ValidationError as err:
        out = [f"{source}: invalid study settings:"]
        for e in err.errors():
            where = ".".join(str(p) for p in e["loc"]) or "(top level)"
            msg = "unknown key" if e["type"] == "extra_forbidden" else _message(e)
            if e["type"] not in ("extra_forbidden", "missing", "value_error") and "input" in e \
                    and not isinstance(e["input"], dict):  # fmt: skip
                msg = f"{msg} (got {e['input']!r})"
            out.append(f"  {set_by(where, overrides, lines, via='--set', unknown=e['type'] == 'extra_forbidden')}: {msg}")
        raise ConfigError("\n".join(out)) from None
