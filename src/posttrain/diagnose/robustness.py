"""The robustness probe: accuracy on clean prompts vs on answer-preserving variants of the same prompts.

Variants come from a built-in task (`posttrain.data.tasks.make_perturbed`: for ``arithmetic``, unseen
paraphrases, an irrelevant sentence with a number and a name, unseen names and items, the question first, other
numbers with the answer recomputed) or from the user's file of perturbed rows (`load_perturbed`): each row names
the ``id`` of the clean prompt it perturbs in ``perturbs``, its ``kind`` (any label: ``paraphrase``, ``typos``,
...), its ``prompt`` and the same ``answer`` (only kind ``numbers`` may change it). Every variant is scored beside
its own clean prompt, and each kind is reported apart with paired statistics (`stats.paired_gap`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.data.readers import read_records_lenient
from posttrain.data.schema import check_row
from posttrain.diagnose.stats import paired_gap
from posttrain.errors import DataError, Problem

ANSWER_CHANGING = ("numbers",)
"""Kinds of variant whose answer may differ from the clean prompt's (the numbers changed, the answer recomputed)."""


@dataclass
class KindGap:
    """One kind of variant against its clean prompts (`stats.paired_gap`'s keys)."""

    kind: str
    pairs: int
    clean_accuracy: float
    perturbed_accuracy: float
    gap: float
    ci_low: float
    ci_high: float
    lost: int
    gained: int
    p_value: float


@dataclass
class Robustness:
    """Greedy accuracy on the clean prompts, each kind's paired gap, and every pair (so anyone can recompute)."""

    source: str  # "task arithmetic" or the perturbed file
    clean_accuracy: float
    kinds: list[KindGap]
    pairs: list[dict] = field(default_factory=list)  # {id, perturbs, kind, clean, perturbed}
    without_variants: int = 0  # clean prompts no variant perturbs

    def worst(self) -> KindGap | None:
        """The kind with the largest gap (None when there is none)."""
        return max(self.kinds, key=lambda k: k.gap, default=None)


def row_id(row: dict, index: int) -> str:
    """A row's ``id`` as a string, or ``#<index>`` for a row without one.

    >>> row_id({"id": 7}, 0), row_id({}, 3)
    ('7', '#3')
    """
    return str(row["id"]) if "id" in row else f"#{index}"


def measure_robustness(
    source: str, clean_ids: Sequence[str], clean_correct: Sequence[bool], variants: Sequence[dict],
    variant_correct: Sequence[bool], *, seed: int = 0,
) -> Robustness:  # fmt: skip
    """Pair each variant with its clean prompt (``variant["perturbs"]``) and report each kind apart, in the order
    kinds first appear.

    >>> r = measure_robustness("t", ["a", "b"], [True, True], [{"perturbs": "a", "kind": "x"},
    ...     {"perturbs": "b", "kind": "x"}], [True, False])
    >>> r.clean_accuracy, r.kinds[0].gap, r.kinds[0].lost
    (1.0, 0.5, 1)
    """
    clean = dict(zip(clean_ids, clean_correct, strict=True))
    by_kind: dict[str, list[tuple[bool, bool]]] = {}
    pairs = []
    for v, right in zip(variants, variant_correct, strict=True):
        was = clean[str(v["perturbs"])]
        by_kind.setdefault(v["kind"], []).append((was, right))
        pairs.append({"id": v.get("id"), "perturbs": str(v["perturbs"]), "kind": v["kind"], "clean": int(was),
                      "perturbed": int(right)})  # fmt: skip
    kinds = []
    for kind, results in by_kind.items():
        gap = paired_gap([c for c, _ in results], [p for _, p in results], seed=seed)
        kinds.append(KindGap(kind=kind, **gap))
    perturbed = {p["perturbs"] for p in pairs}
    accuracy = sum(clean_correct) / len(clean_correct) if clean_correct else math.nan
    return Robustness(source, accuracy, kinds, pairs, sum(1 for i in clean_ids if i not in perturbed))


def load_perturbed(path: str | Path, clean_rows: Sequence[dict]) -> list[dict]:
    """The rows of a perturbed set, checked against the clean rows; one `DataError` listing every problem as
    ``FILE:LINE: field: what is wrong`` (as `posttrain data validate` reports them).

    Each row: a ``prompt`` (a string or messages, checked as a prompts row), ``perturbs`` (the ``id`` of a clean
    row), ``kind`` (a non-empty string) and ``answer`` (equal to the clean row's, except for `ANSWER_CHANGING`
    kinds); other columns are kept. Returns prompts rows (the prompt as messages) with ``perturbs`` as a string.
    """
    name = str(path)
    records, problems = read_records_lenient(path)
    clean = {row_id(r, i): r for i, r in enumerate(clean_rows)}
    rows = []
    for rec in records:
        found: list[Problem] = []

        def report(field, msg, line=rec.line, found=found):
            found.append(Problem(name, line, field, msg))

        _, row = check_row(rec.data, "prompts", report)
        target = _check_link(rec.data, clean, report)
        if target is not None and "answer" in rec.data and rec.data.get("kind") not in ANSWER_CHANGING:
            if not same_answer(rec.data["answer"], target.get("answer")):
                report("answer", f"{rec.data['answer']!r} is not the answer of the clean row it perturbs "
                                 f"({target.get('answer')!r}): a perturbation keeps the answer (only kind "
                                 f"{', '.join(ANSWER_CHANGING)} may change it)")  # fmt: skip
        if found:
            problems.extend(found)
        elif row is not None:
            rows.append({**row, "perturbs": str(rec.data["perturbs"])})
    if not records and not problems:
        problems.append(Problem(name, None, None, "no rows: nothing to use as perturbed prompts"))
    if problems:
        header = f"{name}: {len(problems)} problem(s) in the perturbed prompts; nothing measured"
        raise DataError(sorted(problems, key=lambda p: p.line or 0), header=header)
    return rows


def _check_link(data: dict, clean: dict[str, dict], report) -> dict | None:
    """The clean row a perturbed row names, after reporting what is wrong with its ``perturbs``, ``kind`` and
    ``answer`` fields."""
    kind = data.get("kind")
    if kind is None:
        report("kind", "missing required field: what this variant changes (e.g. paraphrase, noop, names)")
    elif not isinstance(kind, str) or not kind.strip():
        report("kind", f"must be a non-empty string, got {kind!r}")
    if "answer" not in data:
        report("answer", "missing required field: the answer the verifier checks (the clean row's)")
    if "perturbs" not in data:
        report("perturbs", "missing required field: the `id` of the clean prompt this row perturbs")
        return None
    target = data["perturbs"]
    if isinstance(target, bool) or not isinstance(target, str | int):
        report("perturbs", f"must be a string or an integer (a clean row's `id`), got {target!r}")
        return None
    if str(target) not in clean:
        shown = ", ".join(list(clean)[:3]) + (", ..." if len(clean) > 3 else "")
        report("perturbs", f"no clean prompt has the id {target!r} (their ids: {shown})")
        return None
    return clean[str(target)]


def same_answer(a, b) -> bool:
    """Whether two answers are the same: numerically for numbers (and numeric strings), else exactly.

    >>> same_answer(17, "17.0"), same_answer("1,000", 1000), same_answer("x", "x "), same_answer({"a": 1}, {"a": 1})
    (True, True, False, True)
    """
    x, y = _number(a), _number(b)
    if x is not None and y is not None:
        return x == y
    return a == b


def _number(v) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int | float):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v.replace(",", "").strip())
        except ValueError:
            return None
    return None
