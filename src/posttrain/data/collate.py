"""Batch rendered examples into tensors: padded batches, or packed rows whose examples never see each other.

Letters: B rows in the batch, T tokens per row.

`collate` right-pads to the longest example: ``input_ids``, ``attention_mask`` and ``loss_mask``, each (B, T).
Padding is marked by position (past each example's length), never by comparing ids with `pad_id`: when the pad
token is the EOS token (Llama, Mistral and SmolLM2 users often set ``pad_token = eos_token``), a real
end-of-turn EOS keeps the loss `render.py` gave it and the padding after it gets none.

`pack` + `collate_packed` put several examples into one row of at most `max_length` tokens, with no
``attention_mask`` but ``position_ids`` restarting at 0 at every example. That is how transformers 5 expresses
packing: when ``attention_mask`` is None, no cache is in use and ``position_ids`` restart inside a row,
`transformers.masking_utils.find_packed_sequence_indices` splits the row into documents and builds a causal,
block-diagonal mask (sdpa, eager, flex attention); flash-attention-2 runs varlen kernels from the same position
ids. So the caller must call ``model(input_ids=..., position_ids=..., use_cache=False)``: no
``attention_mask``, and ``use_cache=False``, because with a cache (the default ``use_cache=True`` creates one
even in training) transformers 5.23 skips the packed-sequence detection and examples WOULD see each other.
The padding at a row's end gets its own positions 0, 1, ... (a document of its own that real tokens, all
before it, never attend to). ``loss_mask`` is 0 at each example's first token, so no example is trained to be
predicted from the previous example's last token. `tests/unit/test_packing.py` proves isolation: each
example's logits inside a packed row equal its logits run alone.

This module does not tokenize (see `render.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from posttrain.data.render import Rendered

if TYPE_CHECKING:
    import torch

GROUP_KEY = "prompt_group"
"""The batch column (B,) that says which rows begin with the same prompt (equal ids): a DPO pair's two rows
(`preference.collate_pairs`), an RL group's completions. The log-prob forwards run each such group as one row,
the prompt once (`models.prefix_sharing`); a batch without it is scored row by row."""


def collate(rendered: Sequence[Rendered], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples to the longest: ``input_ids``, ``attention_mask``, ``loss_mask``, each (B, T) long."""
    import torch  # here, not at the top: `import posttrain.data` stays light

    if not rendered:
        raise ValueError("collate needs at least one example")
    if pad_id is None:
        raise ValueError("pad_id is None: the tokenizer has no pad token; pass its eos_token_id")
    T = max(len(r.input_ids) for r in rendered)
    B = len(rendered)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    loss_mask = torch.zeros((B, T), dtype=torch.long)
    for b, r in enumerate(rendered):
        n = len(r.input_ids)
        input_ids[b, :n] = torch.tensor(r.input_ids, dtype=torch.long)
        attention_mask[b, :n] = 1
        loss_mask[b, :n] = torch.tensor(r.loss_mask, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def pack(rendered: Sequence[Rendered], max_length: int) -> list[list[Rendered]]:
    """Greedy first-fit in input order: each example goes into the first bin with room, else a new bin.

    Deterministic (no sorting), so a seeded shuffle before packing decides the bins.

    >>> bins = pack([Rendered([1] * n, [1] * n) for n in (5, 4, 3, 2)], max_length=8)
    >>> [[len(r) for r in b] for b in bins]
    [[5, 3], [4, 2]]
    """
    bins: list[list[Rendered]] = []
    room: list[int] = []
    for r in rendered:
        n = len(r.input_ids)
        if n > max_length:
            raise ValueError(
                f"an example of {n} tokens is longer than max_length={max_length}; truncate first"
            )
        for i, left in enumerate(room):
            if n <= left:
                bins[i].append(r)
                room[i] -= n
                break
        else:
            bins.append([r])
            room.append(max_length - n)
    return bins


def collate_packed(bins: Sequence[Sequence[Rendered]], pad_id: int, max_length: int | None = None
                   ) -> dict[str, torch.Tensor]:  # fmt: skip
    """Packed rows: ``input_ids``, ``loss_mask``, ``position_ids`` (B, T) long, T = `max_length` or the longest.

    Call ``model(input_ids=..., position_ids=..., use_cache=False)``, no ``attention_mask`` (module docstring).

    >>> out = collate_packed([[Rendered([5, 6, 7], [0, 1, 1]), Rendered([8, 9], [1, 1])]], pad_id=0, max_length=7)
    >>> out["position_ids"].tolist(), out["loss_mask"].tolist()
    ([[0, 1, 2, 0, 1, 0, 1]], [[0, 1, 1, 0, 1, 0, 0]])
    """
    import torch  # here, not at the top: `import posttrain.data` stays light

    if not bins:
        raise ValueError("collate_packed needs at least one bin")
    if pad_id is None:
        raise ValueError("pad_id is None: the tokenizer has no pad token; pass its eos_token_id")
    lengths = [sum(len(r.input_ids) for r in b) for b in bins]
    T = max_length if max_length is not None else max(lengths)
    if max(lengths) > T:
        raise ValueError(f"a packed row of {max(lengths)} tokens is longer than max_length={T}")
    B = len(bins)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((B, T), dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    for b, docs in enumerate(bins):
        at = 0
        for r in docs:
            n = len(r.input_ids)
            input_ids[b, at : at + n] = torch.tensor(r.input_ids, dtype=torch.long)
            loss_mask[b, at : at + n] = torch.tensor(r.loss_mask, dtype=torch.long)
            loss_mask[b, at] = 0  # never predict a document's first token from the previous document
            position_ids[b, at : at + n] = torch.arange(n)
            at += n
        position_ids[b, at:] = torch.arange(T - at)  # padding: a separate trailing "document"
    return {"input_ids": input_ids, "loss_mask": loss_mask, "position_ids": position_ids}
