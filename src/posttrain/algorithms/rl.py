"""What the reinforcement-learning methods share besides their sections (`config.RLSection`): their data.

An RL run's data is prompts (`data.prompts`); its reward functions are built here once before the model loads,
so that a bad spec, a user file that does not import, a built-in's wrong argument or a column a reward needs
and the rows lack fails in seconds (`rewards.checks`), not hours into the run. The functions are built again,
cheaply, by the rollout source; a reward model loads on its first call.

Not a method (it defines no `ALGORITHM`): GRPO, PPO and RLOO use `prepare` as theirs, and `tis` for truncated
importance sampling; GRPO and RLOO, whose one-step rollouts take their old log-probs from the loss forward, share
`policy_logps` and `step_token_means`; `mark_groups`, which lets their forwards encode each group's prompt once;
and `mark_zero_gradient` with `trained_rows_logps`, which leave the rows that cannot move the weights untrained.
"""

from __future__ import annotations

import math
import warnings

import torch

from posttrain.algorithms.base import ZERO_GRADIENT, Mean
from posttrain.algorithms.common import LOGP_GAP, logp_gap, masked_mean, tis_weights
from posttrain.data.collate import GROUP_KEY
from posttrain.data.prepared import PreparedData
from posttrain.data.prompts import read_prompt_rows, render_prompts
from posttrain.models.logprobs import selected_token_logps
from posttrain.rewards import build_reward_functions, parse_reward_specs
from posttrain.rewards.checks import check_reward_inputs


def prepare(cfg, tokenizer) -> PreparedData:
    """Read and render the prompts of `data.train` and check that the run's rewards can score them."""
    specs = parse_reward_specs(cfg.algorithm.reward_specs(), where=cfg.algorithm.reward_where(cfg))
    build_reward_functions(specs)
    with warnings.catch_warnings(record=True) as caught:  # the rows data.skip_bad_rows left out: a run note
        warnings.simplefilter("always")
        rows = read_prompt_rows(cfg)
    check_reward_inputs(specs, rows, cfg.data.train)
    data = render_prompts(cfg, tokenizer, rows)
    data.notes.extend(str(w.message) for w in caught)
    data.notes.extend(negative_weight_notes(specs, cfg.algorithm.reward_fallback))
    return data


def negative_weight_notes(specs, default: float) -> list[str]:
    """A function with a negative weight and no fallback of its own: its failures take the run's
    `algorithm.reward_fallback`, which suits the functions weighted up (their lowest value, 0 for pass/fail), and
    with the weight's sign turned it is this function's best contribution: a failure then outranks a scored sample.

    >>> from posttrain.rewards import parse_reward_specs
    >>> negative_weight_notes(parse_reward_specs([{"name": "exact_match", "weight": -0.5}]), 0.0)[0][:80]
    "reward 'exact_match' has weight -0.5: a sample it fails on gets algorithm.reward"
    """
    return [f"reward {s.label!r} has weight {s.weight:g}: a sample it fails on gets algorithm.reward_fallback "
            f"({default:g}), and the negative weight ranks that failure as high as a sample scoring {default:g} and "
            f"above every sample scoring more; give it a fallback of its own, its highest ordinary value (e.g. "
            f"{{name: {s.name}, weight: {s.weight:g}, fallback: 1.0}} for a pass/fail check), so that a failure is "
            "never rewarded (docs/rewards.md)"
            for s in specs if s.weight < 0 and s.fallback is None]  # fmt: skip


def reference_mode(cfg, needed: bool) -> str:
    """The reference of an RL run that needs one: the base with the adapter disabled under LoRA/QLoRA (no memory),
    else a frozen copy; "none" when the loss and the logs need no reference."""
    if not needed:
        return "none"
    return "adapter" if cfg.technique.name in ("lora", "qlora") else "copy"


def mark_groups(cfg, tensors: dict[str, torch.Tensor], group_size: int) -> None:
    """Under `data.share_prompt`, give a rollout's rows (prompt by prompt, `group_size` contiguous completions
    each) their group's id as `prompt_group` (N,): the old, reference and training forwards then run each group's
    rows in a micro-batch as one row, the prompt once (`models.prefix_sharing`); a micro-batch holding part of a
    group runs that part so. Row selections (a dropped group, a shuffled pass) carry the ids along."""
    if cfg.data.share_prompt:
        n = tensors["input_ids"].shape[0]
        tensors[GROUP_KEY] = torch.arange(n // group_size).repeat_interleave(group_size)  # (N,)


def policy_logps(model, batch, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The policy's log-probs and entropy (B, T) on the completion tokens, and the old log-probs the ratio uses:
    the rollout's, fixed before any update, when it feeds several steps; else these, detached (ratio 1: the
    policy is the sampler, and no extra forward is needed). Rows of one group share their prompt's forward when
    the batch marks them (`mark_groups`)."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    logps, entropy = selected_token_logps(model, inputs, batch["completion_mask"], temperature=temperature,
                                          with_entropy=True, groups=batch.get(GROUP_KEY))  # fmt: skip
    return logps, entropy, batch["old_logps"] if "old_logps" in batch else logps.detach()


def step_token_means(metrics: dict, batch, logps: torch.Tensor, entropy: torch.Tensor) -> dict[str, Mean]:
    """A loss's token-mean `metrics` with the entropy and, for a one-step rollout (whose loss forward runs on the
    sampling weights), the sampler/trainer gap: each logged as a token mean over the whole step, whatever the
    loss units (completions, or tokens)."""
    mask = batch["completion_mask"]
    metrics["entropy"] = masked_mean(entropy, mask).detach()
    if "old_logps" not in batch:
        metrics[LOGP_GAP] = logp_gap(batch["sampling_logps"], logps.detach(), mask)
    tokens = mask.sum()
    return {k: Mean(v * tokens, tokens) for k, v in metrics.items()}


def tis(batch, old_logps: torch.Tensor, cap: float | None) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """A micro-batch's truncated importance weights (`common.tis_weights`, with `rollout.tis_cap`) and their token
    means: `tis_weight_mean` and `tis_capped_fraction` (the share of tokens whose weight the cap bound);
    (None, {}) when `tis_cap` is null. `old_logps`: the trainer's log-probs under the sampling weights."""
    if cap is None:
        return None, {}
    mask, sampling = batch["completion_mask"], batch["sampling_logps"]
    weights = tis_weights(old_logps, sampling, mask, cap)
    capped = (old_logps - sampling) >= math.log(cap)  # from the log-ratio: exp(log cap) may round below cap
    return weights, {"tis_weight_mean": masked_mean(weights, mask),
                     "tis_capped_fraction": masked_mean(capped.float(), mask).detach()}  # fmt: skip


def mark_zero_gradient(tensors: dict[str, torch.Tensor], ctx, *, exact: bool) -> None:
    """Mark the rollout's rows whose gradient is exactly 0 (`base.ZERO_GRADIENT`) when `exact` (the loss is
    advantage x a function of the ratio and nothing else: GRPO and RLOO at beta 0, with `skip_zero_advantage`) and
    the source can leave them untrained (`ctx.skips_zero_gradient`): the rows whose advantage is exactly 0
    (-min(r A, clip(r) A) is 0, and so is its gradient, whatever r is; a group of equal rewards has advantages
    exactly 0: `grpo.group_advantages`, `rloo.leave_one_out_advantages`) and those with no token in the loss
    (`rollout.overlong: filter`). Call it once the advantages and the final `completion_mask` are set."""
    if exact and ctx.skips_zero_gradient:
        tensors[ZERO_GRADIENT] = (tensors["advantages"] == 0) | (tensors["completion_mask"].sum(-1) == 0)


def trained_rows_logps(compute, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """`compute(tensors)` (N, T), a no-grad log-prob forward (old or reference log-probs), run on the rows that
    train only: the `ZERO_GRADIENT` rows get 0, which nothing reads (they never reach the loss)."""
    inert = tensors.get(ZERO_GRADIENT)
    if inert is None or not bool(inert.any()):
        return compute(tensors)
    rows = ~inert
    if not bool(rows.any()):
        return torch.zeros(tensors["completion_mask"].shape, dtype=torch.float32)
    part = compute({k: v[rows] for k, v in tensors.items()})
    out = part.new_zeros((rows.shape[0], *part.shape[1:]))
    out[rows.to(part.device)] = part
    return out


def trained_mask(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """`completion_mask` (N, T) with the `ZERO_GRADIENT` rows zeroed: the tokens a metric over trained rows means."""
    inert = tensors.get(ZERO_GRADIENT)
    mask = tensors["completion_mask"]
    return mask if inert is None else mask * (~inert).to(mask.dtype)[:, None]


def trained_logp_gap(tensors: dict[str, torch.Tensor]) -> float | None:
    """The sampler/trainer gap (`common.logp_gap`) of a rollout's `old_logps`, over the tokens of the rows that
    train; None when no row trains (a gap of 0 would look perfect)."""
    trained = trained_mask(tensors)
    if not bool(trained.any()):
        return None
    return float(logp_gap(tensors["sampling_logps"], tensors["old_logps"], trained))
