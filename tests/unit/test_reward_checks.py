"""What the rewards need from the prompt rows, checked before any model loads (`rewards.checks`): every row that a
reward could not score is named by file, line and column (an audit of silent data handling, eighteenth session)."""

import pytest

from posttrain.data.schema import Row
from posttrain.errors import DataError
from posttrain.rewards import build_reward_functions, parse_reward_specs
from posttrain.rewards.builtin import numeric_match, to_number
from posttrain.rewards.checks import check_reward_inputs


def _problems(reward, rows) -> list[str]:
    rows = [Row(r, line=i) for i, r in enumerate(rows, start=1)]
    with pytest.raises(DataError) as err:
        check_reward_inputs(parse_reward_specs([reward]), rows, "p.jsonl")
    assert str(err.value).splitlines()[0] == "p.jsonl: the rewards cannot score these rows:"
    return [str(p) for p in err.value.problems]


def test_a_gold_answer_numeric_answer_cannot_read_is_named_on_every_row():
    problems = _problems("numeric_answer", [{"prompt": "a", "answer": None}, {"prompt": "b", "answer": 2},
                                            {"prompt": "c", "answer": "four"}, {"prompt": "d", "answer": [6]},
                                            {"prompt": "e", "answer": float("nan")}, {"prompt": "f"}])  # fmt: skip
    assert [p.split(": ", 2)[:2] for p in problems] == [["p.jsonl:1", "answer"], ["p.jsonl:3", "answer"],
                                                         ["p.jsonl:4", "answer"], ["p.jsonl:5", "answer"],
                                                         ["p.jsonl:6", "answer"]]  # fmt: skip
    assert "is null: no number to compare with" in problems[0]
    assert "'four' is not a number" in problems[1] and "got list [6]" in problems[2]
    assert "is nan, not a finite number" in problems[3] and "missing:" in problems[4]
    # symbolic and formatted gold answers are readable
    check_reward_inputs(parse_reward_specs(["numeric_answer"]),
                        [Row({"prompt": "q", "answer": a}, line=1) for a in ("1,234", r"\frac{1}{2}", 7, 2.5)], "p")  # fmt: skip


def test_a_gold_answer_too_large_for_a_float_matches_only_itself():
    """Read as a float it was inf, and |got - inf| <= 1e-6 x inf held for any other number too large: every
    completion holding 309 digits or more scored 1.0."""
    huge = "1" + "0" * 400
    assert to_number(huge) is None and to_number("1e400") is None
    assert numeric_match(f"Answer: {huge}", int(huge)) and numeric_match(f"Answer: {huge}", huge)
    assert not numeric_match("Answer: " + "9" * 400, int(huge))
    (reward,) = build_reward_functions(["numeric_answer"])
    assert reward.fn(["q", "q"], [f"so {huge}", "so " + "7" * 320], answer=[huge, huge]) == [1.0, 0.0]


def test_a_task_reward_names_rows_whose_task_it_cannot_find():
    problems = _problems("task", [{"prompt": "a", "answer": 2, "metadata": {"task": "arithmetic"}},
                                  {"prompt": "b", "answer": 2, "metadata": "arithmetic"},
                                  {"prompt": "c", "answer": 2, "metadata": {"task": "arithmetc"}},
                                  {"prompt": "d", "answer": 2, "task": "nope"},
                                  {"prompt": "e", "answer": 2}])  # fmt: skip
    assert problems[0] == ("p.jsonl:2: metadata: must be a mapping such as {\"task\": \"arithmetic\"}, got str "
                           "'arithmetic'")  # fmt: skip
    assert problems[1].startswith("p.jsonl:3: metadata.task: unknown task 'arithmetc' for reward 'task'")
    assert problems[1].endswith("built-in tasks: arithmetic, structured")
    assert problems[2].startswith("p.jsonl:4: task: unknown task 'nope'")
    assert problems[3].startswith("p.jsonl:5: metadata.task: reward 'task' (algorithm.rewards[0]) has no args.task")
    assert len(problems) == 4


def test_a_gold_answer_the_task_verifier_cannot_read_is_named():
    """The `task` reward raised inside the verifier on "five" under arithmetic and on a text under structured:
    every such sample got the fallback (an audit, nineteenth session). Named, with the row's task."""
    record = {"name": "Ann Lee", "birth_date": "1990-03-05", "role": "chef", "languages": ["dutch"], "remote": True}
    rows = [{"prompt": "a", "answer": "five", "task": "arithmetic"}, {"prompt": "b", "answer": 5, "task": "arithmetic"},
            {"prompt": "c", "answer": "Ann", "task": "structured"}, {"prompt": "d", "answer": record,
                                                                     "task": "structured"}]  # fmt: skip
    problems = _problems("task", rows)
    assert [p.split(": ", 2)[:2] for p in problems] == [["p.jsonl:1", "answer"], ["p.jsonl:3", "answer"]]
    assert "'five' is not a number; reward 'task'" in problems[0] and "task arithmetic" in problems[0]
    assert "must be a record with the fields name, birth_date" in problems[1]
    fixed = _problems({"name": "task", "args": {"task": "arithmetic"}}, [{"prompt": "a", "answer": "x"}])
    assert len(fixed) == 1 and "'x' is not a number" in fixed[0]


def test_a_row_without_a_column_a_user_reward_takes_by_name_is_named(tmp_path):
    """`def right_answer(prompts, completions, answer, **kwargs)` (docs/rewards.md's pattern) over a row with no
    `answer` scored its samples with None: a group all alike, never trained, and the run said nothing (an audit).
    A parameter with a default, one set by `args`, or one the rollout adds itself reads no column."""
    (tmp_path / "r.py").write_text(
        "def right_answer(prompts, completions, answer, hint=None, **kwargs):\n"
        "    return [float(str(a) in c) for c, a in zip(completions, answer)]\n"
        "def graded(prompts, completions, truncated, *, level, **kwargs):\n"
        "    return [0.0] * len(completions)\n", encoding="utf-8")  # fmt: skip
    rows = [{"prompt": "What is 0+1?", "answer": 1}, {"prompt": "What is 9+1?"}]
    problems = _problems(f"{tmp_path / 'r.py'}:right_answer", rows)
    assert problems == ["p.jsonl:2: answer: missing: reward 'right_answer' (algorithm.rewards[0]) takes `answer` "
                        "with no default, so it reads it; this row has: none (give the column, or a default: "
                        "`answer=None`)"]  # fmt: skip
    spec = {"name": f"{tmp_path / 'r.py'}:graded", "args": {"level": 2}}  # level set by args, truncated by the rollout
    check_reward_inputs(parse_reward_specs([spec]), [Row(r, line=i) for i, r in enumerate(rows, 1)], "p.jsonl")
