"""Reward modelling: the Bradley-Terry pairwise loss on scalar scores of a chosen and a rejected completion.

Bradley & Terry 1952 model the probability that the chosen completion wins as sigma(r_chosen - r_rejected);
a reward model is trained by maximum likelihood of the human choices (Ouyang et al. 2022, InstructGPT, eq. 1):

    loss = -log sigma(r(x, y_chosen) - r(x, y_rejected) - m)

where m is an optional margin (Touvron et al. 2023, Llama 2, eq. 2: a larger margin for pairs that annotators
rated as clearly different, so the model must separate them by at least m). Losses come back per pair,
unreduced: a loss function sums them and the loop divides by the number of pairs of the whole step.

This section is the math only: scores in, per-pair terms out; no model, data or I/O.

Letters: B batch (pairs).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from posttrain.algorithms.base import Algorithm
from posttrain.config import AlgorithmSection
from posttrain.data.preference import prepare_pairs
from posttrain.data.render import lines_text
from posttrain.errors import ConfigError


class Config(AlgorithmSection):
    """`algorithm: {name: reward}`: a Bradley-Terry reward model on preference pairs (docs/preference.md)."""

    name: Literal["reward"] = "reward"
    """A reward model: a scalar head on the language model, trained on (prompt, chosen, rejected) pairs."""
    data_kind: ClassVar[str] = "preference"
    margin: bool = False
    """Use the pairs' `margin` column in the Bradley-Terry loss (Llama 2): the chosen score must beat the rejected
    one by at least the margin."""

    run_fields: ClassVar[frozenset[str]] = frozenset({"data.eval", "optim.head_lr"})


def bradley_terry_loss(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    *,
    margin: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Per-pair Bradley-Terry loss -log sigma(chosen - rejected - margin).

    chosen_scores, rejected_scores: (B,) scalar rewards. margin: None (= 0), a float, or (B,) per pair.
    Returns (B,).

    Worked example: chosen 2, rejected 1 -> -log sigma(1) = log(1 + e^-1) = 0.3133;
    with margin 1 -> -log sigma(0) = log 2 = 0.6931.

    >>> bradley_terry_loss(torch.tensor([2.0, 2.0]), torch.tensor([1.0, 1.0]), margin=torch.tensor([0.0, 1.0]))
    tensor([0.3133, 0.6931])
    """
    logits = chosen_scores - rejected_scores  # (B,)
    if margin is not None:
        logits = logits - margin
    # logsigmoid, not log(sigmoid(.)): stays finite for large negative logits.
    return -F.logsigmoid(logits)


def pair_accuracy(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Per-pair preference accuracy (B,) float: 1 where chosen > rejected, 0 where lower, 0.5 for a tie.

    A tie counts 0.5, the expected accuracy of breaking it at random: a model that scores everything equal
    (e.g. at initialisation with a zeroed head) reads as chance, 0.5, rather than as always wrong (0) or
    always right (1). The mean over pairs is the reported accuracy.

    >>> pair_accuracy(torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 3.0, 1.0]))
    tensor([1.0000, 0.0000, 0.5000])
    """
    wins = (chosen_scores > rejected_scores).float()
    ties = (chosen_scores == rejected_scores).float()
    return wins + 0.5 * ties


# ---------------------------------------------------------------------------------------------------------------
# On the shared loop: the same pairs as DPO (`data.preference.prepare_pairs`), one concatenated forward of a
# causal LM with a scalar head (`head="reward"`: `models.heads.ScalarHeadModel`), the score read at each
# sequence's last token, Bradley-Terry loss.


def _last_token_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool, True at each right-padded row's last real token."""
    last = attention_mask.long().sum(-1) - 1  # (B,)
    keep = torch.zeros_like(attention_mask, dtype=torch.bool)
    keep[torch.arange(keep.shape[0], device=keep.device), last.clamp(min=0)] = True
    return keep


def loss_units(batch, cfg=None) -> int:
    """Pairs."""
    return batch["input_ids"].shape[0] // 2


def loss_fn(model, batch, cfg) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    B = loss_units(batch)
    keep = _last_token_mask(batch["attention_mask"])
    scores, _ = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], keep=keep
    )  # (2B,)
    chosen, rejected = scores[:B], scores[B:]
    margin = batch["margin"] if cfg.algorithm.margin and "margin" in batch else None
    losses = bradley_terry_loss(chosen, rejected, margin=margin)
    diff = (chosen - rejected).detach()
    return losses.sum(), {
        "accuracy": pair_accuracy(chosen.detach(), rejected.detach()).sum(),
        "margin": diff.sum(),
        "chosen_score": chosen.detach().sum(),
        "rejected_score": rejected.detach().sum(),
    }


def prepare(cfg, tokenizer):
    """The same pairs as DPO; `algorithm.margin` must find margins to use, and unused margins are noted."""
    data = prepare_pairs(cfg, tokenizer)
    with_margin = sum(1 for p in data.train if p.margin)
    if cfg.algorithm.margin and not with_margin:
        raise ConfigError(
            f"algorithm.margin is true, but no pair of {cfg.data.train} has a nonzero `margin`, so it would "
            "change nothing; add a `margin` column (how much better the chosen response is) or remove the setting"
        )
    without = [data.train_lines[i][0] for i, p in enumerate(data.train) if p.margin is None]
    if cfg.algorithm.margin and without:
        data.notes.append(f"{cfg.data.train}: {len(without)} of {len(data.train)} pairs have no `margin` "
                          f"({lines_text(without, noun=data.train_noun)}): their margin is 0 in the loss")  # fmt: skip
    if with_margin and not cfg.algorithm.margin:
        data.notes.append(
            f"{cfg.data.train}: {with_margin} pairs have a `margin`, which this run does not use; set "
            "algorithm.margin=true to put it in the loss"
        )
    return data


ALGORITHM = Algorithm(
    name="reward", config=Config, prepare=prepare, loss_fn=loss_fn, loss_units=loss_units, head="reward",
    key_metric="accuracy",
)  # fmt: skip
