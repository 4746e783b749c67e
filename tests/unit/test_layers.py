"""`models.layers`: the lean gated MLP gives the eager module's results and gradients bit for bit, and keeps one
(tokens x intermediate) tensor less per layer for backward."""

from __future__ import annotations

import copy

import pytest
import torch

from posttrain.models.layers import SiluMul, lean_mlps, silu_mul
from posttrain.testing import tiny_model


def test_silu_mul_matches_eager_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    gate = (torch.randn(3, 5, 7, generator=g) * 4).requires_grad_(True)  # wide range: SiLU's tails and its dip
    up = torch.randn(3, 5, 7, generator=g).requires_grad_(True)
    grad = torch.randn(3, 5, 7, generator=g)
    eager_out = torch.nn.functional.silu(gate) * up
    eager = torch.autograd.grad(eager_out, (gate, up), grad)
    lean_out = SiluMul.apply(gate, up)
    lean = torch.autograd.grad(lean_out, (gate, up), grad)
    assert torch.equal(lean_out, eager_out)
    assert torch.equal(lean[0], eager[0]) and torch.equal(lean[1], eager[1])


def test_silu_mul_hand_worked():
    # d/dg [silu(g) u] = u * s(g) (1 + g (1 - s(g))); at g = 0: u / 2. d/du = silu(g); silu(0) = 0, silu(2) = 2 s(2).
    gate = torch.tensor([0.0, 2.0], requires_grad=True)
    up = torch.tensor([3.0, -1.0], requires_grad=True)
    out = silu_mul(gate, up)
    out.sum().backward()
    s2 = 1 / (1 + torch.exp(torch.tensor(-2.0)))
    torch.testing.assert_close(out, torch.stack([torch.tensor(0.0), -2 * s2]), rtol=0, atol=1e-7)
    torch.testing.assert_close(gate.grad, torch.stack([torch.tensor(1.5), -(s2 * (1 + 2 * (1 - s2)))]), rtol=0,
                               atol=1e-7)  # fmt: skip
    torch.testing.assert_close(up.grad, torch.stack([torch.tensor(0.0), 2 * s2]), rtol=0, atol=1e-7)


def test_only_the_needed_gradient_is_computed():
    gate = torch.randn(4, requires_grad=True)
    up = torch.randn(4)  # e.g. a frozen projection's output
    silu_mul(gate, up).sum().backward()
    assert gate.grad is not None and up.grad is None


def _saved_storages(model, ids):
    seen = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = tuple(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, use_cache=False).logits.float().square().mean()
    return loss, seen


@pytest.mark.parametrize("lora", [False, True])
def test_lean_model_equals_eager_and_keeps_one_tensor_less_per_layer(lora):
    eager = tiny_model(hidden_size=32)  # intermediate 64, 2 layers
    if lora:
        from peft import LoraConfig, get_peft_model

        eager = get_peft_model(eager, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
        for n, p in eager.named_parameters():  # B = 0 at init would hide the adapters' part of the gradient
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(1))
    lean = copy.deepcopy(eager)
    assert lean_mlps(lean) == 2
    ids = torch.randint(3, 259, (2, 9), generator=torch.Generator().manual_seed(0))
    loss_e, saved_e = _saved_storages(eager, ids)
    loss_l, saved_l = _saved_storages(lean, ids)
    assert torch.equal(loss_l, loss_e)
    ge = torch.autograd.grad(loss_e, [p for p in eager.parameters() if p.requires_grad])
    gl = torch.autograd.grad(loss_l, [p for p in lean.parameters() if p.requires_grad])
    assert all(torch.equal(a, b) for a, b in zip(gl, ge, strict=True))
    wide = lambda saved: sum(1 for shape in saved.values() if shape[-1] == 64)  # noqa: E731
    assert wide(saved_e) - wide(saved_l) == 2  # silu(gate) of each of the 2 layers is no longer kept


def test_other_activations_are_left_alone():
    model = tiny_model(hidden_act="gelu")  # a Llama MLP with another activation: its forward stays the library's
    assert lean_mlps(model) == 0
