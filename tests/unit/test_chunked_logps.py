"""The output layer run a chunk of rows at a time (`head_logps`, under `selected_token_logps`) gives the same
log-probabilities, entropies and gradients as the model's own forward over all positions at once, on every tiny
family whose forward post-processes its logits (Gemma 2 softcapping, Cohere `logit_scale`, Granite
`logits_scaling`), with tied embeddings and under LoRA; and it never keeps more than one chunk of logits for
backward."""

import copy

import pytest
import torch
from torch.testing import assert_close

from posttrain.models import logprobs
from posttrain.models.logprobs import selected_token_logps, target_positions
from posttrain.testing import assert_as_accurate, tiny_model

CASES = [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": True}),
    ("gemma2", {"final_logit_softcapping": 0.2}),  # a cap small enough that tanh bends every logit
    ("cohere", {"logit_scale": 8.0}),
    ("granite", {"logits_scaling": 0.1}),
    ("gpt2", {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}),
]
V = 97


def _batch():
    torch.manual_seed(3)
    ids = torch.randint(3, V, (3, 9))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 9, [0, 0, 0, 0, 1, 1, 1, 0, 0]])
    weights = torch.rand(3, 9)  # a different gradient on every token, so a mixed-up row would show
    return ids, mask, weights


def _reference(model, ids, mask, temperature):
    """The unchunked computation: the model's own (B, T, V) logits, log-softmax at once, then the gather."""
    logits = model(input_ids=ids).logits[:, :-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature  # (B, T-1, V); float64 stays
    logp_all = logits.log_softmax(-1)
    picked = logp_all.gather(-1, ids[:, 1:, None])[..., 0]  # (B, T-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1).detach()
    target, _ = target_positions(mask)
    zero = torch.zeros(ids.shape[0], 1)
    return (torch.cat([zero, picked], 1) * target, torch.cat([zero, entropy], 1) * target)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _exact_grads(model, ids, mask, weights, temperature):
    """The unchunked gradients in float64 (a copy of the model): what both float32 paths approximate."""
    model.zero_grad(set_to_none=True)
    exact = copy.deepcopy(model).double()
    want, _ = _reference(exact, ids, mask, temperature)
    (-(want * weights.double()).sum()).backward()
    return _grads(exact)


@pytest.mark.parametrize("family,config", CASES, ids=[f"{f}{'-tied' if c.get('tie_word_embeddings') else ''}"
                                                      for f, c in CASES])  # fmt: skip
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logps_and_gradients_equal_the_models_own_forward(monkeypatch, family, config, temperature):
    model = tiny_model(V, family=family, **config)
    model.eval()  # no dropout: both passes must see the same function
    ids, mask, weights = _batch()
    want, want_entropy = _reference(model, ids, mask, temperature)
    (-(want * weights).sum()).backward()
    want_grads = _grads(model)
    model.zero_grad(set_to_none=True)

    monkeypatch.setattr(logprobs, "LOGIT_CHUNK_ELEMENTS", 4 * V)  # 4 rows per chunk: 17 targets -> 5 chunks
    got, entropy = selected_token_logps(model, {"input_ids": ids}, mask, temperature=temperature, with_entropy=True)
    (-(got * weights).sum()).backward()
    got_grads = _grads(model)

    assert_close(got, want, rtol=0, atol=2e-6)
    assert_close(entropy, want_entropy, rtol=0, atol=2e-6)
    assert got_grads.keys() == want_grads.keys() and len(got_grads) > 0
    exact = _exact_grads(model, ids, mask, weights, temperature)
    for name, g in want_grads.items():  # as accurate as the unchunked float32 gradient (`assert_as_accurate`)
        assert_as_accurate(got_grads[name], g, exact[name], msg=name)


def test_lora_gradients_equal_the_unchunked_ones(monkeypatch):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model(V, family="gemma2", final_logit_softcapping=0.2),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))  # fmt: skip
    model.eval()
    ids, mask, weights = _batch()
    want, _ = _reference(model, ids, mask, 1.0)
    (-(want * weights).sum()).backward()
    want_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    monkeypatch.setattr(logprobs, "LOGIT_CHUNK_ELEMENTS", 3 * V)
    got, _ = selected_token_logps(model, {"input_ids": ids}, mask)
    (-(got * weights).sum()).backward()
    assert_close(got, want, rtol=0, atol=2e-6)
    assert {n for n in want_grads} == {n for n in _grads(model)} and all("lora_" in n for n in want_grads)
    exact = _exact_grads(model, ids, mask, weights, 1.0)
    for name, g in _grads(model).items():
        assert_as_accurate(g, want_grads[name], exact[name], msg=name)


def test_no_more_than_one_chunk_of_logits_is_kept_for_backward(monkeypatch):
    """The (N, V) log-softmax is what an unchunked loss keeps for backward; chunked, each chunk's logits are
    recomputed from its hidden states, so nothing vocabulary-sized outlives its chunk."""
    model = tiny_model(V)
    ids, mask, _ = _batch()
    n_targets = int(target_positions(mask)[0].sum())
    monkeypatch.setattr(logprobs, "LOGIT_CHUNK_ELEMENTS", 4 * V)
    kept: list[torch.Tensor] = []

    def keep(t):
        kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        got, _ = selected_token_logps(model, {"input_ids": ids}, mask)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}  # the output layer's W^T is (H, V)
    vocab_sized = [tuple(t.shape) for t in kept
                   if t.shape[-1] == V and t.numel() > 4 * V and t.untyped_storage().data_ptr() not in weights]  # fmt: skip
    assert n_targets > 4 and vocab_sized == []
    got.sum().backward()  # the recompute runs: gradients still arrive
    assert model.lm_head.weight.grad.abs().sum() > 0


def _spy_fused(monkeypatch) -> list[torch.dtype]:
    """The product dtype of each `_LinearHeadLogps` call (the output layer computed here, not by the model)."""
    calls: list[torch.dtype] = []
    apply = logprobs._LinearHeadLogps.apply

    def spy(*args):
        calls.append(args[-1])
        return apply(*args)

    monkeypatch.setattr(logprobs._LinearHeadLogps, "apply", spy)
    return calls


def _through_the_models_forward(monkeypatch) -> None:
    """From here on the output layer's chunks always run through the model's own forward (`_chunk_logps`)."""
    monkeypatch.setattr(logprobs, "_plain_linear_head", lambda lm, hidden: None)


PLAIN = {"llama": True, "llama-tied": True, "gemma2": False, "cohere": False, "granite": False, "gpt2": True}


@pytest.mark.parametrize("family,config", CASES, ids=list(PLAIN))
def test_the_output_layer_is_computed_here_only_where_the_models_forward_adds_nothing(monkeypatch, family, config):
    """`_LinearHeadLogps` takes over the output layer only where the model's own logits are that layer's product
    bit for bit (a probe of two rows, once per model and autocast state); Gemma 2's softcapping, Cohere's logit
    scale and Granite's scaling keep the model's forward. Either way the log-probs are the same bits."""
    model = tiny_model(V, family=family, **config)
    model.eval()
    ids, mask, _ = _batch()
    calls = _spy_fused(monkeypatch)
    got, _ = selected_token_logps(model, {"input_ids": ids}, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got16, _ = selected_token_logps(model, {"input_ids": ids}, mask)
    plain = PLAIN[family + ("-tied" if config.get("tie_word_embeddings") else "")]
    assert calls == ([torch.float32, torch.bfloat16] if plain else [])
    _through_the_models_forward(monkeypatch)
    want, _ = selected_token_logps(model, {"input_ids": ids}, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want16, _ = selected_token_logps(model, {"input_ids": ids}, mask)
    assert torch.equal(got, want) and torch.equal(got16, want16)


def test_a_forward_that_autocasts_itself_is_followed(monkeypatch):
    """Accelerate runs a model's forward under autocast for mixed precision (the caller is not under autocast):
    the probe finds the logits are the product in bf16, and the log-probs equal the model's own."""
    model = tiny_model(V)
    ids, mask, _ = _batch()
    want, _ = selected_token_logps(model, {"input_ids": ids}, mask)  # float32: the probe's first answer
    model.forward = torch.autocast("cpu", dtype=torch.bfloat16)(model.forward)
    got, _ = selected_token_logps(model, {"input_ids": ids}, mask)
    assert [dtype for dtype, _ in logprobs._PLAIN_HEADS[model].values()] == [torch.float32, torch.bfloat16]
    assert not torch.equal(got, want)
    _through_the_models_forward(monkeypatch)
    reference, _ = selected_token_logps(model, {"input_ids": ids}, mask)
    assert torch.equal(got, reference)


def _most_weight_gradients_at_once(model, ids, mask) -> int:
    """The most (V, H) tensors other than parameters that exist at once while `selected_token_logps`' backward
    runs: the output layer's weight gradient and its parts (tracked through every op's output)."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    shape = tuple(model.lm_head.weight.shape)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    class Track(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.refs, self.most = [], 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and tuple(out.shape) in (shape, shape[::-1]):
                if out.untyped_storage().data_ptr() not in params:
                    self.refs.append(weakref.ref(out))
            alive = {r().untyped_storage().data_ptr() for r in self.refs if r() is not None}
            self.most = max(self.most, len(alive))
            return out

    got, _ = selected_token_logps(model, {"input_ids": ids}, mask)
    track = Track()
    with track:
        got.sum().backward()
    return track.most


def test_the_weight_gradient_of_every_chunk_is_added_into_one_tensor(monkeypatch):
    """Through the model's forward, each chunk hands autograd a (V, H) weight gradient that it sums out of place:
    three exist at once at the start of backward (full fine-tuning's peak). `_LinearHeadLogps` adds every chunk's
    part into one. The gradient is the same up to the order of the sums."""
    monkeypatch.setattr(logprobs, "LOGIT_CHUNK_ELEMENTS", 4 * V)  # 5 chunks
    ids, mask, weights = _batch()
    model = tiny_model(V)
    model.model.embed_tokens.weight.requires_grad_(False)  # its gradient has the output layer's shape: none here
    assert _most_weight_gradients_at_once(model, ids, mask) == 1
    fused = _grads(model)
    model.zero_grad(set_to_none=True)
    _through_the_models_forward(monkeypatch)
    assert _most_weight_gradients_at_once(model, ids, mask) == 3
    through_model = _grads(model)
    # every chunk's gradient into the hidden states is autograd's, bit for bit (torch's own backward kernels), so
    # every layer's gradient is too; the output layer's sums its chunks' parts in another order
    assert fused.keys() == through_model.keys()
    assert all(torch.equal(fused[n], through_model[n]) for n in fused if n != "lm_head.weight")
    exact = copy.deepcopy(model).double()
    _reference(exact, ids, mask, 1.0)[0].sum().backward()
    assert_as_accurate(fused["lm_head.weight"], through_model["lm_head.weight"], exact.lm_head.weight.grad)


@pytest.mark.parametrize("blocks", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_in_one_chunk_the_fused_gradients_are_autograds_bit_for_bit(monkeypatch, temperature, blocks):
    """One chunk (the default for up to 341 scored positions of a 49k vocabulary): the same kernels on the same
    values as autograd through the model's forward, so the same bits everywhere, the output layer included; also
    with the log-softmax's backward run 3 rows at a time (`SOFTMAX_BLOCK_ELEMENTS`)."""
    if blocks:
        monkeypatch.setattr(logprobs, "SOFTMAX_BLOCK_ELEMENTS", 3 * V)
    ids, mask, weights = _batch()
    model = tiny_model(V, tie_word_embeddings=True)
    grads = []
    for plain in (True, False):
        if not plain:
            _through_the_models_forward(monkeypatch)
        model.zero_grad(set_to_none=True)
        got, _ = selected_token_logps(model, {"input_ids": ids}, mask, temperature=temperature)
        (got * weights).sum().backward()
        grads.append((got.detach(), _grads(model)))
    (p_f, g_f), (p_m, g_m) = grads
    assert torch.equal(p_f, p_m) and g_f.keys() == g_m.keys() and len(g_f) > 0
    assert all(torch.equal(g_f[n], g_m[n]) for n in g_f)


@pytest.mark.parametrize("sliced", [False, True])
def test_under_bf16_autocast_the_fused_gradients_are_the_models_own(monkeypatch, sliced):
    """A bf16 run as posttrain trains it (Accelerate autocasts the model's forward, so each chunk through the
    model's forward is an autocast region of its own): the product runs in bf16 and so do its gradients, and the
    float32 weight's gradient is the sum of the chunks' bf16 parts in float32. The same log-probs and gradients
    bit for bit. (Two chunks: a sum of two is the same whichever comes first; with more, the order differs.)
    Sliced: each chunk's bf16 part made 10 vocabulary rows at a time (`WEIGHT_GRAD_SLICE_ELEMENTS`; a 49k
    vocabulary runs in slices of 7,281 rows) and the log-softmax's backward 4 rows at a time
    (`SOFTMAX_BLOCK_ELEMENTS`; 42 rows), still the same bits."""
    monkeypatch.setattr(logprobs, "LOGIT_CHUNK_ELEMENTS", 9 * V)  # 17 targets: 2 chunks
    ids, mask, weights = _batch()
    model = tiny_model(V)
    if sliced:  # also the log-softmax's backward 4 rows at a time
        monkeypatch.setattr(logprobs, "WEIGHT_GRAD_SLICE_ELEMENTS", 10 * model.config.hidden_size)
        monkeypatch.setattr(logprobs, "SOFTMAX_BLOCK_ELEMENTS", 4 * V)
    model.forward = torch.autocast("cpu", dtype=torch.bfloat16)(model.forward)
    calls = _spy_fused(monkeypatch)
    grads = []
    for plain in (True, False):
        if not plain:
            _through_the_models_forward(monkeypatch)
        model.zero_grad(set_to_none=True)
        hidden = logprobs.last_hidden_states(model, {"input_ids": ids}).detach().requires_grad_()
        target, keep = target_positions(mask)
        picked, _ = logprobs.head_logps(model, hidden[keep], ids[target], temperature=0.7)
        (picked * weights[target]).sum().backward()
        grads.append((picked.detach(), hidden.grad, model.lm_head.weight.grad))
    assert calls == [torch.bfloat16]
    (p_f, h_f, w_f), (p_m, h_m, w_m) = grads
    assert torch.equal(p_f, p_m) and torch.equal(h_f, h_m) and torch.equal(w_f, w_m)


def test_under_bf16_autocast_no_whole_16_bit_weight_gradient_part_is_made(monkeypatch):
    """A bf16 chunk's part of the float32 weight gradient is made a slice of the vocabulary at a time: no matrix
    product of the backward outputs a (V, H) tensor (on the embedded model that part was 57 MB at the peak of a bf16
    full fine-tuning step), while the float32 gradient is one (V, H) tensor; and the bf16 copy of the weight is
    not alive while a part is made (made again for the next chunk: 2 copies over 2 chunks)."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    monkeypatch.setattr(logprobs, "LOGIT_CHUNK_ELEMENTS", 9 * V)  # 2 chunks
    ids, mask, weights = _batch()
    model = tiny_model(V)
    monkeypatch.setattr(logprobs, "WEIGHT_GRAD_SLICE_ELEMENTS", 10 * model.config.hidden_size)
    model.forward = torch.autocast("cpu", dtype=torch.bfloat16)(model.forward)
    hidden = logprobs.last_hidden_states(model, {"input_ids": ids}).detach().requires_grad_()
    target, keep = target_positions(mask)
    picked, _ = logprobs.head_logps(model, hidden[keep], ids[target])
    products: list[tuple[int, ...]] = []
    copies: list[weakref.ref] = []  # bf16 copies of the output layer's weight
    copy_alive_at_slice: list[bool] = []
    hidden_size = model.config.hidden_size

    class Products(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._to_copy.default and tuple(out.shape) == (V, hidden_size):
                copies.append(weakref.ref(out))
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
                products.append(tuple(out.shape))
                if out.shape[1] == hidden_size and out.shape[0] == 10:  # a slice of a weight-gradient part
                    copy_alive_at_slice.append(any(c() is not None for c in copies))
            return out

    with Products():
        (picked * weights[target]).sum().backward()
    vocab_rows = [shape for shape in products if shape[1] == hidden_size and shape[0] > 1]
    assert vocab_rows and max(shape[0] for shape in vocab_rows) == 10  # slices of 10 of the 97 rows
    assert len(copies) == 2 and copy_alive_at_slice and not any(copy_alive_at_slice)
    assert model.lm_head.weight.grad.shape == (V, model.config.hidden_size)
    assert model.lm_head.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("with_entropy", [False, True])
def test_under_bf16_autocast_the_float32_work_on_a_chunk_runs_a_block_of_rows_at_a_time(monkeypatch, with_entropy):
    """A bf16 chunk's logits are cast to float32, log-softmaxed and gathered (forward), and their gradient made
    (backward, written over the chunk's bf16 logits), a `SOFTMAX_BLOCK_ELEMENTS` block of rows at a time: no float32
    tensor of more than a block's rows of the vocabulary is made, in forward or backward, while the chunks hold 9
    rows (on the embedded model the whole chunk's float32 copies were 67 MB each, up to three at once); and the
    log-probs, entropies and gradients are those of whole chunks, bit for bit."""
    from torch.utils._python_dispatch import TorchDispatchMode

    monkeypatch.setattr(logprobs, "LOGIT_CHUNK_ELEMENTS", 9 * V)  # 17 targets: chunks of 9 and 8 rows
    ids, mask, weights = _batch()
    model = tiny_model(V)
    model.forward = torch.autocast("cpu", dtype=torch.bfloat16)(model.forward)
    target, keep = target_positions(mask)
    hidden_size = model.config.hidden_size

    class Float32Rows(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.rows: list[int] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple | list) else (out,):
                if (isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.dim() == 2 and t.shape[1] == V
                        and t.shape[0] != hidden_size):  # not the weight's transpose (hidden x V)  # fmt: skip
                    self.rows.append(t.shape[0])
            return out

    results = []
    for block_rows in (None, 4):
        if block_rows is not None:
            monkeypatch.setattr(logprobs, "SOFTMAX_BLOCK_ELEMENTS", block_rows * V)
        model.zero_grad(set_to_none=True)
        hidden = logprobs.last_hidden_states(model, {"input_ids": ids}).detach().requires_grad_()
        seen = Float32Rows()
        with seen:
            picked, entropy = logprobs.head_logps(model, hidden[keep], ids[target], temperature=0.7,
                                                  with_entropy=with_entropy)  # fmt: skip
            (picked * weights[target]).sum().backward()
        results.append((picked.detach(), entropy, hidden.grad, model.lm_head.weight.grad, seen.rows))
    (p_whole, e_whole, h_whole, w_whole, rows_whole), (p, e, h, w, rows) = results
    assert max(rows_whole) in (8, 9)  # whole chunks: the check sees them
    assert rows and max(rows) <= 4
    assert torch.equal(p, p_whole) and torch.equal(h, h_whole) and torch.equal(w, w_whole)
    assert (e is None) == (not with_entropy) and (e is None or torch.equal(e, e_whole))
