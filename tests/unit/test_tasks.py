"""Built-in tasks: seeded, split into disjoint wordings, verifiers right on hand cases, rows are valid SFT."""

import json
import re

import pytest

from posttrain.data import TASKS, load_rows, write_jsonl
from posttrain.data.tasks import arithmetic, structured
from posttrain.data.tasks.arithmetic import extract_answer
from posttrain.data.tasks.structured import SCHEMA, Structured


@pytest.mark.parametrize("name", sorted(TASKS))
def test_deterministic_from_seed(name):
    task = TASKS[name]
    assert task.make(20, seed=3) == task.make(20, seed=3)
    assert task.make(20, seed=3) != task.make(20, seed=4)
    assert task.make(20, seed=3, split="train") != task.make(20, seed=3, split="heldout")
    with pytest.raises(ValueError, match="split must be one of"):
        task.make(1, seed=0, split="test")


@pytest.mark.parametrize("name", sorted(TASKS))
def test_rows_are_valid_sft_and_verify_their_own_completion(name, tmp_path):
    task = TASKS[name]
    rows = task.make(50, seed=0) + task.make(50, seed=0, split="heldout")
    path = write_jsonl(rows, tmp_path / "sub" / "rows.jsonl")
    loaded = load_rows(path, "sft")
    assert len(loaded) == 100 and loaded[0]["answer"] == rows[0]["answer"]
    for r in rows:
        assert task.score(r["completion"], r["answer"]) == 1.0
        assert all(task.verify(r["completion"], r["answer"]).values())


def _skeletons(texts: list[str]) -> set[str]:
    """A row's wording with its values blanked out: names, numbers, dates, roles, languages, remote phrases."""
    out = set()
    for t in texts:
        for word in (*structured.FIRST, *structured.LAST, *structured.LANGUAGES, *structured.MONTHS,
                     *arithmetic.NAMES, *arithmetic.ITEMS):  # fmt: skip
            t = re.sub(rf"\b{word}\b", "_", t)
        t = re.sub(r"\d+(st|nd|rd|th)?", "0", t)
        out.add(t)
    return out


def test_structured_heldout_wordings_never_appear_in_train():
    assert not set(structured.TRAIN_TEMPLATES) & set(structured.HELDOUT_TEMPLATES)
    task = Structured()
    train = {r["metadata"]["template"] for r in task.make(400, seed=0)}
    heldout = {r["metadata"]["template"] for r in task.make(200, seed=0, split="heldout")}
    assert len(train) == len(structured.TRAIN_TEMPLATES) and len(heldout) == len(structured.HELDOUT_TEMPLATES)
    # The sentence frames (everything but the sampled values) of the two splits share nothing.
    frame = lambda r: re.sub(r"\{\w+\}", "", r)  # noqa: E731
    train_frames = {frame(t) for t in structured.TRAIN_TEMPLATES}
    assert not train_frames & {frame(t) for t in structured.HELDOUT_TEMPLATES}


def test_arithmetic_heldout_wordings_never_appear_in_train():
    for kind, (train, heldout) in arithmetic.WORDINGS.items():
        assert not set(train) & set(heldout), kind

    def sentences(split, n):  # the story only: the instruction line is shared on purpose
        rows = TASKS["arithmetic"].make(n, seed=0, split=split)
        return _skeletons([s for r in rows for s in re.split(r"(?<=[.?]) ", r["prompt"].split("\n")[0])])

    train, heldout = sentences("train", 300), sentences("heldout", 100)
    assert len(train) >= 10 and len(heldout) >= 5
    assert not train & heldout


def test_arithmetic_difficulty_knob():
    hard = arithmetic.Arithmetic(min_ops=4, max_ops=4, max_value=9)
    rows = hard.make(30, seed=0)
    assert all(r["metadata"]["n_ops"] == 4 for r in rows)
    assert all(int(r["completion"].rsplit("Answer: ", 1)[1]) == r["answer"] for r in rows)


@pytest.mark.parametrize(
    ("text", "want"),
    [("Answer: 42", (42.0, True)), ("#### -3.5", (-3.5, True)), ("answer: 1,000 apples", (1000.0, True)),
     ("7 then Answer: 8 then 9", (8.0, True)), ("It has 12 and then 15 left", (15.0, False)), ("none", (None, False))],
)  # fmt: skip
def test_extract_answer(text, want):
    assert extract_answer(text) == want


def test_arithmetic_verify():
    task = TASKS["arithmetic"]
    assert task.verify("3 + 4 = 7.\nAnswer: 7", 7) == {"correct": True, "formatted": True, "has_number": True}
    assert task.verify("Answer: 7.0", "7")["correct"]
    assert task.verify("Answer: 8", 7) == {"correct": False, "formatted": True, "has_number": True}
    assert task.score("7 apples", 7) == 1.0 and task.score("", 7) == 0.0


ANSWER = {"name": "Ann Lee", "birth_date": "1990-03-05", "role": "data_scientist", "languages": ["dutch", "hindi"],
          "remote": False}  # fmt: skip


def test_structured_verify_hand_cases():
    task = TASKS["structured"]
    exact = json.dumps(ANSWER)
    v = task.verify(f"```json\n{exact}\n```", ANSWER)
    assert v == {"json_valid": True, "schema_match": True, "exact": True,
                 **{f"field_{f}": True for f in structured.FIELDS}}  # fmt: skip
    wrong = {**ANSWER, "role": "Data Scientist", "languages": ["Dutch", "Hindi"]}
    v = task.verify(json.dumps(wrong), ANSWER)
    assert (v["json_valid"], v["schema_match"], v["exact"]) == (True, False, False)
    assert (v["field_role"], v["field_languages"], v["field_name"], v["field_remote"]) == (
        False,
        False,
        True,
        True,
    )
    assert task.score(json.dumps(wrong), ANSWER) == pytest.approx(3 / 5)
    shuffled = {"languages": ["hindi", "dutch"], **{k: ANSWER[k] for k in ANSWER if k != "languages"}}
    v = task.verify(json.dumps(shuffled), ANSWER)  # key order is free, list order is not
    assert v["schema_match"] and not v["exact"] and not v["field_languages"]
    v = task.verify('{"name": "Ann Lee", "birth_date": "1990-03-05"', ANSWER)
    assert not any(v.values())
    assert task.verify("[1, 2]", ANSWER)["json_valid"] is False  # valid JSON, but not an object
    assert task.verify(json.dumps({**ANSWER, "age": 3}), ANSWER)["schema_match"] is False


def test_structured_answers_match_the_schema_and_the_text():
    from jsonschema import validate

    for r in Structured().make(100, seed=1) + Structured().make(50, seed=1, split="heldout"):
        validate(r["answer"], SCHEMA)
        assert r["completion"] == json.dumps(r["answer"], separators=(",", ":"))
        assert r["answer"]["name"] in r["prompt"]
        text = r["prompt"].lower()
        positions = [text.index(lang) for lang in r["answer"]["languages"]]
        assert positions == sorted(positions)  # languages in order of mention


@pytest.mark.parametrize(("completion", "gold", "correct", "formatted"), [
    ("**Answer:** 17", 17, True, True),  # Markdown bold read as unmarked (the format reward gave 0)
    ("Answer: **17**", 17, True, True),
    ("**Answer:** 17\n\nCheck: 17 - 5 = 12", 17, True, True),  # it fell back to the last number, 12
    ("Answer: 6 + 9 = 15\nThe answer is 15", 15, True, True),  # a real sample: the sum's first term was read
    ("Answer: 20-3=17", 17, True, True),
    ("Answer: 17 or 18", 17, False, True),  # a hedge is no answer (it counted as right)
    ("Answer: 17. Check: 17 - 5 = 12.", 17, True, True),
    ("Answer:\n17", 17, True, True),
    ("Answer: \u22125", -5, True, True),  # a typeset minus
    ("Answer: 5. Wait, Answer: 6", 6, True, True),  # the last marked answer
    ("Answer: 12 + 5", 17, False, True),  # a sum not worked out: its first number, not a result
    ("Answer: **17** or **18**", 17, False, True),  # a bold hedge is a hedge (a review)
    ("Answer: 3 * 4 = 12 + 5 = 17", 17, True, True),  # a chained sum: its last result
    ("Answer: 1,234 + 1 = 1,235", 1235, True, True),
    ("Answer:" + " " * 300 + "x", 17, False, False),  # spaces after a marker: no answer (and no backtracking)
])  # fmt: skip
def test_arithmetic_reads_the_marked_answer_as_written(completion, gold, correct, formatted):
    """An audit's hand-labelled cases the arithmetic verifier (every `correct` the README reports, the RL recipes'
    reward and format reward) got wrong."""
    got = arithmetic.Arithmetic().verify(completion, gold)
    assert (got["correct"], got["formatted"]) == (correct, formatted)


GOOD = '{"name": "Ann Lee", "birth_date": "1990-03-05", "role": "chef", "languages": ["dutch"], "remote": true}'


@pytest.mark.parametrize(("completion", "exact", "valid"), [
    ('<think>{"name": "Ann"}</think>\n' + GOOD, True, True),  # a draft before the answer
    ('{"name": "Ann"}\nCorrection:\n' + GOOD, True, True),
    (GOOD + '\n```python\nprint(record["name"])\n```', True, True),  # code after the object
    ("Keys {name, role}:\n" + GOOD, True, True),  # a brace in the prose before it
    (GOOD.replace("true", "1"), False, True),  # 1 is not true (Python's 1 == True scored it exact)
    (GOOD.replace("true", "NaN"), False, False),  # NaN is not JSON
    (GOOD + '\nIf the text gave no role, you would write {"role": null}.', True, True),  # a note after the answer
    ("```json\n" + GOOD + '\n```\nFields not found would be left as {}.', True, True),
    (GOOD + '\n```json\n{"confidence": 0.9}\n```', True, True),
    ("{" * 10_000, False, False),  # braces only
])  # fmt: skip
def test_structured_grades_the_final_object_with_json_types(completion, exact, valid):
    got = structured.Structured().verify(completion, json.loads(GOOD))
    assert (got["exact"], got["json_valid"]) == (exact, valid)
