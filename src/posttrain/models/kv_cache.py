"""A KV cache for decoding that writes each step's keys and values in place, instead of growing by a copy.

transformers' `DynamicCache` appends a step's keys and values with `torch.cat`, which copies the whole cache of
every layer at every step: at 32 rows and ~140 positions on SmolLM2-135M that is ~200 MB written per decode step,
a third of what reading the weights costs (benchmarks/README.md, "Sampling against the machine's limits").
`StaticCache` avoids the copy but attends over all `max_cache_len` slots (the empty ones masked out), which
changes the attention's reductions and so the last bits of the logits; sampling must not change.

`in_place_cache` keeps `DynamicCache` and swaps each full-attention layer for `InPlaceLayer`: a buffer with room
for `spare` more positions, of which the layer's `keys`/`values` are views of the filled part. The model sees
tensors of the same shape and values as with `DynamicCache`, so the logits are the same bit for bit; only the
storage differs. Sliding-window layers keep transformers' own class (they drop old positions, which a
preallocated buffer would not model). What this module does not do: preallocate across `generate` calls of
different batches (one cache per batch of prompts), or save memory (the buffer holds the spare positions from
the start). Import it where it is used (it imports transformers).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


def in_place_cache(config, spare: int):
    """A `DynamicCache` for `config`'s model whose full-attention layers write in place (`InPlaceLayer`), each with
    room for `spare` positions beyond what it first holds (it grows by a copy if more come)."""
    cache = DynamicCache(config=config)
    cache.layers = [InPlaceLayer(spare) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


class InPlaceLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values live in buffers (b, heads, capacity, head_dim) with room to grow:
    `update` copies only the new positions in; `keys`/`values` are views of the filled positions."""

    def __init__(self, spare: int) -> None:
        super().__init__()
        self.spare = spare
        self._k: torch.Tensor | None = None  # (b, heads, capacity, head_dim)
        self._v: torch.Tensor | None = None

    def _reserve(self, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> None:
        """New buffers of `capacity` positions holding `keys`/`values` (b, heads, n, head_dim); the views set."""
        n = keys.shape[-2]
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
            self._reserve(key_states, value_states, new + self.spare)
            return self.keys, self.values
        # more positions than reserved, or `keys` replaced by a method of the base class (`reorder_cache`,
        # offloading): copy into new buffers once
        owned = self.keys.data_ptr() == self._k.data_ptr() and self.values.data_ptr() == self._v.data_ptr()
        if not owned or self.keys.shape[0] != len(self._k) or n + new > self._k.shape[-2]:
            self._reserve(self.keys, self.values, n + new + self.spare)
        self._k[:, :, n : n + new].copy_(key_states)
        self._v[:, :, n : n + new].copy_(value_states)
        self.keys, self.values = self._k[:, :, : n + new], self._v[:, :, : n + new]
        return self.keys, self.values

    def batch_repeat_interleave(self, repeats: int) -> None:
        n = self.get_seq_length()
        if n > 0:
            self._reserve(self.keys.repeat_interleave(repeats, dim=0), self.values.repeat_interleave(repeats, dim=0),
                          n + self.spare)  # fmt: skip

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        n = self.get_seq_length()
        if n > 0:  # the kept rows' filled positions move to the front of the same buffers (no new buffers)
            k = len(indices)
            self._k[:k, :, :n] = self._k[indices, :, :n]
            self._v[:k, :, :n] = self._v[indices, :, :n]
            self._k, self._v = self._k[:k], self._v[:k]
            self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]

    def reset(self) -> None:
        self._k = self._v = None
        super().reset()
