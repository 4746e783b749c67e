"""Supervised fine-tuning: cross-entropy on the completion tokens only.

Loss (per target token t, whose logits come from position t-1):  -log p(x_t | x_<t), counted where
`loss_mask[t] == 1`. The loss function returns the *sum* over target tokens; the loop divides once by the
number of target tokens in the whole accumulated batch, so every token weighs the same whatever micro-batch
or process it falls in (the gradient-accumulation bug of per-micro-batch means cannot happen).

Which tokens are targets is decided by `posttrain.data` rendering (assistant turns only, or everything);
this module does not look at roles.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from posttrain.algorithms.base import Algorithm, Batch, PreparedData
from posttrain.config import AlgorithmSection

IGNORE = -100


class Config(AlgorithmSection):
    """`algorithm: {name: sft}`: no settings of its own; which tokens count is `data.train_on`."""

    name: Literal["sft"] = "sft"
    """Supervised fine-tuning: cross-entropy on the completion (or every) token."""

    run_fields: ClassVar[frozenset[str]] = frozenset({"data.eval", "data.train_on", "data.packing"})
    model_dropout: ClassVar[bool] = True  # plain fine-tuning keeps the model's dropout, as HF Trainer does


def sft_token_losses(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Per-position negative log-likelihood of the next token, 0 where it is not a target.

    logits (B, T, V) at position t predict input_ids[:, t + 1]; loss_mask (B, T) marks target tokens.
    Returns (B, T): entry t is the loss of predicting token t + 1 (the last column is always 0).

    Worked example (V = 2, one row of 3 tokens [0, 1, 1], targets: tokens 1 and 2):
    position 0 logits [0, 0] -> p(token 1) = 1/2 -> loss ln 2 = 0.6931;
    position 1 logits [ln 3, 0] -> p(token 1) = 1/4 -> loss ln 4 = 1.3863.

    >>> logits = torch.tensor([[[0.0, 0.0], [1.0986123, 0.0], [5.0, 5.0]]])
    >>> sft_token_losses(logits, torch.tensor([[0, 1, 1]]), torch.tensor([[0, 1, 1]])).round(decimals=4)
    tensor([[0.6931, 1.3863, 0.0000]])
    """
    B, T, V = logits.shape
    # Shift the labels, not the logits: logits.view() stays a view (no (B, T, V) copy of the largest tensor).
    labels = torch.full_like(input_ids, IGNORE)
    labels[:, :-1] = torch.where(loss_mask[:, 1:].bool(), input_ids[:, 1:], IGNORE)
    losses = F.cross_entropy(
        logits.view(B * T, V).float(), labels.view(-1), ignore_index=IGNORE, reduction="none"
    )
    return losses.view(B, T)  # (B, T); ignored positions are exactly 0


def loss_units(batch: Batch, cfg=None) -> int:
    """Target tokens in a micro-batch (the first position can never be a target: nothing predicts it)."""
    return int(batch["loss_mask"][:, 1:].sum())


def model_inputs(batch: Batch) -> dict[str, torch.Tensor]:
    """The keys a causal LM takes; packed batches carry position_ids (and no padding mask)."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}


def loss_fn(model: torch.nn.Module, batch: Batch, cfg=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    target = batch["loss_mask"][:, 1:].bool()  # (B, T-1): token t + 1 is a target
    # Project onto the vocabulary only where the next token is a target: prompt positions need hidden states
    # but no logits. A boolean `logits_to_keep` (transformers >= 5) returns (N, V) for the N kept positions,
    # which saves most of the LM-head GEMMs and of the largest activation, the (B, T, V) logits.
    keep = F.pad(target, (0, 1))  # (B, T)
    logits = model(**model_inputs(batch), use_cache=False, logits_to_keep=keep).logits
    n_targets = int(target.sum())
    if logits.dim() == 2 and logits.shape[0] == n_targets:  # (N, V), rows in the order of target.nonzero()
        labels = batch["input_ids"][:, 1:][target]  # (N,)
        return F.cross_entropy(logits.float(), labels, reduction="sum"), {}
    # A model whose forward ignores a boolean logits_to_keep: full (B, T, V) logits, same value.
    losses = sft_token_losses(logits, batch["input_ids"], batch["loss_mask"])
    return losses.sum(), {}


def prepare(cfg, tokenizer) -> PreparedData:
    """Read, validate and render the SFT data of a run config (before the model loads)."""
    from functools import partial

    from posttrain.data import collate, collate_packed, load_rows, pack, render_dataset
    from posttrain.errors import ConfigError

    if not cfg.data.train:
        raise ConfigError("data.train is not set: give a training file (e.g. data.train=train.jsonl)")
    notes: list[str] = []

    def render(path: str):
        import warnings

        rows = load_rows(path, "sft")
        # render_dataset warns once with the count of truncated rows; show it as a run note (one clean line)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rendered, _ = render_dataset(
                tokenizer, rows, max_length=cfg.data.max_length, train_on=cfg.data.train_on, source=path
            )
        notes.extend(str(w.message) for w in caught)
        return rendered, [getattr(r, "line", None) for r in rows]  # one rendered example per row, in order

    train, lines = render(cfg.data.train)
    evals = render(cfg.data.eval)[0] if cfg.data.eval else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if cfg.data.packing:
        line_of = {id(r): line for r, line in zip(train, lines)}
        train = pack(train, cfg.data.max_length)
        train_lines = [tuple(line_of[id(r)] for r in b) for b in train]  # a packed row holds several file rows
        evals = pack(evals, cfg.data.max_length) if evals is not None else None
        collate_fn = partial(collate_packed, pad_id=pad_id, max_length=cfg.data.max_length)
    else:
        train_lines = [(line,) for line in lines]
        collate_fn = partial(collate, pad_id=pad_id)
    known = all(line is not None for line in lines)
    return PreparedData(
        train=train, eval=evals, collate=collate_fn, notes=notes, train_lines=train_lines if known else None
    )


ALGORITHM = Algorithm(name="sft", config=Config, prepare=prepare, loss_fn=loss_fn, loss_units=loss_units)
