"""The rollout batch source: samples from the current policy and yields training steps, for any RL method.

Every `steps_per_rollout` optimisation steps it takes the next prompts (deterministic order from `run.seed`,
sharded over processes), samples `G` completions per prompt with an engine, scores them with the reward
functions, hands the scored rollout to the method's `process` (`algorithms.base.Rollouts`: GRPO makes group
advantages, PPO values, KL-shaped rewards and GAE), then yields `rollout.epochs` shuffled passes over the result,
cut into optimisation steps of `optim.batch_size` sequences and micro-batches of `optim.micro_batch_size`. It
names no method: what differs between them is in their `process` and their section (`config.RLSection`).

Truncated completions get the treatment `rollout.overlong` names (`rewards.overlong`): the reward functions see
which ones were truncated (a `truncated` column), their rewards may be replaced or penalised, and their rows may
carry no loss (`ScoredRollout.trains`). When every reward function fails on every sample for
`DEAD_REWARD_ROLLOUTS` rollouts in a row, the run stops with a `UserError` naming each function and where its
first failure happened: there is no reward signal left to learn from. Under `run.sharding=fsdp2` a trained reward
model is sharded as it loads, like a frozen-copy reference, and under DeepSpeed ZeRO-3 partitioned as one is
(`models.sharding.zero3_inference`); each process scores its own samples, as many as every other process, so
each runs as many of its (collective) forwards (`models.heads.RewardModelScorer`).

Generation time and reward statistics ride along as each `Step`'s metrics, so the loop logs `gen_time_s` apart
from the training time. With several processes the statistics cover every process's samples, not the main
process's share (`rollout_statistics`); the times are this process's. It does not compute any loss.

Every prompt is sampled once per epoch (`plan_rollouts`): the last rollout of an epoch takes the prompts left
over and is smaller, unless some process's share of them could not fill each of its optimisation steps with at
least one sequence; then they are skipped in that epoch, and the run says how many and which before training.

Resuming: the step number fixes which prompts come next, and each rollout's sampling seed is a function of the
run's seed and the rollout, each row drawing from the stream of its place in the whole rollout (whatever process
samples it), so from restored weights the next rollout is the one the uninterrupted run sampled. A checkpoint inside a rollout keeps that rollout as its method made it (the samples, their old and
reference log-probs, advantages and values, and the statistics its steps log: `process_state`, one file per
process), and a resume trains its remaining steps on it rather than sampling it anew from weights it was not
sampled from. A run resumed on the same number of processes therefore ends as the uninterrupted one, bit for bit
on the CPU; on another number (`trainer.checkpoint`), a rollout in progress is sampled again, which then starts from the method's state and the dead-reward streak as they were before it
(`rollout_start` in trainer_state.json: it does not count twice). The streak of rollouts whose rewards all failed
(`DEAD_REWARD_ROLLOUTS`) is kept too.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import time
from collections.abc import Iterator
from typing import Any

import torch

from posttrain.algorithms.base import ZERO_GRADIENT, Rollout, RolloutContext, Rollouts, ScoredRollout, Step
from posttrain.config import deepspeed_zero_stage
from posttrain.data.order import EpochPlan, epoch_order
from posttrain.data.prompts import PromptExample
from posttrain.errors import ConfigError, NoRewardSignal
from posttrain.models.heads import language_model
from posttrain.models.logprobs import unwrap_parallel
from posttrain.models.sharding import shard, zero3_inference
from posttrain.rewards import (
    RewardResult,
    build_reward_functions,
    compute_rewards,
    parse_reward_specs,
    reward_metrics,
    row_columns,
)
from posttrain.rewards.overlong import OVERLONG
from posttrain.rollout.engines import get_engine
from posttrain.rollout.samples import SampleLog

DEAD_REWARD_ROLLOUTS = 3
"""Consecutive rollouts in which every reward function failed on every sample before the run stops (one such
rollout can be a passing outage, e.g. a sandbox short of memory; three in a row is a broken reward)."""


def _streak_record(streak: list[tuple[int, RewardResult]]) -> list:
    """A dead-reward streak as JSON: each rollout's index, and what the stop's message names of its result (the
    functions, their failures, errors and where they happened)."""
    return [[i, {"per_function": {k: [] for k in r.per_function}, "failures": r.failures, "errors": r.errors,
                 "sites": r.sites}] for i, r in streak]  # fmt: skip


def _streak(record: list) -> list[tuple[int, RewardResult]]:
    return [(int(i), RewardResult(total=[], **r)) for i, r in record]


def trim(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop columns that are padding in every row of a micro-batch (left of the prompts, right of completions)."""
    am = batch["attention_mask"]
    used = am.bool().any(0).nonzero()
    if used.numel() == 0:
        return batch
    lo, hi = int(used[0]), int(used[-1]) + 1
    return {k: v[:, lo:hi] if v.dim() == 2 and v.shape[1] == am.shape[1] else v for k, v in batch.items()}


def steps_per_rollout(cfg) -> int:
    """Optimisation steps one rollout feeds (`config.RLSection.steps_per_rollout`)."""
    return cfg.algorithm.steps_per_rollout(cfg.optim.batch_size)


def rollout_row_ids(rank: int, world: int, prompts: int, group: int) -> list[int]:
    """The place in the whole rollout of each of a process's `prompts` x `group` rows: its k-th prompt is the
    rollout's (rank + k x world)-th (`RolloutSource.rollout_prompts` deals them round-robin), and sample g of it
    row (that) x group + g. The stream each row samples from (`RowStreams`), the same whatever the number of
    processes.

    >>> rollout_row_ids(1, 2, 2, 2), rollout_row_ids(0, 1, 2, 2)
    ([2, 3, 6, 7], [0, 1, 2, 3])
    """
    return [(rank + k * world) * group + g for k in range(prompts) for g in range(group)]


def plan_rollouts(cfg, n: int, world_size: int, micro_batch_size: int) -> EpochPlan:
    """How each epoch of `n` prompts is cut into rollouts; refuses what cannot run (before any model loads).

    A rollout takes `rollout.batch_size / group_size` prompts. The prompts left over at the end of an epoch make
    a smaller last rollout when every process's share of them, `group_size` sequences each, still gives each of
    its `rollout.batch_size / optim.batch_size` steps per pass at least one sequence (a process with an empty
    step would skip the gradient all-reduce the others wait in; one process would run a step that trains nothing),
    and, for a sharded model (`run.sharding=fsdp2`), when they split evenly over the processes.
    """
    alg = cfg.algorithm
    group_size = alg.group_size()
    rollout_size = alg.rollout.batch_size or cfg.optim.batch_size  # sequences, all processes
    prompts = rollout_size // group_size
    if prompts % world_size:
        raise ConfigError(
            f"algorithm.rollout.batch_size ({rollout_size}) holds {prompts} prompts, which must split evenly over "
            f"{world_size} processes"
        )
    if cfg.optim.batch_size % world_size:
        raise ConfigError(
            f"optim.batch_size ({cfg.optim.batch_size}) must be a multiple of the number of processes ({world_size})"
        )
    step_size = cfg.optim.batch_size // world_size  # sequences per optimisation step, this process
    if step_size % micro_batch_size:
        raise ConfigError(
            f"optim.micro_batch_size ({micro_batch_size}) must divide the per-process batch ({step_size})"
        )
    if n < prompts:
        raise ConfigError(
            f"data.train has {n} prompts, fewer than one rollout needs ({rollout_size} sequences / {group_size} "
            f"per prompt = {prompts})"
        )
    full, rest = divmod(n, prompts)
    per_pass = rollout_size // cfg.optim.batch_size
    if rest and (rest // world_size) * group_size < per_pass:
        who, k = ("a process " if world_size > 1 else ""), (rest // world_size) * group_size
        why = (
            f"after {full} rollouts of {prompts} prompts, the {rest} left would give {who}{k} sequence"
            f"{'s' if k != 1 else ''}, fewer than the {per_pass} optimisation steps of a pass over a rollout"
        )
        return EpochPlan(n, prompts, full, steps_per_rollout(cfg), skipped=rest, reason=why)
    if rest % world_size and cfg.run.collective_forwards:
        why = (
            f"after {full} rollouts of {prompts} prompts, the {rest} left do not split evenly over {world_size} "
            "processes, and a sharded model (run.sharding=fsdp2 or DeepSpeed ZeRO-3) needs every process to run "
            "as many forward passes (each is a collective), so as many prompts"
        )
        return EpochPlan(n, prompts, full, steps_per_rollout(cfg), skipped=rest, reason=why)
    return EpochPlan(n, prompts, full + (rest > 0), steps_per_rollout(cfg))


def pooled_events(results: list[RewardResult]) -> dict[str, dict[str, int]]:
    """Each reward function's own counts (`RewardResult.events`) summed over `results` (every process's share of a
    rollout), in the order they first appear.

    >>> a, b = RewardResult([], {}, {}, events={"c": {"t": 1}}), RewardResult([], {}, {}, events={"c": {"t": 2, "u": 0}})
    >>> pooled_events([a, b])
    {'c': {'t': 3, 'u': 0}}
    """
    out: dict[str, dict[str, int]] = {}
    for r in results:
        for name, counted in r.events.items():
            for event, count in counted.items():
                out.setdefault(name, {})[event] = out.get(name, {}).get(event, 0) + count
    return out


def rollout_statistics(shares: list[dict]) -> dict[str, float]:
    """One rollout's logged statistics over every process's share of its samples (`shares`, in rank order; one
    share in a single process), so that they do not depend on how many processes sampled it. A share holds its
    samples' rewards (`result`, a `RewardResult` whose `total` is after the overlong treatment), `lengths`,
    `truncated` flags and `nll` (each sample's summed -log pi_sampler over its completion tokens), and the method's
    own statistics of its samples (`extra`, from `Rollouts.process`).

    The rewards' means and (population) standard deviations, the lengths' mean and maximum and the truncated share
    are those of all the samples together; failure counts are summed. `sampling_entropy` is the mean of
    -log pi_sampler(y_t) over every completion token: a Monte Carlo estimate of the sampling distribution's
    per-token entropy (E[-log p(y)] = H), from the sampler's own log-probs, so it is there at every step, whatever
    the loss forward trains (`skip_zero_advantage`). A method's own statistic is logged as given
    where every process gives the same value (PPO's KL coefficient), else averaged over the processes weighted by
    their numbers of samples: the all-sample value for means over sequences or groups (GRPO's
    `uniform_group_fraction`, `reward_std_in_group`, PPO's `kl`, `score_mean`), a weighted mean of the processes'
    values for the others (PPO's `explained_variance`, token means such as `returns_mean`)."""
    results = [s["result"] for s in shares]
    names = list(results[0].per_function)
    failed = list(dict.fromkeys(k for r in results for k in r.failures))
    pooled = RewardResult(total=[x for r in results for x in r.total],
                          per_function={n: [x for r in results for x in r.per_function[n]] for n in names},
                          failures={n: sum(r.failures.get(n, 0) for r in results) for n in failed},
                          events=pooled_events(results))  # fmt: skip
    lengths = torch.tensor([x for s in shares for x in s["lengths"]], dtype=torch.float32)
    out = {
        **reward_metrics(pooled),
        "completion_length_mean": float(lengths.mean()),
        "completion_length_max": float(lengths.max()),
        "truncated_fraction": float(torch.tensor([x for s in shares for x in s["truncated"]]).float().mean()),
        "sampling_entropy": sum(x for s in shares for x in s["nll"]) / max(float(lengths.sum()), 1.0),
    }
    for key in dict.fromkeys(k for s in shares for k in s["extra"]):
        given = [(float(s["extra"][key]), len(s["lengths"])) for s in shares if key in s["extra"]]
        same = all(v == given[0][0] for v, _ in given)
        out[key] = given[0][0] if same else sum(v * n for v, n in given) / sum(n for _, n in given)
    return out


class RolloutSource:
    """Rollouts as a `BatchSource`: `steps(start_step)` yields each step's micro-batches and metrics."""

    def __init__(self, cfg, *, prompts: list[PromptExample], model, tokenizer, accelerator, micro_batch_size: int,
                 rollouts: Rollouts, reference, plan: EpochPlan, loss_units=None):  # fmt: skip
        self.cfg, self.model, self.tokenizer, self.accelerator = cfg, model, tokenizer, accelerator
        self.rollout_cfg = cfg.algorithm.rollout
        self.G = cfg.algorithm.group_size()
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.prompts, self.plan, self.micro = prompts, plan, micro_batch_size
        self.prompts_per_rollout = plan.unit
        self.steps_per_rollout = steps_per_rollout(cfg)
        self.rollouts_per_epoch = plan.units_per_epoch  # the last one may hold fewer prompts
        self.steps_per_epoch = plan.steps_per_epoch
        self.process = rollouts.process
        self.loss_units = loss_units  # the method's loss_units(batch, cfg): for the rows left untrained
        # Rows with a zero gradient are left untrained in one process without DeepSpeed; with several processes
        # each must run as many forwards (sharded models, ZeRO) and DeepSpeed's engine owns the gradients.
        skips = self.world == 1 and deepspeed_zero_stage() is None and loss_units is not None
        self.context = RolloutContext(cfg=cfg, model=unwrap_parallel(model), accelerator=accelerator,
                                      micro_batch_size=micro_batch_size, reference=reference,
                                      state=rollouts.state(cfg), skips_zero_gradient=skips)  # fmt: skip
        self.rewards = build_reward_functions(parse_reward_specs(cfg.algorithm.reward_specs(), where=cfg.algorithm.reward_where(cfg)))
        prepare = None  # how a trained reward model (`rewards.builtin.reward_model`) is sharded as it loads
        if cfg.run.sharding == "fsdp2":
            prepare = functools.partial(shard, forward_only=True)
        elif deepspeed_zero_stage() == 3:  # partitioned as a frozen-copy reference is, by the policy's config
            ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
            prepare = functools.partial(zero3_inference, config=ds_config, micro=micro_batch_size,
                                        processes=self.world)  # fmt: skip
        for reward in self.rewards if prepare is not None else ():
            if reward.builtin and hasattr(reward.fn, "prepare"):
                # sharded over several processes, its forwards are collectives: a batch that fails on one process
                # stops the run (in one process nothing waits: a failure is its samples' fallback)
                reward.fn.prepare, reward.fn.collective = prepare, self.world > 1
        self.warned: set = set()  # reward functions (and their events) whose first failure was already printed
        self.dead_rewards: list[tuple[int, Any]] = []  # (rollout, RewardResult) of consecutive dead rollouts
        # the rollout being trained on: (index, tensors, metrics), kept for a checkpoint inside it; one restored by
        # `load_process_state` is trained on instead of sampling it again
        self.current: tuple[int, dict[str, torch.Tensor], dict[str, float]] | None = None
        # the method's state and the dead-reward streak as they were before the current rollout was made (its index
        # first): a resume that must sample that rollout anew (no kept rollout: another number of processes) goes
        # on from them, or the rollout would count twice (PPO's adaptive KL updated twice, a streak of 0, 1, 1)
        self.start: tuple[int, dict, list] | None = None
        self.engine = get_engine(self.rollout_cfg.engine, cfg)
        self.seed = cfg.run.seed
        self.samples = SampleLog.for_run(cfg, steps_per_rollout=self.steps_per_rollout,  # RUN/samples.jsonl
                                         steps_per_epoch=self.steps_per_epoch,
                                         main_process=accelerator.process_index == 0)  # fmt: skip

    # ---- prompts
    def rollout_prompts(self, index: int) -> list[PromptExample]:
        """This process's prompts for rollout `index`: a seeded permutation per epoch, then sharded."""
        epoch, within = divmod(index, self.rollouts_per_epoch)
        order = epoch_order(len(self.prompts), self.seed, epoch, self.cfg.data.shuffle)
        chunk = order[within * self.prompts_per_rollout : (within + 1) * self.prompts_per_rollout]
        return [self.prompts[i] for i in chunk[self.rank :: self.world]]

    # ---- one rollout: sample, score, process
    def make_rollout(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        rc = self.rollout_cfg
        state = self.context.state
        self.start = (index, dict(state.state_dict()) if state is not None else {}, list(self.dead_rewards))
        examples = self.rollout_prompts(index)
        policy = language_model(self.context.model)  # the causal LM (PPO's carries a value head)
        t0 = time.perf_counter()
        rollout = self.engine.generate(
            policy,
            self.tokenizer,
            [e.prompt_ids for e in examples],
            n=self.G,
            max_new_tokens=rc.max_new_tokens,
            temperature=rc.temperature,
            top_p=rc.top_p,
            stop=list(rc.stop),
            seed=self.seed * 7_919 + index,
            batch_size=rc.generation_batch_size,
            # each row's stream is numbered by its place in the whole rollout (this process's k-th prompt is the
            # rollout's rank + k * world-th), so the samples do not depend on the number of processes: they did,
            # rows being numbered from 0 on each process (an audit: 1 and 2 processes differed from step 1)
            row_ids=rollout_row_ids(self.rank, self.world, len(examples), self.G),
        )
        gen_time = time.perf_counter() - t0
        per_seq = [e for e in examples for _ in range(self.G)]
        t1 = time.perf_counter()
        result = self.score(index, rollout, per_seq)
        reward_time = time.perf_counter() - t1
        overlong = OVERLONG[rc.overlong]
        lengths = rollout.lengths
        rewards = overlong.rewards(torch.tensor(result.total, dtype=torch.float32), rollout.truncated, lengths, rc)
        trains = overlong.trains(rollout.truncated)
        self.samples.write(index, per_seq, rollout, result, rewards)  # every Nth rollout, main process only
        # reward/total_*: the rewards the algorithm uses, after the overlong treatment
        mask = rollout.completion_mask.bool()
        nll = -torch.where(mask, rollout.sampling_logps.double(), 0.0).sum(-1)  # over each completion's own tokens
        share = {"result": dataclasses.replace(result, total=rewards.tolist()), "lengths": lengths.tolist(),
                 "truncated": rollout.truncated.tolist(), "nll": nll.tolist()}  # fmt: skip
        times = {"gen_time_s": gen_time, "reward_time_s": reward_time, "rollout": float(index)}
        metrics = {**rollout_statistics([{**share, "extra": {}}]), **times}  # this process's, for `process`
        t2 = time.perf_counter()
        tensors, extra = self.process(ScoredRollout(rollout, per_seq, rewards, metrics, trains), self.context)
        shares = [{**share, "extra": extra}]
        if self.world > 1:  # every process's share, in rank order (a collective: each process makes every rollout)
            from accelerate.utils import gather_object

            shares = gather_object(shares)
        self.say_failures(index, [s["result"] for s in shares])
        self.say_events(index, [s["result"] for s in shares])
        stats = rollout_statistics(shares)
        self.say_all_filtered(index, stats["truncated_fraction"])
        metrics = {**{k: v for k, v in stats.items() if k not in extra}, **times, **{k: stats[k] for k in extra}}
        metrics["prepare_time_s"] = time.perf_counter() - t2
        return tensors, metrics

    def score(self, index: int, rollout: Rollout, per_seq: list[PromptExample]):
        """The reward functions on a rollout (`RewardResult`): each sample with its prompt row's columns, plus
        `prompt_messages` and `truncated`. Stops a run whose rewards all fail (`check_reward_signal`); failures are
        said over every process's samples (`say_failures`)."""
        fallback = self.cfg.algorithm.reward_fallback
        columns = row_columns([e.columns for e in per_seq])  # every row's, None where a row lacks one
        # the full prompts as message lists (system and earlier turns included), for rewards that need them
        columns["prompt_messages"] = [e.messages or [{"role": "user", "content": e.prompt}] for e in per_seq]
        # which completions were cut by max_new_tokens: a reward model then scores them as unfinished turns
        columns["truncated"] = rollout.truncated.tolist()
        result = compute_rewards(
            self.rewards, [e.prompt for e in per_seq], rollout.texts, columns, fallback=fallback
        )
        self.check_reward_signal(index, result, len(per_seq))
        return result

    def say_failures(self, index: int, results: list) -> None:
        """Each reward function's first failure, once, over every process's samples of rollout `index` (`results`,
        in rank order: a failure on another process than the main one is said too), with its reason and where it
        happened; later failures are only counted in the metrics. A function whose batched call failed while every
        sample alone scored is said apart (it is called once per sample), and its first real failure still is."""
        if not self.accelerator.is_main_process:
            return
        n, default = sum(len(r.total) for r in results), self.cfg.algorithm.reward_fallback
        for reward in self.rewards:
            name = reward.name
            errored = [r for r in results if name in r.errors]
            if not errored:
                continue
            failed = sum(r.failures.get(name, 0) for r in results)
            first = next((r for r in errored if r.failures.get(name, 0)), errored[0])
            error, at = first.errors[name], (f" (at {first.sites[name]})" if name in first.sites else "")
            key = (name, "per-sample") if not failed else name  # said apart from a real failure, which may come later
            if key in self.warned:
                continue
            self.warned.add(key)
            if not failed:  # the batched call failed, every sample alone scored
                print(f"warning: reward {name!r}: its call on the {n} samples of rollout {index} failed ({error}{at}), "
                      "so it is called once per sample, and every sample scored that way; a function that returns one "
                      "value per completion is called once a rollout")  # fmt: skip
            else:
                got = (f"its fallback {reward.fallback:g}" if reward.fallback is not None
                       else f"algorithm.reward_fallback = {default}")  # fmt: skip
                print(f"warning: reward {name!r} failed on {failed} of {n} samples of rollout {index} (they got "
                      f"{got}): {error}{at}; further failures are only counted "
                      f"(reward/failures_{name} in metrics.jsonl)")  # fmt: skip

    def say_all_filtered(self, index: int, truncated: float) -> None:
        """Once a run: a rollout in which `overlong: filter` left every completion out of the loss (each one reached
        max_new_tokens) trains nothing, and its logged loss of 0 looks like any other; the summary counts such
        steps (`steps_without_tokens`)."""
        rc = self.cfg.algorithm.rollout
        if truncated < 1.0 or rc.overlong != "filter" or "all filtered" in self.warned:
            return
        self.warned.add("all filtered")
        if self.accelerator.is_main_process:
            print(f"warning: every completion of rollout {index} reached algorithm.rollout.max_new_tokens "
                  f"({rc.max_new_tokens}) and algorithm.rollout.overlong: filter leaves such completions out of the "
                  "loss, so this rollout trains nothing; raise max_new_tokens, or score cut completions (overlong: "
                  "score); the run's summary counts the steps that trained no token")  # fmt: skip

    def say_events(self, index: int, results: list) -> None:
        """What a reward function counts of its own (`RewardResult.events`: code_exec's timeouts), over every
        process's samples of rollout `index` (`results`): the first non-zero count of each is printed once, with the
        function's `event_notes`; the metrics count them all."""
        if not self.accelerator.is_main_process:
            return
        n, pooled = sum(len(r.total) for r in results), pooled_events(results)
        for reward in self.rewards:
            for event, count in pooled.get(reward.name, {}).items():
                if count and (reward.name, event) not in self.warned:
                    self.warned.add((reward.name, event))
                    what = (getattr(reward.fn, "event_notes", None) or {}).get(event, event)
                    print(f"warning: reward {reward.name!r}: {count} of {n} samples of rollout {index}: {what}; "
                          f"further ones are only counted (reward/{event}_{reward.name} in metrics.jsonl)")  # fmt: skip

    def check_reward_signal(self, index: int, result, n: int) -> None:
        """Stop the run (`UserError`, exit 2) after `DEAD_REWARD_ROLLOUTS` rollouts in a row in which every reward
        function failed on every sample; a rollout where any function scored any sample resets the count."""
        dead = bool(result.per_function) and all(result.failures.get(k, 0) == n for k in result.per_function)
        acc = self.accelerator
        if self.world > 1:  # all processes stop together, or the others would wait forever in an all-reduce
            flag = acc.reduce(torch.tensor(float(dead), device=acc.device), reduction="sum")
            dead = int(flag.item()) == self.world
        self.dead_rewards = [*self.dead_rewards, (index, result)] if dead else []
        if len(self.dead_rewards) < DEAD_REWARD_ROLLOUTS:
            return
        first = self.dead_rewards[0][1]  # the first rollout of the streak: where each function's failure began
        builtin = {r.name: r.builtin for r in self.rewards}
        lines = []
        for name in first.per_function:
            at = f" at {first.sites[name]}" if name in first.sites else " (built-in)" if builtin.get(name) else ""
            lines.append(f"  - {name!r}{at}: {first.errors.get(name, 'failed')}")
        rollouts = ", ".join(str(i) for i, _ in self.dead_rewards)
        raise NoRewardSignal(
            f"every reward function failed on every sample of {DEAD_REWARD_ROLLOUTS} rollouts in a row (rollouts "
            f"{rollouts}), so there is no reward signal left and the run stopped. First failure of each:\n"
            + "\n".join(lines)
        )

    # ---- the batch-source interface
    def state_dict(self) -> dict:
        """What a checkpoint must keep besides the weights (the step decides the data position): the method's
        state across rollouts, if it has one (PPO's adaptive KL coefficient), and the rollouts of a streak whose
        rewards all failed (each by its failures, errors and where they happened: what the stop's message names)."""
        state = self.context.state
        out = dict(state.state_dict()) if state is not None else {}
        if self.dead_rewards:
            out["dead_rewards"] = _streak_record(self.dead_rewards)
        if self.start is not None:  # what a resume that samples the current rollout anew goes on from
            index, before, streak = self.start
            out["rollout_start"] = {"rollout": index, "state": before, "dead_rewards": _streak_record(streak)}
        return out

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        self.dead_rewards = _streak(state.pop("dead_rewards", []))
        start = state.pop("rollout_start", None)
        if start is not None:
            self.start = (int(start["rollout"]), start["state"], _streak(start["dead_rewards"]))
        if self.context.state is not None and state:
            self.context.state.load_state_dict(state)

    def process_state(self, step: int) -> dict:
        """This process's share of the rollout a checkpoint after `step` falls inside (none at a rollout's end)."""
        index, within = divmod(step, self.steps_per_rollout)
        if within == 0 or self.current is None or self.current[0] != index:
            return {}
        _, tensors, metrics = self.current
        # clone: a view would save the whole storage it looks into
        return {"rollout": index, "tensors": {k: v.detach().cpu().clone() for k, v in tensors.items()},
                "metrics": metrics}  # fmt: skip

    def load_process_state(self, state: dict) -> None:
        if "rollout" in state:
            self.current = (int(state["rollout"]), state["tensors"], state["metrics"])

    def steps(self, start_step: int = 0) -> Iterator[Step]:
        index, within = divmod(start_step, self.steps_per_rollout)
        while True:
            restored = within > 0 and self.current is not None and self.current[0] == index  # by a resume
            if restored:
                _, tensors, metrics = self.current
            else:
                if within > 0 and self.start is not None and self.start[0] == index:  # made anew: from its start
                    _, before, self.dead_rewards = self.start
                    if self.context.state is not None and before:
                        self.context.state.load_state_dict(before)
                tensors, metrics = self.make_rollout(index)
                self.current = (index, tensors, metrics)
            for k, step in enumerate(self.split(tensors, index)[within:]):
                # every step of a rollout carries its rollout's statistics; the first one sampled here its cost
                timed = k == 0 and not restored
                carried = dict(metrics) if timed else {m: v for m, v in metrics.items() if not m.endswith("_time_s")}
                if not step.micro_batches:
                    # Every sequence was dropped (grpo.drop_uniform_groups) or has a zero gradient: nothing
                    # trains; its loss is the loop's per-unit mean of an empty sum (or of zeros).
                    carried["loss"] = 0.0
                yield Step(step.micro_batches, {**carried, **step.metrics}, step.skipped_units, step.skipped_rows)
            within = 0
            index += 1

    def split(self, tensors: dict[str, torch.Tensor], index: int) -> list[Step]:
        """`rollout.epochs` shuffled passes over the rollout, cut into steps and micro-batches (`Step`s, whose
        metrics say only what share of the step's rows was left untrained).

        Each pass is cut into `rollout.batch_size / optim.batch_size` steps of near-equal size (equal unless
        `grpo.drop_uniform_groups` removed sequences; a step left with none trains nothing and only logs). The rows
        the method marked `ZERO_GRADIENT` are left out of a step's micro-batches and their loss units counted in
        its `skipped_units` (their number: `skipped_rows`); a step holding no other row steps the optimiser on a
        zero gradient.
        """
        tensors = dict(tensors)
        inert = tensors.pop(ZERO_GRADIENT, None)
        inert = inert.tolist() if inert is not None else None  # (N,) bools, read row by row below
        n = next(iter(tensors.values())).shape[0]
        per_pass = self.steps_per_rollout // self.rollout_cfg.epochs
        steps: list[Step] = []
        for epoch in range(self.rollout_cfg.epochs):
            order = list(range(n))
            if epoch > 0:  # the first pass keeps the sampling order (on-policy when epochs == 1)
                random.Random(self.seed * 31 + index * 1_009 + epoch).shuffle(order)
            bounds = [round(k * n / per_pass) for k in range(per_pass + 1)]
            for lo, hi in zip(bounds[:-1], bounds[1:]):
                idx, skipped, left, metrics = order[lo:hi], 0.0, [], {}
                if inert is not None:
                    left = [i for i in idx if inert[i]]
                    idx = [i for i in idx if not inert[i]]
                    if left:
                        skipped = float(self.loss_units({k: v[left] for k, v in tensors.items()}, self.cfg))
                    metrics["skipped_fraction"] = len(left) / max(len(left) + len(idx), 1)
                micro = [trim({k: v[idx[m : m + self.micro]] for k, v in tensors.items()})
                         for m in range(0, len(idx), self.micro)]  # fmt: skip
                steps.append(Step(micro, metrics, skipped, len(left)))
        return steps
