"""Call reward functions on a batch, weight and sum them, and survive their failures.

A function is called once on the whole batch. If that call raises, or returns a list of the wrong length, it
is called again once per sample, so that only the samples it cannot score get `fallback` (one bad completion
must not zero the rewards of the whole batch). A value that is not a finite number (NaN, inf, None, a string)
fails for that sample only. A function whose ``retry_per_sample`` attribute is False is never called again: a
failed batch is every sample's failure. A trained reward model is such a function
(`rewards.builtin.reward_model`): its forward may be a collective (sharded by FSDP2 or ZeRO-3), where one
process scoring its samples one by one while the others do not would hang the run, and it already returns a
failure (`rewards.builtin.Unscored`, saying why) for each sample it cannot score (`models.heads.RewardModelScorer`),
so a batch that still fails would fail sample by sample too. A function whose ``collective`` attribute is True (a
reward model the run has sharded: its forward is a collective) does not survive a failed batch: it raises
`CollectiveRewardFailed` on this process, which then exits, instead of going on while the other processes wait in
the collective it left, a hang. Failures are counted per function and the first error message kept, with where it
happened in the user's file (`failure_site`), so a broken reward shows in the logs instead of stopping a run
hours in (the rollout source stops a run only when every function fails on everything, several rollouts in a
row). Weights apply to the total only; ``per_function`` stays unweighted so each reward reads on its own
scale.
"""

from __future__ import annotations

import functools
import inspect
import math
import statistics
import traceback
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from posttrain.errors import CollectiveRewardFailed
from posttrain.rewards.builtin import Unscored
from posttrain.rewards.spec import NamedReward


@dataclass
class RewardResult:
    """Rewards for one batch of B samples."""

    total: list[float]  # (B,) weighted sum
    per_function: dict[str, list[float]]  # name -> (B,), unweighted, after fallback
    failures: dict[str, int]  # name -> samples that got the fallback
    errors: dict[str, str] = field(default_factory=dict)  # name -> first error message, when any
    sites: dict[str, str] = field(default_factory=dict)  # name -> "file:line" of it (user functions only)
    # name -> {event: samples}: what a function counts of its own calls (`code_exec`'s timeouts), read from its
    # `events()` (a function may have one: it returns the counts since it was last read, and starts again)
    events: dict[str, dict[str, int]] = field(default_factory=dict)


def row_columns(rows: Sequence[dict], skip: Sequence[str] = ()) -> dict[str, list]:
    """The rows' columns as reward functions get them (``fn(prompts, completions, **columns)``): one list per
    column any row has, in order of first appearance, None where a row lacks it; `skip` names columns passed
    otherwise (the prompt).

    >>> row_columns([{"prompt": "q", "answer": 1}, {"prompt": "r", "answer": 2, "hint": "x"}], skip=["prompt"])
    {'answer': [1, 2], 'hint': [None, 'x']}
    """
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in skip]
    return {key: [r.get(key) for r in rows] for key in keys}


def compute_rewards(
    rewards: list[NamedReward],
    prompts: list[str],
    completions: list[str],
    columns: dict[str, list] | None = None,
    *,
    fallback: float = 0.0,
) -> RewardResult:
    """Weighted sum of every reward; failing samples get the function's own `fallback`, else `fallback` (module
    docstring).

    Worked example: exact match (weight 1) gives [1, 0]; a length penalty with target 3 (weight 0.5) gives
    [0, -2] for lengths 1 and 9 (scale 3: -(9-3)/3); total = [1 + 0, 0 + 0.5 * -2] = [1.0, -1.0].

    >>> from posttrain.rewards import build_reward_functions
    >>> rs = build_reward_functions(["exact_match", {"name": "length_penalty", "weight": 0.5, "args": {"target": 3}}])
    >>> r = compute_rewards(rs, ["q", "q"], ["7", "seventeen"], {"answer": ["7", "17"]})
    >>> r.total, r.per_function["length_penalty"], r.failures
    ([1.0, -1.0], [0.0, -2.0], {'exact_match': 0, 'length_penalty': 0})
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    n = len(completions)
    columns = dict(columns or {})
    total = [0.0] * n
    per_function, failures, errors, sites, events = {}, {}, {}, {}, {}
    for reward in rewards:
        own = reward.fallback if reward.fallback is not None else fallback
        values, failed, error, exc = _call(reward, prompts, completions, columns, n, own)
        per_function[reward.name], failures[reward.name] = values, failed
        if callable(counted := getattr(reward.fn, "events", None)):
            events[reward.name] = _read_events(reward.name, counted)
        if error:
            errors[reward.name] = error
            site = None if reward.builtin else failure_site(reward.fn, exc)
            if site:
                sites[reward.name] = site
        total = [t + reward.weight * v for t, v in zip(total, values)]
    return RewardResult(total, per_function, failures, errors, sites, events)


def _read_events(name: str, counted) -> dict[str, int]:
    """A function's `events()` as {event: count}; what cannot be read (it raised, or gave something other than
    whole non-negative counts) is left out with a warning, the first time for each function: a broken counter must
    not stop a run, nor pass unnoticed."""
    try:
        raw = dict(counted())
    except Exception as err:  # noqa: BLE001 - a user's function: any error is its own
        _warn_once(name, f"reward {name!r}: its events() failed ({type(err).__name__}: {err}); its counts are left "
                         "out of the metrics")  # fmt: skip
        return {}
    good = {str(k): int(v) for k, v in raw.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 and float(v).is_integer()}  # fmt: skip
    if len(good) < len(raw):
        bad = ", ".join(f"{k}={v!r}" for k, v in raw.items() if str(k) not in good)
        _warn_once(name, f"reward {name!r}: its events() gave counts that are not whole numbers >= 0 ({bad}); "
                         "they are left out of the metrics")  # fmt: skip
    return good


_WARNED_EVENTS: set[str] = set()


def _warn_once(name: str, message: str) -> None:
    if name not in _WARNED_EVENTS:
        _WARNED_EVENTS.add(name)
        warnings.warn(message, stacklevel=4)


def _call(reward: NamedReward, prompts, completions, columns, n: int, fallback: float):
    """(values, failures, first error, its exception or None) for one function: one batched call, per-sample
    calls if it fails.

    The error kept is the batched call's when it failed, alone when the first failed sample failed the same way
    or every sample then scored on its own (the function is being called n times, and its author will want to
    know why); when the sample failed otherwise, both, with the sample's exception (so its own line)."""
    raw, error, exc = _call_batch(reward.fn, list(prompts), list(completions), columns, n)
    if raw is None and getattr(reward.fn, "collective", False):
        raise CollectiveRewardFailed(
            f"The reward {reward.name!r} failed ({error}). It is a model sharded over the run's processes, whose "
            "forward is a collective every process must finish, so the run stops here rather than hang (a process "
            "whose peer stopped first fails too: the earliest error is the cause). If it ran out of memory, "
            "continue on more processes (--resume takes another number of processes) or start a new run with "
            "shorter samples (algorithm.rollout.max_new_tokens); if its files are missing on a machine, copy them "
            "there."
        ) from exc
    retry = n > 1 and getattr(reward.fn, "retry_per_sample", True)
    singles = None  # each sample's own call: (raw value or _FAILED, why it failed, its exception)
    if raw is None:  # retry sample by sample (a batch of 1 already failed): only samples that fail again lose
        singles = [_one(reward.fn, prompts, completions, columns, i) for i in range(n)] if retry else None
        raw = [v for v, _, _ in singles] if singles else [_FAILED] * n
    values, failed, first = [], 0, None  # first: the first failed sample's (index, why, exception or None)
    for i, v in enumerate(raw):
        x = None if v is _FAILED else _as_float(v)
        if x is None:
            values.append(fallback)
            failed += 1
            if first is None and singles:
                first = (i, singles[i][1] or _bad_value(v), singles[i][2])
            elif first is None and v is not _FAILED:
                first = (i, _bad_value(v), None)
        else:
            values.append(x)
    if first is not None:
        i, why, sample_exc = first
        if not error:
            error = f"sample {i}: {why}"
        elif error != why:  # the sample's own error last, where `failure_site`'s line is put after it
            error, exc = f"its call on all {n} samples failed ({error}), then sample {i} alone: {why}", sample_exc
    return values, failed, error, exc


def _bad_value(v) -> str:
    return str(v) if isinstance(v, Unscored) else f"{v!r} is not a finite number"


def failure_site(fn, exc: BaseException | None = None) -> str | None:
    """Where a user's reward function failed, as ``file:line``: the last frame of `exc`'s traceback inside the
    file that defines `fn` (the user's line, even when the error rose in a library it called), else the line that
    defines `fn` (it returned a bad value, or failed before reaching its own code). None when `fn` has no source
    file (a callable object, a C function).

    >>> def bad(prompts, completions, **kwargs):
    ...     return [1 / 0]
    >>> try:
    ...     bad([], [])
    ... except ZeroDivisionError as e:
    ...     site = failure_site(functools.partial(bad, scale=2), e)
    >>> line = bad.__code__.co_firstlineno
    >>> site.endswith(f":{line + 1}"), failure_site(bad).endswith(f":{line}")
    (True, True)
    """
    target = fn.func if isinstance(fn, functools.partial) else fn
    target = inspect.unwrap(target)
    code = getattr(target, "__code__", None)
    if code is None:
        return None
    if exc is not None:
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == code.co_filename]
        if frames:
            return f"{frames[-1].filename}:{frames[-1].lineno}"
    return f"{code.co_filename}:{code.co_firstlineno}"


_FAILED = object()  # a sample whose own call raised


def _one(fn, prompts, completions, columns: dict, i: int):
    """(sample i's raw value from a call on it alone, "", None), or (`_FAILED`, why, the exception or None)."""
    one_columns = {k: v[i : i + 1] if isinstance(v, list | tuple) else v for k, v in columns.items()}
    raw, error, exc = _call_batch(fn, [prompts[i]], [completions[i]], one_columns, 1)
    return (_FAILED, error, exc) if raw is None else (raw[0], "", None)


def _call_batch(fn, prompts: list, completions: list, columns: dict, n: int):
    """(the n raw values, "", None) or (None, why the call failed, the exception it raised or None)."""
    try:
        raw = list(fn(prompts, completions, **columns))
    except Exception as e:  # a broken reward must not end the run: counted and reported instead
        return None, f"{type(e).__name__}: {e}", e
    if len(raw) != n:
        return None, f"returned {len(raw)} values for {n} samples", None
    return raw, "", None


def _as_float(v: Any) -> float | None:
    """`v` as a finite float, else None (bools count as numbers: a pass/fail reward may return them).

    >>> _as_float(1), _as_float(True), _as_float(float("nan")), _as_float("x"), _as_float(None)
    (1.0, 1.0, None, None, None)
    """
    if isinstance(v, str) or v is None:
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def reward_metrics(result: RewardResult) -> dict[str, float]:
    """Log lines: mean and (population) std of each reward and of the total, failure counts, and the counts of
    what a function counts of its own (`reward/EVENT_NAME`).

    >>> from posttrain.rewards.compute import RewardResult
    >>> reward_metrics(RewardResult([1.0, 3.0], {"a": [0.0, 2.0]}, {"a": 1}))
    {'reward/a_mean': 1.0, 'reward/a_std': 1.0, 'reward/failures_a': 1.0, 'reward/total_mean': 2.0, 'reward/total_std': 1.0}
    >>> reward_metrics(RewardResult([1.0], {"c": [1.0]}, {"c": 0}, events={"c": {"timeouts": 2}}))["reward/timeouts_c"]
    2.0
    """
    out: dict[str, float] = {}
    for name, values in result.per_function.items():
        out[f"reward/{name}_mean"], out[f"reward/{name}_std"] = _mean_std(values)
        out[f"reward/failures_{name}"] = float(result.failures.get(name, 0))
        for event, count in result.events.get(name, {}).items():
            out[f"reward/{event}_{name}"] = float(count)
    out["reward/total_mean"], out["reward/total_std"] = _mean_std(result.total)
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return 0.0, 0.0
    return statistics.fmean(values), statistics.pstdev(values)
