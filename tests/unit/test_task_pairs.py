"""Built-in preference pairs and prompt rows: chosen is the task's own answer, rejected always scores lower."""

import json
import re
from collections import Counter

import pytest

from posttrain.data import REJECTED_KINDS, TASKS, load_rows, make_pairs, make_prompts, write_jsonl
from posttrain.data.tasks import Arithmetic
from posttrain.data.tasks.arithmetic import number_words

ARITHMETIC_HARD = Arithmetic(min_ops=2, max_ops=6, max_value=500)


@pytest.mark.parametrize("task", [*TASKS, ARITHMETIC_HARD], ids=[*TASKS, "arithmetic-hard"])
@pytest.mark.parametrize("split", ["train", "heldout"])
def test_chosen_scores_full_marks_and_rejected_strictly_less(task, split):
    t = TASKS[task] if isinstance(task, str) else task
    rows = make_pairs(task, 300, seed=3, split=split)
    assert len(rows) == 300
    for row in rows:
        chosen, rejected = t.score(row["chosen"], row["answer"]), t.score(row["rejected"], row["answer"])
        assert chosen == 1.0, row
        assert rejected < chosen, row
        assert row["chosen"] != row["rejected"]


@pytest.mark.parametrize("task", list(TASKS))
def test_rows_are_valid_preference_rows_built_from_make(task, tmp_path):
    rows = make_pairs(task, 30, seed=1)
    sft = TASKS[task].make(30, seed=1)
    for row, src in zip(rows, sft):
        assert set(row) == {"id", "prompt", "chosen", "rejected", "answer", "rejected_kind", "metadata"}
        assert (row["id"], row["prompt"], row["chosen"], row["answer"]) == (
            src["id"], src["prompt"], src["completion"], src["answer"],
        )  # fmt: skip
    loaded = load_rows(write_jsonl(rows, tmp_path / "p.jsonl"), "preference")
    assert len(loaded) == 30 and loaded[0]["rejected_kind"] in REJECTED_KINDS


@pytest.mark.parametrize("task", list(TASKS))
def test_kinds_are_mixed_evenly_and_deterministically_by_seed(task):
    rows = make_pairs(task, 90, seed=0)
    kinds = [r["rejected_kind"] for r in rows]
    assert Counter(kinds) == {k: 30 for k in REJECTED_KINDS}
    assert make_pairs(task, 90, seed=0) == rows
    assert [r["rejected_kind"] for r in make_pairs(task, 90, seed=1)] != kinds
    assert len(set(kinds[:9])) > 1  # shuffled, not in blocks


def test_arithmetic_rejected_kinds():
    t = TASKS["arithmetic"]
    rows = make_pairs("arithmetic", 150, seed=2)
    by_kind = {k: [r for r in rows if r["rejected_kind"] == k] for k in REJECTED_KINDS}
    for r in by_kind["wrong"]:  # right format, wrong value
        v = t.verify(r["rejected"], r["answer"])
        assert v["formatted"] and not v["correct"]
        assert r["rejected"].count("\n") == r["chosen"].count("\n")  # the same steps, one slipped
    for r in by_kind["off_format"]:  # the right value in words: no digit, no Answer line
        assert not re.search(r"\d", r["rejected"]) and "Answer:" not in r["rejected"]
        assert number_words(r["answer"]) in r["rejected"].lower()
    for r in by_kind["rambling"]:  # long-winded
        assert len(r["rejected"]) > 2 * len(r["chosen"]) and len(r["rejected"].split()) > 40


def test_structured_rejected_kinds():
    t = TASKS["structured"]
    rows = make_pairs("structured", 150, seed=2)
    by_kind = {k: [r for r in rows if r["rejected_kind"] == k] for k in REJECTED_KINDS}
    for r in by_kind["wrong"]:  # valid compact JSON, exactly one field wrong
        v = t.verify(r["rejected"], r["answer"])
        assert v["json_valid"] and sum(not v[f"field_{f}"] for f in t.fields) == 1
        assert t.score(r["rejected"], r["answer"]) == pytest.approx(0.8)
    for r in by_kind["off_format"]:  # no JSON object, but every value is there
        assert not t.verify(r["rejected"], r["answer"])["json_valid"]
        assert r["answer"]["name"] in r["rejected"] and r["answer"]["birth_date"] in r["rejected"]
    for r in by_kind["rambling"]:  # chatty, with JSON that breaks the rules
        v = t.verify(r["rejected"], r["answer"])
        assert v["json_valid"] and not v["schema_match"]
        assert len(r["rejected"]) > 3 * len(r["chosen"])


def test_number_words():
    assert [number_words(n) for n in (0, 13, 21, 100, 115, 1000, 1_200_005)] == [
        "zero", "thirteen", "twenty-one", "one hundred", "one hundred and fifteen", "one thousand",
        "one million, two hundred thousand and five",
    ]  # fmt: skip


@pytest.mark.parametrize("task", list(TASKS))
def test_make_prompts_rows_for_rl(task, tmp_path):
    rows = make_prompts(task, 12, seed=4, split="heldout")
    src = TASKS[task].make(12, seed=4, split="heldout")
    assert rows == [
        {"id": r["id"], "prompt": r["prompt"], "answer": r["answer"], "metadata": r["metadata"]} for r in src
    ]
    loaded = load_rows(write_jsonl(rows, tmp_path / "prompts.jsonl"), "prompts")
    assert [r["answer"] for r in loaded] == [r["answer"] for r in rows]
    json.dumps(rows)  # plain JSON values only


def test_unknown_task_name():
    with pytest.raises(ValueError, match="built-in tasks: arithmetic, structured"):
        make_pairs("nosuch", 3)
