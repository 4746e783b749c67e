"""The rollout batch source: a generator that samples from the current policy and yields training batches.

Every `steps_per_rollout` optimisation steps it takes the next prompts (deterministic order from `run.seed`,
sharded over processes), samples `G` completions per prompt with an engine, scores them with the reward
functions, lets the algorithm turn the rollout into per-sequence training tensors (GRPO: group advantages;
PPO: values, KL-shaped rewards, GAE), then yields `rollout.epochs` shuffled passes over it, cut into optimisation
steps of `optim.batch_size` sequences and micro-batches of `optim.micro_batch_size`.

Truncated completions get the treatment `rollout.overlong` names (`rollout/overlong.py`): the reward functions see
which ones were truncated (a `truncated` column), their rewards may be replaced or penalised, and their rows may
carry no loss (`ScoredRollout.trains`). When every reward function fails on every sample for
`DEAD_REWARD_ROLLOUTS` rollouts in a row, the run stops with a `UserError` naming each function and where its
first failure happened: there is no reward signal left to learn from.

Generation time and reward statistics ride along as step metrics (`STEP_METRICS`), so the loop logs
`gen_time_s` apart from the training time. It does not compute any loss (see `algorithms/grpo.py`, `ppo.py`).

Every prompt is sampled once per epoch (`plan_rollouts`): the last rollout of an epoch takes the prompts left
over and is smaller, unless some process's share of them could not fill each of its optimisation steps with at
least one sequence; then they are skipped in that epoch, and the run says how many and which before training.

Resuming: the step number fixes which prompts come next, but rollouts are sampled from the model being trained,
so a resumed run continues with fresh rollouts from the restored weights (a run resumed mid-rollout samples the
rest of that rollout anew). RL resumption is therefore not bit-for-bit, unlike SFT and DPO.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from posttrain.algorithms.base import STEP_METRICS, SourceContext
from posttrain.errors import ConfigError, UserError
from posttrain.rollout.engine import Rollout, get_engine
from posttrain.rollout.overlong import OVERLONG
from posttrain.rollout.samples import SampleLog
from posttrain.trainer.batches import EpochPlan, epoch_order
from posttrain.trainer.checkpoint import latest_checkpoint

DEAD_REWARD_ROLLOUTS = 3
"""Consecutive rollouts in which every reward function failed on every sample before the run stops (one such
rollout can be a passing outage, e.g. a sandbox short of memory; three in a row is a broken reward)."""
ADDED_COLUMNS = ("prompt_messages", "truncated")
"""Columns the rollout adds for the reward functions; a prompts file may not use these names."""


@dataclass
class PromptExample:
    """One prompt row, rendered: its ids (chat template + generation prompt), its text and its other columns."""

    prompt_ids: list[int]
    prompt: str
    columns: dict[str, Any]
    messages: list[dict] | None = (
        None  # the whole prompt as chat messages (a reward model scores all of them)
    )
    line: int | None = None  # where the row is in data.train (to name prompts a run does not sample)


@dataclass
class ScoredRollout:
    rollout: Rollout
    examples: list[PromptExample]  # one per sequence (repeated G times)
    rewards: torch.Tensor  # (N,) weighted total, after the `rollout.overlong` treatment
    metrics: dict[str, float]
    trains: torch.Tensor  # (N,) bool: the sequences that carry loss (`overlong: filter` drops truncated ones)


# process(scored, ctx) -> (tensors with a leading N dimension, extra step metrics)
Process = Callable[[ScoredRollout, SourceContext], tuple[dict[str, torch.Tensor], dict[str, float]]]


def sequence_tensors(r: Rollout) -> dict[str, torch.Tensor]:
    """Prompt and completion side by side, (N, P + C), with the positions `generate` used.

    `completion_mask` here is full width (0 over the prompt), aligned with `input_ids`: 1 on the tokens the
    policy generated, the ones the RL losses score. `sampling_logps` too (0 over the prompt): the sampler's
    log-probs, for the sampler/trainer gap (`common.logp_gap`).
    """
    input_ids = torch.cat([r.prompt_ids, r.completion_ids], dim=1)
    attention_mask = torch.cat([r.prompt_mask, r.completion_mask], dim=1)
    # Left-padded prompts: positions count real tokens only, as generate computed them for the KV cache.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    completion_mask = torch.cat([torch.zeros_like(r.prompt_mask), r.completion_mask], dim=1)
    prompt_zeros = torch.zeros_like(r.prompt_mask, dtype=torch.float32)
    sampling_logps = torch.cat([prompt_zeros, r.sampling_logps], dim=1)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "completion_mask": completion_mask,
        "sampling_logps": sampling_logps,
    }


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


def plan_rollouts(cfg, n: int, world_size: int, micro_batch_size: int, *, group_size: int) -> EpochPlan:
    """How each epoch of `n` prompts is cut into rollouts; refuses what cannot run (before any model loads).

    A rollout takes `rollout.batch_size / group_size` prompts. The prompts left over at the end of an epoch make
    a smaller last rollout when every process's share of them, `group_size` sequences each, still gives each of
    its `rollout.batch_size / optim.batch_size` steps per pass at least one sequence (a process with an empty
    step would skip the gradient all-reduce the others wait in; one process would run a step that trains nothing).
    """
    alg = cfg.algorithm
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
    return EpochPlan(n, prompts, full + (rest > 0), steps_per_rollout(cfg))


class RolloutSource:
    """Rollout generator with the batch-source signature: `source(start_step)` yields each step's micro-batches."""

    def __init__(self, ctx: SourceContext, *, group_size: int, process: Process, stateful=None):
        from posttrain.rewards import build_reward_functions, parse_reward_specs

        cfg, acc = ctx.cfg, ctx.accelerator
        self.ctx, self.process, self.G = ctx, process, group_size
        self.stateful = stateful  # e.g. PPO's KL controller: has state_dict() / load_state_dict(); checkpointed
        alg = cfg.algorithm
        self.rollout_cfg = alg.rollout
        self.world, self.rank = acc.num_processes, acc.process_index
        self.rollout_size = alg.rollout.batch_size or cfg.optim.batch_size  # sequences, all processes
        self.prompts: list[PromptExample] = list(ctx.data.train)
        self.plan = plan_rollouts(cfg, len(self.prompts), self.world, ctx.micro_batch_size, group_size=group_size)
        self.prompts_per_rollout = self.plan.unit
        self.micro = ctx.micro_batch_size
        self.steps_per_rollout = steps_per_rollout(cfg)
        self.rollouts_per_epoch = self.plan.units_per_epoch  # the last one may hold fewer prompts
        self.steps_per_epoch = self.plan.steps_per_epoch
        self.rewards = build_reward_functions(parse_reward_specs(reward_specs(cfg)))
        self.warned: set[str] = set()  # reward functions whose first failure was already printed
        self.dead_rewards: list[tuple[int, Any]] = []  # (rollout, RewardResult) of consecutive dead rollouts
        self.engine = get_engine(alg.rollout.engine)
        self.seed = cfg.run.seed
        self.samples = SampleLog.for_run(ctx, self.steps_per_rollout, self.steps_per_epoch)  # RUN/samples.jsonl

    # ---- prompts
    def rollout_prompts(self, index: int) -> list[PromptExample]:
        """This process's prompts for rollout `index`: a seeded permutation per epoch, then sharded."""
        epoch, within = divmod(index, self.rollouts_per_epoch)
        order = epoch_order(len(self.prompts), self.seed, epoch, self.ctx.cfg.data.shuffle)
        chunk = order[within * self.prompts_per_rollout : (within + 1) * self.prompts_per_rollout]
        return [self.prompts[i] for i in chunk[self.rank :: self.world]]

    # ---- one rollout: sample, score, process
    def make_rollout(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        from posttrain.rewards import reward_metrics

        ctx, rc = self.ctx, self.rollout_cfg
        examples = self.rollout_prompts(index)
        model = ctx.accelerator.unwrap_model(ctx.model)
        policy = getattr(model, "policy", model)  # PPO wraps the policy with a value head
        t0 = time.perf_counter()
        rollout = self.engine.generate(
            policy,
            ctx.tokenizer,
            [e.prompt_ids for e in examples],
            n=self.G,
            max_new_tokens=rc.max_new_tokens,
            temperature=rc.temperature,
            top_p=rc.top_p,
            stop=list(rc.stop),
            seed=self.seed * 7_919 + index * self.world + self.rank,
            batch_size=rc.generation_batch_size,
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
        lengths = lengths.float()
        metrics = {
            # reward/total_*: the rewards the algorithm uses, after the overlong treatment
            **reward_metrics(dataclasses.replace(result, total=rewards.tolist())),
            "completion_length_mean": float(lengths.mean()),
            "completion_length_max": float(lengths.max()),
            "truncated_fraction": float(rollout.truncated.float().mean()),
            "gen_time_s": gen_time,
            "reward_time_s": reward_time,
            "rollout": float(index),
        }
        t2 = time.perf_counter()
        tensors, extra = self.process(ScoredRollout(rollout, per_seq, rewards, metrics, trains), ctx)
        metrics.update(extra)
        metrics["prepare_time_s"] = time.perf_counter() - t2
        return tensors, metrics

    def score(self, index: int, rollout: Rollout, per_seq: list[PromptExample]):
        """The reward functions on a rollout (`RewardResult`): each sample with its prompt row's columns, plus
        `prompt_messages` and `truncated`. Prints each function's first failure once; stops a run whose rewards all
        fail (`check_reward_signal`)."""
        from posttrain.rewards import compute_rewards

        fallback = self.ctx.cfg.algorithm.reward_fallback
        columns: dict[str, list] = {}
        for key in per_seq[0].columns if per_seq else []:
            columns[key] = [e.columns.get(key) for e in per_seq]
        # the full prompts as message lists (system and earlier turns included), for rewards that need them
        columns["prompt_messages"] = [e.messages or [{"role": "user", "content": e.prompt}] for e in per_seq]
        # which completions were cut by max_new_tokens: a reward model then scores them as unfinished turns
        columns["truncated"] = rollout.truncated.tolist()
        result = compute_rewards(
            self.rewards, [e.prompt for e in per_seq], rollout.texts, columns, fallback=fallback
        )
        self.check_reward_signal(index, result, len(per_seq))
        for name, error in result.errors.items():  # counts go to the metrics; the reason is printed once
            if name not in self.warned and self.ctx.accelerator.is_main_process:
                self.warned.add(name)
                at = f" (at {result.sites[name]})" if name in result.sites else ""
                print(
                    f"warning: reward {name!r} failed on {result.failures.get(name, 0)} of {len(per_seq)} samples "
                    f"of rollout {index} (they got algorithm.reward_fallback = {fallback}): {error}{at}; further "
                    f"failures are only counted (reward/failures_{name} in metrics.jsonl)"
                )
        return result

    def check_reward_signal(self, index: int, result, n: int) -> None:
        """Stop the run (`UserError`, exit 2) after `DEAD_REWARD_ROLLOUTS` rollouts in a row in which every reward
        function failed on every sample; a rollout where any function scored any sample resets the count."""
        dead = bool(result.per_function) and all(result.failures.get(k, 0) == n for k in result.per_function)
        acc = self.ctx.accelerator
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
        ckpt = latest_checkpoint(self.ctx.run_dir)
        kept = (
            f"The last checkpoint, {ckpt}, is kept: fix the reward and continue from it with --resume."
            if ckpt
            else "No checkpoint had been written yet."
        )
        rollouts = ", ".join(str(i) for i, _ in self.dead_rewards)
        raise UserError(
            f"every reward function failed on every sample of {DEAD_REWARD_ROLLOUTS} rollouts in a row (rollouts "
            f"{rollouts}), so there is no reward signal left and the run stopped. First failure of each:\n"
            + "\n".join(lines)
            + f"\n{kept} No final model was written."
        )

    # ---- the batch-source interface
    def state_dict(self) -> dict:
        """What a checkpoint must keep besides the weights (the step decides the data position)."""
        return self.stateful.state_dict() if self.stateful is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.stateful is not None:
            self.stateful.load_state_dict(state)

    def __call__(self, start_step: int = 0) -> Iterator[list[dict[str, Any]]]:
        index, within = divmod(start_step, self.steps_per_rollout)
        while True:
            tensors, metrics = self.make_rollout(index)
            steps = self.split(tensors, index)
            for k, step in enumerate(steps[within:]):
                # every step of a rollout carries its rollout's statistics; the first one also its cost
                carried = (
                    dict(metrics)
                    if k == 0
                    else {m: v for m, v in metrics.items() if not m.endswith("_time_s")}
                )
                if not step:
                    # Every sequence was dropped (grpo.drop_uniform_groups): nothing trains and the step only
                    # logs; its loss is the loop's per-unit mean of an empty sum.
                    carried["loss"] = 0.0
                yield [*step, {STEP_METRICS: carried}]
            within = 0
            index += 1

    def split(self, tensors: dict[str, torch.Tensor], index: int) -> list[list[dict[str, Any]]]:
        """`rollout.epochs` shuffled passes over the rollout, cut into steps and micro-batches.

        Each pass is cut into `rollout.batch_size / optim.batch_size` steps of near-equal size (equal unless
        `grpo.drop_uniform_groups` removed sequences; a step left with none trains nothing and only logs).
        """
        n = next(iter(tensors.values())).shape[0]
        per_pass = self.steps_per_rollout // self.rollout_cfg.epochs
        steps: list[list[dict[str, Any]]] = []
        for epoch in range(self.rollout_cfg.epochs):
            order = list(range(n))
            if epoch > 0:  # the first pass keeps the sampling order (on-policy when epochs == 1)
                random.Random(self.seed * 31 + index * 1_009 + epoch).shuffle(order)
            bounds = [round(k * n / per_pass) for k in range(per_pass + 1)]
            for lo, hi in zip(bounds[:-1], bounds[1:]):
                idx = order[lo:hi]
                steps.append(
                    [
                        trim({k: v[idx[m : m + self.micro]] for k, v in tensors.items()})
                        for m in range(0, len(idx), self.micro)
                    ]
                )
        return steps


def prepare_prompts(cfg, tokenizer):
    """Read and render the prompts file of an RL run (`data.train`, rows with `prompt` and any other columns).

    Other columns (e.g. `answer`, `tests`) are passed to the reward functions. A prompt that leaves no room for
    `rollout.max_new_tokens` within `data.max_length` is an error naming its line, before any model loads.
    """
    from posttrain.algorithms.base import PreparedData
    from posttrain.data import load_rows
    from posttrain.data.render import render_prompt
    from posttrain.errors import DataError, Problem
    from posttrain.rewards import build_reward_functions, parse_reward_specs

    if not cfg.data.train:
        raise ConfigError(
            "data.train is not set: give a prompts file (e.g. `posttrain data make --kind prompts`)"
        )
    # A bad spec, user file or built-in's args fail here, before the model loads (the functions are built again,
    # cheaply, by the rollout source; a reward model loads on its first call).
    specs = parse_reward_specs(reward_specs(cfg))
    build_reward_functions(specs)
    rows = load_rows(cfg.data.train, "prompts")
    check_reward_inputs(specs, rows, cfg.data.train)
    room = cfg.data.max_length - cfg.algorithm.rollout.max_new_tokens
    examples, problems = [], []
    for row in rows:
        ids = render_prompt(tokenizer, row)
        if len(ids) > room:
            problems.append(
                Problem(
                    cfg.data.train,
                    getattr(row, "line", None),
                    "prompt",
                    f"prompt is {len(ids)} tokens; data.max_length ({cfg.data.max_length}) minus "
                    f"algorithm.rollout.max_new_tokens ({cfg.algorithm.rollout.max_new_tokens}) leaves {room}",
                )
            )
            continue
        reserved = [k for k in ADDED_COLUMNS if k in row]
        if reserved:
            problems.append(Problem(cfg.data.train, getattr(row, "line", None), reserved[0], (
                "this column name is reserved: the rollout passes its own to the reward functions (docs/rewards.md); "
                "rename it")))  # fmt: skip
            continue
        msgs = row["prompt"]
        text = next((m["content"] for m in reversed(msgs) if m["role"] == "user"), msgs[-1]["content"])
        columns = {k: v for k, v in row.items() if k != "prompt"}
        line = getattr(row, "line", None)
        examples.append(PromptExample(prompt_ids=ids, prompt=text, columns=columns, messages=list(msgs), line=line))
    if problems:
        raise DataError(problems, header=f"{cfg.data.train}: prompts this run cannot use:")
    lines = [(e.line,) for e in examples] if all(e.line is not None for e in examples) else None
    return PreparedData(train=examples, collate=lambda items: items, notes=[], train_lines=lines)


def reference_logps(ctx, tensors: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
    """log pi_ref of the completion tokens: the base with the adapter disabled, or a frozen copy (full)."""
    from posttrain.models import is_adapter_model

    model = ctx.accelerator.unwrap_model(ctx.model)
    policy = getattr(model, "policy", model)
    if is_adapter_model(policy):
        with policy.disable_adapter():
            return batched_logps(policy, tensors, ctx.micro_batch_size, temperature)
    ref = getattr(ctx, "reference", None)
    if ref is None:
        from posttrain.models import load_model

        ref = ctx.reference = load_model(  # held as the policy's weights are, so step 0's KL is exactly 0
            ctx.cfg.model, ctx.cfg.technique, device=ctx.accelerator.device, train=False, as_trained=True
        )
    return batched_logps(ref, tensors, ctx.micro_batch_size, temperature)


@torch.no_grad()
def batched_logps(model, tensors: dict[str, torch.Tensor], micro: int, temperature: float) -> torch.Tensor:
    """Completion-token log-probs (N, T) of a whole rollout, `micro` sequences per forward, no gradient."""
    from posttrain.models.logprobs import selected_token_logps

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for s in range(0, tensors["input_ids"].shape[0], micro):
            part = {
                k: tensors[k][s : s + micro].to(device)
                for k in ("input_ids", "attention_mask", "position_ids")
            }
            lp, _ = selected_token_logps(
                model, part, tensors["completion_mask"][s : s + micro].to(device), temperature=temperature
            )
            out.append(lp.cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def reward_specs(cfg) -> list:
    """`algorithm.rewards`, plus the trained reward model of `algorithm.reward_model` when one is set."""
    return cfg.algorithm.reward_specs()


# Built-in rewards that read a column of the prompt rows, and the default name of that column.
_COLUMNS = {"numeric_answer": "answer", "exact_match": "answer", "task": "answer", "code_exec": "tests"}


def check_reward_inputs(specs, rows, source: str) -> None:
    """What a reward will need and the data or a folder cannot give, found before the model loads (otherwise every
    sample would get the fallback and the run would learn nothing): a missing column, a `task` reward with no
    task to read, a reward-model folder that is not one."""
    from posttrain.errors import DataError, Problem
    from posttrain.models.heads import reward_model_problem

    problems = []
    for spec in specs:
        if not spec.builtin:
            continue
        if spec.name == "reward_model":
            why = reward_model_problem(spec.args.get("path", ""))
            if why:
                raise ConfigError(f"{spec.where} (reward_model): {why}")
            continue
        needed = []
        if spec.name in _COLUMNS:
            needed.append(spec.args.get("column", _COLUMNS[spec.name]))
        if spec.name == "json_schema" and spec.args.get("schema") is None:
            needed.append(spec.args.get("column", "schema"))
        for column in needed:
            missing = next((r for r in rows if column not in r), None)
            if missing is not None:
                have = ", ".join(sorted(k for k in missing if k != "prompt")) or "none"
                problems.append(Problem(source, getattr(missing, "line", None), column,
                                        f"missing: reward {spec.label!r} ({spec.where}) reads it; this row has: {have}"))  # fmt: skip
        if spec.name == "task" and spec.args.get("task") is None:
            bad = next(
                (r for r in rows if "task" not in r and not (r.get("metadata") or {}).get("task")), None
            )
            if bad is not None:
                problems.append(Problem(source, getattr(bad, "line", None), "metadata.task", (
                    f"reward {spec.label!r} ({spec.where}) has no args.task, so each row must name its task in a "
                    "`task` column or metadata.task; give args: {task: arithmetic} or add the column")))  # fmt: skip
    if problems:
        raise DataError(problems, header=f"{source}: the rewards cannot score these rows:")
