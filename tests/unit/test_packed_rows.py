"""Padded rows packed into one (`logprobs.packed_rows`) and packed rows attended to one example at a time
(`models.attention`): the same log-probabilities and gradients as the padded rows, up to the kernels' order of
summation, from the real tokens only; and rows stay as they came wherever that would not hold."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from posttrain.models import attention
from posttrain.models.attention import attention_per_segment, float32_attention_on_cpu, packed_segments
from posttrain.models.logprobs import decoder_of, segments_of, selected_token_logps
from posttrain.testing import assert_as_accurate, tiny_model

V = 97


def _batch():
    """Three right-padded rows of 9, 6 and 4 real tokens (19 in all); every real token after the first is a target."""
    torch.manual_seed(5)
    ids = torch.randint(3, V, (3, 9))
    mask = torch.tensor([[1] * 9, [1] * 6 + [0] * 3, [1] * 4 + [0] * 5])
    targets = mask.clone()
    targets[:, 0] = 0
    weights = torch.rand(3, 9)  # a different gradient on every token, so a mixed-up row would show
    return ids, mask, targets, weights


class _Seen:
    """What the decoder and SDPA were called with: the decoder's input shapes, and per SDPA call its query length,
    whether it had a mask and whether it was causal."""

    def __init__(self, model, monkeypatch):
        self.inputs, self.calls = [], []
        decoder_of(model).register_forward_pre_hook(self._decoder, with_kwargs=True)
        sdpa = F.scaled_dot_product_attention

        def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
            self.calls.append((q.shape[0], q.shape[2], attn_mask is not None, is_causal))
            return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)

    def _decoder(self, module, args, kwargs):
        self.inputs.append(tuple((kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]).shape))


def _run(model, ids, mask, targets, weights, **kw):
    model.zero_grad(set_to_none=True)
    logps, _ = selected_token_logps(model, {"input_ids": ids, "attention_mask": mask}, targets, **kw)
    (logps * weights).sum().backward()
    return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _prefixed_batch():
    """Four right-padded rows that begin with the same 4 tokens: 9, 6, 4 (the prefix alone) and 7 real tokens (26 in
    all); every real token after the first is a target, the prefix's too, with a different weight on each."""
    ids, _, _, _ = _batch()
    ids = torch.cat([ids, ids[:1].roll(1, 1)])  # a fourth row
    ids[:, :4] = ids[0, :4]
    ids[1:, 4] = ids[0, 4] % (V - 4) + 3  # rows 1 and 3 differ from row 0 at token 4 (row 2 has no token 4)
    mask = torch.tensor([[1] * 9, [1] * 6 + [0] * 3, [1] * 4 + [0] * 5, [1] * 7 + [0] * 2])
    targets = mask.clone()
    targets[:, 0] = 0
    torch.manual_seed(6)
    return ids, mask, targets, torch.rand(4, 9)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("shared_prefix", [False, True])
def test_packed_rows_give_the_padded_rows_log_probs_and_gradients(monkeypatch, temperature, shared_prefix):
    """Inside a run (`attention_per_segment`) the three padded rows (27 positions) run as one row of their 19 real
    tokens, and attention as one causal SDPA call per layer over the examples laid out one a row (3 x 9, no mask).
    The log-probs equal the padded rows' (here bit for bit), and every gradient is as accurate against float64 as
    the padded rows' (the products sum over 19 rows instead of 27, in another order).

    `shared_prefix` (`_prefixed_batch`): the 4 tokens all four rows begin with run once, then each row's other
    tokens (5, 2, 0 and 3) at positions 4, 5, ...: the decoder sees 14 tokens instead of 26 (36 padded), attention
    is one causal call per layer over the examples laid out one a row (4 x 9), each with its own copy of the
    prefix. The log-probs and every gradient are as accurate against float64 as the padded rows' (the prefix's
    hidden states feed four rows' tokens once instead of four times)."""
    ids, mask, targets, weights = _prefixed_batch() if shared_prefix else _batch()
    model = tiny_model(V)
    exact = copy.deepcopy(model).double()
    padded = _run(model, ids, mask, targets, weights, temperature=temperature)
    seen = _Seen(model, monkeypatch)
    with attention_per_segment():
        packed = _run(model, ids, mask, targets, weights, temperature=temperature, shared_prefix=shared_prefix)
    assert seen.inputs == [(1, 14 if shared_prefix else 19)]
    assert seen.calls == [(4, 9, False, True) if shared_prefix else (3, 9, False, True)] * 2  # 2 layers
    exact_logps, exact_grads = _run(exact, ids, mask, targets, weights.double(), temperature=temperature)
    if shared_prefix:
        assert_as_accurate(packed[0], padded[0], exact_logps)
    else:
        assert torch.equal(packed[0], padded[0])
    assert packed[1].keys() == padded[1].keys()
    for name in packed[1]:
        assert_as_accurate(packed[1][name], padded[1][name], exact_grads[name], msg=name)


@pytest.mark.parametrize("case", ["not asked", "dropout", "no common first token"])
def test_rows_run_every_token_where_the_prefix_is_not_shared(monkeypatch, case):
    """Without `shared_prefix`, while a training model has dropout (one mask for the prefix would replace one per
    row), or when the rows differ from their first token: every real token runs (26), as the padded rows'
    packing did."""
    ids, mask, targets, weights = _prefixed_batch()
    model = tiny_model(V, attention_dropout=0.1 if case == "dropout" else 0.0)
    model.train()
    if case == "no common first token":
        ids[1, 0] = ids[0, 0] % (V - 4) + 3
    seen = _Seen(model, monkeypatch)
    with attention_per_segment():
        _run(model, ids, mask, targets, weights, shared_prefix=case != "not asked")
    assert seen.inputs == [(1, 26)]


def test_a_model_whose_dropout_was_switched_off_shares_the_prefix(monkeypatch):
    """`model.dropout: off` zeroes the modules' rates and leaves the config's `attention_dropout` as shipped: the
    forward draws no mask, so the rows' 4 common tokens run once (26 - 3 x 4 tokens)."""
    from posttrain.models import disable_dropout

    ids, mask, targets, weights = _prefixed_batch()
    model = tiny_model(V, attention_dropout=0.1)
    model.train()
    assert disable_dropout(model) and model.config.attention_dropout == 0.1
    seen = _Seen(model, monkeypatch)
    with attention_per_segment():
        _run(model, ids, mask, targets, weights, shared_prefix=True)
    assert seen.inputs == [(1, 14)]


@pytest.mark.parametrize("shared_prefix", [False, True])
def test_under_bf16_autocast_packed_rows_are_as_accurate_as_padded_ones(shared_prefix):
    """A bf16 run on CPU: the examples' padded batch cast to float32 for attention (the two wrappers compose). The
    log-probs and gradients of packed rows, the rows' common prefix once or not, are as close to float32's as the
    padded rows' are (within twice their error)."""
    ids, mask, targets, weights = _prefixed_batch() if shared_prefix else _batch()
    model = tiny_model(V)
    reference = _run(model, ids, mask, targets, weights)
    got = []
    for packing in (False, True):
        with float32_attention_on_cpu(), attention_per_segment() if packing else float32_attention_on_cpu(False):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got.append(_run(model, ids, mask, targets, weights, shared_prefix=shared_prefix))
    (padded, padded_grads), (packed, packed_grads) = got
    err_padded, err_packed = (float((x - reference[0]).abs().max()) for x in (padded, packed))
    assert err_padded > 0  # bf16 did round
    assert err_packed <= 2 * err_padded, (err_packed, err_padded)
    for name, want in reference[1].items():
        err_padded, err_packed = (float((g[name] - want).abs().max()) for g in (padded_grads, packed_grads))
        assert err_packed <= 2 * err_padded, (name, err_packed, err_padded)


def _no_packing_reason(case):
    """A model and batch for which rows must stay as they came, by case."""
    ids, mask, targets, _ = _batch()
    model = tiny_model(V)
    if case == "outside a run":
        return model, ids, mask, targets, False
    if case == "sliding window":
        model = tiny_model(V, family="gemma2", final_logit_softcapping=None)
    elif case == "gpt2":
        model = tiny_model(V, family="gpt2", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    elif case == "eager attention":
        model.config._attn_implementation = "eager"
    elif case == "compiled layers":
        model.model.layers[0].posttrain_compiled = True
    elif case == "left padding":
        mask = mask.flip(1)
        targets = targets.flip(1)
    elif case == "no padding":
        mask = torch.ones_like(mask)
        targets = mask.clone()
        targets[:, 0] = 0
    elif case == "one row":
        ids, mask, targets = ids[1:2], mask[1:2], targets[1:2]
    return model, ids, mask, targets, True


CASES = ["outside a run", "sliding window", "gpt2", "eager attention", "compiled layers", "left padding",
         "no padding", "one row"]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_rows_stay_padded_where_packing_would_not_hold_or_pay(monkeypatch, case):
    """Outside a run (transformers' block-diagonal mask would attend over the whole row); a model with a sliding
    window (per-example causal attention would ignore it), outside the packable families, with another attention
    than sdpa, or with compiled layers; left padding, no padding, one row: the decoder sees the batch's own rows."""
    model, ids, mask, targets, in_run = _no_packing_reason(case)
    seen = _Seen(model, monkeypatch)
    with attention_per_segment() if in_run else float32_attention_on_cpu(False):
        selected_token_logps(model, {"input_ids": ids, "attention_mask": mask}, targets)
    assert seen.inputs == [tuple(ids.shape)]


def test_each_example_of_packed_rows_attends_to_itself_only():
    """The per-example attention itself, on rows of several examples (as `data.packing` makes them, and as
    `packed_rows` makes one): equal to SDPA over each whole row under the block-diagonal causal mask transformers
    builds for them, for two rows packing (2, 3) and (5,) tokens; and a call whose shapes do not match the
    segments (another batch) runs as it came."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 8) for _ in range(3))
    blocks = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 0, 0]])
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    allowed = (blocks[:, :, None] == blocks[:, None, :]) & causal  # (2, 5, 5)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None]).transpose(1, 2)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.is_causal = True
    per_segment = attention._per_segment(sdpa_attention_forward)
    with packed_segments([(2, 3), (5,)]):
        got, _ = per_segment(module, q, k, v, allowed[:, None])
        other, _ = per_segment(module, q[:1], k[:1], v[:1], allowed[:1, None])  # 1 row: not the segments' batch
    assert_close(got, want, rtol=0, atol=1e-6)
    assert torch.equal(other, want[:1])


@pytest.mark.parametrize("layout", ["padded rows", "data.packing", "shared prefix"])
def test_packed_rows_under_gradient_checkpointing_give_the_same_log_probs_and_gradients(layout):
    """With gradient checkpointing each decoder layer is run again in backward, after `packed_segments` has been
    left: the recompute must attend per example as its forward did (`attention.checkpoint_contexts`). Before, it
    attended over the whole packed row and torch stopped the run (a different number of tensors saved): SFT with
    `model.gradient_checkpointing: true` (configs/sft_qlora.yaml's default) failed on any batch with padding. The
    same log-probs and gradients, bit for bit, as without checkpointing: the recompute runs the same ops."""
    from posttrain.models.adapters import enable_gradient_checkpointing

    ids, mask, targets, weights = _prefixed_batch() if layout == "shared prefix" else _batch()
    if layout != "data.packing":  # padded rows, packed into one row; under `shared_prefix` the prefix once
        inputs = {"input_ids": ids, "attention_mask": mask}
    else:  # one row of examples of 9, 6 and 4 tokens, positions restarting at each (`data.collate_packed`)
        real = mask.bool()
        inputs = {"input_ids": ids[real][None], "position_ids": torch.cat([torch.arange(n) for n in (9, 6, 4)])[None]}
        targets, weights = targets[real][None], weights[real][None]
    model = tiny_model(V)
    checkpointed = copy.deepcopy(model)
    enable_gradient_checkpointing(checkpointed)
    results = []
    for m in (model, checkpointed):
        m.train()
        with attention_per_segment():
            logps, _ = selected_token_logps(m, inputs, targets, shared_prefix=layout == "shared prefix")
            (logps * weights).sum().backward()  # backward inside the run, as `train` does it
        results.append((logps.detach(), {n: p.grad for n, p in m.named_parameters()}))
    assert torch.equal(results[0][0], results[1][0])
    for name, grad in results[0][1].items():
        assert torch.equal(grad, results[1][1][name]), name


def test_segments_of_packed_rows_follow_transformers_rule():
    """`data.packing`'s rows: an example starts wherever a position is not its predecessor's plus one (the padding
    at a row's end, restarting at 0, is an example of its own), inside a run and for a packable model only."""
    model = tiny_model(V)
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])
    inputs = {"input_ids": torch.zeros_like(positions), "position_ids": positions}
    assert segments_of(model, inputs) is None  # outside a run
    with attention_per_segment():
        assert segments_of(model, inputs) == ((3, 2, 1), (4, 2))
        assert segments_of(model, {**inputs, "attention_mask": torch.ones_like(positions)}) is None


def _kept_for_backward(model, ids, mask, targets) -> int:
    """Bytes of the distinct storages (parameters aside) that autograd keeps for backward in one forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        selected_token_logps(model, {"input_ids": ids, "attention_mask": mask}, targets)
    return sum(kept.values())


def test_packed_rows_keep_less_for_backward_than_padded_rows():
    """With the lean layers a training model runs with (`models.layers.lean_layers`), packed rows keep less for
    backward than the padded rows: the products' and norms' inputs at 19 positions instead of 27, and attention
    the same as padded rows (its padded batch of examples is spread by a function that keeps only the index, and
    the output projection's input is rebuilt from the attention output SDPA keeps). A version that kept the
    spread's source (autograd's `index_copy`) and the gathered output kept more than the padded rows."""
    from posttrain.models.layers import lean_layers

    ids, mask, targets, _ = _batch()
    model = tiny_model(V)
    lean_layers(model)
    padded = _kept_for_backward(model, ids, mask, targets)
    with attention_per_segment():
        packed = _kept_for_backward(model, ids, mask, targets)
    assert packed < padded * 0.9, (packed, padded)


def test_under_bf16_autocast_packed_rows_keep_no_bf16_copy_of_the_attention_output(monkeypatch):
    """A bf16 run's float32 attention casts its output back to bf16 for the output projection; the lean layers
    rebuild that cast in backward from the float32 output the attention kernel keeps for its own backward
    (`attention._kept_by_kernel`), also where packed rows take the examples' padded batch back to the packed
    layout (a view of the cast). Exactly one (examples x width x hidden) bf16 tensor a layer less is kept, and the
    gradients are the same bit for bit."""
    from posttrain.models.layers import lean_layers

    ids, mask, targets, weights = _batch()
    model = tiny_model(V)
    lean_layers(model)
    results = {}
    for rebuilt in (True, False):
        if not rebuilt:
            monkeypatch.setattr(attention, "_kept_by_kernel", lambda out: False)
        with float32_attention_on_cpu(), attention_per_segment(), torch.autocast("cpu", dtype=torch.bfloat16):
            kept = _kept_for_backward(model, ids, mask, targets)
            results[rebuilt] = kept, _run(model, ids, mask, targets, weights)
    (kept_new, (logps_new, grads_new)), (kept_old, (logps_old, grads_old)) = results[True], results[False]
    hidden, layers = model.config.hidden_size, model.config.num_hidden_layers
    assert kept_old - kept_new == layers * 3 * 9 * hidden * 2  # 3 examples padded to 9, 2 bytes a value
    assert torch.equal(logps_new, logps_old)
    assert all(torch.equal(grads_new[n], grads_old[n]) for n in grads_old)
