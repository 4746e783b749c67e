"""The sampling-headroom probe: how much more often the model is right in some of n samples than in one.

From each prompt's n samples at a temperature and the c of them the verifier accepts: pass@k for k = 1 .. n
(`stats.pass_at_k`, Chen et al. 2021), the headroom pass@n - pass@1, and the share of *mixed* prompts (some
samples right, some wrong). A mixed prompt is where verifier-rewarded RL has a signal: GRPO's advantage is a
sample's reward minus its group's mean (Shao et al. 2024), zero for every sample of a group that is all right or
all wrong; and `posttrain data pairs` can only pair a right sample with a wrong one on a mixed prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from posttrain.diagnose.stats import pass_at_k_curve
from posttrain.evaluation.intervals import wilson_interval


@dataclass
class Headroom:
    """pass@k per k, the mixed prompts, and each prompt's ``{id, n, c}`` (to recompute any of it)."""

    samples: int
    temperature: float
    pass_at_k: dict[int, float]
    mixed: int
    all_right: int
    all_wrong: int
    prompts: list[dict] = field(default_factory=list)

    @property
    def mixed_share(self) -> float:
        return self.mixed / max(len(self.prompts), 1)

    @property
    def headroom(self) -> float:
        """pass@n - pass@1: how much a perfect pick among n samples would add to one sample."""
        return self.pass_at_k[max(self.pass_at_k)] - self.pass_at_k[1]

    def intervals(self, level: float = 0.95) -> dict[str, tuple[float, float]]:
        """95% intervals over the prompts (the unit: a prompt's samples are not independent of each other) of
        `pass_at_1`, `pass_at_n`, `headroom` and `mixed_share`: each a mean over prompts of a value in [0, 1] (c/n,
        whether c > 0, their difference, whether 0 < c < n), given the Wilson interval of its sum over the prompts
        (`evaluation.intervals.wilson_interval`: exact in form for the 0/1 ones, at least as wide as needed for the
        others). The recommendation's thresholds are read against them (`recommend.borderline`): on 40 prompts
        the mixed share moved from 10% to 27.5% with the seed alone, and the recommendation with it (an audit).

        >>> h = measure_headroom(["a", "b", "c", "d"], [[1, 0], [0, 0], [1, 1], [1, 0]], 1.0)
        >>> {k: [round(x, 3) for x in v] for k, v in h.intervals().items()}["mixed_share"]
        [0.15, 0.85]
        """
        n = len(self.prompts)
        if n == 0:
            return {}
        per = [(p["c"] / p["n"], float(p["c"] > 0), float(0 < p["c"] < p["n"])) for p in self.prompts]
        sums = {"pass_at_1": sum(a for a, _, _ in per), "pass_at_n": sum(b for _, b, _ in per),
                "headroom": sum(b - a for a, b, _ in per), "mixed_share": sum(m for _, _, m in per)}  # fmt: skip
        return {k: wilson_interval(min(max(s, 0.0), n), n, level=level) for k, s in sums.items()}


def measure_headroom(ids: Sequence[str], right: Sequence[Sequence[bool]], temperature: float) -> Headroom:
    """`right[i]`: the verifier's verdict on each sample of prompt `ids[i]` (every prompt with the same n).

    >>> h = measure_headroom(["a", "b", "c"], [[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], 1.0)
    >>> round(h.pass_at_k[1], 4), round(h.pass_at_k[4], 4), h.mixed, round(h.headroom, 4)
    (0.4167, 0.6667, 1, 0.25)
    """
    counts = [(len(r), sum(map(bool, r))) for r in right]
    if len({n for n, _ in counts}) > 1:
        raise ValueError("every prompt needs the same number of samples")
    return Headroom(
        samples=counts[0][0] if counts else 0,
        temperature=temperature,
        pass_at_k=pass_at_k_curve(counts),
        mixed=sum(1 for n, c in counts if 0 < c < n),
        all_right=sum(1 for n, c in counts if c == n),
        all_wrong=sum(1 for _, c in counts if c == 0),
        prompts=[{"id": i, "n": n, "c": c} for i, (n, c) in zip(ids, counts)],
    )
