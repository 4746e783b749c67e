"""Render preference pairs into token ids, and batch them for one forward pass of chosen and rejected.

`render_pair` turns a normalised preference row (see `load_rows(..., "preference")`) into
``RenderedPair(prompt_ids, chosen_ids, rejected_ids, ...)``. Each side is rendered by `render_sft` as the
conversation ``prompt + side`` with the prompt never trained, so ``prompt_ids + chosen_ids`` is exactly what
`render_sft` gives for that conversation (one source of truth for the chat template and for the mask). The
response ids run to the end of the rendered conversation: the assistant content, its end-of-turn token
(``<|im_end|>`` for ChatML, ``</s>`` for Llama 2) and whatever the template writes after it (a newline).
``chosen_mask`` and ``rejected_mask`` are `render_sft`'s loss mask over the response ids: 1 on what the model
generates (the content, whitespace the template puts around it such as Llama 2's ``' ' + content + ' '``, and
the end-of-turn token), 0 on the trailing newline and on any role headers or user turns inside a multi-turn
response. So ``prompt_ids`` is the sampling prompt (`render_prompt`) for every template with the prefix property
(see `render.py`).

Length: a prompt whose tokens alone reach `max_length` leaves no room for a response; `render_preference_dataset`
collects every such row into one `DataError` (``FILE:LINE: prompt: prompt is N tokens, max_length is M ...``).
A response longer than the room left (``max_length - len(prompt_ids)``) is cut at its end, and the dataset
warns once with the count.

`collate_pairs` stacks the B chosen sequences (prompt + chosen) on top of the B rejected ones (prompt +
rejected): ``input_ids``, ``attention_mask``, ``loss_mask``, each (2B, T), so a DPO or reward-model step scores
both sides in one forward pass; row ``b`` and row ``B + b`` are the two sides of pair ``b``; ``margin`` (B,) is
each pair's margin column. With ``share_prompt`` (DPO under `data.share_prompt`), ``prompt_group`` (2B,) says
that rows ``b`` and ``B + b`` share their prompt: the log-prob forwards then run each pair as one row, [prompt,
chosen, rejected], the prompt encoded once (`models.prefix_sharing`). `prepare_pairs` reads and renders a run's
pairs.

Letters: B pairs in the batch, T tokens per row.

This module holds no loss (see `algorithms/`).
"""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from posttrain.data.collate import GROUP_KEY, collate
from posttrain.data.columns import run_columns
from posttrain.data.prepared import PreparedData
from posttrain.data.render import Rendered, lines_text, refuse_markers, render_all, render_sft, warn_no_stop
from posttrain.data.schema import load_rows, normalise_row, places, problem_at
from posttrain.errors import ConfigError, DataError


@dataclass
class RenderedPair:
    """One preference pair as token ids: a shared prompt, then each response to the end of the conversation.

    ``chosen_mask[t] == 1`` when ``chosen_ids[t]`` is scored (same for rejected); all ones when not given.
    `source` and `line` say where the row came from, for error messages.
    """

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool = False
    source: str = "data"
    line: int | None = None
    chosen_mask: list[int] | None = None
    rejected_mask: list[int] | None = None
    margin: float | None = None
    """The row's optional `margin` column: how clearly chosen wins (reward models with `algorithm.margin`); None
    when the row has none (0 in the loss)."""
    identical: bool = False
    """Whether the two sides score the same tokens (once cut to max_length, or as written; kept only where allowed:
    evaluation, where it is a tie)."""

    def __post_init__(self):
        if self.chosen_mask is None:
            self.chosen_mask = [1] * len(self.chosen_ids)
        if self.rejected_mask is None:
            self.rejected_mask = [1] * len(self.rejected_ids)

    def chosen(self) -> Rendered:
        """Prompt + chosen as one `Rendered` example (the prompt is never scored)."""
        return Rendered(self.prompt_ids + self.chosen_ids, [0] * len(self.prompt_ids) + self.chosen_mask)

    def rejected(self) -> Rendered:
        """Prompt + rejected as one `Rendered` example (the prompt is never scored)."""
        return Rendered(self.prompt_ids + self.rejected_ids, [0] * len(self.prompt_ids) + self.rejected_mask)


def render_pair(tokenizer, row: dict, *, max_length: int, source: str = "data", allow_identical: bool = False
                ) -> RenderedPair:  # fmt: skip
    """Token ids of one preference row, each side cut to fit `max_length` together with the prompt.

    `row` is normalised (message lists, from `load_rows`) or raw (strings, conversational rows: normalised
    here). Raises `DataError` naming `source`, the row's line and the field ``prompt`` when the prompt alone
    reaches `max_length`.
    """
    line, located = getattr(row, "line", None), row  # (its problems are named as the file names them)
    if not all(isinstance(row.get(k), list) for k in ("prompt", "chosen", "rejected")):
        row = normalise_row(row, "preference", source=source, line=line)
    prompt = row["prompt"]
    sides = []
    for key in ("chosen", "rejected"):
        convo = {"messages": prompt + row[key], "completion_only": True, "n_prompt": len(prompt)}
        # Render in full (no cut yet): the cut depends on the prompt length, known only after rendering.
        r = render_sft(tokenizer, convo, max_length=sys.maxsize, source=source)
        start = r.loss_mask.index(1)  # the first response token (the schema guarantees one)
        sides.append((r.input_ids, r.loss_mask, start))
    (c_ids, c_mask, c_start), (r_ids, r_mask, r_start) = sides
    # The prompt is the same text on both sides, so its ids agree; if a tokenizer merges a token across the
    # prompt/response boundary, the shared part is the common prefix up to the earlier response start.
    n = 0
    while n < min(c_start, r_start) and c_ids[n] == r_ids[n]:
        n += 1
    prompt_ids = c_ids[:n]
    room = max_length - n
    if room <= 0 or not any(c_mask[n:max_length]) or not any(r_mask[n:max_length]):
        raise DataError([problem_at(source, located, "prompt", (
            f"prompt is {n} tokens, max_length is {max_length}: no room for a response; raise max_length or "
            "shorten the prompt")
        )])  # fmt: skip
    # Truncated: a side loses a token it scores (a cut that takes only what follows the last scored token, the
    # template's newline after its end-of-turn token, changes no log-prob: it was warned about as a lost end)
    truncated = any(_scored(ids, mask, n, max_length) != _scored(ids, mask, n, len(ids))
                    for ids, mask in ((c_ids, c_mask), (r_ids, r_mask)))  # fmt: skip
    # What each side scores: its tokens through its last scored one (what follows changes no log-prob before it)
    identical = _scored(c_ids, c_mask, n, max_length) == _scored(r_ids, r_mask, n, max_length)
    if identical and not allow_identical:  # a training pair: no preference, a zero gradient
        if truncated:
            differ = next(t for t in range(n, min(len(c_ids), len(r_ids)) + 1)
                          if t == min(len(c_ids), len(r_ids)) or c_ids[t] != r_ids[t])  # fmt: skip
            why = (f"identical to chosen once cut to max_length {max_length}: the two sides first differ at token "
                   f"{differ + 1} (the prompt's included), so the pair would carry no preference (a zero gradient); "
                   "raise max_length above that or shorten the responses' common start")  # fmt: skip
        else:  # different messages, the same tokens scored
            why = ("scores the same tokens as chosen (the sides differ only in what the chat template renders "
                   "alike), so the pair would carry no preference (a zero gradient); make the responses differ")  # fmt: skip
        raise DataError([problem_at(source, located, "rejected", why)])
    return RenderedPair(
        prompt_ids=prompt_ids,
        chosen_ids=c_ids[n:max_length],
        rejected_ids=r_ids[n:max_length],
        truncated=truncated,
        source=source,
        line=line,
        chosen_mask=c_mask[n:max_length],
        rejected_mask=r_mask[n:max_length],
        margin=float(row["margin"]) if row.get("margin") is not None else None,
        identical=identical,
    )


def _scored(ids: list[int], mask: list[int], start: int, end: int) -> tuple[list[int], list[int]]:
    """A side's ids and mask from `start` through its last scored token before `end`.

    >>> _scored([1, 2, 3, 4, 5], [0, 1, 1, 0, 0], 1, 9)
    ([2, 3], [1, 1])
    """
    last = max((t for t in range(start, min(end, len(mask))) if mask[t]), default=start - 1)
    return ids[start : last + 1], mask[start : last + 1]


def render_preference_dataset(tokenizer, rows: Sequence[dict], *, max_length: int, source: str = "data",
                              allow_identical: bool = False) -> list[RenderedPair]:  # fmt: skip
    """Render every pair; rows whose prompt leaves no room raise together; warn once with the truncated count.
    A pair whose sides are the same tokens once cut raises too (training: it carries no preference), unless
    `allow_identical` (evaluation: it scores a tie, counted in the warning)."""
    refuse_markers(tokenizer, rows, source=source)
    warn_no_stop(tokenizer, rows, source=source)
    out: list[RenderedPair] = render_all(
        lambda row: render_pair(tokenizer, row, max_length=max_length, source=source, allow_identical=allow_identical),
        rows, header=f"{source}: {{n}} pair(s) do not fit max_length={max_length}",
    )  # fmt: skip
    at, noun = places(rows)
    truncated = [at[i] for i, p in enumerate(out) if p.truncated]
    if truncated:
        warnings.warn(
            f"{source}: {len(truncated)} of {len(out)} pairs have a response longer than the room max_length="
            f"{max_length} leaves after the prompt and were truncated (their ends are not scored: "
            f"{lines_text(truncated, noun=noun)}"
            + (f"; {n_same} of them identical once cut, a tie"
               if (n_same := sum(p.identical and p.truncated for p in out)) else "")
            + "); raise max_length to keep them whole",
            stacklevel=2,
        )
    return out


def collate_pairs(pairs: Sequence[RenderedPair], pad_id: int, *, share_prompt: bool = False) -> dict[str, Any]:
    """Chosen rows then rejected rows, right-padded to the longest of all 2B: each tensor (2B, T) long.

    ``loss_mask`` is 1 on scored response tokens only (the trainer shifts: the logits at ``t - 1`` predict
    token ``t``). The number of pairs is ``input_ids.shape[0] // 2``. `share_prompt` adds ``prompt_group``
    (2B,): pair ``b``'s two rows carry ``b`` (module docstring).

    >>> p = RenderedPair([7, 8], [5, 2], [6, 6, 2])
    >>> out = collate_pairs([p], pad_id=0)
    >>> out["input_ids"].tolist(), out["loss_mask"].tolist(), out["margin"].tolist()
    ([[7, 8, 5, 2, 0], [7, 8, 6, 6, 2]], [[0, 0, 1, 1, 0], [0, 0, 1, 1, 1]], [0.0])
    >>> collate_pairs([p, p], pad_id=0, share_prompt=True)["prompt_group"].tolist()
    [0, 1, 0, 1]
    """
    if not pairs:
        raise ValueError("collate_pairs needs at least one pair")
    import torch  # here, not at the top: `posttrain advise --data` reads data files without loading torch

    batch = collate([p.chosen() for p in pairs] + [p.rejected() for p in pairs], pad_id)
    batch["margin"] = torch.tensor([p.margin or 0.0 for p in pairs], dtype=torch.float32)  # (B,)
    if share_prompt:
        batch[GROUP_KEY] = torch.arange(len(pairs)).repeat(2)  # (2B,)
    return batch


def prepare_pairs(cfg, tokenizer, *, share_prompt: bool = False) -> PreparedData:
    """The preference pairs of a DPO or reward-model run (`data.train`, `data.eval`), read, validated and
    rendered before any model loads; truncation warnings become run notes. `share_prompt`: batches say which
    rows share a prompt (`collate_pairs`)."""
    if not cfg.data.train:
        raise ConfigError(
            "data.train is not set: give a preference file (e.g. `posttrain data make --kind preference`)"
        )
    notes: list[str] = []

    def render(path: str) -> tuple[list[RenderedPair], tuple[list[int], str]]:  # the pairs, and their `places`
        with warnings.catch_warnings(record=True) as caught:  # (the rows left out by data.skip_bad_rows too)
            warnings.simplefilter("always")
            rows = load_rows(path, "preference", run_columns(cfg, path), skip_bad=cfg.data.skip_bad_rows)
            pairs = render_preference_dataset(tokenizer, rows, max_length=cfg.data.max_length, source=path,
                                              allow_identical=path != cfg.data.train)  # evaluation: a tie  # fmt: skip
        notes.extend(str(w.message) for w in caught)
        return pairs, places(rows)

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train, (at, noun) = render(cfg.data.train)
    evals = render(cfg.data.eval)[0] if cfg.data.eval else None
    return PreparedData(
        train=train, eval=evals, collate=functools.partial(collate_pairs, pad_id=pad_id, share_prompt=share_prompt),
        notes=notes, train_lines=[(n,) for n in at], train_noun=noun,
    )  # fmt: skip
