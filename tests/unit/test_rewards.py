"""Reward functions: built-ins on hand cases, specs and their errors, user files, weighting, failure fallback."""

import math
import signal
import time

import pytest

from posttrain.errors import CollectiveRewardFailed, ConfigError
from posttrain.rewards import (
    REWARDS,
    NamedReward,
    build_reward_functions,
    compute_rewards,
    parse_reward_specs,
    reward_metrics,
)
from posttrain.rewards.builtin import final_answer, numeric_match, to_number


def _one(spec, completions, **columns):
    [reward] = build_reward_functions([spec])
    return reward.fn(["p"] * len(completions), completions, **columns)


# ------------------------------------------------------------------------------------------------ built-ins
def test_registry_names():
    assert sorted(REWARDS) == sorted(["numeric_answer", "exact_match", "regex_format", "json_schema",
                                      "length_penalty", "task", "reward_model", "code_exec", "random"])  # fmt: skip


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        ("2 + 3 = 5. Answer: 5", 5, True),
        ("Answer: 5.", "5.0", True),
        ("12 then 7 #### 7", 7, True),
        ("3 + 4 = 7.\nAnswer: 8", 7, False),  # the marked answer wins over earlier numbers
        ("first 3, then 12 apples", 12, True),  # unmarked: the last number
        ("total is 1,234", "1234", True),
        (r"so \boxed{\frac{3}{4}} overall", 0.75, True),
        ("Answer: 3/4", "0.75", True),
        ("The answer is $-2$.", -2, True),
        ("no number", 1, False),
        ("Answer: 100.0000001", 100, True),  # within the 1e-6 relative tolerance
        ("Answer: 100.01", 100, False),
    ],
)
def test_numeric_match(completion, answer, expected):
    assert numeric_match(completion, answer) is expected


def test_math_verify_answers_score_the_same_off_the_main_thread():
    """Reward functions may run in a worker thread, where math-verify cannot set its SIGALRM timeouts: math-verify
    0.7 then failed every parse, and a right LaTeX answer scored 0 silently (hence math-verify>=0.8)."""
    import threading

    results = {}

    def score():
        results["frac"] = numeric_match(r"so \boxed{\frac{1}{2}}", r"\frac{1}{2}")
        results["wrong"] = numeric_match(r"so \boxed{\frac{1}{3}}", r"\frac{1}{2}")

    worker = threading.Thread(target=score)
    worker.start()
    worker.join()
    assert results == {"frac": True, "wrong": False}


def test_numeric_answer_helpers_and_column():
    assert final_answer("x\n#### 9\n") == "9" and to_number("1/0") is None
    assert _one({"name": "numeric_answer", "args": {"column": "gold"}}, ["Answer: 1", "2"], gold=[1, 3]) == [
        1.0,
        0.0,
    ]


def test_exact_match():
    assert _one("exact_match", ["  yes\n", "Yes", "no"], answer=["yes", "yes", 0]) == [1.0, 0.0, 0.0]
    assert _one("exact_match", ["42"], answer=[42]) == [1.0]


def test_regex_format_modes():
    spec = {"name": "regex_format", "args": {"pattern": r"Answer: \d+$", "flags": "m"}}
    assert _one(spec, ["x\nAnswer: 3\n", "Answer: three"]) == [1.0, 0.0]
    full = {"name": "regex_format", "args": {"pattern": r"\d+", "mode": "fullmatch"}}
    assert _one(full, ["  42\n", "42 apples"]) == [1.0, 0.0]


def test_json_schema_fixed_and_per_row():
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    spec = {"name": "json_schema", "args": {"schema": schema}}
    completions = ['{"n": 1}', '```json\n{"n": 2}\n```', '{"n": "x"}', "{n: 1}", 'Sure! {"n": 1}']
    assert _one(spec, completions) == [1.0, 1.0, 0.0, 0.0, 0.0]
    per_row = _one(
        "json_schema", ["[1]", "[1]", "[1]"], schema=[{"type": "array"}, '{"type": "object"}', "{bad"]
    )
    assert per_row[:2] == [1.0, 0.0] and math.isnan(per_row[2])  # a broken row schema is not scored


def test_length_penalty_worked_values():
    # target 10, scale 5: length 8 -> 0; 10 -> 0; 15 -> -(15-10)/5 = -1; 22 -> -12/5 = -2.4
    spec = {"name": "length_penalty", "args": {"target": 10, "scale": 5}}
    assert _one(spec, ["a" * 8, "a" * 10, "a" * 15, "a" * 22]) == pytest.approx([0.0, 0.0, -1.0, -2.4])


def test_length_penalty_tokens_with_a_tokenizer_object():
    class Tok:  # one token per two characters
        def encode(self, text):
            return list(range((len(text) + 1) // 2))

    spec = {"name": "length_penalty", "args": {"target": 2, "unit": "tokens", "tokenizer": Tok()}}
    assert _one(spec, ["abcd", "abcdefgh"]) == [0.0, -1.0]  # 2 tokens -> 0; 4 tokens -> -(4-2)/2


def test_task_reward_by_arg_by_column_and_by_metadata():
    assert _one(
        {"name": "task", "args": {"task": "arithmetic"}}, ["Answer: 17", "Answer: 1"], answer=[17, 17]
    ) == [1.0, 0.0]
    assert _one("task", ["Answer: 2"], answer=[2], task=["arithmetic"]) == [1.0]
    out = _one("task", ["Answer: 2", "Answer: 2"], answer=[2, 2], metadata=[{"task": "arithmetic"}, {}])
    assert out[0] == 1.0 and math.isnan(out[1])  # no task named: not scorable
    # a file may name the task in a `task` column on some rows and in metadata.task on others (the rows' columns
    # reach the reward with None where a row lacks one): each row is scored by the task it names
    mixed = _one("task", ["Answer: 2", "Answer: 2"], answer=[2, 2], task=["arithmetic", None],
                 metadata=[None, {"task": "arithmetic"}])  # fmt: skip
    assert mixed == [1.0, 1.0]


def test_a_math_verify_timeout_is_counted_not_silent(monkeypatch):
    """math-verify's wall-clock limit made a right answer score 0 on a slow or busy machine, with nothing said
    (an audit: n = 700 scored 1 idle and 0 under load). A call past the limit still scores 0, and is counted:
    `numeric_answer` logs `reward/timeouts_<label>` with a note. Worked here with the comparison of sum k^3 =
    (sum k)^2 made to take 50 ms against a 10 ms limit; with the usual limit it scores 1."""
    import math_verify

    from posttrain.rewards import builtin

    fn = builtin.numeric_answer()
    gold, said = r"\sum_{k=1}^{60} k^3", r"The answer is \boxed{\left(\sum_{k=1}^{60} k\right)^2}"
    assert fn(["q"], [said], answer=[gold]) == [1.0] and fn.events() == {"timeouts": 0}
    verify = math_verify.verify

    def slow(*args, **kwargs):  # a comparison that takes sympy 50 ms, past a 10 ms limit
        time.sleep(0.05)
        return verify(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(math_verify, "verify", slow)
        m.setattr(builtin, "MATH_VERIFY_SECONDS", 0.01)
        signal.setitimer(signal.ITIMER_REAL, 30.0)  # a timer of the caller's own, stopped meanwhile and re-armed
        try:
            assert fn(["q"], [said], answer=[gold]) == [0.0]
            left = signal.getitimer(signal.ITIMER_REAL)[0]
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        assert 29.0 < left < 30.0
    assert fn.events() == {"timeouts": 1} and fn.events() == {"timeouts": 0}  # read, then counted afresh
    assert "math-verify comparisons ran past" in fn.event_notes["timeouts"]


def test_task_reward_of_one_verifier_metric():
    """`metric` rewards a verifier metric as 0/1, so a format reward and the `formatted` rate the recipes report are
    one test: `Answer: $16` and `#### 16` are marked answers (the recipes' earlier regex 'Answer:\\s*-?\\d' gave
    them 0), a bare number is not; a metric the task lacks is refused when the reward is built, and a row of a task
    without it (structured has no `formatted`) is not scorable."""
    from posttrain.data.tasks import TASKS

    spec = {"name": "task", "args": {"task": "arithmetic", "metric": "formatted"}}
    assert _one(spec, ["Answer: $16", "#### 16", "So 16.", "Answer: 17"], answer=[17] * 4) == [1.0, 1.0, 0.0, 1.0]
    for task in TASKS.values():  # each task's declared metrics are what its verifier returns
        row = task.make(1)[0]
        assert tuple(task.verify("", row["answer"])) == task.metrics
    with pytest.raises(ConfigError, match="metric 'exact' is not a metric of the arithmetic task's verifier; "
                                          "choose one of correct, formatted, has_number"):  # fmt: skip
        _one({"name": "task", "args": {"task": "arithmetic", "metric": "exact"}}, ["x"], answer=[1])
    out = _one({"name": "task", "args": {"metric": "formatted"}}, ["Answer: 2", "{}"], answer=[2, {}],
               task=["arithmetic", "structured"])  # fmt: skip
    assert out[0] == 1.0 and math.isnan(out[1])


def test_reward_model_calls_the_scorer_once_loaded(monkeypatch):
    made, seen = [], []

    class FakeScorer:
        def __init__(self, path, prepare=None):
            made.append((path, prepare))
            self.unscored = {}

        def __call__(self, prompts, completions, truncated=None):
            seen.append(truncated)
            self.unscored = {i: "it renders to no tokens" for i, c in enumerate(completions) if c == "odd"}
            return [math.nan if i in self.unscored else len(c) / 10 for i, c in enumerate(completions)]

    from posttrain.rewards import builtin

    monkeypatch.setattr(builtin, "RewardModelScorer", FakeScorer)
    [reward] = build_reward_functions([{"name": "reward_model", "args": {"path": "runs/rm"}}])
    assert made == []  # nothing loads at build time
    assert reward.fn(["p", "p"], ["abc", "abcde"]) == [0.3, 0.5]
    assert reward.fn(["p"], ["a"]) == [0.1] and made == [("runs/rm", None)]
    # the rollout's `truncated` column reaches the scorer (which then leaves those turns open)
    assert reward.fn(["p", "p"], ["a", "b"], truncated=[False, True]) == [0.1, 0.1]
    assert seen == [None, None, [False, True]]
    # what the run sets as `prepare` (the rollout source: `shard` under run.sharding=fsdp2) reaches the loaded model
    [other] = build_reward_functions([{"name": "reward_model", "args": {"path": "runs/rm2"}}])
    other.fn.prepare = print
    other.fn(["p"], ["a"])
    assert made[-1] == ("runs/rm2", print)
    # a sample the model cannot score fails with the scorer's reason, not "nan is not a finite number"
    result = compute_rewards([reward], ["p", "p"], ["abc", "odd"], fallback=-1.0)
    assert result.total == [0.3, -1.0] and result.failures == {"reward_model": 1}
    assert result.errors["reward_model"] == "sample 1: the reward model cannot score it: it renders to no tokens"


def test_the_reward_model_scores_a_truncated_completion_as_an_open_turn(tiny_tokenizer):
    """The exact token ids the reward model scores: a finished completion closes the assistant turn (ChatML's
    <|im_end|>, as in reward-model training); a truncated one is the prompt with the generation prompt, then the
    completion's text, and no end-of-turn token."""
    import torch

    from posttrain.models.heads import RewardModelScorer

    scored = []

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, ids, mask, keep):  # one score per row, read at `keep` (its last real token)
            assert keep.sum(-1).tolist() == [1] * len(ids) and keep[torch.arange(len(ids)), mask.sum(-1) - 1].all()
            scored.extend(row[m.bool()].tolist() for row, m in zip(ids, mask))
            return mask.sum(-1).float(), None

    scorer = RewardModelScorer.__new__(RewardModelScorer)
    scorer.model, scorer.tokenizer, scorer.batch_size, scorer.max_length = Model(), tiny_tokenizer, 8, None
    prompts = ["2+2?", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]]
    completions = ["4", "4", "The answer is", "The answer is"]
    out = scorer(prompts * 2, completions, truncated=[False, False, True, True])
    ids = lambda text: tiny_tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    user = "<|im_start|>user\n2+2?<|im_end|>\n"
    system = "<|im_start|>system\nBe brief.<|im_end|>\n"
    assert scored == [
        ids(user + "<|im_start|>assistant\n4<|im_end|>\n"),
        ids(system + user + "<|im_start|>assistant\n4<|im_end|>\n"),
        ids(user + "<|im_start|>assistant\nThe answer is"),
        ids(system + user + "<|im_start|>assistant\nThe answer is"),
    ]
    assert out == [float(len(r)) for r in scored]
    assert scorer(prompts[:1], ["4"]) == [out[0]]  # no `truncated` column: every turn closed, as before


def test_the_reward_model_scorer_keeps_its_forwards_when_a_sample_cannot_be_scored(tiny_model, tiny_tokenizer):
    """A sharded reward model's forward is a collective: one process's odd samples must not change how many
    forwards it runs. 10 samples in batches of 4 are 3 forwards, whatever the samples; sample 5's prompt cannot be
    rendered (None: not a string or a list of messages) and sample 8 renders past the model's length limit, so
    each gets NaN (the sample's failure, counted by `rewards.compute`), and every other sample the score the model
    gives it alone (its batch's padding is masked out: float32 summation order at most, hence assert_close's
    float32 defaults)."""
    import torch

    from posttrain.models.heads import RewardModelScorer, ScalarHeadModel

    torch.manual_seed(0)
    model = ScalarHeadModel(tiny_model).eval()
    scorer = RewardModelScorer.__new__(RewardModelScorer)
    scorer.model, scorer.tokenizer, scorer.batch_size, scorer.max_length = model, tiny_tokenizer, 4, 60
    prompts = [f"add {i} {i}" for i in range(10)]
    prompts[5] = None
    completions = ["x" * (i + 1) for i in range(10)]
    completions[8] = "y" * 80  # more tokens than max_length
    forwards = []
    model.policy.register_forward_hook(lambda *args: forwards.append(1))
    out = scorer(prompts, completions, truncated=[i % 2 == 1 for i in range(10)])
    assert len(forwards) == 3  # ceil(10 / 4), the same as for ten good samples
    assert len(out) == 10 and math.isnan(out[5]) and math.isnan(out[8])
    assert sorted(scorer.unscored) == [5, 8]  # why, for the logged error: the render's own exception, the length
    assert "could not be rendered" in scorer.unscored[5] and "max_position_embeddings" in scorer.unscored[8]
    for i in (0, 1, 2, 3, 4, 6, 7, 9):
        ids = torch.tensor([scorer.render(prompts[i], completions[i], i % 2 == 1)])
        alone = model.scores(ids, torch.ones_like(ids))
        torch.testing.assert_close(torch.tensor([out[i]]), alone, msg=str(i))
    # a batch of none but unscorable samples still runs its forward
    forwards.clear()
    assert all(math.isnan(x) for x in scorer([None, None], ["a", "b"])) and len(forwards) == 1


def test_a_reward_model_scores_a_cut_answer_as_it_was_sampled():
    """A rollout hands rewards the answer without the scaffold the template writes before it (the fallback
    template's space after `Assistant:`); a reward model left the turn of a cut answer open and appended the text
    straight after the generation prompt: `Assistant:four`, tokens it never saw. The scaffold goes back first, so a
    cut answer's ids are a finished one's up to its end-of-turn token."""
    from posttrain.models.heads import RewardModelScorer
    from posttrain.testing import merge_tokenizer

    scorer = RewardModelScorer.__new__(RewardModelScorer)
    scorer.tokenizer = merge_tokenizer(["<|endoftext|>"], eos="<|endoftext|>")
    done, cut = (scorer.render("Is 2+2 four or five?", "four five six", t) for t in (False, True))
    assert scorer.tokenizer.decode(cut) == "User: Is 2+2 four or five?\nAssistant: four five six"
    assert done[: len(cut)] == cut


def test_a_reward_not_retried_per_sample_fails_its_whole_batch_in_one_call():
    """`retry_per_sample = False` (a trained reward model: `rewards.builtin.reward_model`): a batched call that
    raises is every sample's failure, with no call per sample (which, on a sharded model, would run more forwards
    on this process than on the others)."""
    calls = []

    def broken(prompts, completions, **kwargs):
        calls.append(len(completions))
        raise RuntimeError("forward failed")

    broken.retry_per_sample = False
    result = compute_rewards([NamedReward(name="rm", fn=broken, builtin=True)], ["p"] * 3, ["a", "b", "c"],
                             fallback=-1.0)  # fmt: skip
    assert calls == [3]
    assert result.per_function["rm"] == [-1.0, -1.0, -1.0] and result.failures == {"rm": 3}
    assert result.errors["rm"] == "RuntimeError: forward failed"


def test_a_collective_reward_that_fails_stops_the_run_instead_of_falling_back():
    """`collective = True` (a reward model the run sharded: `rollout.source`): its batch failing on this process
    raises `CollectiveRewardFailed`, naming the reward and its error, instead of giving the fallback and going on
    while the other processes wait in its forward's collective. The same function not marked collective still
    falls back."""

    def broken(prompts, completions, **kwargs):
        raise RuntimeError("out of memory")

    broken.retry_per_sample, broken.collective = False, True
    with pytest.raises(CollectiveRewardFailed, match=r"^The reward 'rm' failed \(RuntimeError: out of memory\)\. "
                                                     r"It is a model sharded") as err:  # fmt: skip
        compute_rewards([NamedReward(name="rm", fn=broken, builtin=True)], ["p"] * 2, ["a", "b"])
    assert isinstance(err.value.__cause__, RuntimeError)
    broken.collective = False
    result = compute_rewards([NamedReward(name="rm", fn=broken, builtin=True)], ["p"] * 2, ["a", "b"])
    assert result.failures == {"rm": 2}


def test_code_exec_counts_the_programs_that_ran_past_its_time_limit():
    """A wall-clock limit makes a score depend on the machine's speed and load: the programs that ran past it are
    counted in the metrics (reward/timeouts_code_exec), per batch, instead of only scoring lower."""
    from posttrain.rewards import build_reward_functions
    from posttrain.rewards.compute import reward_metrics

    rewards = build_reward_functions([{"name": "code_exec", "args": {"timeout_s": 1}}])
    slow = "```python\ndef f():\n    return 1\nwhile True:\n    pass\n```"
    fast = "```python\ndef f():\n    return 1\n```"
    result = compute_rewards(rewards, ["p", "p"], [slow, fast], {"tests": ["assert f() == 1"] * 2})
    assert result.per_function["code_exec"] == [0.0, 1.0] and result.events == {"code_exec": {"timeouts": 1}}
    assert reward_metrics(result)["reward/timeouts_code_exec"] == 1.0
    again = compute_rewards(rewards, ["p"], [fast], {"tests": ["assert f() == 1"]})
    assert again.events == {"code_exec": {"timeouts": 0}}  # counted per batch: read, then started again


def test_a_users_reward_keeps_its_counts_with_args_and_a_broken_counter_stops_nothing(tmp_path, monkeypatch):
    """`events()` on a user's function survives binding its args (functools.partial dropped it: no metric, no
    warning); an events() that raises or gives junk leaves its counts out with one warning, and scoring goes on."""
    import warnings

    from posttrain.rewards import build_reward_functions, compute
    from posttrain.rewards.compute import reward_metrics

    (tmp_path / "r.py").write_text(
        "def counting(prompts, completions, scale=1.0, **kw):\n    return [scale] * len(completions)\n"
        "counting.events = lambda: {'slow': 3}\n"
        "def raising(prompts, completions, **kw):\n    return [1.0] * len(completions)\n"
        "def broken():\n    raise RuntimeError('counter broke')\n"
        "raising.events = broken\n"
        "def junk(prompts, completions, **kw):\n    return [1.0] * len(completions)\n"
        "junk.events = lambda: {'slow': 'many', 'ok': 2, 'neg': -1}\n"
    )
    monkeypatch.setattr(compute, "_WARNED_EVENTS", set())
    (tmp_path / "obj.py").write_text(  # a callable object: its events() is a method of its class
        "class Scorer:\n"
        "    def __init__(self):\n        self.n = 0\n"
        "    def __call__(self, prompts, completions, scale=1.0, **kw):\n"
        "        self.n += 1\n        return [scale] * len(completions)\n"
        "    def events(self):\n        n, self.n = self.n, 0\n        return {'calls': n}\n"
        "scorer = Scorer()\n")  # fmt: skip
    bound = build_reward_functions([{"name": f"{tmp_path / 'obj.py'}:scorer", "args": {"scale": 3.0}}])
    assert compute_rewards(bound, ["p"], ["a"]).events == {"scorer": {"calls": 1}}
    specs = [{"name": f"{tmp_path / 'r.py'}:counting", "args": {"scale": 2.0}}, f"{tmp_path / 'r.py'}:raising",
             f"{tmp_path / 'r.py'}:junk"]  # fmt: skip
    rewards = build_reward_functions(specs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = compute_rewards(rewards, ["p"], ["a"])
        compute_rewards(rewards, ["p"], ["a"])  # said once per function
    assert result.total == [4.0]
    assert result.events == {"counting": {"slow": 3}, "raising": {}, "junk": {"ok": 2}}
    assert reward_metrics(result)["reward/slow_counting"] == 3.0
    assert [str(w.message) for w in caught] == [
        "reward 'raising': its events() failed (RuntimeError: counter broke); its counts are left out of the metrics",
        "reward 'junk': its events() gave counts that are not whole numbers >= 0 (slow='many', neg=-1); they are left "
        "out of the metrics"]  # fmt: skip


def test_code_exec_fraction_and_all_or_nothing():
    good = "```python\ndef double(x):\n    return 2 * x\n```"
    half = "def double(x):\n    return x + 2\n"  # right only at x = 2
    tests = ["assert double(2) == 4\nassert double(5) == 10"] * 2
    assert _one({"name": "code_exec", "args": {"timeout_s": 5}}, [good, half], tests=tests) == [1.0, 0.5]
    spec = {"name": "code_exec", "args": {"timeout_s": 5, "all_or_nothing": True}}
    assert _one(spec, [good, half], tests=tests) == [1.0, 0.0]


# -------------------------------------------------------------------------------------------- specs and errors
def test_spec_forms_and_labels():
    specs = parse_reward_specs(
        ["task", {"name": "regex_format", "weight": 0.2, "args": {"pattern": "A"}, "label": "fmt"}]
    )
    assert [(s.name, s.label, s.weight, s.args) for s in specs] == [
        ("task", "task", 1.0, {}), ("regex_format", "fmt", 0.2, {"pattern": "A"})]  # fmt: skip


@pytest.mark.parametrize(
    "specs, message",
    [
        ("task", r"algorithm.rewards must be a list"),
        ([3], r"algorithm.rewards\[0\]: must be a reward name or a mapping"),
        (
            ["task", "nope"],
            r"algorithm.rewards\[1\]: unknown reward 'nope'; expected a built-in \(code_exec, ",
        ),
        ([{"weight": 1}], r"\[0\]: 'name' must be a non-empty string"),
        (
            [{"name": "task", "wieght": 1}],
            r"\[0\]: unknown key\(s\) wieght; allowed: name, weight, args, label",
        ),
        ([{"name": "task", "weight": "high"}], r"\[0\]: 'weight' must be a finite number"),
        ([{"name": "task", "weight": float("nan")}], r"'weight' must be a finite number"),
        ([{"name": "task", "args": [1]}], r"\[0\]: 'args' must be a mapping"),
        ([{"name": "task", "label": ""}], r"'label' must be a non-empty string"),
        (
            [{"name": "regex_format", "args": {"patern": "x"}}],
            r"\[0\]: bad args for 'regex_format': .*patern.*accepted: pattern",
        ),
        (
            ["exact_match", "exact_match"],
            r"\[1\]: reward name 'exact_match' is already used by algorithm.rewards\[0\]",
        ),
        (["missing.py:f"], r"\[0\]: reward file 'missing.py' not found"),
    ],
)
def test_spec_errors(specs, message):
    with pytest.raises(ConfigError, match=message):
        parse_reward_specs(specs)


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"name": "regex_format"}, r"bad args for 'regex_format': .*pattern"),
        ({"name": "regex_format", "args": {"pattern": "("}}, r"not a valid regular expression"),
        (
            {"name": "task", "args": {"task": "poetry"}},
            r"unknown task 'poetry'; built-in tasks: arithmetic, structured",
        ),
        ({"name": "json_schema", "args": {"schema": {"type": 3}}}, r"invalid JSON schema"),
        ({"name": "length_penalty", "args": {"target": 5, "unit": "tokens"}}, r"needs a 'tokenizer'"),
    ],
)
def test_factory_errors_become_config_errors(spec, message):
    with pytest.raises(ConfigError, match=r"algorithm.rewards\[0\]: .*" + message):
        build_reward_functions([spec])


USER_FILE = """
def exact_answer(prompts, completions, answer, **kwargs):
    return [float(c.strip() == str(a)) for c, a in zip(completions, answer)]

def scaled(prompts, completions, factor=1.0, **kwargs):
    return [factor * len(c) for c in completions]

def no_kwargs(prompts, completions):
    return [0.0] * len(completions)

NOT_A_FUNCTION = 3
"""


def test_user_file_loading(tmp_path):
    (tmp_path / "my_rewards.py").write_text(USER_FILE)
    path = tmp_path / "my_rewards.py"
    rewards = build_reward_functions(
        [f"{path}:exact_answer", {"name": f"{path}:scaled", "args": {"factor": 2}}]
    )
    assert [r.name for r in rewards] == ["exact_answer", "scaled"]
    assert rewards[0].fn(["p"], ["4 "], answer=[4], other=["ignored"]) == [1.0]
    assert rewards[1].fn(["p"], ["abc"]) == [6.0]
    # Relative to base_dir, as a config file's folder would be.
    assert build_reward_functions(["my_rewards.py:exact_answer"], base_dir=tmp_path)[0].name == "exact_answer"


@pytest.mark.parametrize(
    "func, message",
    [
        ("absent", r"has no function 'absent'"),
        ("NOT_A_FUNCTION", r"'NOT_A_FUNCTION' in .* is not callable \(it is int\)"),
        ("no_kwargs", r"'no_kwargs' must accept \*\*kwargs"),
    ],
)
def test_user_file_errors(tmp_path, func, message):
    (tmp_path / "r.py").write_text(USER_FILE)
    with pytest.raises(ConfigError, match=r"algorithm.rewards\[0\]: .*" + message):
        parse_reward_specs([f"{tmp_path / 'r.py'}:{func}"])


def test_user_file_that_fails_to_import(tmp_path):
    (tmp_path / "broken.py").write_text("import not_a_module_anywhere\n")
    with pytest.raises(ConfigError, match=r"\[0\]: importing .* failed: ModuleNotFoundError"):
        parse_reward_specs([f"{tmp_path / 'broken.py'}:f"])
    # a script that exits when imported (sys.exit, or argparse reading posttrain's own arguments) ended the run
    # with its exit code and no message (an audit, nineteenth session)
    (tmp_path / "script.py").write_text("import sys\nsys.exit(3)\n")
    with pytest.raises(ConfigError, match=r"\[0\]: importing .*script.py' failed: SystemExit: 3"):
        parse_reward_specs([f"{tmp_path / 'script.py'}:f"])
    (tmp_path / "args.py").write_text(USER_FILE)
    with pytest.raises(
        ConfigError, match=r"bad args for .*args.py:scaled': no parameter named nope; accepted: factor"
    ):
        parse_reward_specs([{"name": f"{tmp_path / 'args.py'}:scaled", "args": {"nope": 1}, "label": "s"}])


# ------------------------------------------------------------------------------------ combination and failures
def _fn(values):
    return lambda prompts, completions, **kw: list(values)


def test_weighted_sum_worked_values():
    # a = [1, 0, 1] (w 1), b = [0.5, 0.5, -1] (w 2), c = [2, 4, 6] (w -0.25)
    # total = a + 2b - c/4 = [1+1-0.5, 0+1-1, 1-2-1.5] = [1.5, 0.0, -2.5]
    rewards = [NamedReward("a", _fn([1, 0, 1])), NamedReward("b", _fn([0.5, 0.5, -1]), 2.0),
               NamedReward("c", _fn([2, 4, 6]), -0.25)]  # fmt: skip
    r = compute_rewards(rewards, ["p"] * 3, ["c"] * 3, {})
    assert r.total == pytest.approx([1.5, 0.0, -2.5])
    assert r.per_function["b"] == [0.5, 0.5, -1.0]  # unweighted
    assert r.failures == {"a": 0, "b": 0, "c": 0} and r.errors == {}


def test_columns_are_passed_and_builtins_combine():
    rewards = build_reward_functions(
        ["numeric_answer", {"name": "regex_format", "weight": 0.2, "args": {"pattern": "Answer: "}}]
    )
    r = compute_rewards(rewards, ["p", "p"], ["Answer: 4", "4"], {"answer": [4, 5], "id": ["a", "b"]})
    assert r.total == pytest.approx([1.2, 0.0])


def test_failures_fall_back_and_are_counted():
    def raises(prompts, completions, **kw):
        raise RuntimeError("boom")

    rewards = [
        NamedReward("raises", raises),
        NamedReward("short", _fn([])),  # wrong length, in the batch and for every sample alone
        NamedReward("bad_values", _fn([float("nan"), None, "x", math.inf, 0.5]), 2.0),
        NamedReward("ok", _fn([1, 1, 1, 1, 1])),
    ]
    r = compute_rewards(rewards, ["p"] * 5, ["c"] * 5, {}, fallback=-1.0)
    assert r.per_function["raises"] == [-1.0] * 5 and r.per_function["short"] == [-1.0] * 5
    assert r.per_function["bad_values"] == [-1.0, -1.0, -1.0, -1.0, 0.5]
    assert r.failures == {"raises": 5, "short": 5, "bad_values": 4, "ok": 0}
    assert (
        r.errors["raises"] == "RuntimeError: boom" and "returned 0 values for 5 samples" in r.errors["short"]
    )
    # total per sample: -1 - 1 + 2 * (-1) + 1 = -3, last: -1 - 1 + 2 * 0.5 + 1 = 0
    assert r.total == pytest.approx([-3.0, -3.0, -3.0, -3.0, 0.0])


def test_a_sample_that_makes_the_batch_raise_is_the_only_one_to_fall_back():
    """The batched call raises because of sample 2; called once per sample, the others keep their rewards."""
    calls = []

    def picky(prompts, completions, answer, **kw):
        calls.append(len(completions))
        return [1.0 / int(c) if a == "x" else float(len(c)) for c, a in zip(completions, answer)]

    r = compute_rewards(
        [NamedReward("picky", picky), NamedReward("ok", _fn([1, 1, 1, 1]))],
        ["p"] * 4,
        ["2", "4", "0", "125"],
        {"answer": ["x", "x", "x", "y"]},
        fallback=-7.0,
    )
    assert calls == [4, 1, 1, 1, 1]  # one batched call, then one per sample
    assert r.per_function["picky"] == [0.5, 0.25, -7.0, 3.0]  # the last row's own column value was passed
    assert r.failures == {"picky": 1, "ok": 0}
    assert r.errors == {"picky": "ZeroDivisionError: float division by zero"}
    assert r.total == pytest.approx([1.5, 1.25, -6.0, 4.0])
    # a function whose batched call returns the wrong length is scored sample by sample too
    r = compute_rewards([NamedReward("first_only", lambda p, c, **kw: [len(c[0])])], ["p"] * 2, ["ab", "c"])
    assert r.per_function["first_only"] == [2.0, 1.0] and r.failures == {"first_only": 0}
    assert "returned 1 values for 2 samples" in r.errors["first_only"]
    # a batch of one is not called twice
    calls.clear()
    r = compute_rewards([NamedReward("picky", picky)], ["p"], ["0"], {"answer": ["x"]})
    assert calls == [1] and r.per_function["picky"] == [0.0] and r.failures == {"picky": 1}


def test_failure_sites_name_the_line_of_the_users_file(tmp_path):
    """The first failure of a user function is located in the user's file: the last frame there (the user's
    line that called into a library, not the library's), or the function's own line when it returned a bad
    value; a built-in is named by its reward, never by a line of posttrain."""
    (tmp_path / "mine.py").write_text(
        "import json\n"
        "\n"
        "def parse(text):\n"
        "    return json.loads(text)\n"  # line 4: raises inside the json library
        "\n"
        "def structured(prompts, completions, **kwargs):\n"
        "    return [float(len(parse(c))) for c in completions]\n"
        "\n"
        "def nan(prompts, completions, **kwargs):\n"  # line 9
        "    return [float('nan')] * len(completions)\n",
        encoding="utf-8",
    )
    path = tmp_path / "mine.py"
    rewards = build_reward_functions([f"{path}:structured", f"{path}:nan", "exact_match"])
    r = compute_rewards(rewards, ["p"] * 2, ["not json", "{}"], {"gold": ["x", "y"]})
    assert r.failures == {"structured": 1, "nan": 2, "exact_match": 2}
    assert r.sites == {"structured": f"{path}:4", "nan": f"{path}:9"}
    assert r.errors["structured"].startswith("JSONDecodeError") and "exact_match" not in r.sites


def test_missing_column_is_a_counted_failure_with_a_clear_message():
    r = compute_rewards(build_reward_functions(["exact_match"]), ["p"], ["x"], {"gold": ["x"]})
    assert (
        r.failures == {"exact_match": 1}
        and "needs a 'answer' column; the dataset has: gold" in r.errors["exact_match"]
    )


def test_reward_metrics_worked_values():
    # a = [0, 1, 2]: mean 1, population std sqrt(2/3); total = 2a + 1 = [1, 3, 5]: mean 3, std 2 sqrt(2/3)
    rewards = [NamedReward("a", _fn([0, 1, 2]), 2.0), NamedReward("one", _fn([1, 1, 1]))]
    m = reward_metrics(compute_rewards(rewards, ["p"] * 3, ["c"] * 3, {}))
    assert m["reward/a_mean"] == pytest.approx(1.0) and m["reward/a_std"] == pytest.approx(math.sqrt(2 / 3))
    assert m["reward/total_mean"] == pytest.approx(3.0) and m["reward/total_std"] == pytest.approx(
        2 * math.sqrt(2 / 3)
    )
    assert m["reward/failures_a"] == 0.0 and m["reward/one_std"] == 0.0
    assert reward_metrics(compute_rewards(rewards[:1], [], [], {}))["reward/total_mean"] == 0.0


def test_mismatched_prompts_and_completions_is_a_bug():
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        compute_rewards([], ["p", "p"], ["c"], {})


@pytest.mark.parametrize(("completion", "gold", "right"), [
    # bare LaTeX gold answers, read as LaTeX (math-verify alone read 2\sqrt{3} as 2 and (-2,2) as nothing)
    (r"\boxed{2\sqrt{3}}", r"2\sqrt{3}", True), (r"\boxed{2}", r"2\sqrt{3}", False),
    (r"\boxed{(-2,2)}", "(-2,2)", True), (r"\boxed{\dfrac{3}{4}}", "0.75", True), (r"\boxed{2^{10}}", "1024", True),
    # a worked solution as the gold: its own marked answer
    (r"\boxed{2\sqrt{3}}", r"We get $x = 2\sqrt{3}$, so $\boxed{2\sqrt{3}}$.", True),
    ("Answer: 72", "She sold 48 + 24 = 72.\n#### 72", True), ("Answer: 5", "5 (answer: five)", True),
    # words and units around an answer read as before (the first wrapping of LaTeX made these 0)
    ("Answer: 5 cm^2", "5", True), ("Answer: 9.8 m/s^2", "9.8", True), ("The answer is 5m^2", "5", True),
    (r"Answer: 25\% of the class", "25", True), (r"Answer: \frac{1}{2} of the pizza", "0.5", True),
    (r"The answer is 3\sqrt{2} units.", r"3\sqrt{2}", True), (r"Answer: 45^\circ angle", "45", True),
    (r"\boxed{-5^{\circ}C}", "-5", True), ("Answer: 8 cm^2", r"8 \text{ cm}^2", True), ("Answer: 12", "12 in^2", True),
    # a gold with its unit in \text{} is LaTeX all the same (the second change read 4\sqrt{2} \text{ units} as 4)
    (r"\boxed{4\sqrt2}", r"4\sqrt{2} \text{ units}", True), (r"\boxed{4}", r"4\sqrt{2} \text{ units}", False),
    (r"\boxed{3\pi}", r"3\pi \text{ square units}", True), (r"\boxed{3}", r"3\pi \text{ square units}", False),
    (r"\boxed{\sqrt5}", r"\sqrt{5} \text{ cm}", True), (r"Answer: 6 \text{ inches}", "6", True),
    # plain numbers as ever
    ("Answer: 1,000", "1000", True), ("x = 5", "5", True), ("Answer: -3", "3", False),
])  # fmt: skip
def test_numeric_answer_reads_latex_as_latex_and_everything_else_as_before(completion, gold, right):
    from posttrain.rewards.builtin import numeric_match

    assert numeric_match(completion, gold) is right


def test_a_gold_answer_that_is_a_label_or_no_math_is_not_readable():
    from posttrain.rewards.builtin import readable_number

    assert [readable_number(g) for g in ("{B}", "B", r"\text{odd}", "}", "four")] == [False] * 5
    assert [readable_number(g) for g in ("(-2,2)", r"2\sqrt{3}", "x^2+1", "{1,2}", "1,000", r"\sqrt{5} \text{ cm}")] == [True] * 6


def test_a_reward_that_names_its_parameters_in_another_order_is_called_by_name(tmp_path):
    """TRL's `def f(completions, **kwargs)` failed on every sample, and `def f(completions, prompts, **kwargs)`
    scored the prompts, with no error (a user-journey audit, twenty-third session)."""
    (tmp_path / "r.py").write_text(
        "def trl(completions, **kwargs):\n    return [float(c == kwargs['answer'][i]) for i, c in enumerate(completions)]\n"
        "def swapped(completions, prompts, **kwargs):\n    return [float(len(c)) for c in completions]\n"
        "def positional(p, c, **kwargs):\n    return [float(len(x)) for x in c]\n")  # fmt: skip
    trl, swapped, positional = build_reward_functions([f"{tmp_path / 'r.py'}:{n}" for n in ("trl", "swapped",
                                                                                             "positional")])  # fmt: skip
    assert trl.fn(["a prompt"], ["4"], answer=["4"]) == [1.0]
    assert swapped.fn(["a long prompt"], ["abc"]) == [3.0] and positional.fn(["a long prompt"], ["abc"]) == [3.0]


def test_calling_by_name_keeps_star_args_callable_objects_and_refuses_positional_only_swaps():
    """A review of the call by name: `def f(prompts, *args, **kw)` lost its completions to **kwargs, a callable
    object's retry_per_sample and events() were dropped by the wrapper, and a positional-only swap failed every
    sample."""
    from posttrain.errors import ConfigError
    from posttrain.rewards.spec import by_name

    def star(prompts, *args, **kwargs):
        return [float(len(c)) for c in args[0]]

    assert by_name(star) is star and star(["p"], ["abc"]) == [3.0]

    class Scorer:
        retry_per_sample = False

        def events(self):
            return {"x": 0}

        def __call__(self, completions, **kwargs):
            return [1.0 for _ in completions]

    wrapped = by_name(Scorer())
    assert wrapped(["p"], ["c"]) == [1.0] and wrapped.retry_per_sample is False and wrapped.events() == {"x": 0}

    def swapped(completions, prompts, /, **kwargs):
        return [0.0]

    with pytest.raises(ConfigError, match="positional-only and not in the order"):
        by_name(swapped, "algorithm.rewards[0]")


def test_a_sample_that_fails_otherwise_than_its_batch_is_named_by_its_own_error_and_line(tmp_path):
    """The batched call raised one error, the samples alone another: the warning named the batch's error (and its
    line) as the reason the samples failed; both are said now, the sample's with its own line."""
    path = tmp_path / "mine.py"
    path.write_text("def f(prompts, completions, **kwargs):\n"
                    "    if len(completions) > 1:\n"
                    "        raise ValueError('batch')\n"  # line 3
                    "    if len(completions[0]) % 2:\n"
                    "        raise RuntimeError('odd')\n"  # line 5
                    "    return [1.0]\n", encoding="utf-8")  # fmt: skip
    r = compute_rewards(build_reward_functions([f"{path}:f"]), ["p"] * 3, ["ab", "a", "abc"], fallback=-1.0)
    assert r.per_function["f"] == [1.0, -1.0, -1.0] and r.failures == {"f": 2}
    assert r.errors["f"] == "its call on all 3 samples failed (ValueError: batch), then sample 1 alone: RuntimeError: odd"
    assert r.sites["f"] == f"{path}:5"


def test_a_reward_can_carry_its_own_fallback_for_a_negative_weight():
    """One `algorithm.reward_fallback` cannot suit a function weighted down: the fallback that is the worst of a
    function weighted up is the best of one weighted down (a failure outranked a scored sample). A spec's own
    `fallback` is used for its function; the others keep the run's."""
    from posttrain.algorithms.rl import negative_weight_notes

    def half(prompts, completions, **kw):
        return [None if c == "x" else 1.0 for c in completions]

    specs = [{"name": "exact_match", "weight": 1.0}, {"name": "exact_match", "label": "penalty", "weight": -0.5,
                                                      "fallback": 1.0}]  # fmt: skip
    rewards = build_reward_functions(specs)
    assert [(r.name, r.fallback) for r in rewards] == [("exact_match", None), ("penalty", 1.0)]
    rewards = [NamedReward("up", half, 1.0), NamedReward("down", half, -0.5, fallback=1.0)]
    r = compute_rewards(rewards, ["p"] * 2, ["ok", "x"], fallback=0.0)
    assert r.per_function == {"up": [1.0, 0.0], "down": [1.0, 1.0]}
    assert r.total == [0.5, -0.5]  # the failed sample ranks below the scored one under both weights
    assert negative_weight_notes(parse_reward_specs(specs), 0.0) == []
    [note] = negative_weight_notes(parse_reward_specs([{"name": "exact_match", "weight": -0.5}]), 0.0)
    assert note.startswith("reward 'exact_match' has weight -0.5: a sample it fails on gets algorithm.reward_fallback")
    for bad in ("one", True, float("nan")):
        with pytest.raises(ConfigError, match=r"algorithm.rewards\[0\]: 'fallback' must be a finite number"):
            parse_reward_specs([{"name": "exact_match", "fallback": bad}])


def test_a_reward_file_edited_within_one_process_is_imported_again(tmp_path):
    """A second `train()` or `evaluate` in one notebook kept the function as first imported, after its file changed."""
    path = tmp_path / "mine.py"
    path.write_text("def f(prompts, completions, **kwargs):\n    return [0.0] * len(completions)\n")
    assert build_reward_functions([f"{path}:f"])[0].fn(["p"], ["c"]) == [0.0]
    path.write_text("def f(prompts, completions, **kwargs):\n    return [1.0] * len(completions)\n")
    assert build_reward_functions([f"{path}:f"])[0].fn(["p"], ["c"]) == [1.0]


def test_an_edited_reward_file_replaces_its_older_module():
    """Each edited version stayed in sys.modules (a review: 4 versions of a file that loads 100 MB held 400 MB)."""
    import sys
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / "mine.py"
    for value in range(3):
        path.write_text(f"def f(prompts, completions, **kwargs):\n    return [{value}.0] * len(completions)\n")
        assert build_reward_functions([f"{path}:f"])[0].fn(["p"], ["c"]) == [float(value)]
    def loaded():
        return [m for m, mod in list(sys.modules.items()) if getattr(mod, "__file__", None) == str(path)]

    assert len(loaded()) == 1
    build_reward_functions([f"{path}:f"])  # unchanged: the same module, not imported again
    assert len(loaded()) == 1


def test_what_a_reward_file_defines_can_be_pickled(tmp_path):
    """Pickling an object of a reward file failed ("import of module 'posttrain_user_rewards.mine_...' failed"):
    the package its modules are named under was never registered, though the code said pickling finds them."""
    import pickle

    path = tmp_path / "mine.py"
    path.write_text("def helper(x):\n    return 2 * x\n\ndef f(prompts, completions, **kwargs):\n"
                    "    return [0.0] * len(completions)\n")  # fmt: skip
    build_reward_functions([f"{path}:f"])
    import sys

    module = next(m for m in sys.modules.values() if getattr(m, "__file__", None) == str(path))
    assert pickle.loads(pickle.dumps(module.helper))(3) == 6


@pytest.mark.parametrize(("completion", "answer", "expected"), [
    (r"\boxed{\$18}", 18, True),  # LaTeX's escaped dollar: MATH-style money answers all scored 0
    (r"The answer is \$18.", 18, True),
    (r"\boxed{\$18.90}", r"Three shirts cost $3 \cdot 6.30 = \boxed{\$18.90}$.", True),  # a worked MATH gold
    ("Answer: 18.90", r"Three shirts cost $3 \cdot 6.30 = \boxed{\$18.90}$.", True),
    ("Answer: -$17", -17, True),
    ("Answer: +17", 17, True),
    (r"\boxed{1\,000}", "1000", True),  # thin-space thousands
    ("Answer: x = 3 or x = 5", "x = 3 or x = 5", True),  # the gold read as the set {3, 5}, as the answer is
    ("Answer: 3 or 5", "x = 3 or x = 5", True),
    ("Answer: 17. Check: 17 - 5 = 12.", 17, True),  # the check after the answer is not its equation
    ("Answer: 1,234. Check: 1,234 - 5 = 1,229.", "1234", True),
    ("Answer: -17. Done.", -17, True),
    (r"\boxed{\$19}", 18, False),
])  # fmt: skip
def test_numeric_match_reads_money_signs_sets_and_checks_as_written(completion, answer, expected):
    """An audit's hand-labelled cases `numeric_answer` got wrong."""
    assert numeric_match(completion, answer) is expected


def test_a_worked_gold_is_checked_by_the_answer_scoring_reads():
    """A MATH-style solution passed the pre-run check (read whole) while scoring read its boxed answer, which was
    then no number: every completion on the row scored 0, unsaid (an audit)."""
    from posttrain.rewards.checks import _not_a_number

    assert _not_a_number(r"Three shirts cost $3 \cdot 6.30 = \boxed{\$18.90}$.") is None
    assert "is not a number" in _not_a_number(r"We find \boxed{\text{blue}}.")
