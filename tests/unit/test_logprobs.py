"""Log-probability and entropy helpers on tiny literal tensors, with the arithmetic worked out by hand."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from posttrain.models.logprobs import entropy_from_logits, model_token_logps, sequence_logps, token_logps

LN2, LN3, LN4 = math.log(2), math.log(3), math.log(4)


def test_token_logps_hand_worked():
    """V = 3.
    Position 0: logits [0, 0, ln 2] -> exp = [1, 1, 2], sum 4 -> p = [1/4, 1/4, 1/2].
        label 2 -> log(1/2) = -ln 2.
    Position 1: logits [0, 0, 0] -> uniform, p = 1/3 each; label 0 -> -ln 3.
    Row 2 repeats position 0 with label 0 -> log(1/4) = -ln 4, and position 1 with label 1 -> -ln 3.
    """
    logits = torch.tensor(
        [[[0.0, 0.0, LN2], [0.0, 0.0, 0.0]], [[0.0, 0.0, LN2], [0.0, 0.0, 0.0]]]
    )  # (B=2, T=2, V=3)
    labels = torch.tensor([[2, 0], [0, 1]])
    expected = torch.tensor([[-LN2, -LN3], [-LN4, -LN3]])
    assert_close(token_logps(logits, labels), expected, rtol=0, atol=1e-6)


def test_token_logps_matches_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11) * 4
    labels = torch.randint(0, 11, (3, 5))
    ce = F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), reduction="none").view(3, 5)
    assert_close(token_logps(logits, labels), -ce, rtol=0, atol=1e-5)


def test_token_logps_bf16_logits_computed_in_float32():
    """bf16 logits are upcast before the log-softmax: the result is the float32 computation on the same values."""
    torch.manual_seed(0)
    logits = (torch.randn(2, 4, 50) * 5).bfloat16()
    labels = torch.randint(0, 50, (2, 4))
    out = token_logps(logits, labels)
    assert out.dtype == torch.float32
    assert_close(out, token_logps(logits.float(), labels), rtol=0, atol=1e-6)


def test_token_logps_ignore_index_gives_zero():
    logits = torch.zeros(1, 3, 4)  # uniform: log(1/4) = -ln 4 everywhere
    labels = torch.tensor([[1, -100, 3]])
    assert_close(token_logps(logits, labels), torch.tensor([[-LN4, 0.0, -LN4]]), rtol=0, atol=1e-6)


def test_sequence_logps_sums_over_mask():
    """Row 0: -1 + -3 = -4 (the -2 is masked). Row 1: fully masked -> 0, and its -inf must not give NaN."""
    token = torch.tensor([[-1.0, -2.0, -3.0], [-float("inf"), -5.0, -6.0]])
    mask = torch.tensor([[1, 0, 1], [0, 0, 0]])
    out = sequence_logps(token, mask)
    assert_close(out, torch.tensor([-4.0, 0.0]), rtol=0, atol=0)
    assert not torch.isnan(out).any()


def test_entropy_uniform_is_log_v():
    for v in (2, 7, 49152):
        assert_close(
            entropy_from_logits(torch.zeros(1, 2, v)), torch.full((1, 2), math.log(v)), rtol=0, atol=1e-5
        )


def test_entropy_hand_worked_and_banned_tokens():
    """logits ln[2, 1, 1] -> p = [1/2, 1/4, 1/4]; H = 1/2 ln 2 + 2 * 1/4 ln 4 = 1.5 ln 2.
    logits [0, 0, -inf] -> p = [1/2, 1/2, 0]; H = ln 2 (the banned token adds 0, not NaN).
    """
    logits = torch.tensor([[[LN2, 0.0, 0.0], [0.0, 0.0, -float("inf")]]])
    assert_close(entropy_from_logits(logits), torch.tensor([[1.5 * LN2, LN2]]), rtol=0, atol=1e-6)


def test_entropy_bf16_returns_float32():
    logits = torch.zeros(1, 1, 8, dtype=torch.bfloat16)
    out = entropy_from_logits(logits)
    assert out.dtype == torch.float32
    assert_close(out, torch.tensor([[LN2 * 3]]), rtol=0, atol=1e-6)


def test_model_token_logps_is_shifted_next_token_logps(tiny_model):
    torch.manual_seed(0)
    ids = torch.randint(3, 200, (2, 6))
    with torch.no_grad():
        logits = tiny_model(input_ids=ids).logits  # (B, T, V)
        expected = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        out = model_token_logps(tiny_model, ids)
    assert out.shape == (2, 5)
    assert_close(out, expected, rtol=0, atol=1e-5)


def test_model_token_logps_right_padding_does_not_change_real_tokens(tiny_model):
    """Causal attention: pad tokens after the sequence cannot change the log-probs of the tokens before them."""
    ids = torch.tensor([[5, 6, 7, 8]])
    padded = torch.tensor([[5, 6, 7, 8, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        a = model_token_logps(tiny_model, ids)
        b = model_token_logps(tiny_model, padded, attention_mask=mask)
    assert_close(b[:, :3], a, rtol=0, atol=1e-5)


def test_model_token_logps_has_gradients(tiny_model):
    out = model_token_logps(tiny_model, torch.tensor([[4, 5, 6]]))
    out.sum().backward()
    assert tiny_model.lm_head.weight.grad is not None


@pytest.mark.parametrize("fn", [token_logps, entropy_from_logits])
def test_empty_batch(fn):
    logits = torch.zeros(0, 3, 5)
    out = fn(logits, torch.zeros(0, 3, dtype=torch.long)) if fn is token_logps else fn(logits)
    assert out.shape == (0, 3)
