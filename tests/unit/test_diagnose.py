"""`posttrain diagnose`'s probes on constructed cases with known answers: pass@k against its closed form and
brute force, the bootstrap interval where it is known, a stub model right only on clean wording, duplicate and
wrong-demonstration detection on a hand-built file, perturbed-set errors, the rules, and the KL."""

import itertools
import json
import math
import random
from math import comb
from statistics import NormalDist

import pytest
import torch

from posttrain.data import TASKS, load_rows
from posttrain.data.tasks import make_perturbed
from posttrain.diagnose import Settings, load_perturbed, recommend, run_diagnosis, task_verifier
from posttrain.diagnose.ambiguity import duplicate_clusters, measure_ambiguity
from posttrain.diagnose.core import demonstration_check
from posttrain.diagnose.drift import token_kl
from posttrain.diagnose.recommend import load_rules
from posttrain.diagnose.stats import bootstrap_ci, paired_gap, pass_at_k, pass_at_k_curve
from posttrain.diagnose.verifiers import reward_verifier
from posttrain.errors import DataError
from posttrain.evaluation.intervals import paired_difference_interval
from posttrain.rewards import build_reward_functions


# ---- pass@k --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_equals_the_closed_form_and_brute_force(n):
    for c in range(n + 1):
        outcomes = [1] * c + [0] * (n - c)
        for k in range(1, n + 1):
            closed = 1 - comb(n - c, k) / comb(n, k)
            subsets = list(itertools.combinations(outcomes, k))  # every way to draw k of the n samples
            brute = sum(any(s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(closed, abs=1e-12) == pytest.approx(brute, abs=1e-12)


def test_pass_at_k_is_stable_for_many_samples():
    # C(1000, 500) overflows a float; the product form does not: 1 - C(990, 500) / C(1000, 500).
    exact = 1 - math.exp(sum(math.log(990 - i) - math.log(1000 - i) for i in range(500)))
    assert pass_at_k(1000, 10, 500) == pytest.approx(exact, rel=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_pass_at_k_curve_means_over_prompts():
    curve = pass_at_k_curve([(4, 2), (4, 0)])
    assert curve == {1: 0.25, 2: pytest.approx(5 / 12, abs=1e-12), 3: 0.5, 4: 0.5}


# ---- bootstrap -----------------------------------------------------------------------------------------------
def test_bootstrap_of_equal_values_has_zero_width():
    assert bootstrap_ci([0.25] * 30) == (0.25, 0.25)
    assert bootstrap_ci([-1.0]) == (-1.0, -1.0)
    assert all(math.isnan(x) for x in bootstrap_ci([]))


def test_bootstrap_matches_the_normal_interval_for_many_values():
    # 400 paired differences: 120 of +1, 40 of -1, 240 of 0. mean 0.2, plug-in sd sqrt(160/400 - 0.04) = 0.6,
    # se 0.6 / 20 = 0.03: normal 95% interval 0.2 +- 1.96 * 0.03 = [0.1412, 0.2588].
    # Tolerance 0.005: two steps of the 1/400 grid the resampled means live on; the Monte Carlo error of a
    # 2.5% quantile from 20,000 resamples is ~0.0006, and the skew of a mean of 400 is far smaller.
    diffs = [1.0] * 120 + [-1.0] * 40 + [0.0] * 240
    z = NormalDist().inv_cdf(0.975)
    lo, hi = bootstrap_ci(diffs, n_resamples=20_000, seed=0)
    assert lo == pytest.approx(0.2 - z * 0.03, abs=0.005) and hi == pytest.approx(0.2 + z * 0.03, abs=0.005)
    assert bootstrap_ci(diffs, seed=3) == bootstrap_ci(diffs, seed=3) != bootstrap_ci(diffs, seed=4)


def test_paired_gap_by_hand():
    # 6 prompts: 3 lost (1 -> 0), 1 gained (0 -> 1), 2 unchanged. gap = (3 - 1) / 6; p = 2 P[Bin(4, 1/2) <= 1] = 10/16.
    r = paired_gap([1, 1, 1, 0, 1, 0], [0, 0, 0, 1, 1, 0])
    assert (r["lost"], r["gained"], r["pairs"]) == (3, 1, 6)
    assert r["gap"] == pytest.approx(2 / 6, abs=1e-12) and r["p_value"] == pytest.approx(10 / 16, abs=1e-12)
    assert r["clean_accuracy"] == pytest.approx(4 / 6) and r["perturbed_accuracy"] == pytest.approx(2 / 6)
    # both right 1 (prompt 4), clean only 3, perturbed only 1, neither 1: Newcombe's paired interval of that table
    assert (r["ci_low"], r["ci_high"]) == paired_difference_interval(1, 3, 1, 1)


def test_the_robustness_interval_is_never_a_point_and_covers_the_gap():
    """The percentile bootstrap of 0/1 differences printed [+0.0, +0.0] when no prompt moved, [+100, +100] for 5 of
    5 prompts lost (sign test p = 0.0625), and covered the true gap ~64% of the time on 10-20 prompts (an audit).
    Simulated here: 15 prompts, clean right with chance 0.8, a variant of a right prompt fails with chance 0.3 and
    one of a wrong prompt succeeds with chance 0.1 (true gap 0.8 x 0.3 - 0.2 x 0.1 = 0.22), 2,000 draws."""
    r = paired_gap([1] * 10, [1] * 10)
    assert r["gap"] == 0 and r["ci_low"] < -0.1 and r["ci_high"] > 0.1
    r = paired_gap([1] * 5, [0] * 5)
    assert r["p_value"] == 0.0625 and r["ci_low"] == pytest.approx(0.385549, abs=1e-6) and r["ci_high"] == 1.0
    rng = random.Random(0)
    covered = 0
    for _ in range(2000):
        clean = [rng.random() < 0.8 for _ in range(15)]
        perturbed = [(rng.random() >= 0.3) if c else (rng.random() < 0.1) for c in clean]
        r = paired_gap(clean, perturbed)
        covered += r["ci_low"] <= 0.22 <= r["ci_high"]
    assert covered / 2000 >= 0.93


# ---- a stub model ---------------------------------------------------------------------------------------------
def _stub(rows, variants, right_variant):
    """An answer function that knows every answer, is right on every clean prompt, and right on a variant only
    when `right_variant(variant)`; when sampling, right on the first `c` copies of each prompt (c from the id)."""
    answers = {r["prompt"]: r["answer"] for r in [*rows, *variants]}
    clean = {r["prompt"] for r in rows}
    by_prompt = {v["prompt"]: v for v in variants}

    def answer(batch, temperature, seed):
        out, seen = [], {}
        for r in batch:
            p = r["prompt"]
            if temperature == 0:
                ok = p in clean or right_variant(by_prompt[p])
            else:
                seen[p] = seen.get(p, 0) + 1
                ok = seen[p] <= int(r["id"].rsplit("-", 1)[1]) % 5  # c = 0..4 right out of n
            out.append(f"Answer: {answers[p] if ok else answers[p] + 1}")
        return out

    return answer


def test_a_model_right_only_on_clean_wording_has_a_gap_equal_to_its_error_on_variants():
    rows = TASKS["arithmetic"].make(40, seed=0, split="heldout")
    variants = make_perturbed("arithmetic", rows, seed=0)
    wrong = lambda v: v["kind"] != "names" and (int(v["perturbs"].rsplit("-", 1)[1]) % 3 != 0)  # noqa: E731
    result = run_diagnosis(rows, task_verifier("arithmetic"), answer=_stub(rows, variants, lambda v: not wrong(v)),
                           variants=variants, settings=Settings(samples=4))  # fmt: skip
    assert result.greedy_accuracy == 1.0 and result.robustness.clean_accuracy == 1.0
    for k in result.robustness.kinds:
        mine = [v for v in variants if v["kind"] == k.kind]
        error = sum(map(wrong, mine)) / len(mine)
        assert k.pairs == 40 and k.gap == pytest.approx(error, abs=1e-12)
        assert k.perturbed_accuracy == pytest.approx(1 - error, abs=1e-12)
        assert (k.lost, k.gained) == (sum(map(wrong, mine)), 0)
        assert k.p_value == pytest.approx(min(1.0, 2 * 0.5**k.lost), abs=1e-12)  # McNemar, all discordant lost
        assert k.ci_low <= k.gap <= k.ci_high
    assert {k.kind: k.gap for k in result.robustness.kinds}["names"] == 0.0
    # Sampling: prompt i has c = i % 5 right out of 4 (c = 4 counts as all 4): pass@k is the closed form's mean.
    counts = [(4, min(i % 5, 4)) for i in range(40)]
    assert result.headroom.pass_at_k == pytest.approx(pass_at_k_curve(counts), abs=1e-12)
    assert [p["c"] for p in result.headroom.prompts] == [c for _, c in counts]
    assert result.headroom.mixed == sum(1 for _, c in counts if 0 < c < 4)
    assert result.recommendation.option == "sft-data" and result.recommendation.fired[0].rule == "robustness-gap"


# ---- data ambiguity ------------------------------------------------------------------------------------------
SFT = [
    {"prompt": "Sam has 5 apples. He buys 3 more. How many?", "completion": "Answer: 8", "answer": 8},
    {"prompt": "Sam has 5 apples; he buys 3 more. How many?!", "completion": "It is 9. Answer: 9", "answer": 8},
    {"prompt": "Sam has 5 apples. He buys 4 more. How many?", "completion": "Answer: 9", "answer": 9},
    {"prompt": "Ava has 2 cards. She finds 7 more. How many cards now?", "completion": "Answer: 9", "answer": 9},
    {"prompt": "Ava has 2 cards. She finds 7 more. How many cards does she hold at the end?",
     "completion": "Answer: 9"},
    {"text": "plain text, no prompt"},
    {"prompt": "Lena has 3 books. How many?", "completion": "Answer: 4", "answer": 3},
]


def test_duplicates_and_wrong_demonstrations_in_a_hand_built_file(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in SFT), encoding="utf-8")
    rows = load_rows(path, "sft")
    d = measure_ambiguity(str(path), rows, demonstration_check(task_verifier("arithmetic")), threshold=0.8)
    # Lines 1 and 2: same numbers, same words once normalised, different answers: one ambiguous cluster. Line 3
    # has other numbers (4, not 3). Lines 4 and 5: Jaccard 10/16 < 0.8 (and the same response); line 6 is text.
    assert (d.rows, d.text_rows, d.duplicate_clusters, d.ambiguous_clusters, d.ambiguous_rows) == (7, 1, 1, 1, 2)
    assert d.clusters[0]["lines"] == [1, 2] and d.ambiguous_share == pytest.approx(2 / 6)
    assert d.clusters[0]["length_spread"] == pytest.approx((5 - 2) / 3.5)
    # Wrong demonstrations: lines 2 (9, not 8) and 7 (4, not 3); line 5 has no answer, so it is not checked.
    assert (d.checked, d.wrong, d.wrong_lines, d.wrong_share) == (5, 2, [2, 7], 0.4)
    loose = measure_ambiguity(str(path), rows, threshold=0.6)
    assert loose.duplicate_clusters == 2 and loose.ambiguous_clusters == 1 and loose.checked == 0


def test_duplicate_clusters_are_transitive_and_keep_numbers_apart():
    assert duplicate_clusters(["a b c d", "a b c e", "a b f e"], threshold=0.6) == [[0, 1, 2]]
    assert duplicate_clusters(["take 5 away", "take 6 away", "Take 5, away!"]) == [[0, 2]]


# ---- user perturbed sets ----------------------------------------------------------------------------------------
CLEAN = [{"id": "a", "prompt": "2 + 2?", "answer": 4}, {"id": 7, "prompt": "3 + 3?", "answer": "6"}]


def test_a_valid_perturbed_set_loads(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"perturbs": "a", "kind": "paraphrase", "prompt": "What is two plus two?", "answer": "4.0"},
            {"perturbs": 7, "kind": "numbers", "prompt": "3 + 4?", "answer": 7, "note": "kept"}]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    loaded = load_perturbed(path, CLEAN)
    assert [r["perturbs"] for r in loaded] == ["a", "7"] and loaded[1]["note"] == "kept"
    assert loaded[0]["prompt"] == [{"role": "user", "content": "What is two plus two?"}]


def test_perturbed_set_errors_name_file_line_and_field(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"perturbs": "zz", "kind": "noop", "prompt": "x", "answer": 4},
            {"perturbs": "a", "prompt": "x", "answer": 4},
            {"perturbs": "a", "kind": "names", "prompt": "x", "answer": 5},
            {"kind": "names", "prompt": "x", "answer": 4},
            {"perturbs": "a", "kind": "names", "answer": 4}]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_perturbed(path, CLEAN)
    lines = str(err.value).splitlines()
    assert lines[0] == f"{path}: 5 problem(s) in the perturbed prompts; nothing measured"
    assert lines[1] == f"{path}:1: perturbs: no clean prompt has the id 'zz' (their ids: a, 7)"
    assert lines[2].startswith(f"{path}:2: kind: missing required field")
    assert lines[3].startswith(f"{path}:3: answer: 5 is not the answer of the clean row it perturbs (4)")
    assert lines[4].startswith(f"{path}:4: perturbs: missing required field")
    assert lines[5].startswith(f"{path}:5: ") and "prompt" in lines[5]


# ---- the rules ---------------------------------------------------------------------------------------------------
def test_every_rule_fires_on_its_own_facts_and_names_them():
    options, rules = load_rules()
    cases = {
        "wrong-demonstrations": {"wrong_share": 0.3},
        "ambiguous-prompts": {"ambiguous_share": 0.1},
        "robustness-gap": {"worst_gap": 0.2, "worst_gap_low": 0.05, "worst_gap_high": 0.3, "worst_p": 0.01,
                           "kinds": 5, "worst_kind": "noop"},
        "sampling-headroom": {"headroom": 0.2, "mixed_share": 0.5, "pass_at_1": 0.2, "pass_at_n": 0.4, "samples": 8},
        "on-policy-pairs": {"headroom": 0.06, "mixed_share": 0.15},
        "pairs-already-ranked": {"pairs_logp_accuracy": 0.95},
        "drift-from-base": {"probe_agreement": 0.5},
        "no-rl-signal": {"mixed_share": 0.0},
    }
    assert set(cases) | {"no-limit-found"} == {r["id"] for r in rules}
    for rule, facts in cases.items():
        r = recommend(facts)
        fired = {f.rule: f for f in r.fired}
        assert rule in fired, rule
        for c in fired[rule].conditions:  # each reason carries the measured number and its threshold
            assert c["value"] == facts[c["fact"]] and c["fact"] in fired[rule].evidence()
    evidence = recommend(cases["robustness-gap"]).fired[0].evidence()
    assert evidence == "worst_gap = 0.2 (>= 0.10); worst_p = 0.01 (< 0.05)"


def test_the_decision_follows_precedence_blocks_and_default():
    grpo = {"headroom": 0.2, "mixed_share": 0.5, "pass_at_1": 0.2, "pass_at_n": 0.4, "samples": 8}
    assert recommend(grpo).option == "sft-grpo"
    assert recommend({**grpo, "headroom": 0.07}).option == "sft-dpo"  # below GRPO's headroom, above DPO's
    assert recommend({**grpo, "wrong_share": 0.2}).option == "sft-data"  # data problems come first
    # Gap not significant (corrected sign test at 0.05 or above): no robustness rule; the headroom rule decides.
    assert recommend({**grpo, "worst_gap": 0.3, "worst_gap_low": 0.01, "worst_p": 0.05}).option == "sft-grpo"
    blocked = recommend({"headroom": 0.5, "mixed_share": 0.01})
    assert blocked.option == "sft-data" and [f.rule for f in blocked.fired] == ["no-limit-found", "no-rl-signal"]
    assert recommend({}).option == "sft-data" and recommend({}).fired[0].rule == "no-limit-found"


# ---- drift and verifiers ---------------------------------------------------------------------------------------
def test_token_kl_against_torch_and_by_hand():
    torch.manual_seed(0)
    p, q = torch.randn(5, 11), torch.randn(5, 11)
    want = torch.nn.functional.kl_div(q.log_softmax(-1), p.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(token_kl(p, q), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(token_kl(p, p), torch.zeros(5), rtol=0, atol=1e-6)
    banned = torch.tensor([[0.0, -float("inf")]])  # p = [1, 0]; q = [1/2, 1/2]: KL = ln 2, no NaN
    torch.testing.assert_close(token_kl(banned, torch.zeros(1, 2)), torch.tensor([math.log(2)]), rtol=0, atol=1e-6)


def test_verifiers_on_hand_cases():
    rows = [{"prompt": "q", "answer": 4}, {"prompt": "q", "answer": 5}]
    assert task_verifier("arithmetic").check(rows, ["Answer: 4", "Answer: 4"]) == [True, False]
    v = reward_verifier(build_reward_functions(["exact_match"]), ["exact_match"])
    assert v.check([{"prompt": "q", "answer": "4"}] * 2, ["4", "5"]) == [True, False] and v.failures == 0


def test_clean_prompts_without_a_variant_are_said_with_where_the_variants_came_from():
    """A task's variants cover only the prompts its own `make` wrote; a --perturbed file covers the rows it names:
    the note says which (it blamed the task for a file's gaps)."""
    rows = TASKS["arithmetic"].make(6, seed=0, split="heldout")
    variants = [v for v in make_perturbed("arithmetic", rows, seed=0) if v["perturbs"] != rows[0]["id"]]
    answer = _stub(rows, variants, lambda v: True)
    for source, says in (("task arithmetic", "the task makes variants only of prompts its own `make` wrote"),
                         ("mine.jsonl", "no row of mine.jsonl `perturbs` them")):  # fmt: skip
        result = run_diagnosis(rows, task_verifier("arithmetic"), answer=answer, variants=variants,
                               variant_source=source, settings=Settings(samples=2))  # fmt: skip
        assert f"1 of 6 clean prompts have no variant ({says})" in result.notes


# ---- the robustness decision (an audit of the statistics, twentieth session) ----------------------------------
def test_the_kind_that_decides_is_the_largest_significant_drop_not_the_largest_gap():
    """5 typo pairs with a 20-point gap (interval from 0, p = 1) made the largest gap the deciding kind and hid a
    100-prompt, 18-point paraphrase drop (p = 1e-4): the rule did not fire. The significant drop decides."""
    from posttrain.diagnose.robustness import measure_robustness

    ids = [f"p{i}" for i in range(100)]
    clean = [True] * 100
    variants, right = [], []
    for i in range(100):  # paraphrase: 20 lost, 2 gained (the first two clean prompts are wrong)
        variants.append({"perturbs": ids[i], "kind": "paraphrase"})
        right.append(not 2 <= i < 22)
    clean[0] = clean[1] = False
    for i in range(5):  # typos: one of 5 lost
        variants.append({"perturbs": ids[50 + i], "kind": "typos"})
        right.append(i != 0)
    r = measure_robustness("t", ids, clean, variants, right)
    para, typos = r.kinds
    assert (para.lost, para.gained, para.gap) == (20, 2, pytest.approx(0.18)) and typos.gap == pytest.approx(0.2)
    assert para.p_value == pytest.approx(2 * sum(comb(22, k) for k in range(3)) / 2**22)  # exact sign test
    assert r.worst() is para and r.adjusted_p(para) == pytest.approx(2 * para.p_value)
    diagnosis = run_diagnosis([{"id": i, "prompt": i, "answer": 1} for i in ids], task_verifier("arithmetic"),
                              answer=lambda rows, t, s: ["Answer: 1"] * len(rows), settings=Settings(samples=0))  # fmt: skip
    diagnosis.robustness = r
    assert recommend(diagnosis.facts()).fired[0].rule == "robustness-gap"
    # no kind significant: the nearest drop is shown, and the rule does not fire
    weak = measure_robustness("t", ids[:40], [True] * 40, [{"perturbs": i, "kind": "x"} for i in ids[:40]],
                              [False] * 4 + [True] * 36)  # fmt: skip
    assert weak.kinds[0].p_value == 0.125 and weak.worst() is weak.kinds[0]
    diagnosis.robustness = weak
    assert "robustness-gap" not in {f.rule for f in recommend(diagnosis.facts()).fired}


def test_several_variants_of_a_prompt_count_as_that_prompt_once():
    """20 prompts, 5 paraphrases each, every paraphrase of 4 prompts failed: 100 independent pairs would give
    p = 1.9e-6; 4 prompts lost of 20 give 2 P[Bin(4, 1/2) <= 0] = 0.125, and the interval resamples prompts."""
    from posttrain.diagnose.robustness import measure_robustness

    ids = [f"p{i}" for i in range(20)]
    variants = [{"perturbs": i, "kind": "paraphrase"} for i in ids for _ in range(5)]
    right = [k // 5 >= 4 for k in range(100)]
    kind = measure_robustness("t", ids, [True] * 20, variants, right).kinds[0]
    assert (kind.pairs, kind.prompts, kind.lost, kind.gained) == (100, 20, 4, 0)
    assert kind.gap == pytest.approx(0.2) and kind.p_value == 0.125
    assert (kind.ci_low, kind.ci_high) == paired_difference_interval(16, 4, 0, 0)  # over the 20 prompts
    one_each = paired_gap([True] * 20, right[::5])  # one variant a prompt: the same prompts, McNemar's test
    assert (one_each["gap"], one_each["p_value"], one_each["ci_low"]) == (kind.gap, kind.p_value, kind.ci_low)
    # a prompt whose variants split adds their mean to its cells: 2 of 4 paraphrases of a right prompt failed
    half = paired_gap([True] * 4, [True, True, False, False], prompts=["a"] * 4)
    assert (half["ci_low"], half["ci_high"]) == paired_difference_interval(0.5, 0.5, 0, 0)


def test_clean_prompts_that_share_an_id_are_refused_not_paired_with_the_last_one(tmp_path):
    from posttrain.diagnose.robustness import measure_robustness
    from posttrain.errors import UserError

    with pytest.raises(UserError, match=r"^the clean prompts share ids: id 'a' on positions 1, 3\. Give every clean prompt its own `id`$"):
        measure_robustness("t", ["a", "b", "a"], [True, False, False], [{"perturbs": "a", "kind": "x"}], [True])
    path = tmp_path / "perturbed.jsonl"
    path.write_text(json.dumps({"prompt": "q", "perturbs": "a", "kind": "x", "answer": 4}) + "\n")
    rows = [{"id": "a", "prompt": "1", "answer": 4}, {"id": "b", "prompt": "2", "answer": 4},
            {"id": "a", "prompt": "3", "answer": 4}]  # fmt: skip
    with pytest.raises(UserError, match=r"perturbed.jsonl cannot be paired with their prompts: the clean prompts share "
                                        r"ids: id 'a' on lines 1, 3\. Give every"):  # fmt: skip
        load_perturbed(path, rows)


def test_drift_over_completions_with_no_token_is_not_measured_not_zero(tiny_model, tiny_tokenizer):
    """Every completion empty: no position is scored. The drift was reported as KL 0 and agreement 0 (a
    measurement), and `drift-from-base` fired on "agrees on only 0%"."""
    from posttrain.diagnose.core import Diagnosis, Drift
    from posttrain.diagnose.drift import compare

    comparison = compare(tiny_model, tiny_model, tiny_tokenizer, ["q", "r"], ["", ""])
    assert comparison.tokens == 0 and all(math.isnan(x) for x in (comparison.kl_policy_base,
                                                                   comparison.top1_agreement))  # fmt: skip
    d = Diagnosis(model="m", verifier="v", prompts=2, greedy_accuracy=1.0, settings=Settings(), robustness=None,
                  headroom=None, data=None, preferences=None, drift=Drift(base="b", task=comparison, probe=comparison))  # fmt: skip
    facts = d.facts()
    assert facts["kl_policy_base"] is None and facts["probe_agreement"] is None
    assert "drift-from-base" not in {f.rule for f in recommend(facts).fired}


def test_the_built_in_tasks_clean_rows_are_not_ambiguous(tmp_path, capsys):
    """The task's shared instruction made "Ravi buys 3 more" (10), "Sam multiplies the collection by 3" (21) and
    "Ravi gives away 3 cards" (4) near-duplicates: 9.1% of a clean 800-row file read as ambiguous, and the
    recommendation turned from SFT -> GRPO to "keep SFT with cleaner data" (an audit). Rows with other answers
    are other problems; the same prompt with two answers is still a conflict."""
    from posttrain.cli import main
    from posttrain.data import load_rows
    from posttrain.diagnose.ambiguity import measure_ambiguity

    path = tmp_path / "math.jsonl"
    assert main(["data", "make", "arithmetic", "--n", "800", "--max-ops", "1", "--max-value", "10", "--out",
                 str(path)]) == 0  # fmt: skip
    rows = load_rows(path, "sft")
    assert measure_ambiguity(str(path), rows).ambiguous_share < 0.01
    conflict = [dict(rows[0]), {**rows[0], "answer": -1, "messages": [*rows[0]["messages"][:-1],
                                                                      {"role": "assistant", "content": "-1"}]}]  # fmt: skip
    assert measure_ambiguity("f", conflict).ambiguous_rows == 2


def test_the_recommendation_says_what_to_run_next():
    """The output ended at "Recommendation: SFT -> GRPO ..." with no command (an audit of the escalation path)."""
    from posttrain.diagnose.recommend import load_rules, recommend

    options, _ = load_rules()
    for facts, option in (({"headroom": 0.3, "mixed_share": 0.5, "pass_at_1": 0.2, "pass_at_n": 0.5, "samples": 8},
                           "sft-grpo"), ({"mixed_share": 0.0, "headroom": 0.3}, "sft-data")):  # fmt: skip
        r = recommend(facts)
        assert r.option == option and r.next and r.to_dict()["next"] == r.next
    grpo = recommend({"headroom": 0.3, "mixed_share": 0.5, "pass_at_1": 0.2, "pass_at_n": 0.5, "samples": 8})
    assert "posttrain train configs/grpo_lora.yaml model.name={model}" in grpo.next


def test_the_default_advice_names_the_probes_that_did_not_run():
    """It asked for --sft-data / --base whatever had run (with --sft-data given and its section printed)."""
    from posttrain.diagnose.recommend import recommend

    r = recommend({"probes_not_run": "--pairs, --base"})
    assert r.option == "sft-data" and "(the probes not run: --pairs, --base)" in r.fired[0].reason


def test_a_recommendation_near_a_threshold_says_that_its_interval_reaches_another():
    """40 prompts, 8 samples each: the mixed share read 10% to 27.5% with the seed alone, and the recommendation
    flipped between SFT -> GRPO and SFT -> DPO with no hint of the noise (an audit). The facts carry the 95%
    intervals over the prompts; where one reaches a value at which the rules decide otherwise, it is said."""
    from posttrain.diagnose.headroom import measure_headroom
    from posttrain.diagnose.recommend import borderline
    from posttrain.evaluation.intervals import wilson_interval

    def facts(mixed: int, n: int = 40) -> dict:
        right = [[1, 0, 0, 0, 0, 0, 0, 0]] * mixed + [[0] * 8] * (n - mixed)  # each mixed prompt: 1 of 8 right
        h = measure_headroom([f"p{i}" for i in range(n)], right, 1.0)
        out = {"samples": 8, "pass_at_1": h.pass_at_k[1], "pass_at_n": h.pass_at_k[8], "headroom": h.headroom,
               "mixed_share": h.mixed_share}  # fmt: skip
        for k, (lo, hi) in h.intervals().items():
            out[f"{k}_low"], out[f"{k}_high"] = lo, hi
        return out

    near = facts(9)  # 22.5% mixed, headroom 19.7 points: GRPO's rule (20% mixed) holds, just
    assert near["mixed_share_low"] == pytest.approx(wilson_interval(9, 40)[0]) and near["mixed_share_low"] < 0.2
    r = recommend(near)
    assert r.option == "sft-grpo"
    assert [(b["fact"], b["option"]) for b in r.borderline] == [("mixed_share", "sft-dpo")]
    clear = facts(30, 100)  # 30% mixed of 100 prompts: [21.9%, 39.6%], above 20% throughout
    assert recommend(clear).option == "sft-grpo" and borderline(clear, "sft-grpo") == []
