"""`study.summary` on hand-built scores with known answers: a stub right only on clean wording has a robustness gap
equal to its error rate on the variants; pass@k and W's check from the sampled counts worked out by hand; the
verdict rule (an interval that excludes 0 is not enough: the difference must also reach the minimum detectable
difference); the predictions read from those comparisons."""

import pytest

from posttrain.diagnose.stats import minimum_detectable_difference
from posttrain.study.config import StudyConfig
from posttrain.study.data import OOD_SPLITS, make_seed_data
from posttrain.study.scoring import Scores
from posttrain.study.summary import Cell, Point, summarise

# 40 problems per split: 20 additions, 20 subtractions (the rare_op split holds the 20 subtractions).
CFG = StudyConfig.model_validate({
    "arms": ["sft-more", "grpo"], "task": {"train_rows": 8, "eval_problems": 40},
    "evaluation": {"samples": 4, "ks": [1, 2, 4], "curve_problems": 4}, "statistics": {"resamples": 2000},
})  # fmt: skip
ROWS = make_seed_data(CFG.task, seed=0).eval
IDS = [r["id"] for r in ROWS if r["split"] == "id"]
NAMES = [r["id"] for r in ROWS if r["split"] == "names"]


def _cell(arm: str, correct: dict, sampled: dict, shortcut: dict | None = None) -> Cell:
    scores = Scores(correct, shortcut or {}, samples=4, sampled=sampled)
    return Cell(arm, 0, 0.0, "trained", budget_s=10.0, steps=3, seconds=9.0, tokens=100.0,
                points=[Point(3, 9.0, 100.0, scores, True)])  # fmt: skip


@pytest.fixture(scope="module")
def result():
    # W: sampled counts 0, 1, 2, 4, 4 of 4 in turn (8 prompts each). pass@1 = c / 4: mean (0 + .25 + .5 + 1 + 1) / 5
    # = 0.55; mixed (0 < c < 4): 2 of 5 = 0.4, just the minimum the check asks.
    w_counts = {i: (0, 1, 2, 4, 4)[j % 5] for j, i in enumerate(IDS)}
    warm = _cell("warm-start", {r["id"]: 1 for r in ROWS}, w_counts)
    # sft-more: right on every clean problem, wrong on every variant, and it answers start + k on every variant
    # subtraction (the shortcut); 2 of 4 samples right on each prompt.
    sft = _cell("sft-more", {r["id"]: int(r["split"] == "id") for r in ROWS}, dict.fromkeys(IDS, 2),
                {r["id"]: int(r["split"] != "id") for r in ROWS if r["shortcut"] is not None})  # fmt: skip
    # grpo: right everywhere except names, where only the first 6 of 40 variants are right; 4 of 4 samples right.
    grpo = _cell("grpo", {r["id"]: int(r["split"] != "names" or r["id"] in NAMES[:6]) for r in ROWS},
                 dict.fromkeys(IDS, 4))  # fmt: skip
    return summarise(CFG, "test", [warm, sft, grpo], {0: ROWS}, out="x", seconds=1.0)


def test_a_model_right_only_on_clean_wording_has_a_gap_equal_to_its_error_on_variants(result):
    sft = {a.arm: a for a in result.summaries}["sft-more"]
    assert sft.accuracy["id"].value == 1.0 and sft.accuracy["ood"].value == 0.0
    for split in OOD_SPLITS:  # every pair is (right, wrong): the gap is exactly 1, and so is every resample
        assert (sft.gap[split].value, sft.gap[split].low, sft.gap[split].high) == (1.0, 1.0, 1.0)
    assert sft.shortcut["ood"].value == 1.0 and sft.shortcut["id"].value == 0.0
    assert result.problems == {"id": 40, "paraphrase": 40, "noop": 40, "names": 40, "rare_op": 20, "ood": 140}


def test_pass_at_k_and_the_warm_start_check_by_hand(result):
    by = {a.arm: a for a in result.summaries}
    # 2 right of 4: pass@1 = 0.5, pass@2 = 1 - C(2,2)/C(4,2) = 5/6, pass@4 = 1; every prompt mixed
    p = by["sft-more"].pass_at_k
    assert (p["1"].value, p["2"].value, p["4"].value) == pytest.approx((0.5, 5 / 6, 1.0), abs=1e-12)
    assert by["sft-more"].mixed_share.value == 1.0 and by["grpo"].mixed_share.value == 0.0
    assert len(by["warm-start"].curve) == 1 and len(by["sft-more"].curve) == 2  # W's point once, then the arm's
    (check,) = result.warm_check
    assert check["pass_at_1"] == pytest.approx(0.55, abs=1e-12) and check["mixed_share"] == 0.4 and check["ok"]


def test_a_difference_is_called_only_past_the_minimum_detectable_difference(result):
    comp = {(c.arm, c.metric): c for c in result.comparisons}
    ood = comp[("grpo", "ood")]  # grpo - sft-more on the 140 pooled variants: (140 - 34) / 140 right more
    assert ood.difference == pytest.approx(106 / 140, abs=1e-12) and ood.low > 0 and ood.verdict == "higher"
    assert ood.mdd == pytest.approx(minimum_detectable_difference(140, 1), abs=1e-12)
    # names: +6/40 = 0.15, an interval above 0 (a resample draws none of the 6 with chance 0.85^40 = 0.15%), but
    # under the MDD of 40 problems, 2.801585 * sqrt(0.5 / 40) = 0.3132: inconclusive
    names = comp[("grpo", "names")]
    assert names.difference == pytest.approx(0.15, abs=1e-12) and names.low > 0
    assert names.mdd == pytest.approx(0.31323, abs=1e-5) and names.verdict == "inconclusive"
    same = comp[("grpo", "id")]  # both right on every clean problem: no difference, no interval width
    assert (same.difference, same.low, same.high, same.verdict) == (0.0, 0.0, 0.0, "inconclusive")
    assert comp[("grpo", "gap:paraphrase")].verdict == "lower"  # grpo loses nothing to paraphrases, sft-more all


def test_the_predictions_read_their_comparisons(result):
    preds = {p.claim.split(" (")[0]: p for p in result.predictions}
    chu = preds["RL keeps or gains out-of-distribution accuracy where SFT loses it"]
    assert (chu.verdict, chu.direction, chu.test.metric) == ("agrees", "agrees", "ood")
    assert preds["Paraphrase-diverse SFT closes much of the gap"].verdict == "not measured"  # no sft-diverse arm
    sharpen = preds["RL sharpens pass@1"]  # 1 - 0.55 = 0.45 > the MDD of 40 prompts (0.3132)
    assert sharpen.test.difference == pytest.approx(0.45, abs=1e-12) and sharpen.verdict == "agrees"
    # gain at pass@1 minus gain at pass@4 per prompt: c = 0: 1 - 1 = 0; c = 1: 0.75 - 0; c = 2: 0.5 - 0; c = 4: 0
    # -> mean (0.75 + 0.5) / 5 = 0.25, under the MDD: inconclusive, in the predicted direction
    cross = next(p for p in result.predictions if "crossover" in p.claim)
    assert cross.test.difference == pytest.approx(0.25, abs=1e-12)
    assert (cross.verdict, cross.direction) == ("inconclusive", "agrees")
    assert all(p.verdict == "not measured" for p in result.predictions if p.source.startswith("Shenfeld"))  # no drift
    assert next(p for p in result.predictions if p.claim.startswith("Wrong demonstrations")).verdict == "not measured"
