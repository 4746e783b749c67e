"""What the rewards need from the prompt rows, checked before any model loads (`rewards.checks`): every row that a
reward could not score is named by file, line and column (an audit of silent data handling, eighteenth session)."""

import pytest

from posttrain.data.schema import Row
from posttrain.errors import DataError
from posttrain.rewards import build_reward_functions, parse_reward_specs
from posttrain.rewards.builtin import numeric_match, to_number
from posttrain.rewards.checks import DIAGNOSE, EVALUATE, check_reward_inputs


def _problems(reward, rows, *options, where="algorithm.rewards[{i}]") -> list[str]:
    rows = [Row(r, line=i) for i, r in enumerate(rows, start=1)]
    with pytest.raises(DataError) as err:
        check_reward_inputs(parse_reward_specs([reward], where=where), rows, "p.jsonl", *options)
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
    missing, *problems = _problems("task", [{"prompt": "a", "answer": 2, "metadata": {"task": "arithmetic"}},
                                            {"prompt": "b", "answer": 2, "metadata": "arithmetic"},
                                            {"prompt": "c", "answer": 2, "metadata": {"task": "arithmetc"}},
                                            {"prompt": "d", "answer": 2, "task": "nope"},
                                            {"prompt": "e", "answer": 2}, {"prompt": "f"}])  # fmt: skip
    assert problems[0] == ("p.jsonl:2: metadata: must be a mapping such as {\"task\": \"arithmetic\"}, got str "
                           "'arithmetic'")  # fmt: skip
    assert problems[1].startswith("p.jsonl:3: metadata.task: unknown task 'arithmetc' for reward 'task'")
    assert problems[1].endswith("built-in tasks: arithmetic, structured")
    assert problems[2].startswith("p.jsonl:4: task: unknown task 'nope'")
    assert problems[3].startswith("p.jsonl:5: metadata.task: reward 'task' (algorithm.rewards[0]) scores the rows")
    # a row with no answer either: the column is missing (columns are checked first), and it names no task
    assert problems[4] == ("p.jsonl:6: metadata.task: reward 'task' (algorithm.rewards[0]) has no args.task, so each "
                           "row must name its task in a `task` column or metadata.task; give args: {task: arithmetic} "
                           "or add the column")  # fmt: skip
    assert missing == "p.jsonl:6: answer: missing: reward 'task' (algorithm.rewards[0]) reads it; this row has: none"
    assert len(problems) == 5


GSM8K = {"prompt": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How "
                   "many clips did Natalia sell altogether in April and May?",
         "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
                   "altogether in April and May.\n#### 72"}  # fmt: skip


def test_a_task_reward_on_a_file_of_ones_own_answers_advises_numeric_answer():
    """`posttrain train configs/grpo_lora.yaml data.train=gsm8k.jsonl` (its rewards: `task`) was told to give
    args: {task: arithmetic}, which refused the GSM8K answers next; `numeric_answer` reads them (an audit)."""
    own = ("scores the rows of posttrain's built-in tasks, each naming its task in a `task` column or metadata.task "
           "(as `posttrain data make arithmetic --kind prompts` writes them), and this row names none. For a file of "
           "your own with numeric answers, {numeric} compares the completion's final answer with the number in "
           "`answer` (in a text, its last: GSM8K's `#### 72`); for a built-in task's rows without their metadata, "
           "name the task: {task}")  # fmt: skip
    in_run = own.format(numeric="algorithm.rewards=[numeric_answer]",
                        task="{name: task, args: {task: arithmetic}} in algorithm.rewards")  # fmt: skip
    assert _problems("task", [GSM8K]) == [f"p.jsonl:1: metadata.task: reward 'task' (algorithm.rewards[0]) {in_run}"]
    in_evaluate = own.format(numeric="--reward numeric_answer",
                             task="""--reward '{"name": "task", "args": {"task": "arithmetic"}}'""")  # fmt: skip
    assert _problems("task", [GSM8K], EVALUATE, where="--reward #{n}") == [
        f"p.jsonl:1: metadata.task: reward 'task' (--reward #1) {in_evaluate}"]
    # naming the task: its verifier reads plain numbers, and the problem says what reads this one
    assert _problems({"name": "task", "args": {"task": "arithmetic"}}, [GSM8K]) == [
        f"p.jsonl:1: answer: {GSM8K['answer']!r} is not a number; reward 'task' (algorithm.rewards[0]) compares "
        "answers with it; the numeric_answer reward reads it (its last number): algorithm.rewards=[numeric_answer]"]
    # and it does: the check passes, and the completion's final answer is compared with the answer's last number
    check_reward_inputs(parse_reward_specs(["numeric_answer"]), [Row(GSM8K, line=1)], "p.jsonl")
    (reward,) = build_reward_functions(["numeric_answer"])
    completions = ["She sold 24 in May, so 72 in all. Answer: 72", "#### 72", "72", "24", "Answer: 48"]
    assert reward.fn([GSM8K["prompt"]] * 5, completions, answer=[GSM8K["answer"]] * 5) == [1.0, 1.0, 1.0, 0.0, 0.0]


def test_a_reference_answer_missing_from_a_file_with_one_other_column_says_how_to_read_that_one():
    """`evaluate --reward exact_match` on an SFT file (prompt, completion) said `answer: missing` and no more."""
    sft = [{"prompt": "Say hi", "completion": "hi"}]
    missing = "p.jsonl:1: answer: missing: reward 'exact_match' ({where}) reads it; this row has: completion. "
    # the reward's column arg, not a rename: a chat read as a prompt holds a completion its file does not
    assert _problems("exact_match", sft, EVALUATE, where="--reward #{n}") == [
        missing.format(where="--reward #1") + "The reference is read from column answer: here --reward "
        """'{"name": "exact_match", "args": {"column": "completion"}}' reads the completion"""]  # fmt: skip
    gold = [{"prompt": "Say hi", "gold": "hi"}]  # another column: renaming it reads it too
    assert _problems("exact_match", gold, EVALUATE, where="--reward #{n}") == [
        "p.jsonl:1: answer: missing: reward 'exact_match' (--reward #1) reads it; this row has: gold. The reference is "
        "read from column answer: here --column answer=gold reads the gold as it, or --reward '{\"name\": "
        """"exact_match", "args": {"column": "gold"}}' reads the gold"""]  # fmt: skip
    # diagnose has no --column; a training run renames with data.columns, and keeps the reward's other settings
    assert _problems("exact_match", sft, DIAGNOSE, where="--reward #{n}") == [
        missing.format(where="--reward #1") + "The reference is read from column answer: here --reward "
        """'{"name": "exact_match", "args": {"column": "completion"}}' reads the completion"""]  # fmt: skip
    spec = {"name": "exact_match", "weight": 2, "args": {"case_sensitive": False}}
    assert _problems(spec, sft) == [
        missing.format(where="algorithm.rewards[0]") + "The reference is read from column answer: here "
        "{name: exact_match, weight: 2.0, args: {case_sensitive: false, column: completion}} in algorithm.rewards "
        "reads the completion"]  # fmt: skip
    # several other columns: which holds the reference is the user's to say
    assert _problems("exact_match", [{"prompt": "q", "completion": "a", "source": "b"}]) == [
        "p.jsonl:1: answer: missing: reward 'exact_match' (algorithm.rewards[0]) reads it; this row has: completion, "
        "source"]  # fmt: skip


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


def test_humaneval_tests_are_called_on_the_entry_point_and_refused_without_one():
    """HumanEval's tests define check(candidate) and leave the call to the harness: code_exec ran them as they
    were, so `return x - y` scored 1.0 (an audit). With the row's entry_point the check is called; without one
    the row is refused before the run."""
    from posttrain.rewards.builtin import code_exec

    tests = "METADATA = {}\n\ndef check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(1, 1) == 2\n"
    right, wrong = ("```python\ndef add(x, y):\n    return x " + op + " y\n```" for op in "+-")
    assert code_exec(timeout_s=5)(["q", "q"], [right, wrong], tests=[tests] * 2, entry_point=["add"] * 2) == [1.0, 0.0]
    row = {"prompt": "def add(x, y):", "tests": tests}
    assert _problems("code_exec", [row]) == [
        "p.jsonl:1: tests: defines check(candidate) and never calls it, so every program that runs would pass; "
        "reward 'code_exec' (algorithm.rewards[0]) reads it. Give the tested function's name in an `entry_point` "
        "column (HumanEval's) and check(entry_point) is called, or end the tests with the call"]  # fmt: skip
    rows = [Row({**row, "entry_point": "add"}, line=1), Row({**row, "tests": tests + "check(add)\n"}, line=2)]
    check_reward_inputs(parse_reward_specs(["code_exec"], where="r"), rows, "p.jsonl")  # both are fine


@pytest.mark.parametrize(("completion", "gold", "right"), [
    # a marked answer with words after it: its leading number (the last number of the line was read)
    ("Answer: 42 (6 groups of 7)", 42, True), ("The answer is 42 apples, since she had 40 and got 2 more.", 42, True),
    ("The answer is 42 apples, since she had 40 and got 2 more.", 2, False),
    # a marker that no value follows marks nothing; the value on the line after the marker counts
    ("Answer: 42\n\nI hope this answer is clear.", 42, True), ("Answer:\n42", 42, True),
    ("The answer is: 12", 12, True), ("the final answer is **12**.", 12, True), ("Answer: x = 5", 5, True),
    # a hedge is no answer, whichever the gold is; scientific notation is one number
    ("Answer: 3 or 4", 4, False), ("Answer: 3 or 4", 3, False), ("Answer: 1e3", 1, False), ("Answer: 1e3", 1000, True),
    # an equation's result; an expression; words after the number, not operators or LaTeX (a review of the rewrite)
    ("Answer: 3 + 4 = 7", 7, True), ("The answer is 5 + 3 = 8.", 8, True), ("#### 6 * 7 = 42", 42, True),
    ("Answer: 6 x 7 = 42", 42, True), (r"The answer is $2 \sqrt{3}$.", r"2\sqrt{3}", True),
    (r"Answer: 3 \pi", r"3\pi", True), (r"Answer: $1.5 \times 10^3$", 1500, True), (r"Answer: 3 \frac{1}{2}", r"\frac{7}{2}", True),
    ("Answer: 2 and 3", "2, 3", True), ("The answer is x^2+1", "x^2+1", True), ("Answer: 50%", 0.5, True),
    ("Answer: 7 (since 3 + 4 = 7)", 7, True), ("Answer: 3.5 hours", 3.5, True),
    # several answers compare as a set (the last number alone was compared)
    (r"\boxed{0, 3}", "2, 3", False), (r"\boxed{3}", "2, 3", False), (r"\boxed{3, 2}", "2, 3", True),
    (r"\boxed{-3, 2}", "2,-3", True), (r"\boxed{-3,2}", "2, -3", True), (r"\boxed{-3, 1}", "2,-3", False),
    # whole numbers exactly (1e-6 of a million is one)
    ("Answer: 1000000", 1000001, False), ("Answer: 100.0000001", 100, True),
    # a typeset minus; a boxed answer then a later marked one: the later
    ("Answer: \u22125", -5, True), ("it is \u22125", 5, False), (r"<think>\boxed{5}</think> The answer is 6", 6, True),
    # read as before
    ("Answer: 1 000", 1000, True), ("Answer: 1/2", 0.5, True), ("Answer: $17", 17, True), ("Answer: 1,234", 1234, True),
])  # fmt: skip
def test_numeric_answer_reads_the_value_a_marker_gives(completion, gold, right):
    """An audit (twenty-third session): right answers with a word of explanation scored 0 and wrong ones scored 1."""
    assert numeric_match(completion, gold) is right


def test_the_arithmetic_verifier_compares_whole_numbers_exactly():
    from posttrain.data.tasks.arithmetic import Arithmetic

    assert Arithmetic().score("Answer: 1553413", 1553414) == 0.0 and Arithmetic().score("Answer: 1553414", 1553414) == 1.0


def test_reward_arguments_are_read_or_refused_when_the_reward_is_built():
    """YAML reads `tolerance: 1e-3` as a string: every sample then failed once scoring began; a negative tolerance
    scored everything 0; a tokenizer that does not load gave no penalty at all, with a warning per call."""
    (reward,) = build_reward_functions([{"name": "numeric_answer", "args": {"tolerance": "1e-3"}}])
    assert reward.fn(["q", "q"], ["Answer: 1.0005", "Answer: 1.01"], answer=[1, 1]) == [1.0, 0.0]
    for args, says in (({"tolerance": -1}, "tolerance must be a number >= 0, got -1"),
                       ({"tolerance": "tight"}, "tolerance must be a number >= 0, got 'tight'")):  # fmt: skip
        with pytest.raises(Exception, match=says):
            build_reward_functions([{"name": "numeric_answer", "args": args}])
    with pytest.raises(Exception, match="tokenizer '/nonexistent/tok' could not be loaded"):
        build_reward_functions([{"name": "length_penalty", "args": {"target": 5, "unit": "tokens",
                                                                    "tokenizer": "/nonexistent/tok"}}])  # fmt: skip


def test_golds_and_tests_that_cannot_tell_right_from_wrong_are_refused():
    """exact_match's null gold matched the completion "None" and an empty one the empty completion; code_exec's
    empty or assert-free tests passed every program, and unittest.main() failed every one; a row's broken JSON
    schema left every sample unscored."""
    problems = _problems("exact_match", [{"prompt": "a", "answer": None}, {"prompt": "b", "answer": " "},
                                         {"prompt": "c", "answer": "x"}])  # fmt: skip
    assert [p.split(": ", 3)[:3] for p in problems] == [["p.jsonl:1", "answer", "is null"],
                                                         ["p.jsonl:2", "answer", "is empty"]]  # fmt: skip
    problems = _problems("code_exec", [{"prompt": "a", "tests": ""}, {"prompt": "b", "tests": "x = 1"},
                                       {"prompt": "c", "tests": None}, {"prompt": "d", "tests": "assert f(1) == 2"},
                                       {"prompt": "e", "tests": "import unittest\nunittest.main()"},
                                       {"prompt": "f", "tests": ["assert f(1) == 2", "pass"]}])  # fmt: skip
    assert [p.split(": ", 2)[0] for p in problems] == ["p.jsonl:1", "p.jsonl:2", "p.jsonl:3", "p.jsonl:5", "p.jsonl:6"]
    assert "checks nothing (no assert, raise or call)" in problems[0] and "is null" in problems[2]
    assert "calls unittest.main()" in problems[3]
    problems = _problems("json_schema", [{"prompt": "a", "schema": '{"type": 3}'}, {"prompt": "b", "schema": "{}"}])
    assert len(problems) == 1 and problems[0].startswith("p.jsonl:1: schema: invalid JSON schema")


def test_json_schema_reads_the_draft_a_schema_names_and_refuses_nan():
    (reward,) = build_reward_functions([{"name": "json_schema", "args": {"schema": {
        "$schema": "http://json-schema.org/draft-07/schema#", "dependencies": {"card": ["billing_address"]}}}}])  # fmt: skip
    assert reward.fn(["q", "q"], ['{"card": 1}', '{"card": 1, "billing_address": 2}']) == [0.0, 1.0]
    (bounded,) = build_reward_functions([{"name": "json_schema", "args": {"schema": {
        "type": "object", "properties": {"x": {"minimum": 0}}}}}])  # fmt: skip
    assert bounded.fn(["q", "q"], ['{"x": NaN}', '{"x": 1}']) == [0.0, 1.0]
