"""Tied embeddings' gradient handed from the output layer to the embedding's backward (`models.tied_embeddings`):
the same gradients bit for bit as autograd's sum of the two, without the embedding's own (V, H) tensor, and no
gradient lost when the hand-over is not taken."""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from posttrain.models import logprobs
from posttrain.models.logprobs import selected_token_logps
from posttrain.models.tied_embeddings import tie_output_gradient
from posttrain.testing import assert_as_accurate, tiny_model

V = 97


def _batch(seed=3):
    torch.manual_seed(seed)
    ids = torch.randint(3, 12, (3, 9))  # 9 distinct tokens over 27 positions: most repeat, some 3+ times
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 9, [0, 0, 0, 0, 1, 1, 1, 0, 0]])
    return ids, mask, torch.rand(3, 9)


def _step(model, ids, mask, weights, autocast=False):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        got, _ = selected_token_logps(model, {"input_ids": ids}, mask)
        (got * weights).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


class _VocabSized(TorchDispatchMode):
    """Counts the (V, H) float32 tensors with storage of their size that the ops make (the gradients of the tied
    matrix, and copies of it)."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.made = shape, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if (isinstance(out, torch.Tensor) and tuple(out.shape) == self.shape and out.dtype == torch.float32
                and out.untyped_storage().nbytes() >= out.numel() * 4):  # memory of its own (no expanded stand-in)
            self.made += 1
        return out


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("pad_token_id", [None, 5])
def test_handed_over_gradients_are_autograds_bit_for_bit(autocast, pad_token_id):
    """The embedding's part added into the output layer's gradient in place gives every gradient autograd gives,
    bit for bit (tokens repeated up to several times in the batch; with a padding token that gets no embedding
    gradient), and the embedding's backward makes no (V, H) tensor of its own."""
    ids, mask, weights = _batch()
    plain = tiny_model(V, tie_word_embeddings=True, pad_token_id=pad_token_id)
    tied = copy.deepcopy(plain)
    assert tie_output_gradient(tied)
    shape = tuple(plain.lm_head.weight.shape)
    counts = []
    grads = []
    for model in (plain, tied):
        with _VocabSized(shape) as seen:
            grads.append(_step(model, ids, mask, weights, autocast))
        counts.append(seen.made)
    want, got = grads
    assert want.keys() == got.keys() and "model.embed_tokens.weight" in got
    assert all(torch.equal(want[n], got[n]) for n in want)
    if pad_token_id is not None:
        assert (ids == pad_token_id).any()
    assert counts[1] == counts[0] - 1  # the embedding's own (V, H) gradient is not made


def test_two_forwards_one_backward_and_gradient_accumulation():
    """Two losses from two forwards summed into one backward, then a second backward accumulating into `.grad`:
    every other weight's gradient is autograd's bit for bit; the tied matrix's adds the same terms in another
    order, so it is as close to the float64 computation as autograd's is."""
    a, mask, wa = _batch(3)
    b, _, wb = _batch(4)
    plain = tiny_model(V, tie_word_embeddings=True)
    tied = copy.deepcopy(plain)
    exact = copy.deepcopy(plain).double()
    assert tie_output_gradient(tied)
    grads = []
    for model in (plain, tied, exact):
        model.zero_grad(set_to_none=True)
        la, _ = selected_token_logps(model, {"input_ids": a}, mask)
        lb, _ = selected_token_logps(model, {"input_ids": b}, mask)
        ((la * wa).sum() + (lb * wb).sum()).backward()
        lc, _ = selected_token_logps(model, {"input_ids": b}, mask)
        (lc * wa).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    want, got, exact_grads = grads
    matrix = "model.embed_tokens.weight"
    assert want.keys() == got.keys() and matrix in got
    assert all(torch.equal(got[n], want[n]) for n in want if n != matrix)
    assert_as_accurate(got[matrix], want[matrix], exact_grads[matrix])


def test_an_output_layer_fed_detached_hidden_states_still_gives_the_matrix_its_gradient():
    """The output layer fed hidden states detached from the embedding's output: its gradient still reaches the
    matrix (through the stand-in, whose embedding backward gets no gradient of its own), as autograd puts it there."""
    ids, mask, weights = _batch()
    plain = tiny_model(V, tie_word_embeddings=True)
    tied = copy.deepcopy(plain)
    assert tie_output_gradient(tied)
    target, keep = logprobs.target_positions(mask)
    grads = []
    for model in (plain, tied):
        model.zero_grad(set_to_none=True)
        hidden = logprobs.last_hidden_states(model, {"input_ids": ids}).detach()  # an embedding forward ran
        picked, _ = logprobs.head_logps(model, hidden[keep], ids[target])
        (picked * weights[target]).sum().backward()
        grads.append(model.lm_head.weight.grad.clone())
    assert torch.equal(grads[0], grads[1]) and grads[1].abs().sum() > 0


def test_backwards_that_do_not_reach_the_matrix_or_fail_leave_nothing_behind():
    """`torch.autograd.grad` and `backward(inputs=...)` for other weights leave the matrix's `.grad` alone, as they
    do without the hand-over; a backward that fails midway leaves nothing that changes the next step's gradients;
    the matrix's hooks see its whole gradient, once."""
    ids, mask, weights = _batch()
    plain = tiny_model(V, tie_word_embeddings=True)
    tied = copy.deepcopy(plain)
    assert tie_output_gradient(tied)
    for model in (plain, tied):
        got, _ = selected_token_logps(model, {"input_ids": ids}, mask)
        (norm_grad,) = torch.autograd.grad((got * weights).sum(), [model.model.norm.weight])
        assert norm_grad.abs().sum() > 0 and model.lm_head.weight.grad is None
        got, _ = selected_token_logps(model, {"input_ids": ids}, mask)
        (got * weights).sum().backward(inputs=[model.model.norm.weight])
        assert model.lm_head.weight.grad is None
        model.zero_grad(set_to_none=True)

    class Fails(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            raise RuntimeError("a backward that fails")

    hook = tied.model.norm.register_forward_hook(lambda module, args, out: Fails.apply(out))
    got, _ = selected_token_logps(tied, {"input_ids": ids}, mask)
    hook.remove()
    with pytest.raises(RuntimeError, match="fails"):
        (got * weights).sum().backward()  # the output layer's part was made, the embedding's backward never ran
    tied.zero_grad(set_to_none=True)
    seen = []
    for model in (plain, tied):
        model.lm_head.weight.register_hook(lambda g: seen.append(g.clone()))
    want, got = (_step(model, ids, mask, weights) for model in (plain, tied))
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])
    assert all(torch.equal(want[n], got[n]) for n in want)


def test_a_patched_model_pickles_and_deep_copies():
    """`torch.save` of the whole model loads back (the patched forward is a partial of a module function), and a
    deep copy hands over through its own embedding; both also after a forward with gradient whose stand-in no
    output layer claimed (a copy gets an empty slot, not a tensor of that forward's graph)."""
    import io

    ids, mask, weights = _batch()
    plain = tiny_model(V, tie_word_embeddings=True)
    tied = copy.deepcopy(plain)
    assert tie_output_gradient(tied)
    tied(input_ids=ids)  # the model's own forward: its output layer is not `_LinearHeadLogps`, nothing claims
    assert tied.model.embed_tokens._posttrain_tied_gradient.stand_in is not None
    buffer = io.BytesIO()
    torch.save(tied, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    copied = copy.deepcopy(tied)
    assert copied.model.embed_tokens.forward.args[0] is copied.model.embed_tokens
    assert loaded.model.embed_tokens._posttrain_tied_gradient.stand_in is None
    assert copied.model.embed_tokens._posttrain_tied_gradient.stand_in is None
    shape = tuple(plain.lm_head.weight.shape)
    with _VocabSized(shape) as unpatched:
        want = _step(plain, ids, mask, weights)
    for model in (loaded, copied):
        with _VocabSized(shape) as seen:
            got = _step(model, ids, mask, weights)
        assert all(torch.equal(want[n], got[n]) for n in want)
        assert seen.made == unpatched.made - 1  # no embedding gradient of its own: the hand-over ran


def test_nothing_is_handed_over_without_gradient_or_for_untied_or_frozen_embeddings():
    untied = tiny_model(V)
    assert not tie_output_gradient(untied)
    tied = tiny_model(V, tie_word_embeddings=True)
    assert tie_output_gradient(tied)
    slot = tied.model.embed_tokens._posttrain_tied_gradient
    ids, mask, _ = _batch()
    with torch.no_grad():
        selected_token_logps(tied, {"input_ids": ids}, mask)
    assert slot.stand_in is None  # a forward without gradient makes no stand-in
    tied.requires_grad_(False)
    tied.model.norm.weight.requires_grad_(True)
    got, _ = selected_token_logps(tied, {"input_ids": ids}, mask)
    assert slot.stand_in is None
    got.sum().backward()
    assert tied.lm_head.weight.grad is None and tied.model.norm.weight.grad is not None
