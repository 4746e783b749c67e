"""The robustness probe: accuracy on clean prompts vs on answer-preserving variants of the same prompts.

Variants come from a built-in task (`posttrain.data.tasks.make_perturbed`: for ``arithmetic``, unseen
paraphrases, an irrelevant sentence with a number and a name, unseen names and items, the question first, other
numbers with the answer recomputed) or from the user's file of perturbed rows (`load_perturbed`): each row names
the ``id`` of the clean prompt it perturbs in ``perturbs``, its ``kind`` (any label: ``paraphrase``, ``typos``,
...), its ``prompt`` and the same ``answer`` (only kind ``numbers`` may change it). Every variant is scored beside
its own clean prompt, and each kind is reported apart with paired statistics over its prompts (`stats.paired_gap`:
several variants of one prompt count once). The kind that decides (`Robustness.worst`) is the one with the
largest drop among those whose drop an exact sign test, Bonferroni-corrected over the kinds compared, puts below
`LEVEL`; the intervals (Newcombe's paired interval) are shown, not tested.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.data.readers import read_records_lenient
from posttrain.data.schema import check_row
from posttrain.diagnose.stats import paired_gap
from posttrain.errors import DataError, Problem, UserError

LEVEL = 0.05
"""The family-wise error rate of the robustness decision: a kind's sign-test p-value times the number of kinds
(Bonferroni) must be below it."""

ANSWER_CHANGING = ("numbers",)
"""Kinds of variant whose answer may differ from the clean prompt's (the numbers changed, the answer recomputed)."""


@dataclass
class KindGap:
    """One kind of variant against its clean prompts (`stats.paired_gap`'s keys)."""

    kind: str
    pairs: int
    prompts: int
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

    def adjusted_p(self, kind: KindGap) -> float:
        """`kind`'s sign-test p-value, Bonferroni-corrected over the kinds compared."""
        return min(1.0, kind.p_value * len(self.kinds))

    def worst(self) -> KindGap | None:
        """The kind that decides: the largest drop among the kinds whose drop is significant (`LEVEL`, corrected
        over the kinds), else the kind nearest to it (the smallest corrected p-value of a drop, then the largest
        gap); None when there is none. Not simply the largest gap: 5 pairs of typos with a 20-point gap and an
        interval from 0 would hide a 100-pair, 18-point paraphrase gap with p = 1e-4."""
        drops = [k for k in self.kinds if k.gap > 0 and self.adjusted_p(k) < LEVEL]
        if drops:
            return max(drops, key=lambda k: k.gap)
        return min(self.kinds, key=lambda k: (k.gap <= 0, self.adjusted_p(k), -k.gap), default=None)


def row_id(row: dict, index: int) -> str:
    """A row's ``id`` as a string, or ``#<index>`` for a row without one.

    >>> row_id({"id": 7}, 0), row_id({}, 3)
    ('7', '#3')
    """
    return str(row["id"]) if "id" in row else f"#{index}"


def measure_robustness(
    source: str, clean_ids: Sequence[str], clean_correct: Sequence[bool], variants: Sequence[dict],
    variant_correct: Sequence[bool],
) -> Robustness:  # fmt: skip
    """Pair each variant with its clean prompt (``variant["perturbs"]``) and report each kind apart, in the order
    kinds first appear.

    >>> r = measure_robustness("t", ["a", "b"], [True, True], [{"perturbs": "a", "kind": "x"},
    ...     {"perturbs": "b", "kind": "x"}], [True, False])
    >>> r.clean_accuracy, r.kinds[0].gap, r.kinds[0].lost
    (1.0, 0.5, 1)
    """
    clean = dict(zip(clean_ids, clean_correct, strict=True))
    # variants name their clean prompt by id: a shared id pairs them wrongly (refused before any model loads by
    # the CLI; this guards the Python API)
    if why := shared_ids_problem([{"id": i} for i in clean_ids], where="positions"):
        raise UserError(why)
    by_kind: dict[str, list[tuple[bool, bool, str]]] = {}
    pairs = []
    for v, right in zip(variants, variant_correct, strict=True):
        was = clean[str(v["perturbs"])]
        by_kind.setdefault(v["kind"], []).append((was, right, str(v["perturbs"])))
        pairs.append({"id": v.get("id"), "perturbs": str(v["perturbs"]), "kind": v["kind"], "clean": int(was),
                      "perturbed": int(right)})  # fmt: skip
    kinds = []
    for kind, results in by_kind.items():
        gap = paired_gap([c for c, _, _ in results], [p for _, p, _ in results],
                         prompts=[i for _, _, i in results])  # fmt: skip
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
    if why := shared_ids_problem(clean_rows):
        raise UserError(f"the variants of {name} cannot be paired with their prompts: {why}")
    rows = []
    for rec in records:
        found: list[Problem] = []

        def report(field, msg, line=rec.line, row=rec.row, found=found):
            found.append(Problem(name, line, field, msg, row))

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
        raise DataError(sorted(problems, key=lambda p: (p.line or 0, p.row or 0)), header=header)
    return rows


def shared_ids_problem(clean_rows: Sequence[dict], *, where: str = "lines") -> str | None:
    """Why variants cannot be paired with `clean_rows` (None: they can): rows that share an ``id``, which a variant
    names its clean prompt by (each was paired with the last of them), with their lines (`where="positions"`:
    1-based positions in a list, rows read from no file).

    >>> shared_ids_problem([{"id": "a"}, {"id": "b"}, {"id": "a"}])
    "the clean prompts share ids: id 'a' on lines 1, 3. Give every clean prompt its own `id`"
    """
    lines: dict[str, list] = {}
    for i, r in enumerate(clean_rows):
        lines.setdefault(row_id(r, i), []).append(getattr(r, "line", None) or i + 1)
    shared = [f"id {k!r} on {where} {', '.join(map(str, v))}" for k, v in lines.items() if len(v) > 1]
    if not shared:
        return None
    return f"the clean prompts share ids: {'; '.join(shared[:5])}. Give every clean prompt its own `id`"


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
