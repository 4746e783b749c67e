"""From measured facts to a recommendation: keep SFT with better data, SFT -> DPO, or SFT -> GRPO.

The rules are data (`rules.yaml`, beside this file: options, rules with conditions, reasons, thresholds and
sources), evaluated with the advisor's condition language (`posttrain.advisor.rules.matches`). Decision: `block`
rules that hold rule out their options; the first `support` rule (in file order) that holds for an option not
ruled out decides it; when none does, the `default` rule. Every rule that held is reported, each with the
measured numbers that made it hold and its thresholds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import yaml

from posttrain.advisor.rules import matches

RULES_FILE = Path(__file__).with_name("rules.yaml")
KINDS = ("support", "block", "note", "default")


@lru_cache(maxsize=1)
def load_rules() -> tuple[dict[str, str], list[dict]]:
    """(options, rules) from rules.yaml, each rule checked for the keys its kind needs."""
    data = yaml.safe_load(RULES_FILE.read_text(encoding="utf-8"))
    options, rules = data["options"], data["rules"]
    if set(data.get("next", {})) != set(options):
        raise ValueError(f"{RULES_FILE.name}: `next` must say what to run for every option ({sorted(options)})")
    for r in rules:
        need = ["id", "kind", "when", "reason", "threshold", "principle"]
        need += {"support": ["option"], "default": ["option"], "block": ["options"]}.get(r.get("kind"), [])
        missing = [k for k in need if k not in r]
        targets = r.get("options", [r.get("option")]) if r.get("kind") != "note" else []
        if r.get("kind") not in KINDS or missing or any(t not in options for t in targets):
            raise ValueError(f"{RULES_FILE.name}: rule {r.get('id')}: kind must be one of {KINDS}, options of "
                             f"{sorted(options)}; missing {missing}")  # fmt: skip
    return options, rules


@dataclass
class Fired:
    """A rule that held: its reason (with the facts), the conditions with their measured values, and why."""

    rule: str
    kind: str
    option: str | None
    reason: str
    conditions: list[dict]  # {fact, value, condition}
    threshold: str
    principle: str

    def evidence(self) -> str:
        """The measured numbers against their thresholds, e.g. ``headroom = 0.18 (>= 0.10)``.

        >>> conditions = [{"fact": "headroom", "value": 0.175, "condition": ">= 0.10"}]
        >>> Fired("r", "support", "x", "", conditions, "", "").evidence()
        'headroom = 0.175 (>= 0.10)'
        """
        return "; ".join(f"{c['fact']} = {_show(c['value'])} ({c['condition']})" for c in self.conditions)


@dataclass
class Recommendation:
    option: str
    label: str
    fired: list[Fired] = field(default_factory=list)  # the deciding rule first, then other support, block, note
    facts: dict = field(default_factory=dict)
    next: str = ""  # what to run next (rules.yaml's `next`), `{model}` standing for the diagnosed model
    borderline: list[dict] = field(default_factory=list)  # `borderline`: where the intervals reach another option

    def to_dict(self) -> dict:
        return asdict(self)


def recommend(facts: dict) -> Recommendation:
    """The recommendation for `facts` (rules.yaml's header lists them; a missing one is not measured).

    >>> r = recommend({"headroom": 0.3, "mixed_share": 0.5, "pass_at_1": 0.2, "pass_at_n": 0.5, "samples": 8})
    >>> r.option, [f.rule for f in r.fired]
    ('sft-grpo', ['sampling-headroom', 'on-policy-pairs'])
    >>> recommend({"mixed_share": 0.0, "headroom": 0.3}).option
    'sft-data'
    """
    options, rules = load_rules()
    chosen, ordered = _decide(rules, facts)
    steps = yaml.safe_load(RULES_FILE.read_text(encoding="utf-8"))["next"][chosen.option]
    return Recommendation(chosen.option, options[chosen.option], ordered, dict(facts), steps,
                          borderline(facts, chosen.option))  # fmt: skip


def _decide(rules: list[dict], facts: dict) -> tuple[Fired, list[Fired]]:
    """(the deciding rule, every rule that held with it first): module docstring."""
    by_id = {r["id"]: r for r in rules}
    fired = [_fire(r, facts) for r in rules if r["kind"] != "default" and matches(r, facts)]
    blocked = {o for f in fired if f.kind == "block" for o in by_id[f.rule]["options"]}
    support = [f for f in fired if f.kind == "support"]
    chosen = next((f for f in support if f.option not in blocked), None)
    if chosen is None:
        chosen = _fire(next(r for r in rules if r["kind"] == "default"), facts)
        return chosen, [chosen, *fired]
    return chosen, [chosen, *(f for f in fired if f is not chosen)]


def borderline(facts: dict, option: str) -> list[dict]:
    """The measurements whose 95% interval (facts `<name>_low`, `<name>_high`) reaches a value at which the rules
    recommend another option than `option`: each as ``{fact, value, low, high, at, option}`` (`at`: the end of
    the interval tried, `option`: what the rules say there). Each fact's ends are tried one at a time, the
    others at their measured values. Empty when the recommendation holds over every interval. On 40 prompts with
    8 samples each, the mixed share moved from 10% to 27.5% with the seed alone and the recommendation between
    SFT -> GRPO and SFT -> DPO, unsaid (an audit): it is said now, with the interval that crosses the threshold.

    >>> facts = {"headroom": 0.3, "headroom_low": 0.2, "headroom_high": 0.4, "samples": 8,
    ...          "mixed_share": 0.22, "mixed_share_low": 0.12, "mixed_share_high": 0.35}
    >>> recommend(facts).option, [(b["fact"], b["at"], b["option"]) for b in borderline(facts, "sft-grpo")]
    ('sft-grpo', [('mixed_share', 0.12, 'sft-dpo')])
    """
    _, rules = load_rules()
    out = []
    for name in [k.removesuffix("_low") for k in facts if k.endswith("_low")]:
        low, high, value = facts.get(f"{name}_low"), facts.get(f"{name}_high"), facts.get(name)
        if None in (low, high, value):
            continue
        for at in (low, high):
            other = _decide(rules, {**facts, name: at})[0].option
            if other != option:
                out.append({"fact": name, "value": value, "low": low, "high": high, "at": at, "option": other})
                break
    return out


def _fire(rule: dict, facts: dict) -> Fired:
    values = {k: v for k, v in facts.items() if v is not None}
    conditions = [{"fact": k, "value": facts.get(k), "condition": str(c)} for k, c in rule["when"].items()]
    return Fired(rule["id"], rule["kind"], rule.get("option"), rule["reason"].format_map(_Missing(values)),
                 conditions, rule["threshold"], rule["principle"])  # fmt: skip


class _Missing(dict):
    """Formatting facts: a fact that was not measured reads ``n/a`` (a reason may name a fact it does not test)."""

    def __missing__(self, key):
        return _NotMeasured()


class _NotMeasured:
    def __format__(self, spec: str) -> str:
        return "n/a"


def _show(value) -> str:
    """
    >>> _show(0.1754321), _show(8), _show("noop"), _show(None)
    ('0.175', '8', 'noop', 'not measured')
    """
    if value is None:
        return "not measured"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)
