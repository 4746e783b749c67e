"""Preference evaluation: how a model ranks held-out (chosen, rejected) pairs, and a reward model as a judge.

`preference_accuracy` scores every pair with the policy and with a reference (the adapter-disabled base for an
adapter, or a given reference model) and reports:

- ``implicit_accuracy``: the share of pairs whose DPO implicit reward beta * (log pi - log pi_ref) is higher for
  the chosen side (Rafailov et al. 2023, sec. 5); ties count 1/2, so a policy equal to its reference reads 0.5;
- ``implicit_margin``: the mean of (chosen reward - rejected reward);
- ``logp_accuracy`` and ``ref_logp_accuracy``: the share of pairs where the chosen response is the more likely
  one (summed log-probability) under the policy and under the reference: what the model itself prefers, with
  no reference subtracted (long rejected responses make this easy, hence also ``*_mean_logp_accuracy``, per
  token).

`judge_scores` runs a trained reward model (`posttrain train` with `algorithm.name: reward`) over completions, and
`reward_model_accuracy` ranks the pairs with one: its scores are what it learnt, where the DPO implicit reward of
its backbone would read a model that was never trained to write (chance, or worse). This module loads nothing by
itself (but the reward model those two are given) and trains nothing.

Letters: B pairs.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from functools import partial

import torch
from tqdm.auto import tqdm

from posttrain.algorithms.reward import pair_accuracy
from posttrain.data import plain_messages
from posttrain.data.preference import collate_pairs, render_preference_dataset
from posttrain.errors import UserError
from posttrain.evaluation import format_table
from posttrain.models import is_adapter_model
from posttrain.models.heads import RewardModelScorer
from posttrain.models.logprobs import selected_token_logps


@torch.no_grad()
def pair_logps(
    model, pairs, collate, *, batch_size: int = 8, progress: str | None = None
) -> tuple[torch.Tensor, ...]:
    """Summed log-probabilities and scored-token counts of each pair's sides: four (B,) float tensors
    (chosen_logps, rejected_logps, chosen_tokens, rejected_tokens), one forward per `batch_size` pairs.
    `progress`: the label of a progress bar on stderr counting pairs (None: no bar)."""
    device = next(model.parameters()).device
    out: list[list[torch.Tensor]] = [[], [], [], []]
    with tqdm(total=len(pairs), desc=progress, unit="pair", dynamic_ncols=True, file=sys.stderr,
              disable=progress is None) as bar:  # fmt: skip
        for s in range(0, len(pairs), batch_size):
            batch = collate(list(pairs[s : s + batch_size]))
            inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
            mask = batch["loss_mask"].to(device)
            logps, _ = selected_token_logps(model, inputs, mask)  # (2b, T)
            b = logps.shape[0] // 2
            seq = logps.sum(-1).float().cpu()
            counts = mask[:, 1:].sum(-1).float().cpu()
            for lst, t in zip(out, (seq[:b], seq[b:], counts[:b], counts[b:])):
                lst.append(t)
            bar.update(b)
    return tuple(torch.cat(x) for x in out)


def _rate(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    return float(pair_accuracy(chosen, rejected).mean())


def preference_accuracy(
    model, tokenizer, rows: Sequence[dict], *, reference=None, beta: float = 0.1, max_length: int = 512,
    source: str = "pairs", batch_size: int = 8, per_pair: list[dict] | None = None, progress: bool = False,
    per_token: bool = False,
) -> dict[str, float]:  # fmt: skip
    """Rank held-out preference rows with the policy and its reference (module docstring). `model` may be an
    adapter model (its reference is the adapter disabled) or a full model with `reference` given.
    `per_pair`, when given, receives each pair's implicit rewards and summed log-probabilities (`chosen_reward`,
    `rejected_reward`, `chosen_logp`, `rejected_logp`, `ref_chosen_logp`, `ref_rejected_logp`); `progress`
    shows a bar on stderr for each pass over the pairs. `per_token`: the implicit rewards from log-probabilities
    averaged over each response's tokens, as an IPO run with `ipo_logps: mean` trains them (its logged margin is
    of those; summed, the same model reads a margin several times larger)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pairs = render_preference_dataset(tokenizer, rows, max_length=max_length, source=source, allow_identical=True)
    collate = partial(collate_pairs, pad_id=pad)
    was_training = model.training
    model.eval()
    policy_bar, reference_bar = ("pairs (policy)", "pairs (reference)") if progress else (None, None)
    try:
        pc, pr, nc, nr = pair_logps(model, pairs, collate, batch_size=batch_size, progress=policy_bar)
        if reference is model:  # a model compared with itself (e.g. the base before training): one pass
            rc, rr = pc, pr
        elif reference is not None:
            rc, rr, _, _ = pair_logps(reference, pairs, collate, batch_size=batch_size, progress=reference_bar)
        elif is_adapter_model(model):
            with model.disable_adapter():
                rc, rr, _, _ = pair_logps(model, pairs, collate, batch_size=batch_size, progress=reference_bar)
        else:
            raise UserError(
                "preference accuracy needs a reference: the model is not an adapter, so give the base model "
                "it was trained from (--reference)"
            )
    finally:
        model.train(was_training)
    if per_token:
        chosen_rewards, rejected_rewards = beta * (pc - rc) / nc.clamp(min=1), beta * (pr - rr) / nr.clamp(min=1)
    else:
        chosen_rewards, rejected_rewards = beta * (pc - rc), beta * (pr - rr)
    if per_pair is not None:
        columns = {"chosen_reward": chosen_rewards, "rejected_reward": rejected_rewards, "chosen_logp": pc,
                   "rejected_logp": pr, "ref_chosen_logp": rc, "ref_rejected_logp": rr}  # fmt: skip
        per_pair.extend({k: float(v[i]) for k, v in columns.items()} for i in range(len(pairs)))
    return {
        "n": float(len(pairs)),
        "implicit_accuracy": _rate(chosen_rewards, rejected_rewards),
        "implicit_margin": float((chosen_rewards - rejected_rewards).mean()),
        "logp_accuracy": _rate(pc, pr),
        "ref_logp_accuracy": _rate(rc, rr),
        "mean_logp_accuracy": _rate(pc / nc.clamp(min=1), pr / nr.clamp(min=1)),
        "ref_mean_logp_accuracy": _rate(rc / nc.clamp(min=1), rr / nr.clamp(min=1)),
    }


def pair_records(rows: Sequence[dict], per_pair: Sequence[dict]) -> list[dict]:
    """One JSON-ready record per ranked pair, as `posttrain evaluate --pairs --out` writes them: `index`, `id`
    when the row has one, `prompt`, `chosen` and `rejected` (strings when they are one message), then the
    pair's `per_pair` values from `preference_accuracy`.

    >>> row = {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", "content": "4"}],
    ...        "rejected": [{"role": "assistant", "content": "5"}]}
    >>> pair_records([row], [{"chosen_reward": 0.5}])
    [{'index': 0, 'prompt': '2+2?', 'chosen': '4', 'rejected': '5', 'chosen_reward': 0.5}]
    """
    return [
        {"index": i, **({"id": row["id"]} if "id" in row else {}), "prompt": plain_messages(row["prompt"], "user"),
         "chosen": plain_messages(row["chosen"], "assistant"), "rejected": plain_messages(row["rejected"], "assistant"),
         **values}
        for i, (row, values) in enumerate(zip(rows, per_pair, strict=True))
    ]  # fmt: skip


def reward_model_accuracy(
    reward_model: str, rows: Sequence[dict], *, per_pair: list[dict] | None = None,
) -> dict[str, float]:  # fmt: skip
    """Rank preference rows with a trained reward model: each side rendered as the reward run trained it (the
    prompt's messages, then the side's, through the chat template; `RewardModelScorer`) and scored at its last
    token. ``reward_accuracy``: the share of pairs whose chosen side scores higher (ties count 1/2, as the reward
    run's own `accuracy`); ``reward_margin``: the mean of chosen - rejected; ``chosen_score_mean`` and
    ``rejected_score_mean``. A pair with a side the model cannot score (longer than its positions) is left out and
    counted (``unscored_pairs``); `per_pair` receives each pair's ``chosen_score`` and ``rejected_score``."""
    scorer = RewardModelScorer(reward_model)
    sides: dict[str, list[float]] = {}
    for side in ("chosen", "rejected"):
        prompts, answers = [], []
        for row in rows:  # an answer of several messages: all but its last join the prompt
            turns = list(row[side]) if isinstance(row[side], list) else [{"role": "assistant", "content": row[side]}]
            prompt = list(row["prompt"]) if isinstance(row["prompt"], list) else [{"role": "user", "content": row["prompt"]}]
            prompts.append(prompt + turns[:-1])
            answers.append(turns[-1]["content"])
        sides[side] = scorer(prompts, answers)
    chosen, rejected = torch.tensor(sides["chosen"]), torch.tensor(sides["rejected"])
    if per_pair is not None:
        per_pair.extend({"chosen_score": float(c), "rejected_score": float(r)} for c, r in zip(chosen, rejected))
    scored = ~(chosen.isnan() | rejected.isnan())
    if not bool(scored.any()):
        raise UserError(f"the reward model {reward_model} could not score any pair: {next(iter(scorer.unscored.values()))}")
    chosen, rejected = chosen[scored], rejected[scored]
    return {
        "n": float(len(chosen)),
        "reward_accuracy": _rate(chosen, rejected),
        "reward_margin": float((chosen - rejected).mean()),
        "chosen_score_mean": float(chosen.mean()),
        "rejected_score_mean": float(rejected.mean()),
        **({"unscored_pairs": float(len(rows) - len(chosen))} if len(chosen) < len(rows) else {}),
    }


def judge_scores(
    reward_model: str, prompts: list, completions: list[str], truncated: list[bool] | None = None
) -> list[float]:
    """Scores of a trained reward model folder for each (prompt, completion); `truncated` flags the answers cut at
    the generation limit, scored as unfinished turns as RL training scores them (`RewardModelScorer`): scored as
    closed turns they read as answers that chose to end there."""
    return [float(x) for x in RewardModelScorer(reward_model)(prompts, completions, truncated)]


def format_preference(results: dict[str, dict[str, float]], intervals: dict | None = None) -> str:
    """A markdown table of `preference_accuracy` results, one column per model (the metrics in alphabetical order,
    `n` last), with one model's `intervals` beside it (`evaluation.format_table`).

    >>> print(format_preference({"base": {"n": 4.0, "implicit_accuracy": 0.5}}))
    | metric | base |
    |---|---|
    | implicit_accuracy | 50.0% |
    | n | 4 |
    """
    return format_table(results, intervals, order=lambda keys: sorted(keys, key=lambda k: (k == "n", k)))
