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
