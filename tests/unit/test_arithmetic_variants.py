"""Arithmetic's answer-preserving variants (`posttrain diagnose`'s robustness probe): every prompt `make` writes
parses back into its facts; each variant links to its clean row, keeps the answer (recomputed for `numbers`),
changes what its kind says and nothing else, uses wordings and names neither split uses, and is repeatable."""

import random
import re

import pytest

from posttrain.data import TASKS
from posttrain.data.tasks import arithmetic as ar
from posttrain.data.tasks import make_perturbed
from posttrain.data.tasks.arithmetic import Arithmetic, parse_problem

TASK_SETTINGS = [Arithmetic(), Arithmetic(min_ops=3, max_ops=5, max_value=9), Arithmetic(min_ops=1, max_ops=1)]


@pytest.mark.parametrize("task", TASK_SETTINGS)
@pytest.mark.parametrize("split", ["train", "heldout"])
def test_every_prompt_make_writes_parses_back_into_its_facts(task, split):
    for row in task.make(300, seed=5, split=split):
        p = parse_problem(row["prompt"])
        assert p is not None, row["prompt"]
        assert (p.prompt(), p.completion(), p.answer) == (row["prompt"], row["completion"], row["answer"])
        assert len(p.ops) == row["metadata"]["n_ops"]


def test_other_text_does_not_parse():
    row = TASKS["arithmetic"].make(1, seed=0)[0]
    story, instruction = row["prompt"].split("\n")
    for text in (story, f"{story} Extra words.\n{instruction}", f"{story}\nAnother instruction.",
                 "Hello there.\n" + instruction, story.replace(".", "!", 1) + "\n" + instruction):  # fmt: skip
        assert parse_problem(text) is None, text


def _sentences(prompt: str) -> list[str]:
    return re.split(r"(?<=[.?]) ", prompt.split("\n")[0])


def _skeleton(sentence: str) -> str:
    for word in (*ar.NAMES, *ar.ITEMS, *ar.UNSEEN_NAMES, *ar.UNSEEN_ITEMS):
        sentence = re.sub(rf"\b{word}\b", "_", sentence)
    return re.sub(r"\d+", "0", sentence)


@pytest.fixture(scope="module")
def variants():
    rows = Arithmetic(max_ops=3).make(120, seed=2, split="heldout")
    return rows, {r["id"]: r for r in rows}, make_perturbed("arithmetic", rows, seed=3)


def test_each_variant_links_to_its_row_and_keeps_its_answer(variants):
    rows, clean, out = variants
    assert len(out) == len(rows) * len(ar.PERTURBATIONS)
    task = TASKS["arithmetic"]
    for v in out:
        row = clean[v["perturbs"]]
        assert v["id"] == f"{row['id']}~{v['kind']}" and v["prompt"] != row["prompt"]
        assert task.score(v["completion"], v["answer"]) == 1.0  # its worked steps reach its answer
        assert ar.parse_steps(v["completion"])[0][0] == int(re.search(r"\d+", v["prompt"]).group())  # the start
        if v["kind"] == "numbers":  # other numbers, same wording: the answer recomputed from the new numbers
            p = parse_problem(v["prompt"])
            assert p is not None and p.answer == v["answer"] and p.start != parse_problem(row["prompt"]).start
            assert [_skeleton(s) for s in _sentences(v["prompt"])] == [_skeleton(s) for s in _sentences(row["prompt"])]
        else:
            assert v["answer"] == row["answer"]


def test_each_kind_changes_what_it_says(variants):
    _, clean, out = variants
    train_heldout = {_skeleton(w) for pair in ar.WORDINGS.values() for ws in pair for w in ws}
    for v in out:
        row, kind = clean[v["perturbs"]], v["kind"]
        old, new = parse_problem(row["prompt"]), v["prompt"]
        if kind == "paraphrase":  # unseen wording for every sentence and the instruction; same facts
            assert not any(_skeleton(s) in train_heldout for s in _sentences(new))
            assert new.split("\n")[1] in ar.UNSEEN_INSTRUCTIONS
            assert re.findall(r"\d+", new) == re.findall(r"\d+", row["prompt"].split("\n")[0])
        elif kind == "names":
            assert not any(re.search(rf"\b{n}\b", new) for n in (*ar.NAMES, *ar.ITEMS))
            assert _skeleton(new) == _skeleton(row["prompt"])
        elif kind == "noop":  # one more sentence, with a number and another name, just before the question
            extra = _sentences(new)[-2]
            assert _sentences(new)[:-2] + _sentences(new)[-1:] == _sentences(row["prompt"])
            assert re.search(r"\d", extra) and any(n in extra for n in ar.NAMES if n != old.name)
        elif kind == "reorder":  # the question first; the facts (maybe in another order) after it
            first = _sentences(new)[0]
            assert first == _sentences(row["prompt"])[-1] and sorted(_sentences(new)[1:]) == sorted(
                _sentences(row["prompt"])[:-1])  # fmt: skip


def test_reorder_shuffles_additive_operations_without_running_out():
    p = parse_problem("Sam has 5 apples. Sam gives away 4 apples. Sam buys 9 more. How many apples does Sam have "
                      "now?\n" + ar.INSTRUCTION)  # fmt: skip
    shuffled = {ar.perturb_problem(p, "reorder", random.Random(s)).ops for s in range(10)}
    assert shuffled == {(("add", 9), ("sub", 4))}  # the only other order; 5 - 4 + 9 = 5 + 9 - 4 = 10
    p = parse_problem("Sam has 3 apples. Sam buys 4 more. Sam multiplies the collection by 2. How many apples does "
                      "Sam have now?\n" + ar.INSTRUCTION)  # fmt: skip
    assert ar.perturb_problem(p, "reorder", random.Random(0)).ops == p.ops  # multiplication: order kept


def test_unseen_wordings_and_names_are_new():
    seen = {_skeleton(w) for pair in ar.WORDINGS.values() for ws in pair for w in ws}
    assert not {_skeleton(w) for ws in ar.UNSEEN_WORDINGS.values() for w in ws} & seen
    assert not set(ar.UNSEEN_NAMES) & set(ar.NAMES) and not set(ar.UNSEEN_ITEMS) & set(ar.ITEMS)
    assert ar.INSTRUCTION not in ar.UNSEEN_INSTRUCTIONS and all("Answer:" in i for i in ar.UNSEEN_INSTRUCTIONS)


def test_variants_are_repeatable_and_independent_of_the_other_rows():
    rows = TASKS["arithmetic"].make(10, seed=0, split="heldout")
    a = make_perturbed("arithmetic", rows, seed=1)
    assert a == make_perturbed("arithmetic", rows, seed=1) != make_perturbed("arithmetic", rows, seed=2)
    alone = make_perturbed("arithmetic", rows[3:4], seed=1, kinds=("noop",))
    assert alone == [v for v in a if v["perturbs"] == rows[3]["id"] and v["kind"] == "noop"]


def test_rows_it_cannot_read_get_no_variant_and_unknown_kinds_fail():
    rows = [{"id": "x", "prompt": "What is 2 + 2?", "answer": 4}, *TASKS["arithmetic"].make(1, seed=0)]
    assert {v["perturbs"] for v in make_perturbed("arithmetic", rows)} == {rows[1]["id"]}
    messages = [{**rows[1], "prompt": [{"role": "user", "content": rows[1]["prompt"]}]}]  # a normalised row
    assert len(make_perturbed("arithmetic", messages)) == len(ar.PERTURBATIONS)
    with pytest.raises(ValueError, match="unknown perturbation 'typos'"):
        make_perturbed("arithmetic", rows, kinds=("typos",))
    with pytest.raises(ValueError, match="makes no perturbed variants"):
        make_perturbed("structured", TASKS["structured"].make(1))
