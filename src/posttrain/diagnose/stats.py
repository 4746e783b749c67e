"""The statistics of `posttrain diagnose`, as pure functions: pass@k, a bootstrap interval, a paired gap.

- `pass_at_k`: the unbiased estimator of Chen et al. 2021 (eq. 1): from n samples of which c are right, the
  chance that at least one of k drawn without replacement is right, 1 - C(n - c, k) / C(n, k), computed as the
  product 1 - prod_{i = n - c + 1}^{n} (1 - k / i) (the same ratio, term by term, with no huge binomials);
- `bootstrap_ci`: the percentile bootstrap interval of a mean (Efron & Tibshirani 1993, ch. 13), seeded;
- `paired_gap`: clean vs perturbed correctness of the same prompts: the mean paired difference, its paired
  interval (Newcombe 1998, `evaluation.intervals`) and an exact sign test over the prompts (McNemar's, `posttrain.evaluation.paired_change`, when each
  prompt has one variant). Never two unpaired rates: the prompts are the same, so their differences are what
  varies; and the prompt is the unit, so several variants of one prompt count once (their mean);
- `hierarchical_bootstrap_ci`: the interval of a mean over seeds of means over problems, resampling seeds, then
  problems within each drawn seed (Davison & Hinkley 1997, sec. 3.8; `posttrain study`);
- `minimum_detectable_difference`: the smallest difference of two accuracies that n problems over s seeds can
  tell from zero, stated before a study runs;
- Student's t interval of a mean of a few values (a per-seed measurement over 2-8 seeds, where a bootstrap of so
  few values gives their range) is `evaluation.intervals.t_interval`, with the Wilson and paired intervals.

No model, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import torch

from posttrain.evaluation import paired_change
from posttrain.evaluation.intervals import paired_difference_interval


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of one prompt with `c` right out of `n` samples (module docstring).

    Worked example: n = 4, c = 1, k = 2: 1 - C(3, 2) / C(4, 2) = 1 - 3/6 = 0.5; as the product,
    1 - (1 - 2/4) = 0.5. With n - c < k every draw of k holds a right one: 1.

    >>> [round(pass_at_k(*ncs), 12) for ncs in ((4, 1, 2), (4, 3, 2), (4, 0, 4), (10, 3, 1))]
    [0.5, 1.0, 0.0, 0.3]
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    miss = 1.0  # the chance that all k drawn are wrong, C(n - c, k) / C(n, k)
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def pass_at_k_curve(counts: Sequence[tuple[int, int]], ks: Sequence[int] | None = None) -> dict[int, float]:
    """The mean over prompts of `pass_at_k` for each k (default 1 .. the fewest samples any prompt has), from
    each prompt's (n, c).

    >>> {k: round(v, 4) for k, v in pass_at_k_curve([(4, 1), (4, 0), (4, 4)]).items()}
    {1: 0.4167, 2: 0.5, 3: 0.5833, 4: 0.6667}
    """
    if not counts:
        return {}
    ks = list(ks) if ks is not None else list(range(1, min(n for n, _ in counts) + 1))
    return {k: sum(pass_at_k(n, c, k) for n, c in counts) / len(counts) for k in ks}


def bootstrap_ci(
    values: Sequence[float], *, level: float = 0.95, n_resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values`: resample them with replacement `n_resamples`
    times (a generator seeded with `seed`: the same inputs give the same interval), take each resample's mean,
    and return the (1 - level) / 2 and (1 + level) / 2 quantiles of those means. (nan, nan) for no values.

    Equal values give a zero-width interval; for many values it approaches the normal interval
    mean +- z * sd / sqrt(n) (tests/unit/test_diagnose.py checks both).

    >>> bootstrap_ci([1.0, 1.0, 1.0])
    (1.0, 1.0)
    >>> lo, hi = bootstrap_ci([0, 1] * 50)
    >>> 0.39 < lo < 0.42 and 0.58 < hi < 0.61
    True
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    x = torch.as_tensor(list(values), dtype=torch.float64)
    n = x.numel()
    if n == 0:
        return math.nan, math.nan
    gen = torch.Generator().manual_seed(seed)
    per_chunk = max(1, 4_000_000 // n)  # resamples per draw, so the (chunk, n) index matrix stays ~32 MB
    means = []
    for start in range(0, n_resamples, per_chunk):
        idx = torch.randint(0, n, (min(per_chunk, n_resamples - start), n), generator=gen)
        means.append(x[idx].mean(dim=1))
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(torch.cat(means), q).tolist()
    return lo, hi


def paired_gap(clean: Sequence[bool], perturbed: Sequence[bool], *, prompts: Sequence | None = None,
               level: float = 0.95) -> dict:  # fmt: skip
    """Accuracy on clean prompts minus accuracy on their perturbed variants, paired (pair i: a variant and its
    clean prompt, `prompts[i]` naming the prompt; None: every pair its own prompt). The prompt is the unit: a
    prompt's variants count as one perturbed accuracy, their mean, so five paraphrases of one prompt are not five
    independent pairs. Returns `pairs`, `prompts`, `clean_accuracy` and `perturbed_accuracy` (means over the
    prompts), `gap` (their difference, the mean of the prompts' differences), `ci_low`/`ci_high` (Newcombe's
    paired interval of that difference, `evaluation.intervals.paired_difference_interval`, from the 2x2 table of
    clean and perturbed outcomes over the prompts, a prompt with several variants adding their mean to its cells),
    `lost` and `gained` (prompts whose variants do worse or better
    than the clean prompt) and `p_value`, the exact two-sided sign test of lost against gained: McNemar's test
    when each prompt has one variant.

    Worked example: 4 prompts right clean; perturbed, prompts 0 and 1 fail: gap = 0.5, lost 2, gained 0,
    p = 2 * P[Bin(2, 1/2) <= 0] = 0.5. Prompt "a" with two variants, one failed, and "b" with one that holds:
    the prompts' differences 0.5 and 0, gap 0.25, one prompt lost.

    >>> r = paired_gap([1, 1, 1, 1], [0, 0, 1, 1])
    >>> r["gap"], r["lost"], r["gained"], r["p_value"]
    (0.5, 2, 0, 0.5)
    >>> r = paired_gap([1, 1, 1], [0, 1, 1], prompts=["a", "a", "b"])
    >>> r["pairs"], r["prompts"], r["gap"], r["lost"], r["p_value"]
    (3, 2, 0.25, 1, 1.0)
    """
    if len(clean) != len(perturbed) or (prompts is not None and len(prompts) != len(clean)):
        raise ValueError(f"{len(clean)} clean results but {len(perturbed)} perturbed")
    groups: dict = {}
    for i, (c, p) in enumerate(zip(clean, perturbed)):
        groups.setdefault(i if prompts is None else prompts[i], (float(bool(c)), []))[1].append(float(bool(p)))
    before = [c for c, _ in groups.values()]
    after = [sum(ps) / len(ps) for _, ps in groups.values()]
    diffs = [b - a for b, a in zip(before, after)]
    n = len(diffs)
    lost, gained = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    # the sign test is McNemar's on prompts that moved: a 0/1 stand-in per prompt for its direction
    change = paired_change([1.0] * lost + [0.0] * gained, [0.0] * lost + [1.0] * gained)
    # the 2x2 table over prompts: right clean and perturbed, clean only, perturbed only, neither (fractional cells
    # for a prompt with several variants). A percentile bootstrap of the 0/1 differences, used before, gave
    # [+0, +0] when no prompt moved and covered the gap ~64% of the time on 10-20 prompts (an audit).
    cells = [sum(c * a for c, a in zip(before, after)), sum(c * (1 - a) for c, a in zip(before, after)),
             sum((1 - c) * a for c, a in zip(before, after)), sum((1 - c) * (1 - a) for c, a in zip(before, after))]
    lo, hi = paired_difference_interval(*cells, level=level)
    return {
        "pairs": len(clean),
        "prompts": n,
        "clean_accuracy": sum(before) / n if n else math.nan,
        "perturbed_accuracy": sum(after) / n if n else math.nan,
        "gap": sum(diffs) / n if n else math.nan,
        "ci_low": lo,
        "ci_high": hi,
        "lost": lost,
        "gained": gained,
        "p_value": change["p_value"],
    }


def hierarchical_bootstrap_means(
    groups: Sequence[Sequence[float]], *, n_resamples: int = 2000, seed: int = 0
) -> torch.Tensor:
    """The two-stage bootstrap distribution of the mean of `groups` (one group of values per seed, e.g. each
    problem's 0/1 correctness): each resample draws as many seeds as there are, with replacement, then, within
    each drawn seed, as many of its values as it has, with replacement, and takes the mean over the drawn seeds of
    each one's mean (every seed weighs the same, whatever its number of problems). Returns the `n_resamples`
    means, float64, from a generator seeded with `seed`.

    Resampling both stages is the nested bootstrap for data in groups (Davison & Hinkley 1997, sec. 3.8): the
    seeds are the independent units (training runs), the problems vary within each. With S seeds of n values,
    the variance of these means is (sigma_b^2 + mean_s(sigma_s^2) / n) / S, sigma_b^2 the variance of the seed
    means and sigma_s^2 that of the values of seed s (both with divisor S or n, as the bootstrap draws them);
    tests/unit/test_study.py checks it.
    """
    sizes = [len(g) for g in groups]
    if not groups or min(sizes) == 0:
        raise ValueError("every seed needs at least one value")
    s, width = len(groups), max(sizes)
    table = torch.zeros(s, width, dtype=torch.float64)  # (S, n_max), padded with zeros never drawn
    for i, g in enumerate(groups):
        table[i, : sizes[i]] = torch.as_tensor(list(g), dtype=torch.float64)
    counts = torch.as_tensor(sizes, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    per_chunk = max(1, 4_000_000 // (s * width))  # resamples per draw: the (chunk, S, n_max) tensors stay ~32 MB
    out = []
    for start in range(0, n_resamples, per_chunk):
        r = min(per_chunk, n_resamples - start)
        picked = torch.randint(0, s, (r, s), generator=gen)  # (r, S): the seeds drawn
        n = counts[picked]  # (r, S): how many values each drawn seed has
        # (r, S, n_max) positions within the drawn seed: uniform over its own n values; slots past n are masked
        pos = (torch.rand(r, s, width, generator=gen, dtype=torch.float64) * n[..., None]).long()
        values = table[picked[..., None], pos]  # (r, S, n_max)
        used = torch.arange(width)[None, None, :] < n[..., None]
        seed_means = torch.where(used, values, torch.zeros_like(values)).sum(-1) / n  # (r, S)
        out.append(seed_means.mean(-1))
    return torch.cat(out)


def hierarchical_bootstrap_ci(
    groups: Sequence[Sequence[float]], *, level: float = 0.95, n_resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile interval of `hierarchical_bootstrap_means`: its (1 - level) / 2 and (1 + level) / 2 quantiles.

    Worked example: two seeds, one all wrong and one all right. Within a seed every draw is the same, so a
    resample's mean is 0, 1/2 or 1 as it draws the first seed twice, once each, or the second twice (chances
    1/4, 1/2, 1/4): the 2.5% quantile is 0 and the 97.5% quantile 1. One seed is the plain bootstrap of its mean.

    >>> hierarchical_bootstrap_ci([[0, 0, 0], [1, 1, 1]])
    (0.0, 1.0)
    >>> hierarchical_bootstrap_ci([[0.5, 0.5], [0.5, 0.5, 0.5]])
    (0.5, 0.5)
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    means = hierarchical_bootstrap_means(groups, n_resamples=n_resamples, seed=seed)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(means, q).tolist()
    return lo, hi


def minimum_detectable_difference(
    problems: int, seeds: int, *, level: float = 0.95, power: float = 0.8, p: float = 0.5
) -> float:
    """The smallest difference of two accuracies, each measured on `problems` problems in each of `seeds` seeds,
    that a two-sided test at `level` detects with probability `power`: (z_{(1+level)/2} + z_{power}) *
    sqrt(2 p (1 - p) / (problems * seeds)), the normal approximation for two proportions (Cohen 1988, ch. 6),
    taken at p = 0.5, where a 0/1 outcome varies most. It counts the sampling noise of the problems only: the
    variation between training seeds is measured by the hierarchical bootstrap, which can only widen an interval,
    and pairing (the same problems for both arms) can only narrow the noise counted here, so the figure is stated
    in advance as a guide, not a guarantee.

    Worked example: 100 problems, 1 seed: (1.95996 + 0.84162) * sqrt(0.5 / 100) = 2.80159 * 0.0707107 = 0.1981.

    >>> round(minimum_detectable_difference(100, 1), 4), round(minimum_detectable_difference(150, 3), 4)
    (0.1981, 0.0934)
    """
    if problems < 1 or seeds < 1:
        raise ValueError(f"need at least one problem and one seed, got {problems} and {seeds}")
    if not (0 < level < 1 and 0 < power < 1 and 0 < p < 1):
        raise ValueError(f"level, power and p must be in (0, 1), got {level}, {power}, {p}")
    z = NormalDist().inv_cdf((1 + level) / 2) + NormalDist().inv_cdf(power)
    return z * math.sqrt(2 * p * (1 - p) / (problems * seeds))
