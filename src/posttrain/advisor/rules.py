"""Load the rule table (`rules.yaml`: slots, rules, flips) and evaluate its conditions against facts.

The rules are data; this module only knows their shape and the condition language (see rules.yaml's header):
a literal means equality, a list means any of, `null` means "not stated", and a string such as ">= 100" or
">= 1, < 100" is a comparison (all parts must hold; never true for a fact that is not stated).
"""

from __future__ import annotations

import operator
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import yaml

RULES_FILE = Path(__file__).with_name("rules.yaml")
KINDS = {"method": ("slot", "method"), "block": (), "note": (), "technique": ("technique",), "risk": ()}
_OPS = {
    ">=": operator.ge,
    "<=": operator.le,
    "!=": operator.ne,
    "==": operator.eq,
    ">": operator.gt,
    "<": operator.lt,
}


def _compare(expr: str, value) -> bool:
    expr = expr.strip()
    for sym, op in _OPS.items():  # two-character operators are listed first
        if expr.startswith(sym):
            return op(value, float(expr[len(sym) :]))
    raise ValueError(f"bad comparison {expr!r} in {RULES_FILE.name}")


def holds(cond, value) -> bool:
    """Whether one condition holds for one fact's value.

    >>> holds(">= 100", 250), holds(">= 1, < 100", 100), holds([None, False], None), holds(True, 1)
    (True, False, True, False)
    """
    if isinstance(cond, list):
        return any(holds(c, value) for c in cond)
    if cond is None:
        return value is None
    if isinstance(cond, str) and cond.strip()[:1] in "<>=!":
        if value is None or isinstance(value, bool):
            return False
        return all(_compare(part, value) for part in cond.split(","))
    if isinstance(cond, bool) or isinstance(value, bool):
        return value is cond  # True must not match the number 1
    return value == cond


def matches(rule: dict, facts: dict) -> bool:
    return all(holds(cond, facts.get(key)) for key, cond in rule["when"].items())


class RuleTable(NamedTuple):
    slots: list[dict]  # {name, methods}: the pipeline's slots in training order, methods by precedence
    rules: list[dict]
    flips: list[dict]


def _check(rule: dict, slots: dict[str, list[str]], ids: set[str]) -> str | None:
    """What is wrong with one rule, or None."""
    need = ("id", "kind", "when", "reason", "principle") + KINDS.get(rule.get("kind"), ())
    missing = [k for k in need if k not in rule]
    if rule.get("kind") not in KINDS or missing:
        return f"kind must be one of {', '.join(KINDS)}; missing {missing}"
    if rule["id"] in ids:
        return "duplicate id"
    if rule["kind"] == "method" and rule["method"] not in slots.get(rule["slot"], ()):
        return f"method {rule['method']} is not one of slot {rule['slot']!r}'s methods"
    if rule["kind"] == "block":
        if ("slot" in rule) == ("method" in rule):
            return "a block names either a slot or a method"
        if rule.get("slot", next(iter(slots))) not in slots or (
            "method" in rule and not any(rule["method"] in ms for ms in slots.values())
        ):
            return "a block's slot or method must be in `slots`"
    return None


@lru_cache(maxsize=1)
def load_rules() -> RuleTable:
    """Slots, rules and flips from rules.yaml, each rule checked for the keys its kind needs."""
    data = yaml.safe_load(RULES_FILE.read_text(encoding="utf-8"))
    table = RuleTable(data["slots"], data["rules"], data["flips"])
    slots = {s["name"]: s["methods"] for s in table.slots}
    ids: set[str] = set()
    for r in table.rules:
        problem = _check(r, slots, ids)
        if problem:
            raise ValueError(f"{RULES_FILE.name}: rule {r.get('id')}: {problem}")
        ids.add(r["id"])
    return table
