"""Confidence intervals of rates, as pure functions: a proportion (Wilson) and a paired difference (Newcombe).

- `wilson_interval`: the score interval of a proportion (Wilson 1927), which never has zero width and stays in
  [0, 1]: 0 right of 8 is "at most 32%", not "exactly 0%" (the normal, Wald, interval gives [0, 0] there);
- `t_interval`: Student's t interval of a mean (rewards, a judge's scores; a per-seed measurement over a few
  seeds);
- `paired_difference_interval`: the interval of p1 - p2 for two rates measured on the *same* items (before and
  after training; a clean prompt and its variant), Newcombe 1998's method 10: the Wilson intervals of the two
  rates, combined with the correlation of the paired outcomes ("square and add"). It does not collapse to a point
  when no item moved, as a percentile bootstrap of the 0/1 differences does, and with 5 items all lost it is
  [+38.6, +100] points, where that bootstrap said [+100, +100].

Both take fractional counts: a count that is a sum of values in [0, 1] (the mean over a prompt's samples or
variants) gives an interval at least as wide as the values need, since such a mean varies no more than a 0/1
outcome of the same mean. No model, no I/O; `posttrain.diagnose.stats` and the before/after tables use them.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from statistics import NormalDist


def _z(level: float) -> float:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return NormalDist().inv_cdf((1 + level) / 2)


def wilson_interval(successes: float, n: float, *, level: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of the proportion `successes` / `n`: (p + z^2/2n -+ z sqrt(p(1-p)/n +
    z^2/4n^2)) / (1 + z^2/n), z the normal quantile of (1 + level) / 2. (nan, nan) for n = 0.

    Worked examples (z = 1.959964): 0 of 5: [0, z^2 / (5 + z^2)] = [0, 0.43448]; 5 of 5: [0.56552, 1];
    14 of 20: p = 0.7, centre (0.7 + 0.096036) / 1.192073 = 0.667776, half-width 1.959964 x sqrt(0.0105 +
    0.0024009) / 1.192073 = 0.186748: [0.48103, 0.85452].

    >>> [round(x, 5) for x in wilson_interval(0, 5) + wilson_interval(5, 5) + wilson_interval(14, 20)]
    [0.0, 0.43448, 0.56552, 1.0, 0.48103, 0.85452]
    """
    z = _z(level)
    if n <= 0:
        return math.nan, math.nan
    if not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    p = successes / n
    scale = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / scale
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / scale
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference_interval(both: float, first_only: float, second_only: float, neither: float, *,
                               level: float = 0.95) -> tuple[float, float]:  # fmt: skip
    """Newcombe's (1998, method 10) interval of p1 - p2 on paired items: `both` items have outcome 1 in the first
    measurement and the second, `first_only` in the first only, `second_only` in the second only, `neither` in
    neither; p1 = (both + first_only) / n and p2 = (both + second_only) / n. With (l1, u1), (l2, u2) their Wilson
    intervals and phi the correlation of the paired outcomes, D / sqrt(the product of the four margins) (0 when a
    margin is 0), where D = both x neither - first_only x second_only, or max(D - n/2, 0) when D > 0 (Newcombe's
    correction of a positive correlation, which method 10 uses):
    p1 - p2 - sqrt((p1 - l1)^2 - 2 phi (p1 - l1)(u2 - p2) + (u2 - p2)^2) to
    p1 - p2 + sqrt((u1 - p1)^2 - 2 phi (u1 - p1)(p2 - l2) + (p2 - l2)^2). (nan, nan) for no items.

    Checked against a published value: Fagerland, Lydersen & Laake (2017, "Statistical Analysis of Contingency
    Tables", ch. 8; Cavo et al. 2012's complete responses, 59 / 6 / 16 / 80) give -0.0621 (-0.1186 to -0.0046).
    Five items, all lost: p1 - p2 = 1, l1 = 0.56552 and u2 = 0.434482, phi = 0: 1 - sqrt(2 x 0.434482^2) = 0.385549.

    >>> [round(x, 4) for x in paired_difference_interval(59, 6, 16, 80)]
    [-0.1186, -0.0046]
    >>> [round(x, 4) for x in paired_difference_interval(0, 5, 0, 0)]
    [0.3855, 1.0]
    >>> lo, hi = paired_difference_interval(20, 0, 0, 0)  # nothing moved: an interval, not a point
    >>> round(lo, 4), round(hi, 4)
    (-0.1611, 0.1611)
    """
    n = both + first_only + second_only + neither
    if n <= 0:
        return math.nan, math.nan
    if min(both, first_only, second_only, neither) < 0:
        raise ValueError("counts must not be negative")
    p1, p2 = (both + first_only) / n, (both + second_only) / n
    l1, u1 = wilson_interval(both + first_only, n, level=level)
    l2, u2 = wilson_interval(both + second_only, n, level=level)
    margins = (both + first_only) * (second_only + neither) * (both + second_only) * (first_only + neither)
    agree = both * neither - first_only * second_only
    agree = max(agree - n / 2, 0.0) if agree > 0 else agree
    phi = agree / math.sqrt(margins) if margins > 0 else 0.0
    below = (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2
    above = (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2
    return max(-1.0, p1 - p2 - math.sqrt(max(below, 0.0))), min(1.0, p1 - p2 + math.sqrt(max(above, 0.0)))


def t_quantile(df: int, p: float) -> float:
    """The `p` quantile of Student's t with `df` degrees of freedom (p in (0.5, 1)): scipy's.

    >>> [round(t_quantile(df, 0.975), 3) for df in (1, 2, 4, 30)]
    [12.706, 4.303, 2.776, 2.042]
    """
    if df < 1 or not 0.5 < p < 1:
        raise ValueError(f"need df >= 1 and 0.5 < p < 1, got df={df}, p={p}")
    from scipy.stats import t  # imported here: importing scipy takes a moment, and few figures need it

    return float(t.ppf(p, df))


def t_interval(values: Sequence[float], *, level: float = 0.95) -> tuple[float, float] | None:
    """Student's t interval of the mean of `values` (mean +- t_{n-1} * sd / sqrt(n), sd with divisor n - 1),
    None for fewer than two, or when one is not a finite number (a drift of NaN: every completion empty), whose
    mean has no interval (`statistics.stdev` raised on it). For a measurement made once per seed over a few seeds: a bootstrap of 3 values gives
    their range (drawing one value three times has chance 1/27, above 2.5%), which excludes 0 whenever the three
    agree in sign.

    Worked example: 0.001, 0.010, 0.030: mean 0.013667, sd 0.014844, t_2 = 4.30265: 0.013667 +- 0.036875.

    >>> [round(x, 4) for x in t_interval([0.001, 0.010, 0.030])]
    [-0.0232, 0.0505]
    >>> t_interval([0.1, float("nan"), 0.2]) is None
    True
    """
    n = len(values)
    if n < 2 or not all(math.isfinite(v) for v in values):
        return None
    mean = statistics.fmean(values)
    half = t_quantile(n - 1, (1 + level) / 2) * statistics.stdev(values) / math.sqrt(n)
    return mean - half, mean + half
