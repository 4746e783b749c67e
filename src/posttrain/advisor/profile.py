"""The task profile the advisor reads: what data exists, how quality is judged, what hardware is there.

A profile comes from a flat YAML file, from command-line flags, from questions asked one at a time, or from a
dict; `KEYS` is the single table of its keys (type, question, help) that all four use. Unknown keys and wrong
types raise `UserError` naming the file and the key. Missing keys stay `None`; the advisor states what it
assumed for each.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from posttrain.errors import UserError
from posttrain.yamlfile import load_yaml, yaml_problem


@dataclass(frozen=True)
class Key:
    name: str
    kind: str  # int | float | bool | str | choice
    question: str
    choices: tuple[str, ...] = ()


# One row per profile key; the first twelve are the stable names from the issue.
KEYS: tuple[Key, ...] = (
    Key("task", "str", "What should the model do (free text)?"),
    Key("demonstrations", "int", "How many (prompt, ideal response) pairs do you have?"),
    Key("preference_pairs", "int", "How many (prompt, chosen, rejected) triplets do you have?"),
    Key("prompts", "int", "How many prompts without answers (for sampling) do you have?"),
    Key("verifiable", "bool", "Can a program check an answer or compute a reward?"),
    Key("quality", "choice", "Is quality objective (right/wrong) or subjective (better/worse)?", ("objective", "subjective")),
    Key("multi_step", "bool", "Does the task need multi-step reasoning?"),
    Key("reward_model", "bool", "Does a trained reward model exist?"),
    Key("model", "str", "Which model (a size like 7b or a name like llama-3-8b)?"),
    Key("gpu", "str", "Which GPU (e.g. A100-80GB, RTX4090-24GB)?"),
    Key("gpu_memory_gb", "float", "Or: how many GB does each GPU have?"),
    Key("gpus", "int", "How many GPUs?"),
    Key("budget_usd", "float", "Budget in USD (optional)?"),
    Key("format_ok", "bool", "Does the model already produce the required output format?"),
    Key("format_compliance", "bool", "Is the main goal a strict output format (e.g. valid JSON)?"),
    Key("domain_adaptation", "bool", "Is the main goal adapting to a new domain?"),
    Key("success_rate", "float", "What fraction of prompts does the model already solve (0-1)?"),
    Key("dense_reward", "bool", "Is the reward dense (per step or token) rather than per answer?"),
    Key("seq_len", "int", "Tokens per example, prompt + response (longest typical)?"),
    Key("avg_tokens", "float", "Average tokens per example?"),
)  # fmt: skip
KEY_BY_NAME = {k.name: k for k in KEYS}
_TRUE = {"true", "yes", "y", "1", "on"}
_FALSE = {"false", "no", "n", "0", "off"}


@dataclass(frozen=True)
class Profile:
    task: str | None = None
    demonstrations: int | None = None
    preference_pairs: int | None = None
    prompts: int | None = None
    verifiable: bool | None = None
    quality: str | None = None
    multi_step: bool | None = None
    reward_model: bool | None = None
    model: str | None = None
    gpu: str | None = None
    gpu_memory_gb: float | None = None
    gpus: int | None = None
    budget_usd: float | None = None
    format_ok: bool | None = None
    format_compliance: bool | None = None
    domain_adaptation: bool | None = None
    success_rate: float | None = None
    dense_reward: bool | None = None
    seq_len: int | None = None
    avg_tokens: float | None = None
    data_file: str | None = None  # set by --data: the config's data.train

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def coerce(key: str, value, where: str):
    """`value` converted to `key`'s type; strings (from flags or questions) are parsed. None stays None."""
    if value is None:
        return None
    spec = KEY_BY_NAME[key]
    bad = f"{where}: {key}: "
    if spec.kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise UserError(bad + f"must be true or false, got {value!r}")
    if spec.kind in ("int", "float"):
        if isinstance(value, str):
            try:
                value = float(value.replace(",", "").replace("_", ""))
            except ValueError:
                raise UserError(bad + f"must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(bad + f"must be a number, got {value!r}")
        if not math.isfinite(value):
            raise UserError(bad + f"must be a finite number, got {value!r}")
        if value < 0 or (value == 0 and key in ("gpus", "gpu_memory_gb", "seq_len", "avg_tokens")):
            raise UserError(
                bad + f"must be {'positive' if key in ('gpus', 'seq_len') else 'non-negative'}, got {value!r}"
            )
        if key == "success_rate" and value > 1:
            raise UserError(bad + f"is a fraction between 0 and 1, got {value!r}")
        if spec.kind == "int":
            if value != int(value):
                raise UserError(bad + f"must be a whole number, got {value!r}")
            return int(value)
        return float(value)
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise UserError(bad + f"must be text, got {value!r}")
    value = str(value).strip()
    if spec.kind == "choice":
        if value.lower() not in spec.choices:
            raise UserError(bad + f"must be one of {', '.join(spec.choices)}, got {value!r}")
        return value.lower()
    return value


def profile_from_dict(data: dict, where: str = "profile", lines: dict[str, int] | None = None) -> Profile:
    """A validated `Profile`; unknown keys are errors with close matches. `lines` (key -> line of the file
    `where`) puts the line in each key's error."""
    if not isinstance(data, dict):
        raise UserError(
            f"{where}: a profile is a flat mapping of keys such as task, demonstrations, verifiable"
        )
    values = {}
    allowed = [k.name for k in KEYS] + ["data_file"]
    for key, value in data.items():
        here = f"{where}:{line}" if (line := (lines or {}).get(str(key))) is not None else where
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=2, cutoff=0.6)
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            raise UserError(
                f"{here}: {key}: unknown profile key{hint}; known keys: {', '.join(allowed[:-1])}"
            )
        if isinstance(value, (dict, list)):
            raise UserError(f"{here}: {key}: profiles are flat; a single value is expected, got {value!r}")
        values[key] = value if key == "data_file" else coerce(key, value, here)
    return check_profile(Profile(**values), where)


def check_profile(p: Profile, where: str = "profile") -> Profile:
    """`p`, or a `UserError` when its answers contradict each other (a user's profile: file, flags, answers)."""
    if p.gpu is not None and p.gpu_memory_gb is not None:
        raise UserError(f"{where}: gpu ({p.gpu}) and gpu_memory_gb ({p.gpu_memory_gb:g}) both name the GPU; give "
                        "one (gpu_memory_gb plans for a GPU known only by its memory)")  # fmt: skip
    if p.avg_tokens is not None and p.seq_len is not None and p.avg_tokens > p.seq_len:
        raise UserError(f"{where}: avg_tokens ({p.avg_tokens:g}) is more than seq_len ({p.seq_len}), the longest "
                        "example; an average cannot exceed the maximum")  # fmt: skip
    return p


def load_profile(path: str | Path) -> Profile:
    p = Path(path)
    try:
        lines: dict[str, int] = {}
        data = load_yaml(p.read_text(encoding="utf-8"), str(p), lines=lines)
    except OSError as err:
        raise UserError(f"{p}: cannot read the profile ({err.strerror})") from None
    except UnicodeDecodeError:
        raise UserError(f"{p}: not UTF-8 text") from None
    except yaml.YAMLError as err:
        raise UserError(yaml_problem(err, str(p))) from None
    return profile_from_dict(data or {}, str(p), lines)


def ask(input_fn=None, print_fn=print) -> Profile:
    """Ask for each key in turn; an empty answer skips it. A bad answer is asked again."""
    input_fn = input_fn or input  # looked up at call time, so tests can replace builtins.input
    print_fn("Answer each question; press Enter to skip (the advisor then states what it assumed).")
    values = {}
    for key in KEYS:
        choices = f" [{'/'.join(key.choices)}]" if key.choices else (" [y/n]" if key.kind == "bool" else "")
        while True:
            try:
                answer = input_fn(f"{key.question}{choices} ").strip()
            except EOFError:  # input closed: keep what was answered
                return Profile(**values)
            if not answer:
                break
            try:
                values[key.name] = coerce(key.name, answer, "answer")
                break
            except UserError as err:
                print_fn(str(err))
    return Profile(**values)
