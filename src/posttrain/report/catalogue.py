"""Which curves a report draws: sections of panels, each panel a few metric keys on one plot, as data.

A panel is drawn when any run of the report logged one of its keys; a section with no panel drawn is left out.
So the method decides what is shown only through what it logged (a DPO run has `reward_accuracy`, a GRPO run
`reward/<fn>_mean`, ...), and a metric a method adds later lands in "Other metrics" until a panel names it.
Reward functions are not listed here: each `reward/<name>_mean` found gets its own panel with its std as a band.
For every key of a panel, the held-out `eval_<key>` is drawn beside it when the run logged it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Panel:
    title: str
    keys: tuple[str, ...]
    band: dict[str, str] = field(default_factory=dict)  # key -> the key of its standard deviation (a band)
    from_zero: bool = False  # the y axis starts at 0: a quantity whose size matters, not only its changes (memory)


@dataclass(frozen=True)
class Section:
    title: str
    intro: str
    panels: tuple[Panel, ...]


def _p(title: str, *keys: str) -> Panel:
    return Panel(title, keys)


REWARDS = "Rewards"  # the section that gets a panel per reward function

SECTIONS: tuple[Section, ...] = (
    Section(
        "Loss and optimisation",
        "The loss per step (and the held-out `eval_loss` where `data.eval` is set), the learning rate each step "
        "used, and the gradient norm before clipping: a spike, or a norm that keeps climbing, is the first sign "
        "of a learning rate that is too high.",
        (_p("loss", "loss"), _p("learning rate", "lr"), _p("gradient norm (before clipping)", "grad_norm")),
    ),
    Section(
        "Preference pairs (DPO)",
        "`reward_accuracy`: the share of pairs whose implicit reward beta (log pi - log pi_ref) is higher for the "
        "chosen response; `reward_margin`: the mean of chosen minus rejected reward. When `chosen_reward` falls "
        "too, the model is pushing the chosen responses down as well (the failure DPO-Positive targets). "
        "`abs_logratio_per_token`: how far the policy moved from the reference on the pairs' tokens (mean "
        "|log pi - log pi_ref| per token, in nats).",
        (
            _p("reward accuracy", "reward_accuracy"),
            _p("reward margin", "reward_margin"),
            _p("implicit rewards", "chosen_reward", "rejected_reward"),
            _p("policy log-probabilities", "chosen_logps", "rejected_logps"),
            _p("|log-ratio| to the reference per token", "abs_logratio_per_token"),
        ),
    ),
    Section(
        "Reward model",
        "`accuracy`: the share of pairs the model scores higher on the chosen side (ties count 1/2); `margin`: "
        "the mean score difference, chosen minus rejected.",
        (
            _p("pair accuracy", "accuracy"),
            _p("score margin", "margin"),
            _p("scores", "chosen_score", "rejected_score"),
        ),
    ),
    Section(
        REWARDS,
        "The mean reward of each rollout, per reward function (unweighted; the band is one standard deviation "
        "over the rollout's samples) and in total (weighted, after the `rollout.overlong` treatment). GRPO and RLOO "
        "learn only from groups whose rewards differ: `uniform_group_fraction` is the share of groups with no signal.",
        (
            Panel("total reward", ("reward/total_mean",), {"reward/total_mean": "reward/total_std"}),
            _p("groups with equal rewards (no signal)", "uniform_group_fraction"),
            _p("completions skipped (advantage 0: no gradient)", "skipped_fraction"),
            _p("reward spread within a group", "reward_std_in_group"),
            _p("PPO score (weighted reward total)", "score_mean"),
        ),
    ),
    Section(
        "Completions",
        "Completion length in tokens (EOS included) and the share cut by `rollout.max_new_tokens`: a length that "
        "runs to the limit can be a reward being gamed, or answers that need more room.",
        (
            _p("completion length", "completion_length_mean", "completion_length_max"),
            _p("truncated share", "truncated_fraction"),
        ),
    ),
    Section(
        "Policy update",
        "`kl`: distance to the reference (GRPO: k3 per completion token; PPO: nats per sequence); `entropy`: "
        "nats per completion token (a collapse towards 0 ends exploration); `clip_fraction`: share of tokens on "
        "the clipped branch of the surrogate; `approx_kl`: how far an update moved from the sampler; the "
        "sampler/trainer gap should read about 1e-7 in float32 (docs/rl.md).",
        (
            _p("KL to the reference", "kl"),
            _p("entropy", "entropy", "sampling_entropy"),
            _p("clip fraction", "clip_fraction", "clip_fraction_low", "clip_fraction_high"),
            _p("importance ratio (mean)", "ratio_mean"),
            _p("approximate KL of the update", "approx_kl"),
            _p("policy loss", "policy_loss"),
            _p("KL coefficient", "kl_coef"),
            _p("sampler/trainer log-prob gap", "logp_gap_sampler_trainer"),
        ),
    ),
    Section(
        "Value head (PPO)",
        "`value_loss` per completion token; `explained_variance`: 1 - Var[R - V] / Var[R] over a rollout (1 is a "
        "perfect critic, 0 or below no better than a constant); `returns_mean`: what the head is fitting.",
        (
            _p("value loss", "value_loss"),
            _p("explained variance", "explained_variance"),
            _p("mean return", "returns_mean"),
        ),
    ),
    Section(
        "Throughput and memory",
        "Tokens per second of each step, where a step's time goes (for RL, `gen_time_s` is sampling, on the first "
        "step of each rollout), and the peak memory so far: the process's resident set (`peak_rss_gb`) and, on a "
        "GPU, the most tensor memory allocated (`peak_cuda_gb`).",
        (
            _p("tokens per second", "tokens_per_s"),
            _p("time per step (s)", "step_time_s", "data_time_s", "train_time_s", "gen_time_s", "reward_time_s",
               "prepare_time_s"),  # fmt: skip
            Panel("peak memory (GB)", ("peak_rss_gb", "peak_cuda_gb"), from_zero=True),
        ),
    ),
)

# Keys no panel draws: counters and clocks that are read in tables instead (or mean nothing on a plot).
NOT_PLOTTED = {"step", "rollout", "loss_units", "tokens", "elapsed_s"}
_REWARD_MEAN = re.compile(r"^reward/(?!total_)(.+)_mean$")


def reward_panels(keys: set[str]) -> list[Panel]:
    """One panel per reward function logged (`reward/<name>_mean`, its std as a band), then failures if any.

    >>> [p.title for p in reward_panels({"reward/task_mean", "reward/task_std", "reward/total_mean"})]
    ['reward: task']
    """
    names = sorted(m.group(1) for k in keys if (m := _REWARD_MEAN.match(k)))
    panels = [Panel(f"reward: {n}", (f"reward/{n}_mean",), {f"reward/{n}_mean": f"reward/{n}_std"}) for n in names]
    failures = tuple(sorted(k for k in keys if k.startswith("reward/failures_")))
    if failures:
        panels.append(Panel("samples a reward function failed on", failures))
    return panels


def with_eval(panel: Panel, keys: set[str]) -> tuple[str, ...]:
    """The panel's keys present in `keys`, each followed by its held-out `eval_` twin when logged."""
    out: list[str] = []
    for k in panel.keys:
        out += [x for x in (k, f"eval_{k}") if x in keys]
    return tuple(out)


def choose_sections(keys: set[str], *, failures_seen: bool = True) -> list[tuple[Section, list[Panel]]]:
    """The sections and panels to draw for runs that logged `keys` (any run), then "Other metrics": every
    numeric key no panel drew (with its eval twin). A failures panel is drawn only if some sample failed
    (`failures_seen`): a line at zero says less than the sentence the report writes instead.

    >>> [(s.title, [p.title for p in ps]) for s, ps in choose_sections({"loss", "lr", "eval_loss", "foo"})]
    [('Loss and optimisation', ['loss', 'learning rate']), ('Other metrics', ['foo'])]
    """
    chosen: list[tuple[Section, list[Panel]]] = []
    used: set[str] = set(NOT_PLOTTED)
    for section in SECTIONS:
        candidates = list(section.panels)
        if section.title == REWARDS:
            candidates = reward_panels(keys) + candidates
            if not failures_seen:
                candidates = [p for p in candidates if not p.keys[0].startswith("reward/failures_")]
        panels = []
        for panel in candidates:
            present = with_eval(panel, keys)
            used |= set(panel.keys) | {f"eval_{k}" for k in panel.keys} | set(panel.band.values())
            if present:
                panels.append(Panel(panel.title, present, {k: v for k, v in panel.band.items() if v in keys}))
        if panels:
            chosen.append((section, panels))
    used |= {k for k in keys if k.startswith("reward/")}  # failures at zero, and any other reward statistic
    rest = sorted(k for k in keys - used if not k.startswith("eval_") or k[5:] not in keys)
    others = [Panel(k, tuple(x for x in (k, f"eval_{k}") if x in keys)) for k in rest if not k.startswith("eval_")]
    others += [Panel(k, (k,)) for k in rest if k.startswith("eval_")]
    if others:
        intro = "Every other number the run logged, one plot each (posttrain does not yet say what to read in them)."
        chosen.append((Section("Other metrics", intro, ()), others))
    return chosen
