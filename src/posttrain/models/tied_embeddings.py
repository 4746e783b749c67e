"""The gradient of an embedding matrix that is also the output layer (tied embeddings), without a second
vocabulary-sized tensor at the end of backward.

A model that ties its output layer to its input embeddings (SmolLM2, Qwen2.5 up to 3B, Gemma, Llama 3.2 1B and
3B) gives the matrix two gradients in a training step: the output layer's, made at the start of backward, and the
embedding's, made at its end. torch makes the embedding's as a dense (V, H) tensor (`embedding_dense_backward`:
zeros, and each input token's row added in), then autograd adds the two. That tensor is the last large
allocation of a full fine-tuning step's backward (113 MB in float32 on the embedded model; 0.54 GB for
Qwen2.5-0.5B), and by then the backward's frees have left the heap in pieces too small for it, so the heap grows
for it and the process's peak memory with it (benchmarks/README.md, "The tied embeddings' second gradient").

With `tie_output_gradient`, the output layer's backward (`logprobs._LinearHeadLogps`) hands its gradient over to
the embedding's backward (`TiedGradient.hand_over`) instead of to autograd, and the embedding's backward adds its
own part into it in place: each token's summed gradient is `embedding_dense_backward` over the batch's distinct
tokens only (the same kernel on the same rows in the same order: the same sums), added once into the output
layer's gradient, as autograd's sum of the two tensors adds each element once. So the gradient is the same, bit
for bit (tests/unit/test_tied_embeddings.py).

What guards the hand-over:
- the output layer takes the slot only when an embedding forward with gradient ran since its own last forward,
  for the same weight;
- a gradient handed over that no embedding backward of the same backward pass takes (an output layer fed hidden
  states that do not come from that embedding's output) is added into the weight's `.grad` when the pass ends (a
  callback of autograd's engine), so no gradient is lost;
- nothing is handed over in a multi-process run (DDP's and DeepSpeed's hooks must see each gradient as autograd
  makes it), nor for a weight that is sharded (a DTensor) or partitioned (DeepSpeed ZeRO-3).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

_SLOT = "_posttrain_tied_gradient"


class TiedGradient:
    """The hand-over slot of one tied embedding: the output layer's gradient on its way to the embedding's
    backward (see the module docstring)."""

    def __init__(self) -> None:
        self.fresh = False  # an embedding forward with gradient ran since the output layer's last forward
        self.grad: torch.Tensor | None = None  # handed over, waiting for the embedding's backward
        self._flush_queued = False

    def hand_over(self, grad: torch.Tensor, weight: torch.Tensor) -> None:
        """Keep the output layer's gradient `grad` of `weight` (called from its backward) for the embedding's
        backward; added to what an earlier output layer of the same pass handed over (as autograd adds the
        gradients of one weight); whatever no embedding backward takes goes into `weight.grad` when the pass
        ends."""
        self.grad = grad if self.grad is None else self.grad.add_(grad)
        if not self._flush_queued:
            self._flush_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(lambda: self._flush(weight))

    def take(self) -> torch.Tensor | None:
        grad, self.grad = self.grad, None
        return grad

    def _flush(self, weight: torch.Tensor) -> None:
        self._flush_queued = False
        grad = self.take()
        if grad is not None:  # no embedding backward ran in this pass: autograd's accumulation, by hand
            weight.grad = grad if weight.grad is None else weight.grad.add_(grad)


class _TiedLookup(torch.autograd.Function):
    """``F.embedding(ids, weight, padding_idx)`` whose backward adds its gradient into the output layer's, when that
    was handed over (`TiedGradient`), instead of making a (V, H) tensor of its own."""

    @staticmethod
    def forward(ctx, ids, weight, slot, padding_idx):
        ctx.save_for_backward(ids)
        ctx.slot, ctx.num_weights, ctx.padding_idx = slot, weight.shape[0], padding_idx
        return F.embedding(ids, weight, None if padding_idx < 0 else padding_idx)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        total = ctx.slot.take()
        if total is None:  # nothing handed over: torch's own embedding gradient
            return None, torch.ops.aten.embedding_dense_backward(grad, ids, ctx.num_weights, ctx.padding_idx, False), \
                None, None  # fmt: skip
        tokens, local = ids.unique(return_inverse=True)  # sorted, so `local` orders the rows as `ids` does
        padding = -1
        if ctx.padding_idx >= 0 and bool((hit := tokens == ctx.padding_idx).any()):
            padding = int(hit.nonzero()[0, 0])
        sums = torch.ops.aten.embedding_dense_backward(grad, local, tokens.numel(), padding, False)  # (U, H)
        total.index_add_(0, tokens, sums.to(total.dtype))
        return None, total, None, None


def _hands_over(weight: torch.Tensor) -> bool:
    """Whether a gradient of `weight` may go by the slot: one process, a plain (not sharded, not partitioned)
    trained weight, gradient on."""
    dist = torch.distributed
    multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    return (torch.is_grad_enabled() and weight.requires_grad and not multi and type(weight) is nn.Parameter
            and not hasattr(weight, "ds_id"))  # fmt: skip


def _tied_forward(self: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    if not _hands_over(self.weight):
        return type(self).forward(self, ids)
    slot = getattr(self, _SLOT)
    slot.fresh = True
    return _TiedLookup.apply(ids, self.weight, slot, -1 if self.padding_idx is None else self.padding_idx)


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
    setattr(emb, _SLOT, TiedGradient())
    emb.forward = types.MethodType(_tied_forward, emb)
    return True


def claim(lm: nn.Module, weight: torch.Tensor) -> TiedGradient | None:
    """The slot through which an output layer's forward over `weight`, with gradient, hands its gradient to the
    embedding of `lm`: when `weight` is the embedding's tied matrix (`tie_output_gradient`) and an embedding
    forward with gradient ran since the last claim; None otherwise."""
    emb = lm.get_input_embeddings() if hasattr(lm, "get_input_embeddings") else None
    slot = getattr(emb, _SLOT, None)
    if slot is None or emb.weight is not weight or not slot.fresh or not _hands_over(weight):
        return None
    slot.fresh = False
    return slot
