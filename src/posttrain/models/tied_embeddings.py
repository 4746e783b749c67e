"""The gradient of an embedding matrix that is also the output layer (tied embeddings), without a second
vocabulary-sized tensor at the end of backward.

A model that ties its output layer to its input embeddings (SmolLM2, Qwen2.5 up to 3B, Gemma, Llama 3.2 1B and
3B) gives the matrix two gradients in a training step: the output layer's, made at the start of backward, and the
embedding's, made at its end. torch makes the embedding's as a dense (V, H) tensor (`embedding_dense_backward`:
zeros, and each input token's row added in), then autograd adds the two. That tensor is the last large
allocation of a full fine-tuning step's backward (113 MB in float32 on the embedded model; 0.54 GB for
Qwen2.5-0.5B), and by then the backward's frees have left the heap in pieces too small for it, so the heap grows
for it and the process's peak memory with it (benchmarks/README.md, fifteenth session).

With `tie_output_gradient`, the embedding's forward also returns a stand-in for the matrix (`_TiedLookup`: a
zero-stride tensor of the matrix's shape, no memory), which the output layer (`logprobs._LinearHeadLogps`) takes
as its input in the matrix's place (`claim`). The output layer's weight gradient then flows through autograd to
the embedding's backward as the stand-in's gradient, and the embedding's backward adds its own part into it in
place and returns it as the matrix's gradient: each token's summed rows are `embedding_dense_backward` over the
batch's distinct tokens only (the same kernel on the same rows in the same order: the same sums), added once into
the output layer's gradient, as autograd's sum of the two tensors adds each element once. So the gradient is the
same, bit for bit (tests/unit/test_tied_embeddings.py). Everything goes by the autograd graph: a backward that
does not reach the embedding (`torch.autograd.grad` for other inputs) drops the output layer's part as autograd
drops any unused gradient, a backward that fails leaves nothing behind, and the matrix's hooks see its whole
gradient once.

Not in multi-process runs (left as autograd makes them), nor for a sharded (DTensor) or partitioned (DeepSpeed
ZeRO-3) matrix, nor without gradient.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

_SLOT = "_posttrain_tied_gradient"


class _Slot:
    """The stand-in of a tied embedding's latest forward with gradient, until an output layer claims it. A copy or
    a pickle of the model gets an empty slot: a stand-in belongs to one forward's graph (and `copy.deepcopy` refuses
    a tensor inside a graph)."""

    def __init__(self) -> None:
        self.stand_in: torch.Tensor | None = None

    def __deepcopy__(self, memo) -> _Slot:
        return _Slot()

    def __reduce__(self):
        return _Slot, ()


class _TiedLookup(torch.autograd.Function):
    """``F.embedding(ids, weight, padding_idx)``, and a stand-in for `weight` whose gradient (the output layer's) the
    backward adds its own rows into, in place, instead of making a (V, H) gradient of its own."""

    @staticmethod
    def forward(ctx, ids, weight, padding_idx):
        ctx.save_for_backward(ids)
        ctx.num_weights, ctx.padding_idx = weight.shape[0], padding_idx
        ctx.set_materialize_grads(False)  # a stand-in nobody used gets None, not (V, H) zeros
        stand_in = weight.new_zeros(()).expand(weight.shape)
        return F.embedding(ids, weight, None if padding_idx < 0 else padding_idx), stand_in

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad, total):
        (ids,) = ctx.saved_tensors
        if grad is None:  # the embeddings reached no loss (hidden states detached): the output layer's part alone
            return None, total, None
        if total is None:  # no output layer used the stand-in: torch's own embedding gradient
            return None, torch.ops.aten.embedding_dense_backward(grad, ids, ctx.num_weights, ctx.padding_idx, False), \
                None  # fmt: skip
        # `total` is the output layer's weight gradient, made by its backward for this stand-in alone: the rows are
        # added into it in place
        tokens, local = ids.unique(return_inverse=True)  # sorted, so `local` orders the rows as `ids` does
        padding = -1
        if ctx.padding_idx >= 0 and bool((hit := tokens == ctx.padding_idx).any()):
            padding = int(hit.nonzero()[0, 0])
        sums = torch.ops.aten.embedding_dense_backward(grad, local, tokens.numel(), padding, False)  # (U, H)
        total.index_add_(0, tokens, sums.to(total.dtype))
        return None, total, None


def _hands_over(weight: torch.Tensor) -> bool:
    """Whether a gradient of `weight` may go by a stand-in: one process, a plain (not sharded, not partitioned)
    trained weight, gradient on."""
    dist = torch.distributed
    multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    return (torch.is_grad_enabled() and weight.requires_grad and not multi and type(weight) is nn.Parameter
            and not hasattr(weight, "ds_id"))  # fmt: skip


def _tied_forward(module: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    slot = getattr(module, _SLOT)
    slot.stand_in = None
    if not _hands_over(module.weight):
        return type(module).forward(module, ids)
    padding = -1 if module.padding_idx is None else module.padding_idx
    embeddings, slot.stand_in = _TiedLookup.apply(ids, module.weight, padding)
    return embeddings


def tie_output_gradient(model: nn.Module) -> bool:
    """Let the output layer of `model` (a causal LM whose output layer is its input embedding matrix) hand its
    gradient to the embedding's backward (module docstring). Returns whether it did: False for untied
    embeddings, or an embedding layer other than a plain `nn.Embedding` (max_norm, scale_grad_by_freq or sparse
    gradients set)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if (type(emb) is not nn.Embedding or head is None or getattr(head, "weight", None) is not emb.weight
            or emb.max_norm is not None or emb.scale_grad_by_freq or emb.sparse):  # fmt: skip
        return False
    setattr(emb, _SLOT, _Slot())
    emb.forward = functools.partial(_tied_forward, emb)  # a partial, not a bound method: a pickled model loads
    return True


def claim(lm: nn.Module, weight: torch.Tensor) -> torch.Tensor | None:
    """The stand-in an output layer over `weight` takes as its input in the matrix's place, so that its gradient
    goes to the embedding's backward: when `weight` is the tied matrix of `lm`'s embedding (`tie_output_gradient`)
    and that embedding's latest forward, with gradient, has not been claimed; None otherwise."""
    emb = lm.get_input_embeddings() if hasattr(lm, "get_input_embeddings") else None
    slot = getattr(emb, _SLOT, None)
    if slot is None or slot.stand_in is None or emb.weight is not weight or not _hands_over(weight):
        return None
    stand_in, slot.stand_in = slot.stand_in, None
    return stand_in
