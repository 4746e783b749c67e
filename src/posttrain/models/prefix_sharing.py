"""Shared-prompt packing: rows that begin with the same prompt run it once, in one row with their continuations.

A DPO pair is two sequences, prompt + chosen and prompt + rejected; a GRPO group is G sequences, prompt +
completion i. Scored as ordinary right-padded rows, every prompt is encoded once per sequence (twice per pair, G
times per group). Wang & Hegde 2024 ("Accelerating Direct Preference Optimization with Prefix Sharing") put a
pair into one row instead, [prompt, chosen, rejected], with an attention mask under which each response sees the
prompt and its own earlier tokens only. `share_prefix` does that for any group of rows:

    row      [ prefix (L tokens) | continuation 1 | continuation 2 | ... | padding ]
    position   0 .. L-1            L .. n_1-1       L .. n_2-1             0 ...
    sees       causal              prefix + own     prefix + own           itself only
                                   (causal)         (causal)

The prefix is the longest run of tokens that every row of the group starts with (the prompt, or more when the
continuations begin alike); position ids restart at L for every continuation, so each token has the position,
the keys and the values it has in its own row: the log-probabilities are the same (up to float rounding), and so
are their gradients (a prefix token's hidden state feeds every continuation of its row, as its copies did in
each padded row). Padding at the row's end attends to itself only (no query row is fully masked: such rows give
NaN in some attention kernels) and nothing real attends to it.

How transformers takes it (read in transformers 5.25, `masking_utils._preprocess_mask_arguments`): a 4D
`attention_mask` (B, 1, T, T) is handed to the attention function as it is, whatever the cache. Its meaning is the
attention function's: `sdpa` (`integrations/sdpa_attention.py`) passes it to `scaled_dot_product_attention`,
where a boolean mask marks the keys to attend to; `eager` (e.g. `modeling_llama.eager_attention_forward`) *adds*
it to the scores, so it needs an additive float mask (0, or the dtype's minimum), and a boolean one would add 1
or 0 and be silently wrong. Flash-attention (varlen kernels: a sequence may not see part of another), flex
attention (a BlockMask), and sliding-window layers (the window is applied by the mask transformers builds, which
a custom one replaces) cannot take it: `mask_kind` says so and the caller runs the ordinary padded rows.

This module builds rows and masks; it runs no model (`logprobs.selected_token_logps` does).

Letters: B rows of the padded batch, T its width, R packed rows (groups), S their width.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from posttrain.data.collate import GROUP_KEY

__all__ = ["EXACT_KERNELS", "GROUP_KEY", "GroupLayout", "SharedPrefixRow", "SharedPrefixRows", "group_layout",
           "mask_kind", "share_prefix", "share_prefix_in_one_row"]

EXACT_KERNELS = {"sdpa": "bool", "eager": "additive"}
"""Attention implementations that take a custom 4D mask, and the form they read it in (module docstring)."""


class SharedPrefixRows(NamedTuple):
    """Packed rows and where each token of the padded batch went."""

    input_ids: torch.Tensor  # (R, S)
    position_ids: torch.Tensor  # (R, S)
    allowed: torch.Tensor  # (R, S, S) bool: query s may attend to key s'
    index: torch.Tensor  # (B, T) long: flat index into (R * S) of each real token of the padded batch; -1 elsewhere

    def attention_mask(self, kind: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (R, 1, S, S) mask in the form the attention implementation reads (`EXACT_KERNELS`): boolean, or
        additive (0 where allowed, the minimum of `dtype` elsewhere, as transformers' own eager mask)."""
        mask = self.allowed[:, None]
        if kind == "bool":
            return mask
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)

    @property
    def tokens(self) -> int:
        """Token slots of the packed rows, padding included (R x S)."""
        return self.input_ids.numel()


ALIBI_MODEL_TYPES = frozenset({"bloom", "mpt"})


def slot_distances(config) -> str | None:
    """Why a model places tokens by their slots in a row rather than by position ids (None: by position ids):
    ALiBi attention (BLOOM, MPT, Falcon with ``alibi: true``) biases each score by the distance in slots and reads
    no position ids, so padding or another example between two tokens changes what they see of each other. Such
    rows are padded at the left only: no shared prefix with padding after it, no packing.

    >>> from types import SimpleNamespace as C
    >>> slot_distances(C(model_type="bloom")), slot_distances(C(model_type="falcon", alibi=False))
    ('ALiBi attention (bloom) measures distances in slots, not position ids', None)
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "model_type", None) in ALIBI_MODEL_TYPES or getattr(text, "alibi", False) is True:
        return f"ALiBi attention ({text.model_type}) measures distances in slots, not position ids"
    return None


def mask_kind(config, row_length: int) -> tuple[str | None, str]:
    """How a model with this config takes a shared-prefix mask over rows of `row_length` tokens: ("bool" or
    "additive", "") when it can, else (None, why not)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    impl = getattr(text, "_attn_implementation", None) or getattr(config, "_attn_implementation", None) or "eager"
    if impl not in EXACT_KERNELS:
        return None, (f"attention implementation {impl!r} cannot take a custom 4D mask (flash-attention's varlen "
                      "kernels cannot let a sequence see only part of another)")  # fmt: skip
    if not getattr(text, "is_causal", True):
        return None, "the model is not causal"
    if why := slot_distances(text):
        return None, why
    kinds = set(getattr(text, "layer_types", None) or [])
    window = getattr(text, "sliding_window", None)
    if kinds - {"full_attention", "sliding_attention"}:
        return None, f"layer types {sorted(kinds)} have masks of their own"
    sliding = "sliding_attention" in kinds or (not kinds and window is not None)
    if sliding and (window is None or window < row_length):
        # The window is applied by the mask transformers builds; a custom mask replaces it. A window at least as
        # long as the row excludes nothing, so only then is the custom mask exact.
        return None, f"sliding-window attention (window {window}) is shorter than the {row_length}-token rows"
    return EXACT_KERNELS[impl], ""


def _spans(input_ids, attention_mask, position_ids) -> list[tuple[int, int]] | None:
    """(start, length) of each row's real tokens, or None unless they are one run at positions 0, 1, ..., n - 1
    (the layouts `data.collate` and `algorithms.base.sequence_tensors` make: right padding, or left-padded
    prompts with cumulative positions)."""
    B, T = input_ids.shape
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    n = real.sum(-1)  # (B,)
    start = torch.where(n > 0, real.int().argmax(-1), torch.zeros_like(n))  # first real column
    cols = torch.arange(T, device=input_ids.device)[None]
    span = (cols >= start[:, None]) & (cols < (start + n)[:, None])  # (B, T)
    if not torch.equal(span, real):
        return None  # real tokens with holes: not a layout this packs
    positions = cols.expand(B, T) if position_ids is None else position_ids.expand(B, T)
    if not torch.equal(positions[real], (cols - start[:, None]).expand(B, T)[real]):
        return None  # positions that do not count the real tokens from 0
    return list(zip(start.tolist(), n.tolist()))


class GroupLayout(NamedTuple):
    """A padded batch's groups (`group_layout`), what both packed layouts are built from."""

    shape: tuple[int, int]  # (B, T)
    spans: list[tuple[int, int]]  # each row's (start, length) of real tokens
    seqs: list[torch.Tensor]  # each row's real tokens, on the CPU
    groups: list[tuple[list[int], int]]  # per group in order of first appearance: its rows, their common prefix

    @property
    def blocks(self) -> tuple:
        """((L_g, (n_1 - L_g, ..., n_k - L_g)), ...): per group its prefix's length and its rows' continuations'."""
        return tuple((L, tuple(self.spans[b][1] - L for b in rows)) for rows, L in self.groups)


def group_layout(inputs: dict[str, torch.Tensor], groups: torch.Tensor) -> GroupLayout | None:
    """The padded batch's groups, or None when `_spans` is (the rows' real tokens are not one run each at positions
    0 .. n - 1): computed once and handed to `share_prefix` or `share_prefix_in_one_row`."""
    # The rows are laid out on the CPU (a few small tensors and Python loops over B rows), then moved.
    input_ids, attention_mask, position_ids = (inputs[k].cpu() if inputs.get(k) is not None else None
                                               for k in ("input_ids", "attention_mask", "position_ids"))  # fmt: skip
    spans = _spans(input_ids, attention_mask, position_ids)
    if spans is None:
        return None
    members: dict[int, list[int]] = {}
    for b, g in enumerate(groups.tolist()):
        members.setdefault(g, []).append(b)
    seqs = [input_ids[b, s : s + n] for b, (s, n) in enumerate(spans)]
    out = []
    for rows_of_group in members.values():
        L = min(spans[b][1] for b in rows_of_group)
        first = seqs[rows_of_group[0]]
        for b in rows_of_group[1:]:  # the longest common prefix of the group's real tokens
            differs = (seqs[b][:L] != first[:L]).nonzero()
            L = int(differs[0]) if differs.numel() else L
        out.append((rows_of_group, L))
    return GroupLayout(tuple(input_ids.shape), spans, seqs, out)


class SharedPrefixRow(NamedTuple):
    """Every group of a padded batch in one row: per group its prefix once, then each of its rows' continuations
    (`share_prefix_in_one_row`), for attention one example at a time (`attention.packed_blocks`)."""

    input_ids: torch.Tensor  # (1, N)
    position_ids: torch.Tensor  # (1, N)
    blocks: tuple  # ((L_g, (n_1, ..., n_k)), ...): per group, its prefix's length and its continuations' lengths
    index: torch.Tensor  # (B, T) long: index into the row of each real token of the padded batch; -1 elsewhere


def share_prefix_in_one_row(inputs: dict[str, torch.Tensor], groups: torch.Tensor,
                            layout: GroupLayout | None = None) -> SharedPrefixRow | None:  # fmt: skip
    """`share_prefix`'s layout without padding or a mask: the groups' packed rows end to end in one row, for a model
    whose attention runs one example at a time inside a run (`attention.packed_blocks`: each example is its group's
    prefix and its own continuation, laid out as a padded batch of examples). Attention then costs what the padded
    rows' did, where `share_prefix`'s mask makes it attend over every (query, key) pair of a group's row, masked or
    not, and keep the (S, S) mask for backward in every layer. None when `share_prefix` would be. `layout`:
    `group_layout(inputs, groups)`, when the caller has it.

    Worked example: rows [7, 8, 5] and [7, 8, 6, 6] in one group, [9, 4] alone -> [7, 8, 5, 6, 6, 9, 4], positions
    [0, 1, 2, 2, 3, 0, 1], blocks ((2, (1, 2)), (2, (0,))).

    >>> row = share_prefix_in_one_row({"input_ids": torch.tensor([[7, 8, 5, 0], [7, 8, 6, 6], [9, 4, 0, 0]]),
    ...     "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])}, torch.tensor([0, 0, 1]))
    >>> row.input_ids.tolist(), row.position_ids.tolist(), row.blocks
    ([[7, 8, 5, 6, 6, 9, 4]], [[0, 1, 2, 2, 3, 0, 1]], ((2, (1, 2)), (2, (0,))))
    >>> row.index.tolist()
    [[0, 1, 2, -1], [0, 1, 3, 4], [5, 6, -1, -1]]
    """
    device = inputs["input_ids"].device
    layout = layout or group_layout(inputs, groups)
    if layout is None:
        return None
    (B, T), spans, seqs, group_prefixes = layout
    tokens, positions = [], []
    index = torch.full((B, T), -1, dtype=torch.long)
    at = 0
    for rows_of_group, L in group_prefixes:
        tokens.append(seqs[rows_of_group[0]][:L])
        positions.append(torch.arange(L))
        start, at = at, at + L
        for b in rows_of_group:
            s, n = spans[b]
            tokens.append(seqs[b][L:])
            positions.append(torch.arange(L, n))
            index[b, s : s + L] = torch.arange(start, start + L)
            index[b, s + L : s + n] = torch.arange(at, at + n - L)
            at += n - L
    return SharedPrefixRow(torch.cat(tokens)[None].to(device), torch.cat(positions)[None].to(device), layout.blocks,
                           index.to(device))  # fmt: skip


def share_prefix(inputs: dict[str, torch.Tensor], groups: torch.Tensor,
                 layout: GroupLayout | None = None) -> SharedPrefixRows | None:  # fmt: skip
    """One row per group of the padded batch `inputs` (`input_ids`, optional `attention_mask` and
    `position_ids`, (B, T)): the group's common prefix once, then each row's continuation (module docstring).

    groups: (B,) ids; rows with equal ids form one packed row (in the order groups first appear), whatever
    their contents: the shared prefix is what their real tokens have in common, possibly nothing. Returns None
    when the rows' real tokens are not one run each at positions 0 .. n - 1 (the caller runs them as they are).
    `layout`: `group_layout(inputs, groups)`, when the caller has it.

    Worked example: rows [7, 8, 5] and [7, 8, 6, 6] in one group -> [7, 8, 5, 6, 6], positions [0, 1, 2, 2, 3];
    token 5 (position 2) sees 7, 8, 5; the first 6 sees 7, 8 and itself, not 5.

    >>> rows = share_prefix({"input_ids": torch.tensor([[7, 8, 5, 0], [7, 8, 6, 6]]),
    ...                      "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])}, torch.tensor([0, 0]))
    >>> rows.input_ids.tolist(), rows.position_ids.tolist(), rows.index.tolist()
    ([[7, 8, 5, 6, 6]], [[0, 1, 2, 2, 3]], [[0, 1, 2, -1], [0, 1, 3, 4]])
    >>> rows.allowed[0].int().tolist()
    [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 0, 1, 0], [1, 1, 0, 1, 1]]
    """
    device = inputs["input_ids"].device
    layout = layout or group_layout(inputs, groups)
    if layout is None:
        return None
    (B, T), spans, seqs, group_prefixes = layout

    rows, segments, where = [], [], []  # per packed row: tokens, segment of each (0 prefix, i continuation i)
    for r, (rows_of_group, L) in enumerate(group_prefixes):
        first = seqs[rows_of_group[0]]
        tokens, segment, positions = [first[:L]], [torch.zeros(L, dtype=torch.long)], [torch.arange(L)]
        at = L
        for i, b in enumerate(rows_of_group, start=1):
            n = spans[b][1]
            tokens.append(seqs[b][L:])
            segment.append(torch.full((n - L,), i, dtype=torch.long))
            positions.append(torch.arange(L, n))
            # where row b's real tokens went: its prefix, then its own continuation
            where.append((b, r, torch.cat([torch.arange(L), torch.arange(at, at + n - L)])))
            at += n - L
        rows.append((torch.cat(tokens), torch.cat(positions)))
        segments.append(torch.cat(segment))

    R, S = len(rows), max(1, max(len(t) for t, _ in rows))
    packed_ids = torch.zeros((R, S), dtype=inputs["input_ids"].dtype)
    packed_pos = torch.zeros((R, S), dtype=torch.long)
    seg = torch.full((R, S), -1, dtype=torch.long)  # -1: padding
    for r, ((tokens, positions), segment) in enumerate(zip(rows, segments)):
        packed_ids[r, : len(tokens)] = tokens
        packed_pos[r, : len(tokens)] = positions
        seg[r, : len(tokens)] = segment
    index = torch.full((B, T), -1, dtype=torch.long)
    for b, r, at in where:
        s, n = spans[b]
        index[b, s : s + n] = r * S + at

    q, k = seg[:, :, None], seg[:, None, :]  # (R, S, 1), (R, 1, S)
    causal = torch.ones(S, S, dtype=torch.bool).tril()  # key at or before the query
    allowed = causal & (k >= 0) & ((k == 0) | (k == q))  # the prefix, or the query's own continuation
    eye = torch.eye(S, dtype=torch.bool)
    allowed = torch.where(q < 0, eye, allowed)  # padding sees itself only: no query without a key
    return SharedPrefixRows(packed_ids.to(device), packed_pos.to(device), allowed.to(device), index.to(device))
