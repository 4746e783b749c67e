"""A KV cache for decoding that writes each step's keys and values in place, instead of growing by a copy.

transformers' `DynamicCache` appends a step's keys and values with `torch.cat`, which copies the whole cache of
every layer at every step: at 32 rows and ~140 positions on SmolLM2-135M that is ~200 MB written per decode step,
a third of what reading the weights costs (benchmarks/README.md, "In-place KV cache, no second draw per token").
`StaticCache` avoids the copy but attends over all `max_cache_len` slots (the empty ones masked out), which
changes the attention's reductions and so the last bits of the logits; sampling must not change.

`in_place_cache` keeps `DynamicCache` and swaps each full-attention layer for `InPlaceLayer`: buffers with room
for more positions, of which the layer's `keys`/`values` are views of the filled part. The model sees tensors of
the same shape and values as with `DynamicCache`, so the logits are the same bit for bit; only the storage
differs. Room: the caller says how many positions may follow the first ones (`spare`: the prompt's rest and
`max_new_tokens`), and a buffer holds at most twice the positions it has, up to that total: the whole of a short
completion's room at once (no copy at all in the benchmark's rollout), and for a long `max_new_tokens` whose
completions may end early, a few copies as it doubles rather than memory reserved for tokens never made.
Sliding-window layers keep transformers' own class (they drop old positions, which these buffers do not model).
Import this module where it is used (it imports transformers).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


def in_place_cache(config, spare: int):
    """A `DynamicCache` for `config`'s model whose full-attention layers write in place (`InPlaceLayer`), for up to
    `spare` positions after the ones the first `update` brings (more still work: the buffers then grow by copies)."""
    cache = DynamicCache(config=config)
    cache.layers = [InPlaceLayer(spare) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


class InPlaceLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values live in buffers (b, heads, capacity, head_dim) with room to grow:
    `update` copies only the new positions in; `keys`/`values` are views of the filled positions."""

    def __init__(self, spare: int) -> None:
        super().__init__()
        self.spare = spare
        self.limit: int | None = None  # the positions expected in all: the first update's + spare
        self._k: torch.Tensor | None = None  # (b, heads, capacity, head_dim)
        self._v: torch.Tensor | None = None

    def _capacity(self, needed: int) -> int:
        """Room for `needed` positions: twice that, but no more than expected in all (unless already past it)."""
        return min(self.limit, 2 * needed) if needed <= self.limit else 2 * needed

    def _reserve(self, keys: torch.Tensor, values: torch.Tensor, needed: int) -> None:
        """New buffers with room for `needed` positions holding `keys`/`values` (b, heads, n, head_dim); views set."""
        n, capacity = keys.shape[-2], self._capacity(needed)
        self._k = keys.new_empty((*keys.shape[:2], capacity, keys.shape[-1]))
        self._v = values.new_empty((*values.shape[:2], capacity, values.shape[-1]))
        self._k[:, :, :n].copy_(keys)
        self._v[:, :, :n].copy_(values)
        self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, new = self.get_seq_length(), key_states.shape[-2]
        if n == 0:
            self.limit = new + self.spare
            self._reserve(key_states, value_states, new)
            return self.keys, self.values
        # more positions than reserved, or `keys` replaced by a method of the base class (`reorder_cache`,
        # offloading): copy into new buffers once
        owned = self.keys.data_ptr() == self._k.data_ptr() and self.values.data_ptr() == self._v.data_ptr()
        if not owned or self.keys.shape[0] != len(self._k) or n + new > self._k.shape[-2]:
            self._reserve(self.keys, self.values, n + new)
        self._k[:, :, n : n + new].copy_(key_states)
        self._v[:, :, n : n + new].copy_(value_states)
        self.keys, self.values = self._k[:, :, : n + new], self._v[:, :, : n + new]
        return self.keys, self.values

    def batch_repeat_interleave(self, repeats: int) -> None:
        n = self.get_seq_length()
        if n > 0:
            self._reserve(self.keys.repeat_interleave(repeats, dim=0), self.values.repeat_interleave(repeats, dim=0),
                          n)  # fmt: skip

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        n = self.get_seq_length()
        if n > 0:  # the kept rows' filled positions move to the front of the same buffers (no new buffers)
            k = len(indices)
            self._k[:k, :, :n] = self._k[indices, :, :n]
            self._v[:k, :, :n] = self._v[indices, :, :n]
            self._k, self._v = self._k[:k], self._v[:k]
            self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]

    def reset(self) -> None:
        self._k = self._v = self.limit = None
        super().reset()
