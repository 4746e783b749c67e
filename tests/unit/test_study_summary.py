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
    # pooled OOD counts problems (40, each with 3 or 4 variants), not the 140 variants: they are not independent
    assert result.problems == {"id": 40, "paraphrase": 40, "noop": 40, "names": 40, "rare_op": 20, "ood": 40}


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
    # grpo - sft-more pooled out of distribution, per problem (sft-more wrong on every variant): grpo's mean over a
    # problem's variants. 20 additions have 3 variants, 20 subtractions 4 (rare_op); the 6 names variants grpo gets
    # right perturb 3 of each. (3 x 1 + 17 x 2/3 + 3 x 1 + 17 x 3/4) / 40 = (361 / 12) / 40 = 361 / 480
    ood = comp[("grpo", "ood")]
    assert ood.difference == pytest.approx(361 / 480, abs=1e-12) and ood.low > 0 and ood.verdict == "higher"
    assert ood.mdd == pytest.approx(minimum_detectable_difference(40, 1), abs=1e-12)
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


def test_a_per_seed_measurement_over_three_seeds_gets_a_t_interval_not_the_seeds_range():
    """Drift is measured once per seed. A bootstrap of three values gives their range (drawing one seed three times
    has chance 1/27), so per-seed differences +0.001, +0.010, +0.030 were called "higher" [+0.001, +0.030]; on
    arms that do not differ that calls a verdict a quarter of the time (an audit). Student's t over the seeds:
    0.013667 +- 4.30265 x 0.014844 / sqrt(3) = [-0.0232, +0.0505], inconclusive."""
    cfg = CFG.model_copy(update={"seeds": [0, 1, 2]})
    cells = []
    for seed, (sft_kl, grpo_kl) in enumerate([(0.100, 0.101), (0.200, 0.210), (0.300, 0.330)]):
        for arm, kl in (("sft-more", sft_kl), ("grpo", grpo_kl)):
            drift = {"task": {"kl_policy_base": kl, "kl_base_policy": kl, "top1_agreement": 0.9},
                     "probe": {"kl_policy_base": kl, "kl_base_policy": kl, "top1_agreement": 0.9}}  # fmt: skip
            scores = Scores({r["id"]: 1 for r in ROWS}, {}, samples=4, sampled=dict.fromkeys(IDS, 2), drift=drift)
            cells.append(Cell(arm, seed, 0.0, "trained", points=[Point(3, 9.0, 100.0, scores, True)]))
    res = summarise(cfg, "test", cells, dict.fromkeys(cfg.seeds, ROWS), out="x", seconds=1.0)
    kl = next(p for p in res.predictions if p.claim.startswith("On-policy RL drifts less")).test
    assert kl.difference == pytest.approx(0.041 / 3, abs=1e-12) and kl.mdd is None
    assert (kl.low, kl.high) == (pytest.approx(-0.0232, abs=1e-4), pytest.approx(0.0505, abs=1e-4))
    assert kl.verdict == "inconclusive"
    grpo = {a.arm: a for a in res.summaries}["grpo"].drift["kl_task"]  # an arm's own: t over its 3 seeds, whose
    # low end, 0.2137 - 0.2845, is cut at 0 (a KL is never negative)
    assert (grpo.low, grpo.high) == (0.0, pytest.approx(0.2137 + 4.30265 * 0.11452 / 3**0.5, abs=1e-3))


def test_a_difference_of_differences_is_called_past_sqrt_2_times_the_mdd(result):
    """The crossover (gain at pass@1 minus gain at pass@4) adds the noise of four pass rates, not two."""
    cross = next(p for p in result.predictions if "crossover" in p.claim).test
    assert cross.mdd == pytest.approx(2**0.5 * minimum_detectable_difference(40, 1), abs=1e-12)


def test_an_arms_drift_interval_stays_within_what_the_number_can_take():
    """A t interval over 2 seeds printed "top-1 agreement 75.8% [-80.9, 232.5]" and KL intervals below 0 (an
    audit): an arm's own interval is cut to [0, 1] for a share and [0, inf) for a KL; a difference is not cut."""
    cfg = CFG.model_copy(update={"seeds": [0, 1]})
    cells = []
    for seed, (kl, agree) in enumerate([(0.01, 0.5), (0.5, 1.0)]):
        drift = {"task": {"kl_policy_base": kl, "kl_base_policy": kl, "top1_agreement": agree},
                 "probe": {"kl_policy_base": kl, "kl_base_policy": kl, "top1_agreement": agree}}  # fmt: skip
        scores = Scores({r["id"]: 1 for r in ROWS}, {}, samples=4, sampled=dict.fromkeys(IDS, 2), drift=drift)
        cells.append(Cell("sft-more", seed, 0.0, "trained", points=[Point(3, 9.0, 100.0, scores, True)]))
    res = summarise(cfg, "test", cells, dict.fromkeys(cfg.seeds, ROWS), out="x", seconds=1.0)
    d = {a.arm: a for a in res.summaries}["sft-more"].drift
    # t_1 = 12.706: 0.255 +- 12.706 x 0.34648 / sqrt(2) and 0.75 +- 12.706 x 0.35355 / sqrt(2), both past their range
    assert d["kl_task"].low == 0.0 and d["kl_task"].high == pytest.approx(0.255 + 12.7062 * 0.346482 / 2**0.5, abs=1e-3)
    assert (d["probe_agreement"].low, d["probe_agreement"].high) == (0.0, 1.0)
