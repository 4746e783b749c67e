"""Reward specs from the run config (``algorithm.rewards``): check their shape, resolve each to a function.

A spec is a string (a built-in name, or ``path/to/file.py:function``) or a mapping
``{name, weight=1.0, args={}, label=None, fallback=None}`` (`fallback`: the function's own value for a sample it
fails on, instead of ``algorithm.reward_fallback``). For a built-in, ``args`` go to its factory in `REWARDS`; for a
user function, they are bound as keyword arguments (``functools.partial``). Every mistake is a
`ConfigError` naming ``algorithm.rewards[i]``, raised before any model loads.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
import math
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.errors import ConfigError
from posttrain.rewards.builtin import REWARDS

KEYS = ("name", "weight", "args", "label", "fallback")


@dataclass(frozen=True)
class RewardSpec:
    """One checked spec; `fn` is the factory (built-in) or the user's function (file)."""

    name: str
    weight: float = 1.0
    args: dict[str, Any] = field(default_factory=dict)
    label: str = ""
    fn: Callable[..., Any] | None = None
    builtin: bool = True
    where: str = "algorithm.rewards[0]"
    fallback: float | None = None  # the function's own; None: the run's algorithm.reward_fallback


@dataclass(frozen=True)
class NamedReward:
    """A ready reward function with its log label and weight."""

    name: str
    fn: Callable[..., list[float]]
    weight: float = 1.0
    builtin: bool = False
    """A built-in from `REWARDS` (its failures are named by the reward, not by a file and line of posttrain)."""
    fallback: float | None = None
    """The value of a sample it fails on (its spec's `fallback`); None: the caller's default (the run's
    `algorithm.reward_fallback`)."""


def is_file_spec(name: str) -> bool:
    """Whether `name` reads as ``path/to/file.py:function``.

    >>> is_file_spec("my_rewards.py:exact_answer"), is_file_spec("numeric_answer")
    (True, False)
    """
    path, sep, func = name.rpartition(":")
    return bool(sep) and path.endswith(".py") and bool(func)


def parse_reward_specs(specs: list, *, base_dir: str | Path | None = None,
                       where: str | list[str] = "algorithm.rewards[{i}]") -> list[RewardSpec]:  # fmt: skip
    """Check every spec and resolve its function (a user file is imported here); relative file paths are
    taken from `base_dir` (default: the working directory). `where` names spec i in errors (`{i}` from 0, `{n}`
    from 1): the config's field, or a command's flag (``--reward #{n}``); or a name for each spec (a run config's
    `reward_where`, which adds the file line that wrote it).

    >>> [(s.label, s.weight) for s in parse_reward_specs(["task", {"name": "regex_format", "weight": 0.2,
    ...     "args": {"pattern": "Answer: "}}])]
    [('task', 1.0), ('regex_format', 0.2)]
    >>> parse_reward_specs(["nope"])
    Traceback (most recent call last):
    ...
    posttrain.errors.ConfigError: algorithm.rewards[0]: unknown reward 'nope'; expected a built-in (code_exec, exact_match, json_schema, length_penalty, numeric_answer, random, regex_format, reward_model, task) or 'path/to/file.py:function'
    """
    if not isinstance(specs, list | tuple):
        raise ConfigError(f"algorithm.rewards must be a list of reward specs, got {type(specs).__name__}")
    names = where if isinstance(where, list) else [where.format(i=i, n=i + 1) for i in range(len(specs))]
    out = [_parse_one(spec, names[i], base_dir) for i, spec in enumerate(specs)]
    seen: dict[str, str] = {}
    for s in out:
        if s.label in seen:
            raise ConfigError(f"{s.where}: reward name {s.label!r} is already used by {seen[s.label]}; "
                              "give one of them a distinct 'label'")  # fmt: skip
        seen[s.label] = s.where
    return out


def _parse_one(spec: Any, where: str, base_dir: str | Path | None) -> RewardSpec:
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict):
        raise ConfigError(
            f"{where}: must be a reward name or a mapping with 'name', got {type(spec).__name__}"
        )
    unknown = sorted(set(spec) - set(KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(KEYS)}")
    name, weight = spec.get("name"), spec.get("weight", 1.0)
    args, label = spec.get("args") or {}, spec.get("label")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{where}: 'name' must be a non-empty string")
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
        raise ConfigError(f"{where}: 'weight' must be a finite number, got {weight!r}")
    if not isinstance(args, dict):
        raise ConfigError(f"{where}: 'args' must be a mapping, got {type(args).__name__}")
    if label is not None and (not isinstance(label, str) or not label.strip()):
        raise ConfigError(f"{where}: 'label' must be a non-empty string")
    fallback = spec.get("fallback")
    if fallback is not None and (isinstance(fallback, bool) or not isinstance(fallback, int | float)
                                 or not math.isfinite(fallback)):  # fmt: skip
        raise ConfigError(f"{where}: 'fallback' must be a finite number, got {fallback!r}")
    if is_file_spec(name):
        fn, builtin, default_label = (
            _load_user_function(name, where, base_dir),
            False,
            name.rpartition(":")[2],
        )
    elif name in REWARDS:
        fn, builtin, default_label = REWARDS[name], True, name
    else:
        raise ConfigError(f"{where}: unknown reward {name!r}; expected a built-in ({', '.join(sorted(REWARDS))}) "
                          "or 'path/to/file.py:function'")  # fmt: skip
    _check_args(fn, args, where, name, strict=not builtin)
    return RewardSpec(name, float(weight), dict(args), label or default_label, fn, builtin, where,
                      None if fallback is None else float(fallback))  # fmt: skip


def _check_args(fn: Callable, args: dict, where: str, name: str, *, strict: bool = False) -> None:
    """Bind `args` to `fn`'s signature. `strict` (user functions, which must take ``**kwargs``): every arg
    must also name a parameter, since ``**kwargs`` would otherwise swallow a misspelt one silently."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # builtins without a signature: the call will tell
    named = [p.name for p in sig.parameters.values() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    accepted = [n for n in named if n not in ("prompts", "completions")]
    hint = f"; accepted: {', '.join(accepted)}" if accepted else "; it takes no args"
    try:
        sig.bind_partial(**args)
    except TypeError as e:
        raise ConfigError(f"{where}: bad args for {name!r}: {e}{hint}") from None
    unknown = sorted(set(args) - set(accepted))
    if strict and unknown:
        raise ConfigError(f"{where}: bad args for {name!r}: no parameter named {', '.join(unknown)}{hint}")


_REWARD_ATTRIBUTES = ("events", "event_notes", "retry_per_sample", "collective")
"""What posttrain reads off a reward function besides calling it (`compute`)."""


def _load_user_function(name: str, where: str, base_dir: str | Path | None) -> Callable:
    path_text, _, func = name.rpartition(":")
    path = Path(path_text).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    if not path.is_file():
        relative = "" if Path(path_text).expanduser().is_absolute() else (
            f" (a relative path is read from {base_dir if base_dir is not None else Path.cwd()})")
        raise ConfigError(f"{where}: reward file {str(path)!r} not found{relative}")
    # A unique module name per file and content, so two files both called rewards.py do not replace each other, and
    # a file edited since it was imported in this process is imported again (a notebook's second train() used the
    # function as first imported, silently).
    where_from = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    content = hashlib.sha1(path.read_bytes()).hexdigest()[:10]
    family = f"posttrain_user_rewards.{path.stem}_{where_from}_"
    mod_name = family + content
    if "posttrain_user_rewards" not in sys.modules:  # the package its modules are named under: pickle imports it
        package = types.ModuleType("posttrain_user_rewards")
        package.__path__ = []
        sys.modules["posttrain_user_rewards"] = package
    module = sys.modules.get(mod_name)
    if module is None:
        for older in [m for m in sys.modules if m.startswith(family)]:  # the file as it was: not kept alive
            del sys.modules[older]
        loader_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[mod_name] = module  # dataclasses and pickling look modules up here
        try:
            loader_spec.loader.exec_module(module)
        except (Exception, SystemExit) as e:  # a script that exits or parses sys.argv when imported
            del sys.modules[mod_name]
            raise ConfigError(f"{where}: importing {str(path)!r} failed: {type(e).__name__}: {e}") from None
    if not hasattr(module, func):
        raise ConfigError(f"{where}: {str(path)!r} has no function {func!r}")
    fn = getattr(module, func)
    if not callable(fn):
        raise ConfigError(f"{where}: {func!r} in {str(path)!r} is not callable (it is {type(fn).__name__})")
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return fn
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        raise ConfigError(f"{where}: {func!r} must accept **kwargs (it is given the dataset's other columns), "
                          "e.g. def f(prompts, completions, answer, **kwargs)")  # fmt: skip
    return by_name(fn, where)


def by_name(fn, where: str = "the reward"):
    """`fn` called as posttrain calls a reward, ``fn(prompts, completions, **columns)``, also where it names its
    parameters in another order: TRL's ``def f(completions, **kwargs)`` failed on every sample, and ``def
    f(completions, prompts, **kwargs)`` scored the prompts, silently. A function that takes a parameter called
    ``prompts`` or ``completions`` other than first or second is called with them by name; one that names neither
    (``def f(p, c, **kw)``) is called by position, as documented.

    >>> def trl(completions, **kwargs): return [len(c) for c in completions]
    >>> by_name(trl)(["the prompt"], ["abc"])
    [3]
    """
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return fn
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    named = {"prompts", "completions"} & set(positional)
    misplaced = any(positional.index(name) != i for i, name in enumerate(("prompts", "completions")) if name in named)
    starred = any(p.kind is p.VAR_POSITIONAL for p in params)  # def f(prompts, *args, **kw): by position, as ever
    if not named or (not misplaced and (len(positional) >= 2 or starred)):
        return fn
    if any(p.kind is p.POSITIONAL_ONLY and p.name in named for p in params):
        raise ConfigError(f"{where}: its parameters {', '.join(positional[:2])} are positional-only and not in the "
                          "order posttrain calls a reward, fn(prompts, completions, **columns): reorder them, or drop "
                          "the / so that they are called by name")  # fmt: skip

    @functools.wraps(fn)
    def call(prompts, completions, **columns):
        return fn(prompts=prompts, completions=completions, **columns)

    for attr in _REWARD_ATTRIBUTES:  # what `compute` reads off the function (a callable object's own: wraps
        if hasattr(fn, attr):  # copies only its __dict__, not its class's)
            setattr(call, attr, getattr(fn, attr))
    return call


def build_reward_functions(specs: list, *, base_dir: str | Path | None = None) -> list[NamedReward]:
    """Specs (raw, or from `parse_reward_specs`) -> ready functions with labels and weights; a factory
    that rejects its args becomes a `ConfigError` naming the spec.

    >>> rewards = build_reward_functions([{"name": "exact_match", "weight": 2}])
    >>> rewards[0].name, rewards[0].weight, rewards[0].fn(["q"], ["4"], answer=["4"])
    ('exact_match', 2.0, [1.0])
    """
    parsed = (
        specs
        if specs and all(isinstance(s, RewardSpec) for s in specs)
        else parse_reward_specs(specs, base_dir=base_dir)
    )
    out = []
    for s in parsed:
        if s.builtin:
            try:
                fn = s.fn(**s.args)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{s.where}: bad args for {s.name!r}: {e}") from None
        elif s.args:  # the function's own attributes (events, event_notes, retry_per_sample) go with it, a
            fn = functools.partial(s.fn, **s.args)  # callable object's methods included
            for attr in _REWARD_ATTRIBUTES:
                if hasattr(s.fn, attr):
                    setattr(fn, attr, getattr(s.fn, attr))
        else:
            fn = s.fn
        out.append(NamedReward(s.label, fn, s.weight, s.builtin, s.fallback))
    return out
