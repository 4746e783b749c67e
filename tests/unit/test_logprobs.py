"""The one log-prob module on tiny literal tensors, with the arithmetic worked out by hand, and on a tiny model."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from posttrain.models import logprobs
from posttrain.models.logprobs import (
    chunked_token_logps,
    gather_logps,
    no_grad_chunks,
    scatter,
    selected_token_logps,
    target_positions,
)
from posttrain.testing import TINY_FAMILIES, assert_as_accurate, tiny_model

LN2, LN3, LN4 = math.log(2), math.log(3), math.log(4)


def test_gather_logps_hand_worked():
    """V = 3.
    Row 0: logits [0, 0, ln 2] -> exp = [1, 1, 2], sum 4 -> p = [1/4, 1/4, 1/2]; target 2 -> -ln 2.
    Row 1: logits [0, 0, 0] -> uniform, p = 1/3; target 0 -> -ln 3.
    Row 2: row 0's logits, target 0 -> log(1/4) = -ln 4.
    """
    logits = torch.tensor([[0.0, 0.0, LN2], [0.0, 0.0, 0.0], [0.0, 0.0, LN2]])
    picked, _ = gather_logps(logits, torch.tensor([2, 0, 0]))
    assert_close(picked, torch.tensor([-LN2, -LN3, -LN4]), rtol=0, atol=1e-6)


def test_gather_logps_matches_cross_entropy_and_temperature_divides_first():
    torch.manual_seed(0)
    logits = torch.randn(15, 11) * 4
    targets = torch.randint(0, 11, (15,))
    assert_close(gather_logps(logits, targets)[0], -F.cross_entropy(logits, targets, reduction="none"),
                 rtol=0, atol=1e-5)  # fmt: skip
    assert_close(gather_logps(logits, targets, temperature=0.5)[0],
                 -F.cross_entropy(logits / 0.5, targets, reduction="none"), rtol=0, atol=1e-5)  # fmt: skip


def test_bf16_logits_are_computed_in_float32():
    """bf16 logits are upcast before the log-softmax: the result is the float32 computation on the same values."""
    torch.manual_seed(0)
    logits = (torch.randn(8, 50) * 5).bfloat16()
    targets = torch.randint(0, 50, (8,))
    picked, entropy = gather_logps(logits, targets, with_entropy=True)
    assert picked.dtype == entropy.dtype == torch.float32
    want, want_entropy = gather_logps(logits.float(), targets, with_entropy=True)
    assert_close(picked, want, rtol=0, atol=1e-6)
    assert_close(entropy, want_entropy, rtol=0, atol=1e-6)


def test_entropy_uniform_is_log_v():
    for v in (2, 7, 49152):
        _, entropy = gather_logps(torch.zeros(2, v), torch.zeros(2, dtype=torch.long), with_entropy=True)
        assert_close(entropy, torch.full((2,), math.log(v)), rtol=0, atol=1e-5)


def test_entropy_hand_worked_and_banned_tokens():
    """logits ln[2, 1, 1] -> p = [1/2, 1/4, 1/4]; H = 1/2 ln 2 + 2 * 1/4 ln 4 = 1.5 ln 2.
    logits [0, 0, -inf] -> p = [1/2, 1/2, 0]; H = ln 2 (the banned token adds 0, not NaN).
    """
    logits = torch.tensor([[LN2, 0.0, 0.0], [0.0, 0.0, -float("inf")]])
    _, entropy = gather_logps(logits, torch.tensor([0, 1]), with_entropy=True)
    assert_close(entropy, torch.tensor([1.5 * LN2, LN2]), rtol=0, atol=1e-6)


def test_targets_are_predicted_by_the_previous_position_and_column_0_never():
    target, keep = target_positions(torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1]]))
    assert target.int().tolist() == [[0, 1, 1, 0], [0, 0, 1, 1]]
    assert keep.int().tolist() == [[1, 1, 0, 0], [0, 1, 1, 0]]
    assert_close(scatter(torch.tensor([1.0, 2.0, 3.0, 4.0]), target),
                 torch.tensor([[0.0, 1.0, 2.0, 0.0], [0.0, 0.0, 3.0, 4.0]]), rtol=0, atol=0)  # fmt: skip


def test_selected_token_logps_are_the_shifted_next_token_logps(tiny_model):
    torch.manual_seed(0)
    ids = torch.randint(3, 200, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 0, 1, 1]])
    with torch.no_grad():
        logits = tiny_model(input_ids=ids).logits  # (B, T, V)
        full = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # (B, T-1)
        out, entropy = selected_token_logps(tiny_model, {"input_ids": ids}, mask, with_entropy=True)
    target, _ = target_positions(mask)
    assert_close(out[:, 1:][target[:, 1:]], full[target[:, 1:]], rtol=0, atol=1e-5)
    assert (out[~target] == 0).all() and (entropy[~target] == 0).all()


def test_a_head_that_calls_the_base_models_decoder_scores_its_own_forward():
    """OPT's head calls ``self.model.decoder(...)``, under the stand-in that gives it the hidden states to score
    (an audit: every log-prob call failed with an AttributeError). Log-probs and gradients equal its forward's."""
    from posttrain.testing import tiny_model as make

    model = make(259, family="opt").eval()
    ids, mask = torch.randint(3, 259, (2, 7), generator=torch.Generator().manual_seed(0)), torch.ones(2, 7)
    out, _ = selected_token_logps(model, {"input_ids": ids}, mask)
    out.sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    full = model(input_ids=ids).logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    full.sum().backward()
    assert_close(out[:, 1:], full, rtol=0, atol=1e-6)
    assert got.keys() == {n for n, p in model.named_parameters() if p.grad is not None} and got
    for n, p in model.named_parameters():
        assert_close(got[n], p.grad, rtol=1e-5, atol=1e-6)


def test_right_padding_does_not_change_real_tokens(tiny_model):
    """Causal attention: pad tokens after the sequence cannot change the log-probs of the tokens before them."""
    ids, padded = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[5, 6, 7, 8, 0, 0]])
    with torch.no_grad():
        a, _ = selected_token_logps(tiny_model, {"input_ids": ids}, torch.ones(1, 4))
        b, _ = selected_token_logps(tiny_model, {"input_ids": padded, "attention_mask": torch.tensor([[1] * 4 + [0] * 2])},
                                    torch.tensor([[1, 1, 1, 1, 0, 0]]))  # fmt: skip
    assert_close(b[:, :4], a, rtol=0, atol=1e-5)


def test_selected_token_logps_have_gradients(tiny_model):
    out, _ = selected_token_logps(tiny_model, {"input_ids": torch.tensor([[4, 5, 6]])}, torch.ones(1, 3))
    out.sum().backward()
    assert tiny_model.lm_head.weight.grad is not None


def test_chunks_equal_one_forward_and_leave_the_model_as_it_was(tiny_model):
    torch.manual_seed(1)
    tensors = {"input_ids": torch.randint(3, 200, (5, 7)), "completion_mask": torch.ones(5, 7, dtype=torch.long)}
    tiny_model.train()
    with torch.no_grad():
        tiny_model.eval()
        whole, _ = selected_token_logps(tiny_model, {"input_ids": tensors["input_ids"]}, tensors["completion_mask"])
        tiny_model.train()
    chunked = chunked_token_logps(tiny_model, tensors, "completion_mask", 2)
    assert_close(chunked, whole, rtol=0, atol=1e-5)
    assert tiny_model.training and not chunked.requires_grad
    values = no_grad_chunks(lambda part: (part["input_ids"] * 2, part["input_ids"]), tiny_model, tensors, 3)
    assert torch.equal(values[0], tensors["input_ids"] * 2) and torch.equal(values[1], tensors["input_ids"])


def test_empty_selection():
    picked, entropy = gather_logps(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long), with_entropy=True)
    assert picked.shape == entropy.shape == (0,)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_temperature_scores_softmax_of_logits_over_t(tiny_model, temperature):
    ids = torch.tensor([[5, 9, 11, 13]])
    with torch.no_grad():
        logits = tiny_model(input_ids=ids).logits[0, :-1] / temperature
        want = logits.log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
        got, _ = selected_token_logps(tiny_model, {"input_ids": ids}, torch.ones(1, 4), temperature=temperature)
    assert_close(got[0, 1:], want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_right_padding_runs_without_its_mask_and_scores_the_same_bits(family, monkeypatch):
    """A right-padded batch (SFT's, DPO's) reaches the model without its attention mask (causal attention alone:
    SDPA keeps no mask for backward and skips the blocks above the diagonal), and its log-probs are bit for bit
    those of the forward with the mask: a real token never sees later positions, and the padding positions carry
    no target. Every parameter's gradient is the same to float rounding: bit for bit on the Intel VMs this was
    written on, 1-2 ulps of each tensor's largest element on an AMD EPYC one (SDPA's backward adds in another
    order with and without the mask)."""
    torch.manual_seed(0)
    model = tiny_model(family=family)
    ids = torch.randint(3, 200, (3, 12))
    mask = (torch.arange(12) < torch.tensor([[12], [8], [5]])).long()
    target = mask.clone()
    target[:, :3] = 0
    seen = []
    decoder = model.get_decoder()
    decoder.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("attention_mask")), with_kwargs=True)

    def run(model):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same dropout draws (gpt2 ships dropout 0.1)
        logps, _ = selected_token_logps(model, {"input_ids": ids, "attention_mask": mask}, target)
        (logps * torch.linspace(0.5, 2.0, 12)).sum().backward()  # weights, so that every position's gradient counts
        return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    exact_model = copy.deepcopy(model).double()
    logps, grads = run(model)
    assert seen[-1] is None
    monkeypatch.setattr(logprobs, "without_right_padding_mask", lambda inputs: inputs)  # the mask kept
    kept_logps, kept_grads = run(model)
    assert seen[-1] is not None
    _, exact = run(exact_model)  # the masked path in float64
    assert torch.equal(logps, kept_logps)
    assert (logps[target.bool()] != 0).all() and (logps[~target.bool()] == 0).all()
    assert grads.keys() == kept_grads.keys() and len(grads) > 5
    for name, grad in grads.items():  # bit for bit on some CPUs; on others SDPA's backward sums in another order
        assert_as_accurate(grad, kept_grads[name], exact[name], msg=name)


def test_only_a_right_padding_mask_is_dropped():
    ids = torch.ones(2, 4, dtype=torch.long)
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert logprobs.without_right_padding_mask({"input_ids": ids, "attention_mask": right}) == {"input_ids": ids}
    for kept in ({"input_ids": ids, "attention_mask": torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]])},  # left padding
                 {"input_ids": ids, "attention_mask": torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]])},  # a hole
                 {"input_ids": ids, "attention_mask": right, "position_ids": torch.arange(4).expand(2, 4)},
                 {"input_ids": ids, "attention_mask": torch.ones(2, 1, 4, 4)}):  # fmt: skip
        assert logprobs.without_right_padding_mask(kept) is kept
