"""Leaner activations for training: the gated MLP's product keeps two tensors for backward instead of three.

A Llama-family MLP computes ``down(silu(gate(x)) * up(x))``. Run as written, autograd keeps gate(x) (for SiLU's
backward), silu(gate(x)) and up(x) (for the product's backward), and the product itself (for ``down``'s weight or
LoRA gradient): four (tokens x intermediate) tensors a layer, 56% of the activations an SFT LoRA step keeps on
SmolLM2-135M (benchmarks/README.md, "Where SFT LoRA's memory goes"). `SiluMul` keeps only gate(x) and up(x) and
recomputes SiLU in backward: one (tokens x intermediate) tensor less per layer (-217 MB at 1,176 positions on the
135M model), for one elementwise SiLU more in backward and no extra matrix product. Liger-Kernel's fused SwiGLU
(Hsu et al. 2024, "Liger Kernel: Efficient Triton Kernels for LLM Training", sec. 3) keeps the same two tensors.

The result and the gradients are bit-identical to the eager module's: the forward runs the same two kernels
(`F.silu`, then the product), and backward recomputes SiLU with the same kernel and applies torch's own
``silu_backward`` to the same operands autograd would (tests/unit/test_layers.py checks `torch.equal`).

`lean_mlps` patches, on a model about to train, the MLPs whose class is one of `GATED_SILU_MLPS` (their forward
is exactly the line above) and whose activation is SiLU; any other MLP runs as its library wrote it.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

GATED_SILU_MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "Olmo2MLP"})
"""transformers' MLP classes whose forward is ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` (checked against
transformers 5.25 for each; Phi-3's, with one fused gate_up projection, is not one of them)."""


class SiluMul(torch.autograd.Function):
    """``silu(gate) * up``, saving only `gate` and `up` for backward."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``: through `SiluMul` when autograd will need it, plainly otherwise (no graph to save)."""
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return SiluMul.apply(gate, up)
    return F.silu(gate) * up


def _lean_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


def _is_silu(act: nn.Module) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def lean_mlps(model: nn.Module) -> int:
    """Give every gated-SiLU MLP of `model` the `SiluMul` forward; returns how many were patched."""
    patched = 0
    for module in model.modules():
        if type(module).__name__ in GATED_SILU_MLPS and _is_silu(getattr(module, "act_fn", None)):
            module.forward = types.MethodType(_lean_forward, module)
            patched += 1
    return patched
