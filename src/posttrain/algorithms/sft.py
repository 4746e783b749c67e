"""Supervised fine-tuning: cross-entropy on the completion tokens only.

Loss (per target token t, whose logits come from position t-1):  -log p(x_t | x_<t), counted where
`loss_mask[t] == 1`; the log-probabilities come from `models.logprobs` like every other method's. The loss function returns the *sum* over target tokens; the loop divides once by the
number of target tokens in the whole accumulated batch, so every token weighs the same whatever micro-batch
or process it falls in (the gradient-accumulation bug of per-micro-batch means cannot happen).

Which tokens are targets is decided by `posttrain.data` rendering (assistant turns only, or everything);
this module does not look at roles.
"""

from __future__ import annotations

import warnings
from functools import partial
from typing import ClassVar, Literal

import torch

from posttrain.algorithms.base import Algorithm, Batch
from posttrain.config import AlgorithmSection
from posttrain.data import collate, collate_packed, load_rows, pack, render_dataset
from posttrain.data.columns import run_columns
from posttrain.data.prepared import PreparedData
from posttrain.data.schema import places
from posttrain.errors import ConfigError
from posttrain.models.logprobs import selected_token_logps


class Config(AlgorithmSection):
    """`algorithm: {name: sft}`: no settings of its own; which tokens count is `data.train_on`."""

    name: Literal["sft"] = "sft"
    """Supervised fine-tuning: cross-entropy on the completion (or every) token."""

    run_fields: ClassVar[frozenset[str]] = frozenset({"data.eval", "data.train_on", "data.packing", "data.share_prompt"})
    model_dropout: ClassVar[bool] = True  # plain fine-tuning keeps the model's dropout, as HF Trainer does


def loss_units(batch: Batch, cfg=None) -> int:
    """Target tokens in a micro-batch (the first position can never be a target: nothing predicts it)."""
    return int(batch["loss_mask"][:, 1:].sum())


def model_inputs(batch: Batch) -> dict[str, torch.Tensor]:
    """The keys a causal LM takes; packed batches carry position_ids (and no padding mask)."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}


def loss_fn(model: torch.nn.Module, batch: Batch, cfg=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The summed negative log-likelihood of the target tokens: -sum_t log p(x_t | x_<t) where loss_mask[t] = 1.
    Only target positions are projected onto the vocabulary (`models.logprobs.selected_token_logps`); under
    `data.share_prompt` (the default) the tokens every row of the micro-batch begins with run once."""
    shared = cfg is None or cfg.data.share_prompt
    logps, _ = selected_token_logps(model, model_inputs(batch), batch["loss_mask"], shared_prefix=shared)  # (B, T)
    return -logps.sum(), {}


def prepare(cfg, tokenizer) -> PreparedData:
    """Read, validate and render the SFT data of a run config (before the model loads)."""
    if not cfg.data.train:
        raise ConfigError("data.train is not set: give a training file (e.g. data.train=train.jsonl)")
    notes: list[str] = []

    def render(path: str):
        # render_dataset warns once with the count of truncated rows, and load_rows with the rows it left out
        # (data.skip_bad_rows); each is shown as a run note (one clean line)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rows = load_rows(path, "sft", run_columns(cfg, path), skip_bad=cfg.data.skip_bad_rows)
            rendered, _ = render_dataset(
                tokenizer, rows, max_length=cfg.data.max_length, train_on=cfg.data.train_on, source=path
            )
        notes.extend(str(w.message) for w in caught)
        return rendered, places(rows)  # one rendered example per row, in order

    train, (lines, noun) = render(cfg.data.train)
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
    return PreparedData(train=train, eval=evals, collate=collate_fn, notes=notes, train_lines=train_lines,
                        train_noun=noun)  # fmt: skip


ALGORITHM = Algorithm(name="sft", config=Config, prepare=prepare, loss_fn=loss_fn, loss_units=loss_units)
