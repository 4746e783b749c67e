"""`posttrain study`'s pure parts: the hierarchical bootstrap on cases with known intervals and variance, the
minimum detectable difference worked out by hand, budgets turned into steps, the data splits (the share of each
operation, evaluation splits that share no wording or name with training, right answers, the noise condition), the
random reward, and the settings' checks."""

import re
import statistics

import pytest
import torch

from posttrain.data.tasks.arithmetic import (
    HELDOUT_WORDINGS,
    NAMES,
    UNSEEN_INSTRUCTIONS,
    UNSEEN_NAMES,
    UNSEEN_WORDINGS,
    Arithmetic,
    parse_steps,
)
from posttrain.diagnose.stats import (
    bootstrap_ci,
    hierarchical_bootstrap_ci,
    hierarchical_bootstrap_means,
    minimum_detectable_difference,
)
from posttrain.errors import ConfigError
from posttrain.rewards import build_reward_functions
from posttrain.study.arms import steps_for_budget
from posttrain.study.config import STUDY_CONFIGS, TaskSettings, load_study_config
from posttrain.study.data import OOD_SPLITS, RARE_OP_WORDINGS, make_seed_data


# ---- hierarchical bootstrap ------------------------------------------------------------------------------------
def test_seeds_that_never_vary_within_give_the_interval_of_the_seed_draw():
    # Seed A always wrong (3 problems), seed B always right (5 problems): a resample's mean is 0, 1/2 or 1 with
    # chances 1/4, 1/2, 1/4 (each seed weighs the same whatever its size), so the 95% interval is [0, 1] and the
    # 40% interval [0.5, 0.5] (its 30% and 70% quantiles both fall in the 1/2 mass, which spans 25% to 75%).
    groups = [[0.0] * 3, [1.0] * 5]
    assert hierarchical_bootstrap_ci(groups, n_resamples=4000) == (0.0, 1.0)
    assert hierarchical_bootstrap_ci(groups, level=0.4, n_resamples=4000) == (0.5, 0.5)
    means = hierarchical_bootstrap_means(groups, n_resamples=4000)
    assert set(means.tolist()) == {0.0, 0.5, 1.0}
    assert (means == 0.5).double().mean().item() == pytest.approx(0.5, abs=0.03)  # 4000 draws: sd 0.008


def test_one_seed_is_the_plain_bootstrap_of_its_mean():
    # 400 values, half right: the normal interval 0.5 +- 1.96 * 0.5 / 20 = [0.451, 0.549]; the two bootstraps
    # draw differently, so both are compared with it (quantile noise ~0.003 at 4000 resamples).
    values = [0.0, 1.0] * 200
    lo, hi = hierarchical_bootstrap_ci([values], n_resamples=4000, seed=3)
    assert lo == pytest.approx(0.451, abs=0.008) and hi == pytest.approx(0.549, abs=0.008)
    plain = bootstrap_ci(values, n_resamples=4000, seed=3)
    assert lo == pytest.approx(plain[0], abs=0.01) and hi == pytest.approx(plain[1], abs=0.01)


def test_the_resampled_means_have_the_two_stage_variance():
    # Var = (sigma_b^2 + mean_s(sigma_s^2 / n_s)) / S, population variances (divisor S, n_s): the seed drawn,
    # then the problems within it (Davison & Hinkley 1997, sec. 3.8). Seeds of different sizes on purpose.
    groups = [[0, 1, 1, 1], [0, 0, 1, 0, 0, 1], [1, 1, 1], [0, 1]]
    seed_means = [statistics.fmean(g) for g in groups]
    within = [statistics.pvariance(g) / len(g) for g in groups]
    expected = (statistics.pvariance(seed_means) + statistics.fmean(within)) / len(groups)
    means = hierarchical_bootstrap_means(groups, n_resamples=40000, seed=1)
    # 40000 resamples: the variance estimate's relative sd is sqrt(2 / 40000) = 0.7%; 3% is about 4 sd
    assert means.var().item() == pytest.approx(expected, rel=0.03)
    assert means.mean().item() == pytest.approx(statistics.fmean(seed_means), abs=0.003)


def test_hierarchical_bootstrap_is_seeded_and_refuses_an_empty_seed():
    groups = [[0, 1, 1], [1, 0]]
    assert torch.equal(hierarchical_bootstrap_means(groups, seed=5), hierarchical_bootstrap_means(groups, seed=5))
    with pytest.raises(ValueError, match="at least one value"):
        hierarchical_bootstrap_ci([[1.0], []])


# ---- minimum detectable difference ---------------------------------------------------------------------------
@pytest.mark.parametrize(("problems", "seeds", "kwargs", "expected"), [
    # (z_0.975 + z_0.8) sqrt(2 * 0.25 / N): 2.801585 * sqrt(0.5 / 100) = 0.198101
    (100, 1, {}, 0.198101),
    # N = 450: 2.801585 * sqrt(0.5 / 450) = 0.093386
    (150, 3, {}, 0.093386),
    # 90% level, 90% power: (1.644854 + 1.281552) * sqrt(0.5 / 100) = 2.926406 * 0.0707107 = 0.206929
    (50, 2, {"level": 0.9, "power": 0.9}, 0.206929),
    # p = 0.2: sqrt(2 * 0.16 / 60) = 0.073030; * 2.801585 = 0.204600
    (60, 1, {"p": 0.2}, 0.204600),
])  # fmt: skip
def test_minimum_detectable_difference_by_hand(problems, seeds, kwargs, expected):
    assert minimum_detectable_difference(problems, seeds, **kwargs) == pytest.approx(expected, abs=2e-6)


# ---- budgets into steps --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("seconds", "step_s", "checkpoints", "calibration", "steps"), [
    (100, 7, 3, 2, 12),   # 14 fit, rounded down to a multiple of 3
    (10, 7, 3, 2, 3),     # 1 fits, but 2 ran for calibration: rounded up to 3
    (100, 7, 1, 2, 14),
    (-5, 7, 3, 4, 6),     # the generation alone spent the budget: the calibration steps, rounded up
    (90, 30, 3, 2, 3),
])  # fmt: skip
def test_steps_for_budget(seconds, step_s, checkpoints, calibration, steps):
    assert steps_for_budget(seconds, step_s, checkpoints, calibration) == steps


# ---- the data splits -----------------------------------------------------------------------------------------
def _templates_in(prompt: str, templates) -> set[str]:
    """The templates (with their slots as wildcards) that occur in `prompt`."""
    found = set()
    for t in templates:
        pattern = re.escape(t)
        for slot in ("name", "items", "n", "k"):
            pattern = pattern.replace(re.escape("{" + slot + "}"), r"[A-Za-z0-9']+")
        if re.search(pattern, prompt):
            found.add(t)
    return found


@pytest.fixture(scope="module")
def seed_data():
    return make_seed_data(TaskSettings(train_rows=200, eval_problems=40), seed=7, noise=0.3)


def test_training_holds_the_share_of_each_operation_and_evaluation_is_balanced(seed_data):
    ops = [r["metadata"]["op"] for r in seed_data.train]
    assert ops.count("add") == 160 and ops.count("sub") == 40  # 80% "gets more", 20% "gives away"
    clean = seed_data.split("id")
    assert [r["op"] for r in clean].count("sub") == 20 == len(seed_data.split("rare_op"))
    for split in ("paraphrase", "noop", "names"):
        assert [r["perturbs"] for r in seed_data.split(split)] == [r["id"] for r in clean]


def test_answers_are_right_and_the_shortcut_is_start_plus_k(seed_data):
    for row in [r for r in seed_data.train if not r["metadata"]["wrong"]] + seed_data.eval:
        ((start, op, k),) = parse_steps(row["completion"])
        assert row["answer"] == (start + k if op == "+" else start - k) >= 1
        assert row["completion"].endswith(f"Answer: {row['answer']}")
        shortcut = row["shortcut"] if "shortcut" in row else row["metadata"]["shortcut"]
        assert shortcut == (start + k if op == "-" else None)
    ids = {r["id"]: r for r in seed_data.eval}
    for row in seed_data.eval:
        if row["perturbs"] is not None:
            assert row["answer"] == ids[row["perturbs"]]["answer"] and row["op"] == ids[row["perturbs"]]["op"]


def test_evaluation_splits_share_no_wording_and_no_name_with_training(seed_data):
    training = [r["prompt"] for r in seed_data.train + seed_data.varied]
    unseen = [w for ws in UNSEEN_WORDINGS.values() for w in ws] + list(RARE_OP_WORDINGS["sub"])
    assert not any(_templates_in(p, unseen) for p in training)
    assert not any(i in p for p in training for i in UNSEEN_INSTRUCTIONS)
    assert not any(re.search(rf"\b{n}\b", p) for p in training for n in UNSEEN_NAMES)
    for row in seed_data.split("paraphrase"):  # every sentence of a paraphrase is in an unseen wording
        assert len(_templates_in(row["prompt"], unseen)) == 3
    for row in seed_data.split("rare_op"):  # only the subtraction is reworded, and never as training has it
        assert len(_templates_in(row["prompt"], RARE_OP_WORDINGS["sub"])) == 1
        assert not _templates_in(row["prompt"], HELDOUT_WORDINGS["start"] + HELDOUT_WORDINGS["question"])
    for row in seed_data.split("names"):
        assert not any(re.search(rf"\b{n}\b", row["prompt"]) for n in NAMES)
    train_numbers = {(r["completion"].split("=")[0]) for r in seed_data.train}
    assert not any(r["completion"].split("=")[0] in train_numbers for r in seed_data.split("id"))


def test_the_noise_condition_gives_a_share_of_wrong_demonstrations(seed_data):
    wrong = [r for r in seed_data.train if r["metadata"]["wrong"]]
    assert len(wrong) == 60  # 30% of 200
    assert all(Arithmetic().score(r["completion"], r["answer"]) == 0.0 for r in wrong)
    assert [r["completion"] for r in seed_data.varied] == [r["completion"] for r in seed_data.train]
    assert [r["prompt"] for r in seed_data.varied] != [r["prompt"] for r in seed_data.train]
    clean = make_seed_data(TaskSettings(train_rows=200, eval_problems=40), seed=7, noise=0.0)
    assert clean.eval == seed_data.eval and not any(r["metadata"]["wrong"] for r in clean.train)
    assert [r["prompt"] for r in clean.train] == [r["prompt"] for r in seed_data.train]


# ---- the random reward and the settings ----------------------------------------------------------------------
def test_the_random_reward_ignores_the_answer():
    (reward,) = build_reward_functions([{"name": "random", "args": {"seed": 2}}])
    prompts, completions = [f"q{i}" for i in range(400)], ["Answer: 5"] * 400
    values = reward.fn(prompts, completions, answer=[5] * 400)
    assert values == reward.fn(prompts, completions, answer=[6] * 400)  # the answer changes nothing
    assert set(values) == {0.0, 1.0} and statistics.fmean(values) == pytest.approx(0.5, abs=0.1)
    assert values != build_reward_functions([{"name": "random", "args": {"seed": 3}}])[0].fn(prompts, completions)


@pytest.mark.parametrize(("overrides", "says"), [
    (["task.eval_problems=7"], "must be even"),
    (["baseline=grpo", "arms=[sft-more]"], "baseline 'grpo' is not one of the arms"),
    (["arms=[sft-more, nope]"], "arms.1"),
    (["budget.secs=3"], "budget.secs (--set budget.secs=3): unknown key"),
    (["warm_start.pass_range=[0.9, 0.1]"], "warm_start.pass_range (--set warm_start.pass_range=[0.9, 0.1]): must be "
     "[low, high] with 0 <= low <= high <= 1, got [0.9, 0.1]"),
    (["budget.seconds=abc"], "budget.seconds (--set budget.seconds=abc): should be a valid number, unable to parse "
     "string as a number (got 'abc')"),
    (["evaluation.ks=[1, 16]"], "each k in 1..evaluation.samples"),
    (["noise=[0.0, 1.0]"], "noise must list distinct shares in [0, 1)"),
    # the study writes these over the fragments: they were accepted and replaced (an audit, nineteenth session)
    (["runs.common.model.name=elsewhere"], "runs.common.model.name: the study sets it itself (from the setting's "
     "model), so a value here would be replaced; remove it"),
    (["runs.sft.run.max_steps=5"], "runs.sft.run.max_steps: the study sets it itself (from the budget)"),
    (["runs.grpo.data.train=x.jsonl"], "runs.grpo.data.train: the study sets it itself"),
])  # fmt: skip
def test_bad_settings_name_the_field(overrides, says):
    with pytest.raises(ConfigError, match=re.escape(says)):
        load_study_config("quick", overrides)


def test_a_settings_file_error_names_the_line(tmp_path):
    f = tmp_path / "mine.yaml"
    text = (STUDY_CONFIGS / "quick.yaml").read_text()
    f.write_text(re.sub(r"(?m)^  seconds: \d+", "  seconds: soon", text, count=1))
    line = 1 + text[: text.index("\n  seconds:")].count("\n") + 1
    with pytest.raises(ConfigError) as err:
        load_study_config(str(f))
    assert f"  budget.seconds (line {line}): should be a valid number" in str(err.value)
    assert f.read_text().splitlines()[line - 1].startswith("  seconds: soon")


def test_the_shipped_settings_read():
    for name in ("quick", "standard", "full"):
        cfg, stem = load_study_config(name)
        assert stem == name and cfg.baseline in cfg.arms
    quick, _ = load_study_config("quick")
    assert quick.seeds == [0] and quick.noise == [0.0] and len(quick.arms) == 4
    assert set(OOD_SPLITS) == {"paraphrase", "noop", "names", "rare_op"}
