"""Per-token log-probabilities (and entropy) of chosen positions: the one place every method computes them.

SFT's cross-entropy, DPO's sequence log-probs and its reference, GRPO's and PPO's policy, old and reference
log-probs, the sampler/trainer gap and preference evaluation all call these, so there is one gather:

- `target_positions`: which positions predict a target (the hidden state at t - 1 predicts token t);
- `gather_logps`: log softmax(logits / T)[target] (and the entropy) from the selected logits, in float32;
- `head_logps`: the same from hidden states, through the model's own output layer, a chunk of rows at a time;
- `selected_token_logps`: the model's backbone, then `head_logps` at the positions that predict a target,
  scattered back to (B, T);
- `no_grad_chunks`: any of these over a large batch, a chunk at a time, in eval mode and without gradient
  (old log-probs, references, values).

Rows that share a prompt (a DPO pair, a GRPO group: the batch's `prompt_group` column says which) are scored
with the prompt encoded once: inside a run, where attention runs one example at a time (`_runs_packed`) and it
keeps less for backward (`_one_row_pays`), every group end to end in one row
(`prefix_sharing.share_prefix_in_one_row`); otherwise in one packed row each under a 4D mask
(`prefix_sharing.share_prefix`), when the model's attention can take it. When no groups are given, inside
a run as one row of the batch's real tokens (`packed_rows`: no layer computes padding, attention per example;
SFT's rows run the prefix they all begin with once), outside one as the padded rows they are.
Either way the log-probs come back aligned with the padded batch, (B, T).

Memory: the (N, V) logits, their log-softmax and their gradient are the largest tensors of a small model's step
(N = 4,000 response tokens x V = 49,152 is 0.8 GB each in float32). `head_logps` never holds them for more than
`LOGIT_CHUNK_ELEMENTS / V` rows at once: each chunk's logits are computed, reduced to N numbers and freed, and
recomputed from the chunk's hidden states in backward (activation checkpointing of the output layer alone, as
Liger-Kernel's fused linear cross-entropy and Wijmans et al. 2024, "Cut Your Losses", avoid materialising
them). The recompute costs one more output-layer GEMM on the selected positions, ~2-3% of a step here. Where the
model's logits are its output layer's product alone (checked once per model, `_plain_linear_head`), the chunks
run in `_LinearHeadLogps`, whose backward forms the log-softmax's gradient in place and adds every chunk's weight
gradient into one tensor (autograd would hold three of those (V, H) tensors at once).

Everything is computed in float32 whatever the logits' dtype (bf16 has 8 bits of mantissa: a log-softmax over 49k
entries in bf16 is off by ~0.01 nats per token). Letters: B batch, T tokens, H hidden size, V vocabulary, N
selected positions. This module does not reduce over tokens for a loss (the algorithms' `masked_mean`/`aggregate`
do).
"""

from __future__ import annotations

import contextlib
import sys
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from posttrain.models.attention import packed_blocks, packed_segments, runs_per_segment
from posttrain.models.loading import active_dropout
from posttrain.models.prefix_sharing import (
    GROUP_KEY,
    GroupLayout,
    group_layout,
    mask_kind,
    share_prefix,
    share_prefix_in_one_row,
)
from posttrain.models.sharding import gathers_in_forward
from posttrain.models.tied_embeddings import claim as claim_tied_gradient

LOGIT_CHUNK_ELEMENTS = 2**24
"""Rows x vocabulary of one chunk of logits in `head_logps`: 64 MB in float32 (341 rows of a 49,152 vocabulary)."""

SOFTMAX_BLOCK_ELEMENTS = 2**21
"""Rows x vocabulary of one block of `_LinearHeadLogps`'s float32 work on a chunk's logits: its forward casts,
log-softmaxes and gathers them a block at a time, its backward makes their gradient a block at a time and writes
it over the chunk's logits (`_logits_grad_in_place`). 8 MB in float32 (42 rows of a 49,152 vocabulary) where the
chunk's float32 copies would be 67 MB each (two at once in forward, three in backward)."""

WEIGHT_GRAD_SLICE_ELEMENTS = 2**22
"""Elements of one slice (vocabulary rows x hidden) of a 16-bit chunk's output-layer weight gradient in
`_LinearHeadLogps.backward`, made and added into the float32 gradient one slice at a time: 8 MB in bf16 (7,281 of
the 49,152 rows at 576 wide) where the whole (V, H) part would be 57 MB at the peak of a bf16 run's memory."""


def target_positions(target_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(target, keep), both (B, T) bool: `target` marks the tokens to score (never column 0: nothing predicts it),
    `keep` the positions whose logits predict them (position t - 1 for token t).

    >>> target, keep = target_positions(torch.tensor([[1, 1, 0, 1]]))
    >>> target.int().tolist(), keep.int().tolist()
    ([[0, 1, 0, 1]], [[1, 0, 1, 0]])
    """
    target = target_mask.bool().clone()
    target[:, 0] = False
    return target, F.pad(target[:, 1:], (0, 1))


def gather_logps(
    logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(logits / temperature)[target] for each row, and (no gradient) the entropy of that distribution.

    logits: (N, V), any float dtype; targets: (N,) ids. Returns ((N,), (N,) or None), float32. A -inf logit (a
    banned token) contributes 0 to the entropy, not NaN.

    Worked example (V = 3, T = 1): logits [0, 0, ln 2] -> p = [1/4, 1/4, 1/2]; target 2 -> log(1/2) = -0.6931;
    entropy = -(2 x 1/4 ln 1/4 + 1/2 ln 1/2) = 1.0397. Logits [0, 0, 0], target 0 -> -ln 3 = -1.0986, entropy ln 3.

    >>> lp, ent = gather_logps(torch.tensor([[0.0, 0.0, 0.6931472], [0.0, 0.0, 0.0]]), torch.tensor([2, 0]),
    ...                        with_entropy=True)
    >>> lp, ent
    (tensor([-0.6931, -1.0986]), tensor([1.0397, 1.0986]))
    """
    logp_all = _float_log_softmax(logits, temperature)  # (N, V)
    picked = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (N,)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            p = logp_all.exp()
            entropy = -torch.where(p > 0, p * logp_all, torch.zeros_like(p)).sum(-1)  # (N,)
    return picked, entropy


def _float_log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(logits / temperature) over the last dim, in float32 (bf16 is cast up; float64 stays). The cast
    and divided copies are freed on return, before the caller's next tensor (the entropy's, or a gradient's)."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))  # a float32 input: itself, no copy
    if temperature != 1.0:  # x / 1.0 is x: skip the copy
        z = z / temperature
    return z.log_softmax(-1)


def scatter(values: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """(N,) values into a (B, T) tensor of zeros, float32 (float64 for float64 values), at the N positions where
    `where` is True (row-major)."""
    out = torch.zeros(where.shape, dtype=torch.promote_types(values.dtype, torch.float32), device=values.device)
    out[where] = values.to(out.dtype)
    return out


def repeat_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[index] along dim 0, for an `index` that repeats rows (a shared prompt's last position predicts the first
    token of every continuation), with a gradient that sums the repeats in the same order in every run.

    `x[index]`'s backward on the CPU adds the repeated rows' gradients with atomic float adds from several threads
    (torch's `index_put_` with `accumulate=True`, parallel unless deterministic algorithms are on), so their sum
    differs in the last bits from run to run. `index_select`'s backward (`index_add_`) adds them one index after
    another: the same values (up to that summation order), the same bits every run.
    """
    return x.index_select(0, index)


def selected_logits(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The (N, V) logits at the `keep` positions: what a forward with a boolean `logits_to_keep` returns, or the
    rows of full (B, T, V) logits from a model that ignores it."""
    n = int(keep.sum())
    return logits if logits.dim() == 2 and logits.shape[0] == n else logits[keep]


def decoder_of(lm) -> nn.Module:
    """The transformer body (embeddings, blocks, final norm) of a causal LM, under any peft wrapper."""
    return causal_lm_of(lm).get_decoder()


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """`model` out of its data-parallel wrappers: DDP (as Accelerate prepares it for several processes) or a
    DeepSpeed engine. What Accelerate's `extract_model_from_parallel` unwraps for posttrain's runs, without its
    side effect: it imports DeepSpeed wherever DeepSpeed is installed, to test for its engine class, which on a
    CPU-only machine prints DeepSpeed's "Setting accelerator to CPU" warning into every run's progress bar and adds
    ~0.3 s and ~15 MB. A model can only sit inside a DeepSpeed engine once DeepSpeed is imported, so its class is
    consulted only then. (posttrain never wraps models in FSDP1 or torch.compile, the other cases Accelerate's
    helper handles; FSDP2's `fully_shard` changes the module in place and needs no unwrapping.)"""
    wrappers: tuple[type, ...] = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    if (deepspeed := sys.modules.get("deepspeed")) is not None:
        wrappers += (deepspeed.DeepSpeedEngine,)
    while isinstance(model, wrappers):
        model = model.module
    return model


def causal_lm_of(lm) -> nn.Module:
    """The `...ForCausalLM` module itself, under a DDP (Accelerate) or peft wrapper (peft's layers are inside it)."""
    lm = unwrap_parallel(lm)
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


def hidden_and_logits(
    model, inputs: dict[str, torch.Tensor], keep: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder's last hidden states (B, T, H), after its final norm, and the logits (N, V) at the `keep`
    positions (B, T) bool, from one forward of `model` (so that every wrapper's hooks run: DDP, FSDP2, peft).

    The hidden states are caught on their way from the decoder to the output layer, which the model's own forward
    runs with a boolean `logits_to_keep` on the kept positions only."""
    caught: list[torch.Tensor] = []

    def catch(module, args, out):
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        caught.append(hidden)
        device = hidden.device.type  # the autocast the forward ran under, for `head_logps` to run under it too
        _FORWARD_AUTOCAST[module] = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))

    hook = decoder_of(model).register_forward_hook(catch)
    try:
        out = model(**inputs, use_cache=False, logits_to_keep=keep)
    finally:
        hook.remove()
    return caught[-1], selected_logits(out.logits, keep)


_FORWARD_AUTOCAST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""Per decoder: (autocast on, its dtype) in the forward that last produced its hidden states (`hidden_and_logits`).
A forward that autocasts itself (Accelerate wraps a prepared model's forward so under mixed precision) computes its
output layer under that autocast; `head_logps`, projecting the hidden states afterwards, does the same."""


def last_hidden_states(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The decoder's last hidden states (B, T, H), after its final norm: what the output layer reads
    (`hidden_and_logits` with no position kept, so none is projected onto the vocabulary)."""
    none = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)  # (B, T)
    return hidden_and_logits(model, inputs, none)[0]


class _HiddenStatesOnly:
    """A decoder output holding only `last_hidden_state` (also `[0]`, as transformers' outputs index); any other
    field a head's forward reads (GPT-2's `cross_attentions`, ...) is None, as in a decoder output without it."""

    def __init__(self, hidden: torch.Tensor):
        self.last_hidden_state = hidden

    def __getitem__(self, index: int) -> torch.Tensor:
        if index != 0:
            raise IndexError(index)
        return self.last_hidden_state

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return None


class _GivenHiddenStates(nn.Module):
    """Stands in for a causal LM's decoder: returns the hidden states it holds, whatever it is called with. `nested`:
    names under which it also stands in for a module the decoder holds, which a head's forward calls directly (OPT
    calls ``self.model.decoder(...)``); kept out of the module tree, which must not hold itself."""

    def __init__(self, hidden: torch.Tensor, nested: tuple[str, ...] = ()):
        super().__init__()
        self.hidden = hidden  # (1, n, H)
        for name in nested:
            self.__dict__[name] = self

    def forward(self, *args, **kwargs) -> _HiddenStatesOnly:
        return _HiddenStatesOnly(self.hidden)


@contextlib.contextmanager
def _decoder_replaced(lm: nn.Module, hidden: torch.Tensor):
    """`lm`'s decoder swapped for `_GivenHiddenStates(hidden)` inside the block, so that `lm`'s own forward turns
    given hidden states into logits with its own output layer and post-processing (Gemma 2/3
    `final_logit_softcapping`, Cohere `logit_scale`, Granite `logits_scaling`, whatever a family adds): the
    logits are always those of the model's own forward, never a re-implementation of its head."""
    name = lm.base_model_prefix
    decoder = getattr(lm, name)
    nested = tuple(n for n in ("decoder",) if isinstance(getattr(decoder, n, None), nn.Module))
    setattr(lm, name, _GivenHiddenStates(hidden, nested))
    try:
        yield
    finally:
        setattr(lm, name, decoder)


def _chunk_logps(lm, hidden, targets, temperature, with_entropy):
    """`gather_logps` of one chunk: hidden (n, H) -> logits (n, V) through `lm`'s forward -> (n,), (n,)."""
    with _decoder_replaced(lm, hidden.unsqueeze(0)):
        logits = lm(input_ids=targets.unsqueeze(0), use_cache=False).logits[0]  # (n, V)
    return gather_logps(logits, targets, temperature=temperature, with_entropy=with_entropy)


def head_logps(
    model,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`gather_logps` of the logits the model's forward would compute from `hidden`, `chunk_rows` rows at a time.

    hidden: (N, H), the decoder's last hidden states (after its final norm) at the positions to score;
    targets: (N,) ids. Returns ((N,), (N,) or None), float32, equal to `gather_logps` of the model's own (N, V)
    logits. With gradient, each chunk runs under activation checkpointing: only its (n, H) hidden states are kept
    for backward, and its logits, log-softmax and their gradient exist one chunk at a time (see the module
    docstring). `chunk_rows` defaults to `LOGIT_CHUNK_ELEMENTS // V`.
    """
    lm = causal_lm_of(model)
    region = _as_in_forward(lm, hidden.device.type)
    rows = chunk_rows or max(1, LOGIT_CHUNK_ELEMENTS // lm.config.get_text_config().vocab_size)
    with region():
        plain = _plain_linear_head(lm, hidden)
    if plain is not None:
        head, dtype = plain
        # a tied embedding's stand-in for the weight, to which the weight's gradient goes (tied_embeddings); or None
        stand_in = claim_tied_gradient(lm, head.weight)
        picked, entropy = _LinearHeadLogps.apply(hidden, head.weight, head.bias, targets, temperature, rows,
                                                 with_entropy, stand_in, dtype)  # fmt: skip
        return picked, (entropy if with_entropy else None)
    keep_graph = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in lm.parameters()))
    picked, entropy = [], []
    # split: backward concatenates the chunks' grads; N = 0 gives one empty chunk (a graph, a zero gradient)
    for h, t in zip(hidden.split(rows), targets.split(rows)):
        with region():  # each chunk a region of its own, as each call of a forward that autocasts itself
            if keep_graph:
                p, e = checkpoint(_chunk_logps, lm, h, t, temperature, with_entropy, use_reentrant=False)
            else:
                p, e = _chunk_logps(lm, h, t, temperature, with_entropy)
        picked.append(p)
        entropy.append(e)
    return torch.cat(picked), (torch.cat(entropy) if with_entropy else None)


def _as_in_forward(lm: nn.Module, device: str) -> Callable[[], contextlib.AbstractContextManager]:
    """A context for projecting hidden states as the forward that made them would have: under the autocast it ran
    under (`_FORWARD_AUTOCAST`) where that differs from the one in force here, else none. A forward that autocasts
    itself (Accelerate's wrapper of a prepared model) computes its output layer in that region; outside it, QLoRA in
    bf16 multiplied float32 hidden states (peft keeps the final norm in float32) by the bf16 output layer, and the
    step failed (an audit)."""
    state = _FORWARD_AUTOCAST.get(decoder_of(lm))
    if state is None or state == (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)):
        return contextlib.nullcontext
    return lambda: torch.autocast(device, dtype=state[1], enabled=state[0])


_PLAIN_HEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""Per language model, per (autocast on, its dtype, the hidden states' dtype, the ids of its output layer and of
its instance `forward` if any): the dtype in which its own forward computes the logits as its output layer's
product alone, or None, with a weak reference to that output layer (`_plain_linear_head`)."""


def _plain_linear_head(lm: nn.Module, hidden: torch.Tensor) -> tuple[nn.Linear, torch.dtype] | None:
    """`lm`'s output layer, and the dtype of its product, when the logits of `lm`'s own forward are exactly
    ``F.linear(hidden, W, b)`` computed in that dtype, so that `_LinearHeadLogps` may compute them itself; None
    otherwise (the chunks then run through the model's forward, `_chunk_logps`).

    It must be a plain `nn.Linear` (not a LoRA, quantised or otherwise wrapped layer) that no hook would see,
    and the model's forward must add nothing after it (Gemma 2's softcapping, Cohere's logit scale, Granite's
    scaling). That is checked, not assumed: once per model and autocast state, two rows of `hidden` go through
    the model's own forward, and its logits must equal ``F.linear`` bit for bit in one of the dtypes the forward
    may compute in: autocast's where it is on, the weight's, or a 16-bit one (a forward that autocasts itself,
    as Accelerate wraps a model's forward under mixed precision)."""
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if (type(head) is not nn.Linear or hidden.dim() != 2 or hidden.shape[0] == 0 or head._forward_hooks
            or head._forward_pre_hooks or nn.modules.module._global_forward_hooks
            or nn.modules.module._global_forward_pre_hooks):  # fmt: skip
        return None
    device = hidden.device.type
    # What the answer depends on: the autocast state, the hidden states' dtype, and the model's forward and output
    # layer as they are now (Accelerate replaces a prepared model's `forward` with an autocasting one).
    forward = lm.__dict__.get("forward")
    key = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device), hidden.dtype, id(head), id(forward))
    known = _PLAIN_HEADS.setdefault(lm, {})
    if key in known and known[key][1]() is not head:  # an id reused by another output layer
        del known[key]
    if key not in known:
        known[key] = (_probed_product_dtype(lm, head, hidden[:2].detach()), weakref.ref(head))
    dtype = known[key][0]
    return None if dtype is None else (head, dtype)


@torch.no_grad()
def _probed_product_dtype(lm: nn.Module, head: nn.Linear, probe: torch.Tensor) -> torch.dtype | None:
    """The dtype in which ``F.linear(probe, W, b)`` equals the logits of `lm`'s own forward from hidden states
    `probe` bit for bit, trying autocast's dtype where it is on, then the weight's, bf16 and fp16; None if none
    does (`_plain_linear_head`)."""
    device = probe.device.type
    with _decoder_replaced(lm, probe.unsqueeze(0)):
        theirs = lm(input_ids=torch.zeros(1, probe.shape[0], dtype=torch.long, device=probe.device),
                    use_cache=False).logits[0].float()  # fmt: skip
    first = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else head.weight.dtype
    for dtype in dict.fromkeys((first, head.weight.dtype, torch.bfloat16, torch.float16)):
        with torch.autocast(device, enabled=False):
            ours = F.linear(probe.to(dtype), head.weight.to(dtype), None if head.bias is None else head.bias.to(dtype))
        if ours.shape == theirs.shape and torch.equal(ours.float(), theirs):
            return dtype
    return None


class _LinearHeadLogps(torch.autograd.Function):
    """`gather_logps` of ``F.linear(hidden, weight, bias)``, `rows` rows at a time, with a backward that
    recomputes each chunk's logits and accumulates the weight's gradient into one tensor.

    What it saves over `_chunk_logps` under activation checkpointing (the same arithmetic, chunk for chunk): that
    path's backward hands autograd one (V, H) weight gradient per chunk, which autograd sums out of place, so
    three (V, H) tensors exist at once at the start of backward, the most memory a full fine-tuning step holds
    (benchmarks/README.md). Here the chunks' products are added into one gradient (`addmm_` when the product's
    dtype is the weight's); the logits' gradient is made a block of rows at a time and written over the chunk's
    logits, by torch's own kernels (`_logits_grad_in_place`). The forward runs `gather_logps` on the same logits as
    the model's forward, a block of rows at a time (`SOFTMAX_BLOCK_ELEMENTS`), so the log-probabilities are the same
    bits; the gradients are those autograd would compute, chunk for chunk, summed in another order (float
    rounding; bit for bit with one chunk, or two in bf16: tests/unit/test_chunked_logps.py). In a 16-bit product each
    chunk's weight gradient is 16-bit and the parts are summed in the weight's float32, as autograd does when
    each chunk casts the weight itself (posttrain's bf16 runs: Accelerate makes each call of the model's forward
    an autocast region of its own); under one autocast region around all the chunks, autocast's cache would
    share one 16-bit copy of the weight and autograd would sum the parts in 16 bits. The entropy has no
    gradient, as in `gather_logps`."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, rows, with_entropy, stand_in, dtype):
        device = hidden.device.type
        out_dtype = torch.promote_types(dtype, torch.float32)
        picked = torch.empty(hidden.shape[0], dtype=out_dtype, device=hidden.device)
        entropy = torch.empty_like(picked) if with_entropy else picked.new_empty(0)
        with torch.autocast(device, enabled=False):
            w = weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            block = _block_rows(weight.shape[0])
            for s in range(0, hidden.shape[0], rows):
                logits = F.linear(hidden[s : s + rows].to(dtype), w, b)  # (n, V) in the product's dtype
                # a block of rows at a time: a row's log-softmax reads that row alone, so the same bits as the
                # whole chunk at once, with one block's float32 copies instead of the chunk's
                for r in range(0, logits.shape[0], block):
                    p, e = gather_logps(logits[r : r + block], targets[s : s + rows][r : r + block],
                                        temperature=temperature, with_entropy=with_entropy)  # fmt: skip
                    picked[s + r : s + r + p.shape[0]] = p
                    if with_entropy:
                        entropy[s + r : s + r + p.shape[0]] = e
                del logits
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.temperature, ctx.rows, ctx.dtype = temperature, rows, dtype
        ctx.mark_non_differentiable(entropy)
        return picked, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_picked, _grad_entropy):
        hidden, weight, bias, targets = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        to_stand_in = ctx.needs_input_grad[7]  # the weight's gradient goes to a tied embedding's stand-in for it
        need_weight = need_weight or to_stand_in
        dtype, rows, temperature = ctx.dtype, ctx.rows, ctx.temperature
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = grad_bias = None
        with torch.autocast(hidden.device.type, enabled=False):
            w = None
            b = None if bias is None else bias.to(dtype)
            for s in range(0, hidden.shape[0], rows):
                if w is None:  # the first chunk's, or made again after a chunk freed its 16-bit copy (below)
                    w = weight.to(dtype)
                h = hidden[s : s + rows].to(dtype)
                grad_logits = _logits_grad_in_place(F.linear(h, w, b), targets[s : s + rows],
                                                    grad_picked[s : s + rows], temperature)  # fmt: skip
                if need_hidden:
                    grad_hidden[s : s + rows] = grad_logits @ w
                if need_weight:
                    if dtype == weight.dtype:
                        if grad_weight is None:
                            grad_weight = grad_logits.T @ h
                        else:
                            grad_weight.addmm_(grad_logits.T, h)
                    else:
                        # the 16-bit copy of the weight is not needed for this part: freed while it is made (the
                        # peak of a bf16 full fine-tuning step), made again for the next chunk, if any
                        w = None
                        grad_weight = _add_product_in_slices(grad_weight, grad_logits, h, weight.dtype)
                if need_bias:
                    part = grad_logits.sum(0)
                    grad_bias = part.to(bias.dtype) if grad_bias is None else grad_bias.add_(part)
                del grad_logits, h  # not alive while the next chunk's 16-bit weight copy and logits are made
        if to_stand_in:  # the tied embedding's backward adds its part into it (tied_embeddings)
            return grad_hidden, None, grad_bias, None, None, None, None, grad_weight, None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None


def _block_rows(vocab: int) -> int:
    """Rows of one `SOFTMAX_BLOCK_ELEMENTS` block of a vocabulary-wide tensor."""
    return max(1, SOFTMAX_BLOCK_ELEMENTS // max(vocab, 1))


def _logits_grad_in_place(logits: torch.Tensor, targets: torch.Tensor, g: torch.Tensor,
                          temperature: float) -> torch.Tensor:  # fmt: skip
    """The gradient of ``sum(g * log_softmax(logits / temperature).gather(1, targets))`` with respect to `logits`
    (n, V), in their dtype, written over `logits` and returned: a block of `SOFTMAX_BLOCK_ELEMENTS` at a time,
    each cast to float32, divided by the temperature, log-softmaxed, and through gather's and log_softmax's backward
    (torch's own kernels: an exp and a multiply-add of one's own give other last bits), divided by the temperature
    again and cast back. Every step reads one row alone (the log-softmax's sums, and its backward's sum of the
    row's incoming gradient, read before the row is overwritten), so blocks give the same bits as the whole chunk
    at once (tests/unit/test_chunked_logps.py), with one block's float32 copies where the chunk's would be three
    (67 MB each on a 341-row chunk of a 49k vocabulary)."""
    block = _block_rows(logits.shape[1])
    for r in range(0, logits.shape[0], block):
        part = logits[r : r + block]
        logp = _float_log_softmax(part, temperature)
        grad = torch.zeros_like(logp).scatter_(1, targets[r : r + block].unsqueeze(1),
                                               g[r : r + block].unsqueeze(1).to(logp.dtype))  # fmt: skip
        torch.ops.aten._log_softmax_backward_data.out(grad, logp, -1, logp.dtype, out=logp)
        del grad
        if temperature != 1.0:
            logp.div_(temperature)
        part.copy_(logp)
    return logits


def _add_product_in_slices(total: torch.Tensor | None, grad_logits: torch.Tensor, h: torch.Tensor,
                           dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    """``total + grad_logits.T @ h`` (or the product alone, cast to `dtype`, when `total` is None), the product made
    in its own (16-bit) dtype `WEIGHT_GRAD_SLICE_ELEMENTS` at a time: rows [v, v + n) of the product are
    ``grad_logits[:, v : v + n].T @ h``, the same dot products as the whole product's rows (the same values, bit for
    bit: tests/unit/test_chunked_logps.py), each cast or added into `total` as the whole part would have been."""
    vocab, width = grad_logits.shape[1], h.shape[1]
    first = total is None
    if first:
        total = torch.empty(vocab, width, dtype=dtype, device=h.device)
    step = max(1, WEIGHT_GRAD_SLICE_ELEMENTS // max(width, 1))
    for v in range(0, vocab, step):
        part = grad_logits[:, v : v + step].T @ h
        if first:
            total[v : v + step] = part
        else:
            total[v : v + step] += part
    return total


_NOTED: set[str] = set()


def _note_once(message: str) -> None:
    """Print `message` as a note once a process. Through `tqdm.write`: the training progress bar is on the
    terminal when the first batch is laid out, and the note gets a line of its own above it."""
    if message not in _NOTED:
        _NOTED.add(message)
        from tqdm.auto import tqdm

        tqdm.write(f"note: {message}")


def _group_layout(inputs: dict[str, torch.Tensor], groups: torch.Tensor) -> GroupLayout | None:
    """`prefix_sharing.group_layout`, with a note (once) when the rows cannot share their prompt."""
    layout = group_layout(inputs, groups)
    if layout is None:
        _note_once("rows whose real tokens are not one run from position 0 are scored without sharing their prompt")
    return layout


def _shared_prompt_inputs(model, inputs: dict[str, torch.Tensor], groups: torch.Tensor, keep: torch.Tensor,
                          layout: GroupLayout) -> tuple[dict[str, torch.Tensor], torch.Tensor] | None:  # fmt: skip
    """The forward's inputs with each group of rows packed into one row (`prefix_sharing.share_prefix`), and the
    flat index (N,) into the packed (R x S) positions of each `keep` position; None (with a note, once) when the
    model cannot take it, so the rows run as they are."""
    rows = share_prefix(inputs, groups, layout)
    lm = causal_lm_of(model)
    kind, why = mask_kind(lm.config, rows.input_ids.shape[1])
    if kind is None:
        _note_once(f"prompts are not shared between rows ({why}): the rows are scored as they are, padded")
        return None
    where = rows.index[keep]  # (N,)
    if bool((where < 0).any()):  # a position that predicts a target is padding: nothing to share it with
        return None
    # An additive mask in the dtype transformers' own eager mask has: the embeddings' (the hidden states').
    dtype = lm.get_input_embeddings().weight.dtype
    packed = {"input_ids": rows.input_ids, "position_ids": rows.position_ids,
              "attention_mask": rows.attention_mask(kind, dtype)}  # fmt: skip
    return packed, where


def _shared_prompt_row(model, inputs: dict[str, torch.Tensor], groups: torch.Tensor, keep: torch.Tensor,
                       layout: GroupLayout):  # fmt: skip
    """Each group's prompt once, every group end to end in one row, for attention one example at a time
    (`prefix_sharing.share_prefix_in_one_row`, `attention.packed_blocks`): ``(row inputs (1, N), blocks, where
    (B, T))``; None where it would not pay or a kept position is padding (the caller then tries
    `_shared_prompt_inputs`). The cost is decided from the groups before the row is built."""
    if not _one_row_pays(causal_lm_of(model).config, layout.blocks):
        return None
    row = share_prefix_in_one_row(inputs, groups, layout)
    if bool((row.index[keep] < 0).any()):
        return None
    return {"input_ids": row.input_ids, "position_ids": row.position_ids}, row.blocks, row.index


def _one_row_pays(config, blocks) -> bool:
    """Whether every group in one row, attended one sequence at a time (`_shared_prompt_row`), keeps less for
    backward per layer than a row per group under an (S, S) mask (`_shared_prompt_inputs`), by a count of elements:

        one row: N x A + E x Q          a row per group: R x S x (A + Q) + R x S^2

    N the groups' tokens (each prompt once), E the tokens of the sequences attention lays out (each prompt once per
    sequence), R groups padded to the longest, S tokens; Q = 2 (heads + kv heads) x head size, what attention keeps
    per token (queries, output, keys, values); A = 4 x hidden + 2 x intermediate, about what the rest of a lean
    layer keeps per token; the mask, S^2 a row, as SDPA keeps it. One row runs no padding, but copies each prompt's
    queries, keys and values into every sequence: a long prompt with short completions (8 x 100 tokens behind
    1,000) is cheaper masked, short prompts with long completions or pairs of uneven lengths in one row (measured
    on the embedded model: benchmarks/README.md, sixteenth session)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden, heads = text.hidden_size, text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    inner = getattr(text, "intermediate_size", None) or 4 * hidden
    q, a = 2 * (heads + kv_heads) * head_dim, 4 * hidden + 2 * inner
    lengths = [p + sum(conts) for p, conts in blocks]  # each group's row
    n = sum(lengths)
    e = sum(p * len(conts) + sum(conts) for p, conts in blocks)
    r, width = len(blocks), max(lengths)
    return n * a + e * q <= r * width * (a + q) + r * width * width


PACKABLE_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "olmo2"})
"""Model types whose padded rows `packed_rows` may put side by side: their attention is transformers' sdpa
function called with position ids, rotary positions from `position_ids`, and nothing else that would see across
rows (the lean layers' families, `models.layers.DECODER_LAYERS`)."""


def packed_rows(model, inputs: dict[str, torch.Tensor], *, shared_prefix: bool = False):
    """A right-padded batch as one row of its real tokens, each example's positions from 0, for attention one
    example at a time (`models.attention.packed_blocks`): ``(row inputs (1, R), blocks (((L, (n_1 - L, ...,
    n_B - L)),),), where (B, T))``, `where` the packed index of each real token (-1 at padding); or None to run the
    padded rows.

    Why: a padded batch computes every layer at B x T positions, padding included (5.4% of them in the SFT
    benchmark's batches, more when lengths vary). In one row of the R real tokens, every product, norm and
    pointwise op runs at R positions, and attention per example, causal over its own tokens: the keys each real
    query sees are the ones it sees in its padded row, at the same positions, so every real token's hidden state
    is the same up to the kernels' order of summation (tests/unit/test_packed_rows.py).

    `shared_prefix`: the L tokens every row begins with (a system prompt, instructions) are put in the row once,
    then each example's other tokens, at positions L, L + 1, ... (L = 0 when the rows differ from their first
    token, or when `_prefix_sharable` says no). Each example still attends to the prefix and its own tokens, so
    the log-probs and gradients are the same up to float rounding, from (B - 1) x L tokens fewer: 32% of the
    quickstart's, whose rows share 50 tokens. The layout is `prefix_sharing.share_prefix_in_one_row`'s with the
    whole batch one group (L = 0: the rows side by side, sharing nothing).

    Only where that holds and pays (`_runs_packed`), for a right-padded batch of several rows, with padding or a
    shared prefix, and no explicit positions."""
    real = _right_padded(inputs)
    if (real is None or real.shape[0] < 2 or set(inputs) - {"input_ids", "attention_mask"}
            or not bool(real[:, 0].all())):  # fmt: skip
        return None
    if not _runs_packed(model):
        return None
    one_group = torch.zeros(real.shape[0], dtype=torch.long)
    layout = group_layout(inputs, one_group)  # the rows' common prefix: the longest, within the shortest row
    (rows, prefix), = layout.groups
    if not (shared_prefix and _prefix_sharable(model)):
        prefix = 0
    if prefix:  # once a process: the run's tokens/s counts every row's tokens, the layers run fewer
        _note_once("the rows of a micro-batch that begin with the same tokens (a system prompt, shared instructions) "
                   f"run them once ({prefix} tokens in the first such batch; data.share_prompt=false runs every "
                   "row's tokens)")  # fmt: skip
    elif bool(real.all()):
        return None  # no padding and nothing shared: the rows as they are
    row = share_prefix_in_one_row(inputs, one_group, layout._replace(groups=[(rows, prefix)]))
    return {"input_ids": row.input_ids, "position_ids": row.position_ids}, row.blocks, row.index


def _prefix_sharable(model) -> bool:
    """Whether a shared prefix's tokens may run once for all rows (SFT's common prefix, a DPO pair's or a GRPO
    group's prompt): not while dropout is active (a training model with a dropout of rate > 0 on its modules,
    `loading.active_dropout`: LoRA's, attention's, the layers'), which would draw one mask for the prefix where the
    padded rows drew one per row, tying the rows' noise together; a note says so once."""
    if not model.training:
        return True
    if active_dropout(causal_lm_of(model)):  # the modules' rates, not the config's (`model.dropout: off` zeroes them)
        _note_once("the rows' common prefix is not shared while dropout is on (each row draws its own masks)")
        return False
    return True


def segments_of(model, inputs: dict[str, torch.Tensor]) -> tuple[tuple[int, ...], ...] | None:
    """For rows packed by `data.packing` (``position_ids`` restarting inside a row, no ``attention_mask``; see
    `data.collate`): per row, the lengths of its examples, where `_runs_packed` allows attention one example at a
    time; else None (transformers' block-diagonal mask over the whole row). An example starts wherever a position
    is not its predecessor's plus one, the rule transformers splits the row by
    (`masking_utils.find_packed_sequence_indices`)."""
    positions = inputs.get("position_ids")
    if positions is None or inputs.get("attention_mask") is not None or positions.dim() != 2:
        return None
    if not _runs_packed(model):
        return None
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    width = positions.shape[1]
    rows = []
    for row in starts.cpu():
        at = row.nonzero().flatten().tolist() + [width]
        rows.append(tuple(b - a for a, b in zip(at, at[1:])))
    return tuple(rows)


def _runs_packed(model) -> bool:
    """Whether packed rows of `model` may run attention one example at a time: inside a run whose "sdpa" attention
    does that (`runs_per_segment`; otherwise transformers' block-diagonal mask attends over the whole row, slower
    than padded rows), a model of `PACKABLE_MODEL_TYPES` with sdpa attention and no sliding window, its layers not
    compiled (`model.compile`: the examples' layout, read from a context variable inside the attention, changes
    with every batch, which a compiled layer would trace and recompile for)."""
    if not runs_per_segment():
        return False
    lm = causal_lm_of(model)
    config = lm.config.get_text_config()
    types = getattr(config, "layer_types", None)
    full = all(t == "full_attention" for t in types) if types else getattr(config, "sliding_window", None) is None
    return (config.model_type in PACKABLE_MODEL_TYPES and getattr(config, "_attn_implementation", None) == "sdpa"
            and full and not any(getattr(m, "posttrain_compiled", False) for m in lm.modules()))  # fmt: skip


def without_right_padding_mask(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`inputs` without their `attention_mask` when it only marks padding at the right end of each row (SFT and DPO
    batches), else `inputs` as they are (left-padded prompts, packed rows, explicit positions).

    Why it changes nothing that is scored: under causal attention a real token never sees a later position, so it
    never sees right padding, with or without the mask; the padding positions' own outputs change (they now attend to
    the earlier padding too) but carry no target, so their gradient is exactly zero, and positions default to 0..T-1
    either way. The real positions' hidden states and log-probs come out bit for bit the same, and every gradient
    the same to float rounding (bit for bit on some CPUs; on others SDPA's backward adds in another order:
    tests/unit/test_logprobs.py). Why drop it: with a padding mask transformers hands SDPA a (B, 1, T, T) mask,
    which SDPA converts to float and saves for backward in every layer (30 copies, 21 MB at 8 x 147 tokens, 63 MB at
    8 x 256, for the 135M model), and its attention computes every block; without one SDPA takes its causal path
    (`is_causal`), which keeps no mask and skips the blocks above the diagonal.
    """
    if _right_padded(inputs) is None:
        return inputs
    return {k: v for k, v in inputs.items() if k != "attention_mask"}


def _right_padded(inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The (B, T) boolean mask of real tokens when `inputs`' `attention_mask` marks only padding at the right end of
    each row and no explicit positions are given; None otherwise (no mask, left padding, packed rows, positions)."""
    mask = inputs.get("attention_mask")
    if mask is None or mask.dim() != 2 or inputs.get("position_ids") is not None:
        return None
    real = torch.arange(mask.shape[1], device=mask.device) < mask.sum(-1, keepdim=True)
    return real if torch.equal(mask.bool(), real) else None


def selected_token_logps(
    model,
    inputs: dict[str, torch.Tensor],
    target_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    groups: torch.Tensor | None = None,
    shared_prefix: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(token t | tokens < t) at the positions where `target_mask[:, t]` is 1; 0 elsewhere.

    inputs: the model's keyword inputs (`input_ids`, optional `attention_mask`, `position_ids`), (B, T);
    target_mask: (B, T), marks the tokens to score (response or completion tokens; column 0 is never scored);
    groups: (B,) ids of rows that share their prompt (`GROUP_KEY`), or None; shared_prefix: where the rows run as
    one packed row (`packed_rows`), the tokens they all begin with run once. Returns (logps (B, T), entropy (B, T)
    or None), float32, aligned with `input_ids`.

    Only the hidden states of the positions that predict a target are projected onto the vocabulary, a chunk at
    a time (`head_logps`; in one go, inside the forward, for a model sharded by FSDP2 or DeepSpeed ZeRO-3): prompt
    positions need hidden states but no logits, and the (B, T, V) logits are the largest activation of a small
    model. The logits come
    from the model's own forward, with its own post-processing (Gemma's softcapping, Cohere's logit scale).
    `temperature` divides them first, so that the log-probabilities are those of the distribution the rollout
    sampled from. With `groups`, each group's rows run as one packed row with their prompt once
    (`prefix_sharing`), when the model's attention can take it: the same log-probs, fewer tokens.
    """
    target, keep = target_positions(target_mask)
    # keep.nonzero() and target.nonzero() list the same rows in the same order (one shift within each row).
    targets = inputs["input_ids"][target]
    gathers = gathers_in_forward(unwrap_parallel(model))
    # Rows that share a prompt: inside a run, for a model whose attention runs one example at a time, every group in
    # one row with its prompt once (no mask); else each group in a row of its own under a 4D mask.
    # computed once for either layout; not while dropout is on, where each row must draw its own masks (as in SFT)
    layout = _group_layout(inputs, groups) if groups is not None and _prefix_sharable(model) else None
    one_row = (_shared_prompt_row(model, inputs, groups, keep, layout)
               if layout is not None and not gathers and _runs_packed(model) else None)  # fmt: skip
    shared = (_shared_prompt_inputs(model, inputs, groups, keep, layout)
              if layout is not None and one_row is None else None)  # fmt: skip
    forward_inputs = without_right_padding_mask(inputs) if shared is None else shared[0]
    if gathers:
        # FSDP2 and DeepSpeed ZeRO-3 gather the output layer's weights only inside a forward (ZeRO-3: around the
        # layer's own, and a checkpointed chunk's recompute in backward would find the weight partitioned again),
        # and each process may have a different number of chunks (collectives must match): one projection of the
        # kept rows, in the forward.
        # (One forward per call whether rows are packed or not, so every process still runs as many.)
        if shared is None:
            logits = selected_logits(model(**forward_inputs, use_cache=False, logits_to_keep=keep).logits,
                                     keep)  # (N, V)  # fmt: skip
        else:
            where = shared[1]
            packed_keep = torch.zeros(forward_inputs["input_ids"].numel(), dtype=torch.bool, device=where.device)
            packed_keep[where] = True  # a prompt's last position predicts the first token of every continuation
            rank = packed_keep.cumsum(0) - 1  # row of each kept packed position among the projected ones
            packed_keep = packed_keep.view_as(forward_inputs["input_ids"])
            logits = repeat_rows(selected_logits(model(**forward_inputs, use_cache=False,
                                                       logits_to_keep=packed_keep).logits, packed_keep),
                                 rank[where])  # (N, V)  # fmt: skip
        picked, entropy = gather_logps(logits, targets, temperature=temperature, with_entropy=with_entropy)
    else:
        packed = packed_rows(model, inputs, shared_prefix=shared_prefix) if shared is None and one_row is None else None
        if one_row is not None:  # the groups in one row, each prompt once, attended to example by example
            row_inputs, blocks, where = one_row
            with packed_blocks([blocks]):  # one row
                hidden = last_hidden_states(model, row_inputs)  # (1, N, H)
            kept = repeat_rows(hidden[0], where[keep])  # (N, H); a position may predict several targets
        elif packed is not None:  # the padded rows' real tokens side by side in one row, attended to row by row
            row_inputs, blocks, where = packed
            with packed_blocks([blocks]):
                hidden = last_hidden_states(model, row_inputs)  # (1, sum of lengths, H)
            kept = repeat_rows(hidden[0], where[keep])  # (N, H); under a shared prefix a position may repeat
        else:
            segments = segments_of(model, forward_inputs) if shared is None else None
            with packed_segments(segments) if segments is not None else contextlib.nullcontext():
                hidden = last_hidden_states(model, forward_inputs)  # (B, T, H), or (R, S, H) packed
            kept = hidden[keep] if shared is None else repeat_rows(hidden.flatten(0, 1), shared[1])  # (N, H)
        picked, entropy = head_logps(model, kept, targets, temperature=temperature, with_entropy=with_entropy)
    return scatter(picked, target), (scatter(entropy, target) if entropy is not None else None)


def no_grad_chunks(
    fn: Callable[[dict[str, torch.Tensor]], torch.Tensor | tuple[torch.Tensor, ...]],
    model: torch.nn.Module,
    tensors: dict[str, torch.Tensor],
    chunk: int,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """`fn(part)` over `tensors` (each with a leading N dimension) `chunk` rows at a time, with `model` in eval
    mode (no dropout) and no gradient; the parts' outputs concatenated on the CPU. For whole rollouts or datasets
    whose forward does not fit in one go: old log-probs, reference log-probs, values."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outs = []
    try:
        with torch.no_grad():
            for s in range(0, next(iter(tensors.values())).shape[0], chunk):
                out = fn({k: v[s : s + chunk].to(device) for k, v in tensors.items()})
                outs.append(tuple(o.cpu() for o in out) if isinstance(out, tuple) else out.cpu())
    finally:
        model.train(was_training)
    if outs and isinstance(outs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outs))
    return torch.cat(outs)


def chunked_token_logps(
    model, tensors: dict[str, torch.Tensor], target_key: str, chunk: int, *, temperature: float = 1.0
) -> torch.Tensor:
    """`selected_token_logps` of `tensors[target_key]`'s positions (N, T), `chunk` rows per forward, no gradient.

    Rows that share a prompt (`tensors[GROUP_KEY]`, when given) are put next to each other first (a stable sort
    by group; the results come back in the given order), so that a chunk holds whole groups and shares their
    prompts: a DPO batch (B chosen rows, then B rejected) would otherwise be cut between its two halves. The
    chunks are as many, of as many rows, as without groups."""
    inputs = ("input_ids", "attention_mask", "position_ids")

    def one(part):
        return selected_token_logps(
            model, {k: part[k] for k in inputs if k in part}, part[target_key], temperature=temperature,
            groups=part.get(GROUP_KEY),
        )[0]  # fmt: skip

    carried = {k: v for k, v in tensors.items() if k in (*inputs, target_key, GROUP_KEY)}
    if GROUP_KEY not in carried:
        return no_grad_chunks(one, model, carried, chunk)
    order = torch.sort(carried[GROUP_KEY].cpu(), stable=True).indices  # (N,): each group's rows together
    logps = no_grad_chunks(one, model, {k: v[order.to(v.device)] for k, v in carried.items()}, chunk)
    return logps[torch.argsort(order)]  # back in the rows' own order
