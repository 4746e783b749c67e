"""Load the rule table (`rules.yaml`) and evaluate its conditions against a dict of facts.

The rules are data; this module only knows the condition language (see the header of rules.yaml):
a literal means equality, a list means any of, `null` means "not stated", and a string such as ">= 100" or
">= 1, < 100" is a comparison (all parts must hold; never true for a fact that is not stated).
"""

from __future__ import annotations

import operator
from functools import lru_cache
from pathlib import Path

import yaml

RULES_FILE = Path(__file__).with_name("rules.yaml")
KINDS = {"method": ("method", "score"), "order": ("stage",), "technique": ("technique",), "risk": ()}
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


@lru_cache(maxsize=1)
def load_rules() -> tuple[list[dict], list[dict]]:
    """(rules, flips) from rules.yaml, checked for the keys each kind needs."""
    data = yaml.safe_load(RULES_FILE.read_text(encoding="utf-8"))
    rules, flips = data["rules"], data["flips"]
    ids = set()
    for r in rules:
        need = ("id", "kind", "when", "reason", "principle") + KINDS[r["kind"]]
        missing = [k for k in need if k not in r]
        if missing or r["id"] in ids:
            raise ValueError(f"{RULES_FILE.name}: rule {r.get('id')}: missing {missing} or duplicate id")
        ids.add(r["id"])
    return rules, flips
