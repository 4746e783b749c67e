"""`models.attention.float32_attention_on_cpu`: bfloat16 CPU attention computed in float32 (torch's CPU flash
kernel is slow backward in bf16), the output cast back; anything else left to transformers' own "sdpa"."""

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from posttrain.models.attention import float32_attention_on_cpu


@pytest.fixture()
def attn(tiny_model):
    """The tiny Llama's first attention module (4 heads over 2 key/value heads: grouped-query attention)."""
    return tiny_model.model.layers[0].self_attn


def _qkv(dtype, b=2, t=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, 4, t, 8, generator=g)  # (b, heads, t, head_dim)
    k, v = torch.randn(b, 2, t, 8, generator=g), torch.randn(b, 2, t, 8, generator=g)
    return [x.to(dtype).requires_grad_() for x in (q, k, v)]


def _additive_causal_mask(b, t, dtype, padded_first=2):
    """(b, 1, t, t): 0 where a query may attend, the dtype's minimum elsewhere; row 1's first keys are padding."""
    allowed = torch.ones(t, t, dtype=torch.bool).tril().expand(b, 1, t, t).clone()
    allowed[1, :, :, :padded_first] = False
    allowed[1, :, :padded_first, :padded_first] = torch.eye(padded_first, dtype=torch.bool)  # keep rows defined
    return torch.zeros(b, 1, t, t, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def test_bf16_attention_under_autocast_is_the_float32_computation_cast_back(attn):
    q, k, v = _qkv(torch.bfloat16)
    with float32_attention_on_cpu(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](attn, q, k, v, None, dropout=0.0, scaling=attn.scaling)
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    want, _ = sdpa_attention_forward(attn, q32, k32, v32, None, dropout=0.0, scaling=attn.scaling)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, want.to(torch.bfloat16))  # autocast did not cast the inputs back to bf16
    # gradients reach the bf16 inputs as the float32 computation's, cast to bf16
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    out.backward(grad)
    want.backward(grad.float())
    for x, x32 in ((q, q32), (k, k32), (v, v32)):
        assert x.grad.dtype == torch.bfloat16 and torch.equal(x.grad, x32.grad.to(torch.bfloat16))


def test_float32_queries_under_bf16_autocast_are_rounded_as_autocast_would_then_computed_in_float32(attn):
    """Full fine-tuning: the rotary embedding's float32 cos and sin promote queries and keys to float32, values
    stay bf16, and autocast would run the kernel in bf16 on bf16 copies of them. It runs in float32 on those same
    bf16 values: the output is the float32 attention of the rounded inputs, cast to bf16 as autocast's, and the
    gradients reach the float32 queries and keys as autocast's cast passes them: the bf16 copies' gradients (the
    float32 computation's, rounded to bf16) cast up."""
    q, k, v = _qkv(torch.float32)
    v = v.detach().to(torch.bfloat16)
    with float32_attention_on_cpu(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](attn, q, k, v, None, dropout=0.0, scaling=attn.scaling)
        in_bf16, _ = sdpa_attention_forward(attn, q, k, v, None, dropout=0.0, scaling=attn.scaling)
    q32, k32 = (x.detach().to(torch.bfloat16).float().requires_grad_() for x in (q, k))
    want, _ = sdpa_attention_forward(attn, q32, k32, v.float(), None, dropout=0.0, scaling=attn.scaling)
    unrounded, _ = sdpa_attention_forward(attn, q.detach(), k.detach(), v.float(), None, dropout=0.0,
                                          scaling=attn.scaling)  # fmt: skip
    assert out.dtype == in_bf16.dtype == torch.bfloat16
    assert torch.equal(out, want.to(torch.bfloat16)) and not torch.equal(in_bf16, out)
    assert not torch.equal(want, unrounded)  # the rounding is not a no-op on these inputs
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    out.backward(grad)
    want.backward(grad.float())
    for x, x32 in ((q, q32), (k, k32)):
        assert x.grad.dtype == torch.float32 and torch.equal(x.grad, x32.grad.to(torch.bfloat16).float())


def test_it_is_the_exact_attention_rounded_once_to_bf16(attn):
    """Against float64: the output is the exact attention of the bf16 inputs rounded once to bf16, but for the
    rare element within float32's error of a rounding boundary (none of 4,096 here; the bound allows 4), and at
    least as often as torch's bf16 kernel manages (88-91% of elements measured, torch 2.13)."""
    q, k, v = (x.detach() for x in _qkv(torch.float32, t=64, seed=3))
    q, k = (3 * q).to(torch.bfloat16), (3 * k).to(torch.bfloat16)  # sharper softmaxes than unit scores
    v = v.to(torch.bfloat16)
    exact, _ = sdpa_attention_forward(attn, q.double(), k.double(), v.double(), None, dropout=0.0,
                                      scaling=attn.scaling)  # fmt: skip
    rounded = exact.to(torch.bfloat16)
    plain, _ = sdpa_attention_forward(attn, q, k, v, None, dropout=0.0, scaling=attn.scaling)
    with float32_attention_on_cpu():
        ours, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](attn, q, k, v, None, dropout=0.0, scaling=attn.scaling)
    share_ours = (ours == rounded).double().mean().item()
    assert share_ours >= 0.999
    assert share_ours >= (plain == rounded).double().mean().item()


def test_a_bf16_additive_mask_is_cast_up_with_the_inputs(attn):
    q, k, v = _qkv(torch.bfloat16, t=6)
    mask = _additive_causal_mask(2, 6, torch.bfloat16)
    with float32_attention_on_cpu():
        out, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](attn, q, k, v, mask, dropout=0.0, scaling=attn.scaling)
    want, _ = sdpa_attention_forward(attn, q.float(), k.float(), v.float(), mask.float(), dropout=0.0,
                                     scaling=attn.scaling)  # fmt: skip
    assert torch.equal(out, want.to(torch.bfloat16))


def test_float32_inputs_go_to_transformers_sdpa_untouched(attn):
    q, k, v = _qkv(torch.float32)
    mask = _additive_causal_mask(2, 7, torch.float32)
    want, _ = sdpa_attention_forward(attn, q, k, v, mask, dropout=0.0, scaling=attn.scaling)
    with float32_attention_on_cpu():
        out, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](attn, q, k, v, mask, dropout=0.0, scaling=attn.scaling)
    assert out.dtype == torch.float32 and torch.equal(out, want)


def test_the_table_entry_is_put_back_on_exit_and_left_alone_when_not_enabled():
    original = AttentionInterface._global_mapping["sdpa"]
    with float32_attention_on_cpu(enabled=False) as on:
        assert on is False and AttentionInterface._global_mapping["sdpa"] is original
    with pytest.raises(RuntimeError, match="boom"), float32_attention_on_cpu() as on:
        assert on is True and AttentionInterface._global_mapping["sdpa"].__wrapped__ is original
        raise RuntimeError("boom")
    assert AttentionInterface._global_mapping["sdpa"] is original
