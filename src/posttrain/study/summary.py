"""The study's statistics: every arm's measurements with intervals, paired differences between arms, and the
pre-registered predictions checked against them.

Every measurement is a value per problem (0/1 right, a pass@k, a paired clean-minus-variant difference; the
pooled out-of-distribution accuracy of a problem is the mean over its variants, so a problem with four variants
counts once) or per seed (KL, probe agreement), for each seed. A per-problem measurement's interval is
`diagnose.stats.hierarchical_bootstrap_ci`: resample seeds, then problems within each drawn seed. A per-seed
measurement's is Student's t interval over the seeds (`diagnose.stats.t_interval`): a bootstrap of two or three
values gives their range, which excludes 0 whenever they agree in sign. A difference between two arms is taken
problem by problem on the same problems (every arm scores the same problems of a seed), then bootstrapped the
same way. It is called only when its interval excludes 0 *and* it is at least the minimum detectable difference
stated in advance (`diagnose.stats.minimum_detectable_difference` of the problems per seed and the seeds; sqrt(2)
times it for a difference of two differences, which adds the noise of two more accuracies); otherwise it is
`inconclusive`. With one seed, a seed-level measurement has no interval (`low`, `high` null): only its direction
is reported.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from posttrain.diagnose.stats import hierarchical_bootstrap_ci, minimum_detectable_difference, pass_at_k
from posttrain.evaluation.intervals import t_interval
from posttrain.study.arms import ARMS
from posttrain.study.config import StudyConfig
from posttrain.study.data import OOD_SPLITS, SPLITS
from posttrain.study.scoring import Scores


@dataclass
class Point:
    """A scored checkpoint: its step, the arm's seconds and training tokens up to it (W: 0), its scores, and
    whether every row was scored (the last checkpoint) or the curve rows only."""

    step: int
    seconds: float
    tokens: float
    scores: Scores | None
    full: bool


@dataclass
class Cell:
    """One arm (or W, or the base) in one (seed, noise) condition. `status`: trained, reused (read back) or not
    run (`note` says why)."""

    arm: str
    seed: int
    noise: float
    status: str
    note: str = ""
    budget_s: float | None = None
    prepared_s: float = 0.0
    step_s: float | None = None
    steps: int = 0
    seconds: float = 0.0
    tokens: float = 0.0
    points: list[Point] = field(default_factory=list)

    @property
    def final(self) -> Scores | None:
        return self.points[-1].scores if self.points else None

    def record(self) -> dict:
        """JSON-ready, without the scores (each checkpoint's are in their own file)."""
        out = asdict(self)
        out["points"] = [{k: v for k, v in asdict(p).items() if k != "scores"} for p in self.points]
        return out

    @classmethod
    def from_record(cls, d: dict) -> Cell:
        return cls(**{**d, "points": [Point(**p, scores=None) for p in d["points"]]})


@dataclass
class Estimate:
    """A mean over seeds and rows with its interval (null bounds: no interval, e.g. one seed of a per-seed value)."""

    value: float
    low: float | None
    high: float | None


Metric = Callable[[Scores, list[dict]], dict]
"""(a seed's scores, that seed's rows) -> {row id (or "seed"): value}: what is averaged and resampled."""


def by_problem(values: dict[str, float], rows: list[dict]) -> dict[str, float]:
    """Out-of-distribution rows' `values` (by row id) as one mean per clean problem (the rows' ``perturbs``): the
    problem is the unit that is sampled, its variants are not independent draws.

    >>> by_problem({"a~x": 1.0, "a~y": 0.0, "b~x": 1.0}, [{"id": "a~x", "perturbs": "a"},
    ...     {"id": "a~y", "perturbs": "a"}, {"id": "b~x", "perturbs": "b"}])
    {'a': 0.5, 'b': 1.0}
    """
    groups: dict[str, list[float]] = {}
    for r in rows:
        if r["id"] in values:
            groups.setdefault(r["perturbs"], []).append(values[r["id"]])
    return {k: statistics.fmean(v) for k, v in groups.items()}


def _per_row(field: str, split: str) -> Metric:
    """The `Scores` field `field` (row id -> 0/1) on each row of `split`; ``ood``: each problem's mean over its
    out-of-distribution rows (`by_problem`)."""
    if split == "ood":
        return lambda s, rows: by_problem({r["id"]: getattr(s, field)[r["id"]] for r in rows
                                           if r["split"] in OOD_SPLITS and r["id"] in getattr(s, field)}, rows)  # fmt: skip
    return lambda s, rows: {r["id"]: getattr(s, field)[r["id"]] for r in rows
                            if r["split"] == split and r["id"] in getattr(s, field)}  # fmt: skip


def accuracy(split: str) -> Metric:
    """Greedy right (0/1) on each row of `split`; ``ood``: each problem's mean over its out-of-distribution rows."""
    return _per_row("correct", split)


def gap(split: str) -> Metric:
    """Right on the clean problem minus right on its variant in `split`, per variant (the robustness gap)."""
    return lambda s, rows: {r["id"]: s.correct[r["perturbs"]] - s.correct[r["id"]] for r in rows
                            if r["split"] == split and r["id"] in s.correct}  # fmt: skip


def shortcut_rate(split: str) -> Metric:
    """1 when a subtraction of `split` was answered start + k; ``ood``: each problem's mean over its variants."""
    return _per_row("shortcut", split)


def pass_k(k: int) -> Metric:
    """pass@k (Chen et al. 2021's unbiased estimator) of each sampled prompt."""
    return lambda s, rows: {i: pass_at_k(s.samples, c, k) for i, c in s.sampled.items()}


def mixed() -> Metric:
    """1 for a sampled prompt with some samples right and some wrong."""
    return lambda s, rows: {i: float(0 < c < s.samples) for i, c in s.sampled.items()}


def drift(part: str, key: str) -> Metric:
    """One per-seed drift number (`part`: task or probe; `key`: kl_policy_base, top1_agreement, ...)."""
    return lambda s, rows: {"seed": s.drift[part][key]} if s.drift else {}


@dataclass
class ArmSummary:
    """One arm at one noise level, over its seeds (`Estimate`s; `curve`: seed means at each checkpoint)."""

    arm: str
    noise: float
    label: str
    status: str
    budget_s: float | None
    seconds: float
    tokens: float
    steps: float
    accuracy: dict[str, Estimate]
    gap: dict[str, Estimate]
    shortcut: dict[str, Estimate]
    pass_at_k: dict[str, Estimate]
    mixed_share: Estimate | None
    drift: dict[str, Estimate]
    curve: list[dict]
    runs: list[dict]


@dataclass
class Comparison:
    """`arm` minus `other` on one measurement, paired row by row; `verdict`: higher, lower or inconclusive."""

    arm: str
    other: str
    noise: float
    metric: str
    difference: float
    low: float | None
    high: float | None
    mdd: float | None
    verdict: str


@dataclass
class Prediction:
    """A pre-registered prediction, its test (a `Comparison`) and the sign it expects."""

    claim: str
    source: str
    expect: str  # "higher" or "lower"
    test: Comparison | None
    verdict: str  # agrees, disagrees, inconclusive, not measured
    direction: str  # the sign alone: agrees, disagrees, none


@dataclass
class StudyResult:
    setting: str
    model: str
    out: str
    seeds: list[int]
    noise: list[float]
    arms: list[str]
    baseline: str
    problems: dict[str, int]
    mdd: dict[str, float]
    warm_check: list[dict]
    summaries: list[ArmSummary]
    comparisons: list[Comparison]
    predictions: list[Prediction]
    seconds: float
    notes: list[str]
    settings: dict

    def to_dict(self) -> dict:
        return asdict(self)


class _Data:
    """The cells of one study, looked up by (arm, noise) with each seed's rows."""

    def __init__(self, cells: list[Cell], rows: dict[int, list[dict]], cfg: StudyConfig) -> None:
        self.cells, self.rows, self.cfg = cells, rows, cfg

    def of(self, arm: str, noise: float) -> list[Cell]:
        return [c for c in self.cells if c.arm == arm and c.noise == noise and c.final is not None]

    def groups(self, arm: str, noise: float, metric: Metric) -> dict[int, dict]:
        return {c.seed: metric(c.final, self.rows[c.seed]) for c in self.of(arm, noise)}


def estimate(groups: dict[int, dict], s: StudyConfig, *, seed: int = 0,
             bounds: tuple[float, float] = (-math.inf, math.inf)) -> Estimate | None:  # fmt: skip
    """The mean over seeds of each seed's mean, with its hierarchical interval; a per-seed value (one value a
    seed) gets Student's t interval over the seeds (none for one seed), cut to the values the quantity can take
    (`bounds`: a share in [0, 1], a KL >= 0; a t interval over 2 seeds read "75.8% [-80.9, 232.5]": an audit);
    None when nothing was measured."""
    values = [list(g.values()) for g in groups.values() if g]
    if not values:
        return None
    mean = statistics.fmean(statistics.fmean(v) for v in values)
    if all(len(v) == 1 for v in values):
        found = t_interval([v[0] for v in values], level=s.statistics.level)
        if found is None:
            return Estimate(mean, None, None)
        return Estimate(mean, max(found[0], bounds[0]), min(found[1], bounds[1]))
    lo, hi = hierarchical_bootstrap_ci(values, level=s.statistics.level, n_resamples=s.statistics.resamples, seed=seed)
    return Estimate(mean, lo, hi)


def compare_rows(d: _Data, a: tuple[str, float], b: tuple[str, float], metric: Metric) -> dict[int, dict]:
    """`a` minus `b` (each an (arm, noise)) on `metric`, row by row, per seed, on the rows both have."""
    ga, gb = d.groups(*a, metric), d.groups(*b, metric)
    return {seed: {k: ga[seed][k] - gb[seed][k] for k in sorted(set(ga[seed]) & set(gb[seed]))}
            for seed in sorted(set(ga) & set(gb))}  # fmt: skip


def minus(x: dict[int, dict], y: dict[int, dict]) -> dict[int, dict]:
    """Row-by-row `x - y` on the seeds and rows both have (a difference of differences).

    >>> minus({0: {"a": 1.0, "b": 0.0}}, {0: {"a": 0.5}, 1: {"a": 1.0}})
    {0: {'a': 0.5}}
    """
    return {seed: {k: x[seed][k] - y[seed][k] for k in x[seed] if k in y[seed]} for seed in x if seed in y}


def compare(d: _Data, diffs: dict[int, dict], arm: str, other: str, noise: float, name: str, *,
            twice: bool = False) -> Comparison | None:  # fmt: skip
    """The mean of the problem-by-problem differences `diffs`, its interval, the minimum detectable difference for
    as many problems and seeds (`twice`: a difference of two differences, four accuracies: sqrt(2) times it), and
    the verdict (module docstring); None when nothing was measured."""
    diffs = {seed: g for seed, g in diffs.items() if g}
    est = estimate(diffs, d.cfg, seed=1)
    if est is None:
        return None
    n = min(len(v) for v in diffs.values())
    s = d.cfg.statistics
    # a per-seed value (KL, probe agreement) has no count of problems to state a detectable difference from
    mdd = minimum_detectable_difference(n, len(diffs), level=s.level, power=s.power) if n > 1 else None
    if mdd is not None and twice:
        mdd *= math.sqrt(2)
    verdict = "inconclusive"
    if est.low is not None and (mdd is None or abs(est.value) >= mdd):
        verdict = "higher" if est.low > 0 else "lower" if est.high < 0 else "inconclusive"
    return Comparison(arm, other, noise, name, est.value, est.low, est.high, mdd, verdict)


DRIFT_RANGE = {"kl_task": (0.0, math.inf), "kl_task_reverse": (0.0, math.inf), "probe_agreement": (0.0, 1.0),
               "kl_probe": (0.0, math.inf)}
"""The values each drift number can take: its interval is cut to them."""
DRIFT_KEYS = {"kl_task": ("task", "kl_policy_base"), "kl_task_reverse": ("task", "kl_base_policy"),
              "probe_agreement": ("probe", "top1_agreement"), "kl_probe": ("probe", "kl_policy_base")}  # fmt: skip


def _summary(d: _Data, arm: str, noise: float, label: str) -> ArmSummary:
    s, cells = d.cfg, d.of(arm, noise)
    acc = {sp: estimate(d.groups(arm, noise, accuracy(sp)), s) for sp in (*SPLITS, "ood")}
    gaps = {sp: estimate(d.groups(arm, noise, gap(sp)), s) for sp in OOD_SPLITS}
    short = {sp: estimate(d.groups(arm, noise, shortcut_rate(sp)), s) for sp in (*SPLITS, "ood")}
    passes = {str(k): estimate(d.groups(arm, noise, pass_k(k)), s) for k in s.evaluation.ks}
    drifts = {name: estimate(d.groups(arm, noise, drift(*where)), s, bounds=DRIFT_RANGE[name])
              for name, where in DRIFT_KEYS.items()}  # fmt: skip
    mean = statistics.fmean if cells else (lambda xs: math.nan)
    return ArmSummary(
        arm=arm, noise=noise, label=label, status=",".join(sorted({c.status for c in cells})) or "not run",
        budget_s=cells[0].budget_s if cells else None, seconds=mean([c.seconds for c in cells]),
        tokens=mean([c.tokens for c in cells]), steps=mean([c.steps for c in cells]),
        accuracy={k: v for k, v in acc.items() if v}, gap={k: v for k, v in gaps.items() if v},
        shortcut={k: v for k, v in short.items() if v}, pass_at_k={k: v for k, v in passes.items() if v},
        mixed_share=estimate(d.groups(arm, noise, mixed()), s), drift={k: v for k, v in drifts.items() if v},
        curve=_curve(d, cells), runs=[{k: v for k, v in c.record().items() if k not in ("arm", "noise")}
                                      for c in [x for x in d.cells if x.arm == arm and x.noise == noise]],
    )  # fmt: skip


def _curve(d: _Data, cells: list[Cell]) -> list[dict]:
    """Seed means at each checkpoint: seconds, tokens, and accuracy on the curve rows (in distribution and out),
    starting from W's point at 0 seconds."""
    curve_ids = {}
    for seed, rows in d.rows.items():
        first = {r["id"] for r in rows if r["split"] == "id"}
        first = set(sorted(first, key=lambda i: int(i.rsplit("-", 1)[1]))[: d.cfg.evaluation.curve_problems])
        curve_ids[seed] = {r["id"]: r["split"] for r in rows if r["id"] in first or r.get("perturbs") in first}
    warm = {c.seed: c for c in d.cells if c.arm == "warm-start" and cells and c.noise == cells[0].noise}
    series = []
    for c in cells:
        points = ([warm[c.seed].points[0]] if c.seed in warm and c.arm != "warm-start" else []) + c.points  # W once
        series.append([(p.seconds, p.tokens, *_curve_acc(p.scores, curve_ids[c.seed])) for p in points])
    if not series:
        return []
    length = min(len(x) for x in series)
    keys = ("seconds", "tokens", "id", "ood")
    return [{k: statistics.fmean(x[i][j] for x in series) for j, k in enumerate(keys)} for i in range(length)]


def _curve_acc(scores: Scores, ids: dict[str, str]) -> tuple[float, float]:
    clean = [scores.correct[i] for i, sp in ids.items() if sp == "id"]
    ood = [scores.correct[i] for i, sp in ids.items() if sp != "id"]
    return statistics.fmean(clean), statistics.fmean(ood) if ood else math.nan


PREDICTIONS = [
    ("RL keeps or gains out-of-distribution accuracy where SFT loses it", "Chu et al. 2025", "higher",
     ("grpo", "sft-more", "ood")),
    ("Paraphrase-diverse SFT closes much of the gap", "Lin et al. 2025", "higher", ("sft-diverse", "sft-more", "ood")),
    ("RL sharpens pass@1", "Yue et al. 2025", "higher", ("grpo", "warm-start", "pass@1")),
    ("RL's gain shrinks at larger k (pass@k crossover): gain at pass@1 minus gain at pass@k_max", "Yue et al. 2025",
     "higher", ("grpo", "warm-start", "crossover")),
    ("On-policy RL drifts less from the base than SFT (forward KL on the task)", "Shenfeld et al. 2025", "lower",
     ("grpo", "sft-more", "kl_task")),
    ("On-policy DPO drifts less from the base than SFT (forward KL on the task)", "Shenfeld et al. 2025", "lower",
     ("dpo-onpolicy", "sft-more", "kl_task")),
    ("On-policy RL forgets less (top-1 agreement with the base on unrelated prompts)", "Shenfeld et al. 2025",
     "higher", ("grpo", "sft-more", "probe_agreement")),
    ("Wrong demonstrations hurt SFT more than a verifier-rewarded method (in-distribution accuracy: SFT's change "
     "minus GRPO's, noisy minus clean)", "SFT imitates every demonstration; GRPO's reward is the verifier", "lower",
     ("sft-more", "grpo", "noise")),
]  # fmt: skip


def stated(cfg: StudyConfig) -> dict:
    """What the study states before any result exists: each prediction (claim, source, expected direction, and the
    comparison that tests it) and the statistics its verdicts use (level, power). `study.core` writes it into the
    study's folder before the first arm trains and refuses to go on with other ones: a verdict is judged against
    what was stated before the results, not against thresholds chosen after them (an audit changed the level and
    power of a finished study, and two verdicts flipped)."""
    return {"predictions": [{"claim": c, "source": s, "expect": e, "test": list(t)} for c, s, e, t in PREDICTIONS],
            "statistics": {"level": cfg.statistics.level, "power": cfg.statistics.power}}  # fmt: skip


def _metric(name: str) -> Metric:
    if name.startswith("pass@"):
        return pass_k(int(name[5:]))
    if name in DRIFT_KEYS:
        return drift(*DRIFT_KEYS[name])
    if name.startswith("gap:"):
        return gap(name[4:])
    return accuracy(name)


def _test(d: _Data, a: str, b: str, metric: str) -> Comparison | None:
    """The comparison a prediction names: `a` minus `b` on `metric` at the first noise level; ``crossover``:
    the gain in pass@1 minus the gain in pass@k at the largest k; ``noise``: `a`'s change from the first noise
    level to the last minus `b`'s (None with one noise level)."""
    s, clean = d.cfg, d.cfg.noise[0]
    if metric == "crossover":
        k = max(s.evaluation.ks)
        rows = minus(compare_rows(d, (a, clean), (b, clean), pass_k(1)), compare_rows(d, (a, clean), (b, clean), pass_k(k)))
        return compare(d, rows, a, b, clean, f"pass@1 gain - pass@{k} gain", twice=True)
    if metric == "noise":
        if len(s.noise) < 2:
            return None
        noisy = s.noise[-1]
        rows = minus(compare_rows(d, (a, noisy), (a, clean), accuracy("id")),
                     compare_rows(d, (b, noisy), (b, clean), accuracy("id")))  # fmt: skip
        return compare(d, rows, a, b, noisy, f"id accuracy: ({a} noisy - clean) - ({b} noisy - clean)", twice=True)
    return compare(d, compare_rows(d, (a, clean), (b, clean), _metric(metric)), a, b, clean, metric)


def _predictions(d: _Data) -> list[Prediction]:
    out = []
    for claim, source, expect, (a, b, metric) in PREDICTIONS:
        test = _test(d, a, b, metric)
        if test is None:
            out.append(Prediction(claim, source, expect, None, "not measured", "none"))
            continue
        other = "lower" if expect == "higher" else "higher"
        sign = "higher" if test.difference > 0 else "lower" if test.difference < 0 else ""
        verdict = {expect: "agrees", other: "disagrees"}.get(test.verdict, "inconclusive")
        out.append(Prediction(claim, source, expect, test, verdict, {expect: "agrees", other: "disagrees"}.get(sign, "none")))
    return out


def _warm_check(d: _Data) -> tuple[list[dict], list[str]]:
    """W's sampled pass@1 and share of mixed prompts per condition, against the setting's thresholds."""
    w, checks, notes = d.cfg.warm_start, [], []
    low, high = w.pass_range
    for c in (c for c in d.cells if c.arm == "warm-start"):
        s = c.final
        p1 = statistics.fmean(pass_at_k(s.samples, n, 1) for n in s.sampled.values()) if s.sampled else math.nan
        mixed_share = statistics.fmean(0 < n < s.samples for n in s.sampled.values()) if s.sampled else math.nan
        ok = low <= p1 <= high and mixed_share >= w.min_mixed
        checks.append({"seed": c.seed, "noise": c.noise, "pass_at_1": p1, "mixed_share": mixed_share,
                       "prompts": len(s.sampled), "samples": s.samples, "pass_range": [low, high],
                       "min_mixed": w.min_mixed, "ok": ok})  # fmt: skip
        if not ok:
            notes.append(f"W (seed {c.seed}, noise {c.noise:g}) fails its check: sampled pass@1 {p1:.2f} (wanted "
                         f"{low:g}-{high:g}), mixed prompts {mixed_share:.2f} (wanted >= {w.min_mixed:g}); the arms "
                         "still ran from it, and every comparison should be read with that in mind")  # fmt: skip
    return checks, notes


def summarise(cfg: StudyConfig, setting: str, cells: list[Cell], rows: dict[int, list[dict]], *, out: str,
              seconds: float) -> StudyResult:  # fmt: skip
    """Every arm's summary, its differences from the baseline, W's check and the predictions; `rows`: each
    seed's evaluation rows."""
    d = _Data(cells, rows, cfg)
    labels = {"warm-start": "W, the warm start every arm starts from", "base": "the base model, untrained",
              **{k: a.label for k, a in ARMS.items()}}  # fmt: skip
    order = ["base", "warm-start", *cfg.arms]
    summaries = [_summary(d, arm, noise, labels[arm]) for noise in cfg.noise for arm in order
                 if any(c.arm == arm and c.noise == noise for c in cells)]  # fmt: skip
    metrics = [*(accuracy(sp) for sp in (*SPLITS, "ood")), *(gap(sp) for sp in OOD_SPLITS)]
    names = [*SPLITS, "ood", *(f"gap:{sp}" for sp in OOD_SPLITS)]
    comparisons = [c for noise in cfg.noise for arm in ["warm-start", *cfg.arms] if arm != cfg.baseline
                   for metric, name in zip(metrics, names)
                   if (c := compare(d, compare_rows(d, (arm, noise), (cfg.baseline, noise), metric), arm,
                                    cfg.baseline, noise, name, twice=name.startswith("gap:"))) is not None]
    # (a gap's difference is one of two differences, clean - variant for each arm: four accuracies, as `twice`)
    first = next(iter(rows.values()), [])
    problems = {sp: sum(r["split"] == sp for r in first) for sp in SPLITS}
    problems["ood"] = len({r["perturbs"] for r in first if r["split"] in OOD_SPLITS})  # problems, not their variants
    mdd = {sp: minimum_detectable_difference(n, len(cfg.seeds), level=cfg.statistics.level,
                                             power=cfg.statistics.power) for sp, n in problems.items() if n}  # fmt: skip
    warm, notes = _warm_check(d)
    notes += [c.note for c in cells if c.note]
    return StudyResult(setting, cfg.model, out, cfg.seeds, cfg.noise, cfg.arms, cfg.baseline, problems, mdd, warm,
                       summaries, comparisons, _predictions(d), seconds, notes, cfg.model_dump(mode="json"))  # fmt: skip
