"""Attention in float32 while a run computes in bfloat16 on a CPU, and packed rows attended to one example at a time.

transformers' "sdpa" attention runs torch's CPU flash-attention kernel, whose bfloat16 backward is slow: for one
layer of the embedded SmolLM2-135M at 8 rows x 139 tokens (9 heads of 64), forward and backward took 26.8 ms in
bfloat16 against 10.7 ms with the same inputs cast to float32 and the output cast back, and 9.2 ms for float32
inputs (2 cores of an Intel Xeon with AMX, torch 2.13; benchmarks/README.md, "A CPU with AMX"). In a bfloat16 SFT
LoRA step it took 18% of the step. So while a bfloat16 run trains on CPU (`train`), attention that would run in
bfloat16 on CPU (bfloat16 inputs, or any inputs under bfloat16 autocast) runs in float32 on the bfloat16 values the
kernel would have read (float32 inputs under autocast are rounded to bfloat16 first, as autocast rounds them):
queries, keys, values and a floating-point mask cast up, the output cast back to bfloat16, as the kernel would
have given it. Backward keeps the bfloat16 inputs and rebuilds their float32 copies, and the bfloat16 output is
rebuilt from the float32 one the kernel keeps for its own backward. Every forward of the run computes it the same
way (the training forward, old log-probs, a reference, sampling), so a run's forwards still agree with each other.
Float32 attention is also the more precise one: the products and softmax of bf16 inputs are accumulated in
float32 rounding rather than bfloat16's. Any other attention (float32, a GPU, another implementation than "sdpa")
is left as it is.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from posttrain.models.layers import node_behind_views, rebuilt_in_backward


def _in_float32(sdpa):
    """transformers' attention function `sdpa` (same signature), computing bfloat16 CPU attention in float32:
    bfloat16 inputs, or any inputs under a bfloat16 CPU autocast, which would run the kernel in bfloat16 on bfloat16
    copies of its inputs. A full fine-tuning run's queries and keys reach attention in float32, promoted by the
    rotary embedding's float32 cos and sin: they are rounded to bfloat16 first, as autocast would, so that the
    attention is the same function of its inputs whether they come in float32 or bfloat16 (and backward keeps
    the bfloat16 copies, half the bytes). The output has the dtype the kernel would have given: bfloat16."""

    def sdpa_bf16_cpu_in_float32(module, query, key, value, attention_mask, *args, **kwargs):
        autocast = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        if query.device.type != "cpu" or not (autocast or torch.bfloat16 in (query.dtype, key.dtype, value.dtype)):
            return sdpa(module, query, key, value, attention_mask, *args, **kwargs)
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.float()  # an additive mask: its dtype must match the queries'
        # autocast's inputs to the kernel: bfloat16 copies of float32 ones
        low = [x.to(torch.bfloat16) if autocast and x.dtype == torch.float32 else x for x in (query, key, value)]
        # outside autocast, which would cast the inputs back (CPU autocast runs attention in its lower precision)
        up = [x.float() for x in low]
        for x32, x in zip(up, low):
            if x32 is not x:  # the kernel keeps its inputs: keep the bf16 ones, cast up again in backward
                rebuilt_in_backward(x32, torch.Tensor.float, x)
        with torch.autocast("cpu", enabled=False):
            out, weights = sdpa(module, *up, attention_mask, *args, **kwargs)
        result = out.to(torch.bfloat16)
        if _kept_by_kernel(out):  # the output projection's (or its adapter's) input: cast again in backward
            rebuilt_in_backward(result, torch.Tensor.to, out, torch.bfloat16)
        return result, weights

    sdpa_bf16_cpu_in_float32.__wrapped__ = sdpa  # the standard attribute (`inspect.unwrap`)
    return sdpa_bf16_cpu_in_float32


_KEEPS_OUTPUT = frozenset({"ScaledDotProductFlashAttentionForCpuBackward0", "ScaledDotProductFlashAttentionBackward0",
                           "ScaledDotProductEfficientAttentionBackward0", "ScaledDotProductCudnnAttentionBackward0"})
"""grad_fn names of torch's SDPA kernels whose backward keeps their output (the math fallback's does not)."""


def _kept_by_kernel(out: torch.Tensor) -> bool:
    """Whether `out` is (a view of) the output an SDPA kernel keeps for its backward: transformers' "sdpa" returns
    the kernel's (batch, heads, tokens, d) output transposed to (batch, tokens, heads, d), which is the layout the
    kernels allocate, so `.contiguous()` there copies nothing. Then a cast of it can be rebuilt in backward for
    free: its source is kept anyway."""
    node = node_behind_views(out)
    return node is not None and type(node).__name__ in _KEEPS_OUTPUT


@contextmanager
def float32_attention_on_cpu(enabled: bool = True) -> Iterator[bool]:
    """While inside (when `enabled`): transformers' "sdpa" attention computes bfloat16 CPU inputs in float32
    (module docstring). transformers looks the function up by name in a process-wide table at every forward,
    so this swaps the table's entry and puts the original back on exit. Yields whether it did."""
    if not enabled:
        yield False
        return
    with _sdpa_wrapped_by(_in_float32):
        yield True


@contextmanager
def _sdpa_wrapped_by(wrap) -> Iterator[None]:
    """While inside: transformers' "sdpa" entry of its process-wide attention table is `wrap(the entry before)`;
    the entry before is put back on exit (transformers looks the function up by name at every forward)."""
    from transformers.modeling_utils import AttentionInterface

    original = AttentionInterface._global_mapping["sdpa"]
    AttentionInterface.register("sdpa", wrap(original))
    try:
        yield
    finally:
        AttentionInterface.register("sdpa", original)


# ---------------------------------------------------------------------------------------------------------------
# Packed rows: attention over each example on its own


Block = tuple[int, tuple[int, ...]]
"""(p, (n_1, ..., n_k)): a run of a packed row holding a prefix of p tokens its k examples share, then their
continuations of n_1, ..., n_k tokens; example i is the prefix followed by continuation i. With p = 0, k examples
side by side (they share nothing)."""


class _Packing:
    """What `packed_segments` or `packed_blocks` put in force: per row of the batch, the blocks of examples packed in
    it (`Block`), and per device the index of each packed token in a padded batch of the examples (one example a
    row).

    A block with a prefix (SFT rows under `logprobs.packed_rows(shared_prefix=True)`, a DPO pair or a GRPO group
    under `data.share_prompt`) holds it once; in the examples' padded batch every example of the block holds its own
    copy of the prefix's queries, keys and values, and each packed prefix token takes its output from the block's
    first example (the copies are equal: the same keys, causal)."""

    def __init__(self, blocks: Sequence[Sequence[Block]]):
        self.blocks = tuple(tuple((int(p), tuple(int(n) for n in conts)) for p, conts in row) for row in blocks)
        if any(p and not conts for row in self.blocks for p, conts in row):
            raise ValueError("a block with a shared prefix needs at least one example")
        self.lengths = [p + n for row in self.blocks for p, conts in row for n in conts]
        self.width = max(self.lengths)
        self.shared = any(p for row in self.blocks for p, _ in row)
        self._layouts: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def matches(self, query: torch.Tensor, key: torch.Tensor) -> bool:
        return (query.shape[0] == len(self.blocks) and key.shape[2] == query.shape[2]
                and all(sum(p + sum(conts) for p, conts in row) == query.shape[2] for row in self.blocks))  # fmt: skip

    def index(self, device: torch.device) -> torch.Tensor:
        """(tokens,): for each token of the rows, in order, its place in the (examples x width) padded batch (a
        shared prefix token: its place in its block's first example)."""
        return self._layout(device)[0]

    def sources(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Under a shared prefix: (src, slots), each (filled slots,): slot `slots[j]` of the (examples x width)
        padded batch holds packed token `src[j]` (a prefix token fills one slot in each of its block's examples)."""
        return self._layout(device)[1:]

    def _layout(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(index, src, slots) of `index` and `sources`, made once per device. A block's packed tokens are [prefix
        (p) | continuation 1 (n_1) | ...]; its examples e, e + 1, ... are rows of the padded batch: example e + i
        holds the prefix at slots 0 .. p - 1 and continuation i after it."""
        if device not in self._layouts:
            self._layouts[device] = tuple(t.to(device) for t in self._laid_out())
        return self._layouts[device]

    def _laid_out(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        index, src, slots = [], [], []
        e, base = 0, 0  # the block's first example, the block's first packed token (rows laid end to end)
        for row in self.blocks:
            for p, conts in row:
                index.append(torch.arange(e * self.width, e * self.width + p))  # the prefix: the first example's
                at = base + p
                for i, n in enumerate(conts):
                    first = (e + i) * self.width
                    index.append(torch.arange(first + p, first + p + n))
                    src.append(torch.cat([torch.arange(base, base + p), torch.arange(at, at + n)]))
                    slots.append(torch.arange(first, first + p + n))
                    at += n
                e, base = e + len(conts), at
        return torch.cat(index), torch.cat(src), torch.cat(slots)


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.index_select(0, index)


class _Spread(torch.autograd.Function):
    """Rows of `tokens` put at rows `index` of a zero tensor of `rows` rows; backward keeps only the index (autograd's
    `index_copy` keeps its source too: one more copy of each layer's queries, keys and values, 128 MB over the
    embedded model's 30 layers at 1,112 tokens)."""

    @staticmethod
    def forward(ctx, tokens, index, rows):
        ctx.save_for_backward(index)
        return tokens.new_zeros(rows, *tokens.shape[1:]).index_copy_(0, index, tokens)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return grad.index_select(0, index), None, None


class _SpreadShared(torch.autograd.Function):
    """Under a shared prefix: rows `src` of `tokens` put at rows `slots` of a zero tensor of `rows` rows (a prefix
    token in each of its examples); backward adds each slot's gradient into its token's (`index_add_`, in slot
    order) and keeps only the two indices."""

    @staticmethod
    def forward(ctx, tokens, src, slots, rows):
        ctx.save_for_backward(src, slots)
        ctx.tokens = tokens.shape[0]
        return tokens.new_zeros(rows, *tokens.shape[1:]).index_copy_(0, slots, tokens.index_select(0, src))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        src, slots = ctx.saved_tensors
        return grad.new_zeros(ctx.tokens, *grad.shape[1:]).index_add_(0, src, grad.index_select(0, slots)), None, None, None


_PACKING: contextvars.ContextVar[_Packing | None] = contextvars.ContextVar("posttrain_packing", default=None)


def _per_segment(sdpa):
    """transformers' attention function `sdpa` (same signature), computing packed rows' attention over each example
    on its own while `packed_segments` says where the examples lie: the examples' queries, keys and values are laid
    out as a right-padded batch of their own, one example a row, attended with SDPA's causal path (no mask), and
    the outputs taken back to the packed layout.

    Why: transformers runs a packed row (examples side by side, positions restarting at 0 at each;
    `data.collate`, `logprobs.packed_rows`) under a block-diagonal causal mask of the row's whole width, so SDPA
    computes every (query, key) block of the row, masked or not, and saves the mask for backward in every layer.
    In the examples' own padded batch each query sees exactly the keys the block-diagonal mask allows, so the
    result is the same up to the kernel's order of summation (tests/unit/test_packed_rows.py), for the attention
    work of padded rows; everything outside attention (the products, norms, pointwise ops) runs on the real tokens
    only. Rows whose examples share a prefix (`packed_blocks`' blocks) hold the prefix once: every product
    and norm runs on it once, and in the examples' padded batch each example gets its own copy of the prefix's
    queries, keys and values (the attention of the padded rows those examples were). Any call whose shapes do not
    match the segments (sampling with a cache, another batch) runs as it came."""

    def sdpa_packed_rows(module, query, key, value, attention_mask, *args, **kwargs):
        packing = _PACKING.get()
        if packing is None or not packing.matches(query, key):
            return sdpa(module, query, key, value, attention_mask, *args, **kwargs)
        kwargs.pop("is_causal", None)
        index, examples, width = packing.index(query.device), len(packing.lengths), packing.width

        def padded(x):  # (B, heads, S, d) -> (examples, heads, width, d), zeros past each example's end
            tokens = x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3])  # (B x S, heads, d), row after row
            if packing.shared:  # each example its own copy of its row's prefix
                out = _SpreadShared.apply(tokens, *packing.sources(query.device), examples * width)
            else:
                out = _Spread.apply(tokens, index, examples * width)
            return out.view(examples, width, x.shape[1], x.shape[3]).transpose(1, 2)

        out, _ = sdpa(module, padded(query), padded(key), padded(value), None, *args, is_causal=True, **kwargs)
        flat = out.reshape(examples * width, out.shape[2], out.shape[3])  # a view of what SDPA keeps for backward
        tokens = _rows(flat, index)  # (B x S, heads, d)
        rebuilt_in_backward(tokens, _rows, flat, index)  # the output projection's input, not kept a second time
        return tokens.view(query.shape[0], query.shape[2], tokens.shape[1], tokens.shape[2]), None

    sdpa_packed_rows.__wrapped__ = sdpa
    sdpa_packed_rows.posttrain_per_segment = True
    return sdpa_packed_rows


@contextmanager
def attention_per_segment() -> Iterator[None]:
    """While inside: transformers' "sdpa" attention computes packed rows' attention over each example on its own,
    where `packed_segments` says where they lie (`_per_segment`); everything else as before. `train` runs every
    forward of a run inside it, inside a bfloat16 CPU run's float32 attention (`float32_attention_on_cpu`), which
    then casts the examples' padded batch, as it cast padded rows (`_sdpa_wrapped_by`)."""
    with _sdpa_wrapped_by(_per_segment):
        yield


def runs_per_segment() -> bool:
    """Whether "sdpa" attention computes packed rows per example now (inside `attention_per_segment`)."""
    from transformers.modeling_utils import AttentionInterface

    fn = AttentionInterface._global_mapping.get("sdpa")
    while fn is not None:
        if getattr(fn, "posttrain_per_segment", False):
            return True
        fn = getattr(fn, "__wrapped__", None)
    return False


@contextmanager
def packed_segments(segments: Sequence[Sequence[int]]) -> Iterator[None]:
    """Inside: the batch's row b packs examples of lengths `segments[b]`, in order, filling the row (`data.packing`
    rows: examples side by side, sharing nothing; `packed_blocks` for rows whose examples share a prefix)."""
    with packed_blocks([[(0, tuple(row))] for row in segments]):
        yield


@contextmanager
def packed_blocks(blocks: Sequence[Sequence[Block]]) -> Iterator[None]:
    """Inside: the batch's row b packs the blocks `blocks[b]` (`Block`: a shared prefix and its examples'
    continuations, or examples side by side), in order, filling the row."""
    with _packing_as(_Packing(blocks)):
        yield


@contextmanager
def _packing_as(packing: _Packing | None) -> Iterator[None]:
    token = _PACKING.set(packing)
    try:
        yield
    finally:
        _PACKING.reset(token)


def checkpoint_contexts():
    """`context_fn` for `torch.utils.checkpoint.checkpoint` (non-reentrant): a checkpointed layer's recompute in
    backward runs under the examples' layout its forward saw. `packed_segments` is a context variable, set around
    the forward only; without this the recompute would find none, attend over the whole packed row, and
    checkpointing would stop the run (a different number of tensors saved) or, were the shapes alike, compute
    another function. Returns (the forward's context, the recompute's)."""
    return contextlib.nullcontext(), _packing_as(_PACKING.get())
