"""Rollouts on the tiny model: sample layout, masks, the sampler's log-probs against a teacher-forced pass, stop
strings, seeds; `sequence_tensors`/`trim` by hand; the rollout source's steps, micro-batches, epochs and resume."""

from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from posttrain.algorithms.base import sequence_tensors
from posttrain.rewards import RewardResult
from posttrain.rollout.engine import HFEngine, Rollout
from posttrain.rollout.source import RolloutSource, rollout_statistics, trim

EOS = 2  # <|im_end|> in the tiny tokenizer
PROMPTS = ["hi", "hello there, friend", "x"]  # different lengths: left padding differs per row


@pytest.fixture()
def eos_model(tiny_tokenizer):
    """The tiny random model with a louder EOS row, so that some samples end early and some run to the limit."""
    from posttrain.testing import tiny_model

    model = tiny_model(len(tiny_tokenizer))
    with torch.no_grad():
        model.lm_head.weight[EOS] *= 25
    return model.eval()


def _prompt_ids(tok):
    return [tok(p)["input_ids"] for p in PROMPTS]


def _generate(model, tok, *, n=4, seed=0, temperature=1.0, stop=(), batch_size=None, max_new_tokens=10):
    return HFEngine().generate(
        model,
        tok,
        _prompt_ids(tok),
        n=n,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=1.0,
        stop=list(stop),
        seed=seed,
        batch_size=batch_size,
    )


def _first(row: list[int], token: int) -> int | None:
    return row.index(token) if token in row else None


def test_samples_are_contiguous_and_masks_end_at_the_first_eos(eos_model, tiny_tokenizer):
    tok, n = tiny_tokenizer, 4
    r = _generate(eos_model, tok, n=n)
    prompts = _prompt_ids(tok)
    N, P = r.prompt_ids.shape
    assert N == n * len(prompts) and P == max(len(p) for p in prompts)
    for i in range(N):  # rows i*n .. i*n + n - 1 are prompt i, left-padded
        p = prompts[i // n]
        assert r.prompt_ids[i, P - len(p) :].tolist() == p
        assert r.prompt_mask[i].tolist() == [0] * (P - len(p)) + [1] * len(p)
    ended = truncated = 0
    for i, row in enumerate(r.completion_ids.tolist()):
        eos = _first(row, EOS)
        length = len(row) if eos is None else eos + 1
        assert r.completion_mask[i].tolist() == [1] * length + [0] * (len(row) - length)
        assert all(t == tok.pad_token_id for t in row[length:])  # generate pads finished rows
        assert bool(r.truncated[i]) == (eos is None)
        assert r.texts[i] == tok.decode(row[:length], skip_special_tokens=True)
        assert (r.sampling_logps[i, length:] == 0).all() and (r.sampling_logps[i, :length] < 0).all()
        ended, truncated = ended + (eos is not None), truncated + (eos is None)
    assert ended and truncated  # both cases are covered by this seed
    torch.testing.assert_close(r.lengths, r.completion_mask.sum(-1))


@pytest.mark.parametrize("temperature,batch_size", [(1.0, None), (0.7, 5)])
def test_sampling_logps_equal_a_teacher_forced_pass(eos_model, tiny_tokenizer, temperature, batch_size):
    """The rollout and the loss must agree on positions and padding (left-padded prompts, the position ids that
    generate used). Sampling log-probs (KV cache, token by token; several generate calls when batch_size is
    set) equal one teacher-forced forward at the same temperature over the completion tokens."""
    from posttrain.models.logprobs import selected_token_logps

    r = _generate(eos_model, tiny_tokenizer, temperature=temperature, batch_size=batch_size)
    t = sequence_tensors(r)
    P = r.prompt_ids.shape[1]
    inputs = {k: t[k] for k in ("input_ids", "attention_mask", "position_ids")}
    with torch.no_grad():
        logps, _ = selected_token_logps(eos_model, inputs, t["completion_mask"], temperature=temperature)
        # Control: attending to the left padding scores the padded rows differently, so the check has teeth.
        # (Dropping position_ids would not show: RoPE scores depend on relative positions only, and a left pad
        # shifts every position of a row by the same amount.)
        padded, _ = selected_token_logps(
            eos_model,
            {**inputs, "attention_mask": torch.ones_like(t["attention_mask"])},
            t["completion_mask"],
            temperature=temperature,
        )
    mask = r.completion_mask.bool()
    torch.testing.assert_close(logps[:, P:][mask], r.sampling_logps[mask], rtol=0, atol=1e-5)
    assert (padded[:, P:][mask] - r.sampling_logps[mask]).abs().max() > 1e-2


@pytest.fixture()
def lora_eos_model(eos_model):
    """`eos_model` with LoRA adapters whose B is random (not peft's zero start), so that the adapted model differs
    from its base."""
    from posttrain.testing import with_random_lora

    return with_random_lora(eos_model, std=0.3)


@pytest.mark.parametrize("setting, merge", [(None, True), (True, True), (False, False)])
def test_lora_samples_from_merged_weights_score_as_the_adapted_model(lora_eos_model, tiny_tokenizer, setting, merge):
    """`merge_adapters` (true, or null, the default, on CPU): the rollout runs no adapter (peft's lora_A layers are never called) and
    samples from W + delta, so its log-probs equal a teacher-forced pass through the adapted model to float
    rounding; the control, the base model (adapters off), differs. After it, every base weight is the same tensor
    with the same values, the adapters are trainable again, and the model is back in training mode. Without
    merging, the adapters run on every decode step."""
    from posttrain.models.adapters import merged_for_sampling
    from posttrain.models.logprobs import selected_token_logps

    model = lora_eos_model.train()
    base = {n: (p, p.detach().clone()) for n, p in model.named_parameters() if "lora" not in n}
    adapter_calls = []
    hooks = [m.register_forward_hook(lambda *a: adapter_calls.append(1)) for n, m in model.named_modules()
             if n.endswith("lora_A.default")]  # fmt: skip
    r = HFEngine(merge_adapters=setting).generate(model, tiny_tokenizer, _prompt_ids(tiny_tokenizer), n=4,
                                                max_new_tokens=10, temperature=1.0, top_p=1.0, stop=[], seed=0)  # fmt: skip
    for h in hooks:
        h.remove()
    assert (adapter_calls == []) is merge
    assert model.training
    assert all(p is dict(model.named_parameters())[n] and torch.equal(p, before) for n, (p, before) in base.items())
    assert all(p.requires_grad is ("lora" in n) for n, p in model.named_parameters())
    t = sequence_tensors(r)
    P = r.prompt_ids.shape[1]
    inputs = {k: t[k] for k in ("input_ids", "attention_mask", "position_ids")}
    mask = r.completion_mask.bool()
    with torch.no_grad():
        adapted, _ = selected_token_logps(model.eval(), inputs, t["completion_mask"])
        with model.disable_adapter():
            plain, _ = selected_token_logps(model, inputs, t["completion_mask"])
    torch.testing.assert_close(adapted[:, P:][mask], r.sampling_logps[mask], rtol=0, atol=1e-5)
    assert (plain[:, P:][mask] - r.sampling_logps[mask]).abs().max() > 1e-2
    with merged_for_sampling(model.train()) as merged:  # in training mode (gradients may flow): never merged
        assert not merged


def _bf16_params(model):
    """A copy of `model` with every floating-point parameter in bfloat16 and its buffers as they were (as
    `models.generation.weights_in` leaves them: the rotary frequencies stay float32)."""
    import copy

    twin = copy.deepcopy(model)
    for p in twin.parameters():
        p.data = p.data.to(torch.bfloat16)
    return twin


@pytest.mark.parametrize("case", ["full", "lora merged", "lora unmerged"])
def test_bfloat16_sampling_is_a_bfloat16_copy_s_and_leaves_the_weights_alone(eos_model, lora_eos_model,
                                                                             tiny_tokenizer, case):  # fmt: skip
    """`rollout.dtype: bfloat16` on a float32 model: the samples and their log-probs are exactly those of the same
    engine run on a bfloat16 copy of the model (merged LoRA: merged in float32, then cast, as peft's
    `merge_and_unload` then a cast does; unmerged: the adapters cast too); the float32 model scores them
    otherwise (the setting takes effect); after it, every parameter is the same float32 tensor with the same
    values, and tied weights were copied once."""
    from posttrain.models.generation import weights_in
    from posttrain.models.logprobs import selected_token_logps

    model = eos_model if case == "full" else lora_eos_model.eval()
    merge = case == "lora merged"
    before = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    kwargs = {"n": 4, "max_new_tokens": 10, "temperature": 1.0, "top_p": 1.0, "stop": [], "seed": 0}
    r = HFEngine(merge_adapters=merge, dtype=torch.bfloat16).generate(model, tiny_tokenizer,
                                                                      _prompt_ids(tiny_tokenizer), **kwargs)  # fmt: skip
    assert all(p is dict(model.named_parameters())[n] and p.dtype == torch.float32 and torch.equal(p, old)
               for n, (p, old) in before.items())  # fmt: skip
    if merge:
        import copy

        twin = _bf16_params(copy.deepcopy(model).merge_and_unload())
    else:
        twin = _bf16_params(model)
    want = HFEngine(merge_adapters=False).generate(twin, tiny_tokenizer, _prompt_ids(tiny_tokenizer), **kwargs)
    assert torch.equal(r.completion_ids, want.completion_ids)
    assert torch.equal(r.sampling_logps, want.sampling_logps)
    t = sequence_tensors(r)
    inputs = {k: t[k] for k in ("input_ids", "attention_mask", "position_ids")}
    with torch.no_grad():
        fp32, _ = selected_token_logps(model, inputs, t["completion_mask"])
    mask = r.completion_mask.bool()
    assert (fp32[:, r.prompt_ids.shape[1] :][mask] - r.sampling_logps[mask]).abs().max() > 1e-4

    from posttrain.testing import tiny_model

    tied = tiny_model(len(tiny_tokenizer), tie_word_embeddings=True)  # the output layer shares the embedding
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    with weights_in(tied, torch.bfloat16) as swapped:
        assert tied.lm_head.weight is tied.model.embed_tokens.weight
        assert tied.lm_head.weight.dtype == torch.bfloat16
        assert swapped == len(list(tied.parameters())) < len(list(tied.named_parameters(remove_duplicate=False)))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight and tied.lm_head.weight.dtype == torch.float32


def _moe_families():
    import transformers as tf

    common = dict(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)  # fmt: skip
    yield "glm4_moe", tf.Glm4MoeForCausalLM(tf.Glm4MoeConfig(  # keeps its router in float32 under bfloat16 too
        **common, moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
        first_k_dense_replace=0, n_shared_experts=1, head_dim=8))  # fmt: skip
    yield "gpt_oss", tf.GptOssForCausalLM(tf.GptOssConfig(  # keeps its norms in float32 under float16 only
        **common, head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=16,
        layer_types=["sliding_attention", "full_attention"]))  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_the_sampling_copy_keeps_in_float32_what_transformers_keeps_loading_in_that_dtype(tmp_path, dtype):
    """GLM-4-MoE and DeepSeek-V3 keep their router (``gate.weight``) in float32 whatever they load in, gpt-oss its
    norms under float16 only: the copy `weights_in` samples from holds each parameter in the dtype
    `from_pretrained(dtype=...)` gives it (an audit found GLM's router cast to bfloat16, logits 2e-2 off, and
    gpt-oss's norms kept in float32 under bfloat16, 0.34 off); so are the logits."""
    from posttrain.models.generation import weights_in

    for family, model in _moe_families():
        model.save_pretrained(tmp_path / family)
        loaded = type(model).from_pretrained(tmp_path / family, dtype=dtype).eval()
        want = {n: p.dtype for n, p in loaded.named_parameters()}
        assert {torch.float32, dtype} <= set(want.values()) or family == "gpt_oss"  # glm keeps some in float32
        ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad(), weights_in(model.eval(), dtype):
            assert {n: p.dtype for n, p in model.named_parameters()} == want, family
            got = model(ids).logits
        assert torch.equal(got, loaded(ids).logits), family


def test_merge_adapters_true_that_cannot_merge_says_so_once(lora_eos_model, tiny_tokenizer, capsys):
    """`merge_adapters: true` on a policy it cannot merge (here: its adapters turned off by the caller, which the
    merge must not undo) samples as the policy is and says why, once per engine; null says nothing."""
    engine = HFEngine(merge_adapters=True)
    kwargs = {"n": 2, "max_new_tokens": 4, "temperature": 1.0, "top_p": 1.0, "stop": [], "seed": 0}
    with lora_eos_model.disable_adapter():
        for _ in range(2):
            engine.generate(lora_eos_model, tiny_tokenizer, _prompt_ids(tiny_tokenizer), **kwargs)
        notes = capsys.readouterr().err
        assert notes.count("note: algorithm.rollout.merge_adapters=true, but the policy's adapters cannot be merged for "
                           "sampling (base_model.model.model.layers.0.self_attn.q_proj: its adapters are disabled or "
                           "merged): it samples unmerged") == 1
        HFEngine().generate(lora_eos_model, tiny_tokenizer, _prompt_ids(tiny_tokenizer), **kwargs)
        assert "note:" not in capsys.readouterr().err


def test_stop_strings_cut_the_mask_and_the_text(eos_model, tiny_tokenizer):
    tok = tiny_tokenizer
    plain = _generate(eos_model, tok, seed=3)
    rows = plain.completion_ids.tolist()

    def char(t: int) -> str:
        s = tok.decode([t])
        return s if len(s) == 1 and s.isascii() and s.isalnum() else ""

    # A two-character stop string spread over two tokens of some sample (found, not assumed).
    row, j = next(
        (i, j) for i, row in enumerate(rows) for j in range(1, len(row)) if char(row[j - 1]) and char(row[j])
    )
    stop = char(rows[row][j - 1]) + char(rows[row][j])
    cut = _generate(eos_model, tok, seed=3, stop=[stop])
    assert torch.equal(cut.completion_ids, plain.completion_ids)  # stop strings do not change the sampling
    hits = 0
    for i, ids in enumerate(rows):
        chars = [char(t) for t in ids]
        at = next((k for k in range(1, len(ids)) if chars[k - 1] + chars[k] == stop), None)
        eos = _first(ids, EOS)
        if at is not None and (eos is None or at < eos):  # the token completing the stop string ends the row
            hits += 1
            assert cut.completion_mask[i].tolist() == [1] * (at + 1) + [0] * (len(ids) - at - 1)
            assert cut.texts[i] == tok.decode(ids[: at - 1], skip_special_tokens=True)  # cut before the stop
            assert not cut.truncated[i]
        else:
            assert torch.equal(cut.completion_mask[i], plain.completion_mask[i])
            assert cut.texts[i] == plain.texts[i]
    assert hits >= 1
    mask = cut.completion_mask.bool()
    torch.testing.assert_close(cut.sampling_logps[mask], plain.sampling_logps[mask], rtol=0, atol=0)


def _skew_generation_config(model, rollout, prompt_len):
    """Set, in the model's generation_config, every field that switches on a logits processor, aimed at tokens the
    plain rollout sampled (so that any one of them that ran would change the samples)."""
    rows = rollout.completion_ids.tolist()
    drawn = rollout.completion_ids[rollout.completion_mask.bool()].tolist()
    common = [t for t, _ in Counter(t for t in drawn if t != EOS).most_common(4)]
    gc = model.generation_config
    gc.repetition_penalty, gc.top_k, gc.typical_p, gc.min_p = 1.5, 3, 0.5, 0.3
    gc.epsilon_cutoff, gc.eta_cutoff, gc.no_repeat_ngram_size = 0.05, 0.05, 1
    gc.min_new_tokens, gc.min_length = 9, prompt_len + 9  # both forbid the EOS that plain samples end with
    gc.suppress_tokens = [common[0]]
    gc.begin_suppress_tokens = [rows[0][0]]
    gc.bad_words_ids = [[common[1]]]
    gc.sequence_bias = {(common[2],): -30.0}
    gc.forced_bos_token_id, gc.forced_eos_token_id = common[3], EOS
    gc.exponential_decay_length_penalty = (2, 1.5)
    gc.renormalize_logits = True
    return common


def test_no_field_of_the_models_generation_config_changes_what_is_sampled(eos_model, tiny_tokenizer):
    """A model's generation_config.json may set any processor (Qwen2.5-Instruct ships repetition_penalty and
    top_k; Whisper-style configs suppress tokens; some force an EOS): none may change the samples, so that they
    come from softmax(logits / T), the distribution the losses score, and the sampler's log-probs equal the
    trainer's. The same seed on the same weights must give the same samples with or without those fields."""
    from posttrain.models.logprobs import selected_token_logps

    plain = _generate(eos_model, tiny_tokenizer, seed=5, temperature=0.8)
    common = _skew_generation_config(eos_model, plain, plain.prompt_ids.shape[1])
    skewed = _generate(eos_model, tiny_tokenizer, seed=5, temperature=0.8)
    assert torch.equal(skewed.completion_ids, plain.completion_ids)
    torch.testing.assert_close(skewed.sampling_logps, plain.sampling_logps, rtol=0, atol=0)
    sampled = set(skewed.completion_ids[skewed.completion_mask.bool()].tolist())
    # suppressed, banned and biased tokens were all drawn, and EOS before min_new_tokens
    assert set(common) <= sampled and EOS in sampled
    t = sequence_tensors(skewed)
    with torch.no_grad():
        trainer, _ = selected_token_logps(
            eos_model, {k: t[k] for k in ("input_ids", "attention_mask", "position_ids")}, t["completion_mask"],
            temperature=0.8,
        )  # fmt: skip
    mask = skewed.completion_mask.bool()
    P = skewed.prompt_ids.shape[1]
    torch.testing.assert_close(skewed.sampling_logps[mask], trainer[:, P:][mask], rtol=0, atol=1e-5)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_generate_runs_only_temperature_top_p_and_the_recorder(
    eos_model, tiny_tokenizer, monkeypatch, temperature, top_p
):
    """Structural checks: the logits processors transformers builds are exactly ours, in order (the recorder
    last, so it sees the distribution sampled from), and generate keeps no per-step logits or scores
    (`output_logits` would hold b x C x V floats: ~10 GB for 32 x 1024 tokens of a 152k vocabulary in bf16)."""
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    from posttrain.rollout.engine import RowStreams, SampledLogps

    plain = _generate(eos_model, tiny_tokenizer, seed=5)
    _skew_generation_config(eos_model, plain, plain.prompt_ids.shape[1])
    built, configs = [], []
    real_processors = type(eos_model)._get_logits_processor
    real_generate = eos_model.generate

    def get_processors(self, *args, **kwargs):
        built.append(real_processors(self, *args, **kwargs))
        return built[-1]

    def generate(*args, **kwargs):
        configs.append(kwargs.get("generation_config"))
        rows.append(kwargs["input_ids"].shape)
        sampled.append("logits_processor" in kwargs)  # greedy over `RowStreams`' forced pick, or a prefill
        return real_generate(*args, **kwargs)

    rows, sampled = [], []
    monkeypatch.setattr(type(eos_model), "_get_logits_processor", get_processors)
    monkeypatch.setattr(eos_model, "generate", generate)
    prompts = _prompt_ids(tiny_tokenizer)
    r = HFEngine().generate(
        eos_model, tiny_tokenizer, prompts, n=2, max_new_tokens=6, temperature=temperature,
        top_p=top_p, stop=[], seed=0, batch_size=3,
    )  # fmt: skip
    # batch_size 3 holds one whole group of 2: one call per prompt, each after a prefill of that prompt alone
    # (all but its last token; a one-token prompt needs none), the 6 new tokens in one segment.
    sampling = [i for i, s in enumerate(sampled) if s]
    prefills = [i for i, s in enumerate(sampled) if not s]
    assert [rows[i] for i in sampling] == [(2, len(p)) for p in prompts]
    assert [rows[i] for i in prefills] == [(1, len(p) - 1) for p in prompts if len(p) > 1]
    expected = [TemperatureLogitsWarper] * (temperature != 1.0) + [TopPLogitsWarper] * (top_p < 1.0)
    for i in sampling:
        assert [type(p) for p in built[i]] == [*expected, SampledLogps, RowStreams]
        cfg = configs[i]
        assert not cfg.output_logits and not cfg.output_scores and not cfg.return_dict_in_generate
        assert built[i][-2]._scores is None  # nothing of the last step is kept after generate
    for i in prefills:
        assert configs[i].max_new_tokens == 1 and list(built[i]) == []
    assert r.sampling_logps.shape == r.completion_ids.shape
    assert eos_model.generation_config.top_k == 3  # the model's own config is back after sampling


def _nucleus_logps(logits: torch.Tensor, tokens: torch.Tensor, temperature: float, top_p: float):
    """log p(token) under top-p(softmax(logits / T)), renormalised, worked out independently of transformers:
    a token is kept when the tokens more probable than it hold less than top_p of the mass. logits (N, V)."""
    logp = (logits.float() / temperature).log_softmax(-1)
    sorted_logp, order = logp.sort(-1, descending=True)
    p = sorted_logp.exp()
    kept_sorted = (p.cumsum(-1) - p) < top_p
    kept = torch.zeros_like(kept_sorted).scatter(-1, order, kept_sorted)
    return logp.masked_fill(~kept, float("-inf")).log_softmax(-1).gather(-1, tokens[:, None])[:, 0]


def test_top_p_sampling_logps_are_those_of_the_truncated_renormalised_distribution(eos_model, tiny_tokenizer):
    T, top_p = 0.7, 0.6
    r = HFEngine().generate(
        eos_model, tiny_tokenizer, _prompt_ids(tiny_tokenizer), n=4, max_new_tokens=10, temperature=T,
        top_p=top_p, stop=[], seed=2,
    )  # fmt: skip
    t = sequence_tensors(r)
    P = r.prompt_ids.shape[1]
    with torch.no_grad():
        logits = eos_model(
            input_ids=t["input_ids"], attention_mask=t["attention_mask"], position_ids=t["position_ids"]
        ).logits[:, P - 1 : -1]  # (N, C, V): position P - 1 + j predicts completion token j
    mask = r.completion_mask.bool()
    tokens = r.completion_ids[mask]
    expected = _nucleus_logps(logits[mask], tokens, T, top_p)
    torch.testing.assert_close(r.sampling_logps[mask], expected, rtol=0, atol=1e-5)
    untruncated = (logits[mask].float() / T).log_softmax(-1).gather(-1, tokens[:, None])[:, 0]
    # renormalising over the nucleus raised the kept tokens' log-probs
    assert (r.sampling_logps[mask] - untruncated).max() > 0.05


def test_seed_repeats_rollouts_and_leaves_the_global_rng_alone(eos_model, tiny_tokenizer):
    eos_model.train()
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    a = _generate(eos_model, tiny_tokenizer, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert eos_model.training  # sampled in eval mode, then put back
    b = _generate(eos_model, tiny_tokenizer, seed=7)
    c = _generate(eos_model, tiny_tokenizer, seed=8)
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.sampling_logps, b.sampling_logps)
    assert not torch.equal(a.completion_ids, c.completion_ids)


def test_sequence_tensors_by_hand():
    r = Rollout(
        prompt_ids=torch.tensor([[0, 5, 6], [7, 8, 9]]),
        prompt_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]),
        completion_ids=torch.tensor([[10, 2, 0], [11, 12, 13]]),
        completion_mask=torch.tensor([[1, 1, 0], [1, 1, 1]]),
        sampling_logps=torch.zeros(2, 3),
        texts=["", ""],
        truncated=torch.tensor([False, True]),
    )
    t = sequence_tensors(r)
    assert t["input_ids"].tolist() == [[0, 5, 6, 10, 2, 0], [7, 8, 9, 11, 12, 13]]
    assert t["attention_mask"].tolist() == [[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    # Row 0: real tokens count from 0 after the left pad (the pad itself gets 0; it is masked anyway).
    assert t["position_ids"].tolist() == [[0, 0, 1, 2, 3, 3], [0, 1, 2, 3, 4, 5]]
    assert t["completion_mask"].tolist() == [[0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1]]


def test_trim_drops_all_padding_columns_only():
    batch = {
        "input_ids": torch.tensor([[0, 5, 6, 7, 0], [0, 0, 8, 9, 0]]),
        "attention_mask": torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 0]]),
        "advantages": torch.tensor([1.0, -1.0]),  # per sequence: untouched
        "other": torch.ones(2, 3),  # another width: untouched
    }
    out = trim(batch)
    assert out["input_ids"].tolist() == [[5, 6, 7], [0, 8, 9]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]
    assert out["advantages"] is batch["advantages"] and out["other"] is batch["other"]
    empty = {"attention_mask": torch.zeros(1, 2, dtype=torch.long)}
    assert trim(empty) is empty


# ---------------------------------------------------------------------------------------------- rollout source
def _source(tmp_path, *, prompts=12, world=1, rank=0, loss_units=None, **overrides):
    from posttrain.algorithms import load_config
    from posttrain.algorithms.base import Rollouts
    from posttrain.data.prompts import PromptExample
    from posttrain.models.reference import Reference
    from posttrain.rollout.source import plan_rollouts

    base = {
        "algorithm.name": "grpo",
        "algorithm.rewards": "[exact_match]",
        "algorithm.num_generations": 2,
        "optim.batch_size": 4,
        "optim.micro_batch_size": 2,
        "algorithm.rollout.batch_size": 8,
        "run.seed": 3,
        "run.output_dir": str(tmp_path / "run"),
    }
    base.update(overrides)
    cfg = load_config(None, [f"{k}={v}" for k, v in base.items()])
    prompts = [PromptExample([i], f"p{i}", {"answer": str(i)}) for i in range(prompts)]
    accelerator = SimpleNamespace(num_processes=world, process_index=rank, unwrap_model=lambda m: m)
    return RolloutSource(cfg, prompts=prompts, model=None, tokenizer=None, accelerator=accelerator,
                         micro_batch_size=cfg.optim.micro_batch_size, rollouts=Rollouts(process=None),
                         reference=Reference("none"), loss_units=loss_units,
                         plan=plan_rollouts(cfg, len(prompts), world, cfg.optim.micro_batch_size))  # fmt: skip


def _tensors(n: int, tag: int = 0) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.arange(n)[:, None].repeat(1, 3),
        "attention_mask": torch.ones(n, 3, dtype=torch.long),
        "seq": torch.arange(n),
        "rollout": torch.full((n,), tag),
    }


def test_split_into_steps_and_micro_batches(tmp_path):
    # rollout 8 sequences, steps of 4, micro-batches of 2, one pass: 2 steps x 2 micro-batches, in order.
    src = _source(tmp_path)
    assert src.steps_per_rollout == 2 and src.prompts_per_rollout == 4
    assert src.rollouts_per_epoch == 3 and src.steps_per_epoch == 6
    steps = src.split(_tensors(8), index=0)
    assert [[mb["seq"].tolist() for mb in step.micro_batches] for step in steps] == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]


def test_zero_gradient_rows_are_left_out_of_the_micro_batches_and_their_units_counted(tmp_path):
    from posttrain.algorithms.base import ZERO_GRADIENT

    # units: a row's attention tokens (3 each); rows 0, 1 and 5 have a zero gradient
    src = _source(tmp_path, loss_units=lambda batch, cfg: float(batch["attention_mask"].sum()))
    assert src.context.skips_zero_gradient
    tensors = {**_tensors(8), ZERO_GRADIENT: torch.tensor([1, 1, 0, 0, 0, 1, 0, 0], dtype=torch.bool)}
    steps = src.split(tensors, index=0)
    assert ZERO_GRADIENT in tensors  # the caller's rollout is left as it was
    assert [[mb["seq"].tolist() for mb in step.micro_batches] for step in steps] == [[[2, 3]], [[4, 6], [7]]]
    assert all(ZERO_GRADIENT not in mb for step in steps for mb in step.micro_batches)
    assert [(step.skipped_units, step.skipped_rows, step.metrics) for step in steps] == [
        (6.0, 2, {"skipped_fraction": 0.5}), (3.0, 1, {"skipped_fraction": 0.25})]  # fmt: skip
    # a step whose rows all have a zero gradient: no micro-batch, its units counted, its loss logged as 0
    src.make_rollout = lambda index: ({**_tensors(8), ZERO_GRADIENT: torch.arange(8) < 4}, {"rollout": 0.0})
    first = next(src.steps(0))
    assert (first.micro_batches, first.skipped_units, first.skipped_rows, first.metrics["loss"]) == ([], 12.0, 4, 0.0)
    # rows with no loss units (an overlong filter took every completion out of the loss): still a zero-gradient step
    src.loss_units = lambda batch, cfg: 0.0
    first = next(src.steps(0))
    assert (first.micro_batches, first.skipped_units, first.skipped_rows) == ([], 0.0, 4)
    # several processes (each must run as many forwards) or no loss units: nothing is left out
    assert not _source(tmp_path, world=2, loss_units=len).context.skips_zero_gradient
    assert not _source(tmp_path).context.skips_zero_gradient


def test_trained_rows_logps_runs_the_forward_on_the_trained_rows_only():
    from posttrain.algorithms.base import ZERO_GRADIENT
    from posttrain.algorithms.rl import trained_mask, trained_rows_logps

    mask = torch.tensor([[1, 1], [1, 0], [1, 1]])
    seen = []

    def compute(t):  # a stand-in forward: each row's log-probs are its index, negated, on its mask
        seen.append(t["seq"].tolist())
        return -t["seq"][:, None].float() * t["completion_mask"]

    rows = {"seq": torch.arange(3), "completion_mask": mask, ZERO_GRADIENT: torch.tensor([False, True, False])}
    assert trained_rows_logps(compute, rows).tolist() == [[0.0, 0.0], [0.0, 0.0], [-2.0, -2.0]]
    assert seen == [[0, 2]]
    assert trained_mask(rows).tolist() == [[1, 1], [0, 0], [1, 1]]
    assert trained_rows_logps(compute, {k: v for k, v in rows.items() if k != ZERO_GRADIENT}).tolist() == [
        [0.0, 0.0], [-1.0, 0.0], [-2.0, -2.0]]  # fmt: skip
    everything_inert = {**rows, ZERO_GRADIENT: torch.ones(3, dtype=torch.bool)}
    assert trained_rows_logps(compute, everything_inert).tolist() == [[0.0, 0.0]] * 3 and len(seen) == 2


def test_epochs_reshuffle_every_pass_after_the_first(tmp_path):
    src = _source(tmp_path, **{"algorithm.rollout.epochs": 3})
    assert src.steps_per_rollout == 6
    steps = src.split(_tensors(8), index=0)
    passes = [[s for step in steps[k : k + 2] for mb in step.micro_batches for s in mb["seq"].tolist()]
              for k in (0, 2, 4)]  # fmt: skip
    assert passes[0] == list(range(8))  # the first pass keeps the sampling order
    for p in passes[1:]:
        assert sorted(p) == list(range(8)) and p != list(range(8))  # every sequence once, reshuffled
    assert passes[1] != passes[2]
    assert all(len(mb["seq"]) == 2 for step in steps for mb in step.micro_batches)
    again = src.split(_tensors(8), index=0)
    other = src.split(_tensors(8), index=1)
    flat = lambda s: [x for step in s for mb in step.micro_batches for x in mb["seq"].tolist()]  # noqa: E731
    assert flat(again) == flat(steps) and flat(other) != flat(steps)  # seeded by the rollout index


def test_prompts_are_a_seeded_permutation_per_epoch_and_sharded(tmp_path):
    src = _source(tmp_path)
    epoch0 = [e.prompt for i in range(3) for e in src.rollout_prompts(i)]
    epoch1 = [e.prompt for i in range(3, 6) for e in src.rollout_prompts(i)]
    assert sorted(epoch0) == sorted(epoch1) == sorted(f"p{i}" for i in range(12))
    assert epoch0 != epoch1
    ranks = [_source(tmp_path, world=2, rank=r) for r in (0, 1)]
    shards = [[e.prompt for e in s.rollout_prompts(4)] for s in ranks]
    assert len(shards[0]) == len(shards[1]) == 2 and not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(e.prompt for e in src.rollout_prompts(4))


@pytest.mark.parametrize("start_step", [0, 3, 4])
def test_resuming_lands_on_the_right_rollout_and_step(tmp_path, monkeypatch, start_step):
    src = _source(tmp_path)  # 2 steps per rollout
    made = []

    def make_rollout(index):
        made.append(index)
        return _tensors(8, tag=index), {"rollout": float(index), "gen_time_s": 1.0}

    monkeypatch.setattr(src, "make_rollout", make_rollout)
    it = src.steps(start_step)
    got = [next(it) for _ in range(3)]
    for k, step in enumerate(got):
        global_step = start_step + k
        index, within = divmod(global_step, 2)
        micro, meta = step.micro_batches, step.metrics
        assert {int(mb["rollout"][0]) for mb in micro} == {index}
        assert [s for mb in micro for s in mb["seq"].tolist()] == list(range(4 * within, 4 * within + 4))
        # the generation cost rides on the first step taken from each rollout
        assert ("gen_time_s" in meta) == (k == 0 or within == 0)
        assert meta["rollout"] == index
    assert made == sorted({(start_step + k) // 2 for k in range(3)})


def test_an_empty_step_only_logs(tmp_path, monkeypatch):
    """Every group dropped (grpo.drop_uniform_groups): the steps carry metrics and nothing to train."""
    src = _source(tmp_path)
    monkeypatch.setattr(src, "make_rollout", lambda index: (_tensors(0), {"rollout": float(index)}))
    first = next(src.steps(0))
    assert first.micro_batches == [] and first.metrics["loss"] == 0.0


def test_drop_uniform_groups_is_refused_on_several_processes(tmp_path):
    from posttrain.algorithms import grpo, load_config
    from posttrain.errors import ConfigError

    cfg = load_config(None, ["algorithm.name=grpo", "algorithm.rewards=[exact_match]", "algorithm.num_generations=2",
                             "optim.batch_size=4", "algorithm.rollout.batch_size=8",
                             "algorithm.drop_uniform_groups=true"])  # fmt: skip
    assert grpo.ALGORITHM.config is type(cfg.algorithm)
    cfg.algorithm.check_launch(1)  # one process: fine
    with pytest.raises(ConfigError, match="drop_uniform_groups"):
        cfg.algorithm.check_launch(2)


def _reward_result(failures: dict[str, int], n: int = 4):
    from posttrain.rewards import RewardResult

    return RewardResult(
        total=[0.0] * n,
        per_function={k: [0.0] * n for k in failures},
        failures=failures,
        errors={
            "mine": "KeyError: 'x'",
            "exact_match": "KeyError: \"reward 'exact_match' needs a 'answer' column\"",
        },
        sites={"mine": "r.py:3"},
    )


def test_the_run_stops_after_three_rollouts_without_any_reward_signal(tmp_path):
    """Dead rollouts (every function failed on every sample) must come 3 in a row: one that scored anything resets
    the count. The message names each function, where it first failed, and what was kept."""
    from posttrain.errors import UserError
    from posttrain.rewards import NamedReward

    src = _source(tmp_path)
    src.rewards = [NamedReward("mine", lambda p, c, **k: []), *src.rewards]  # a user function and exact_match
    dead, alive = {"mine": 4, "exact_match": 4}, {"mine": 4, "exact_match": 3}
    for index, failures in enumerate([dead, dead, alive, dead, dead]):
        src.check_reward_signal(index, _reward_result(failures), 4)
    with pytest.raises(UserError) as err:
        src.check_reward_signal(5, _reward_result(dead), 4)
    message = str(err.value)
    assert "every reward function failed on every sample of 3 rollouts in a row (rollouts 3, 4, 5)" in message
    assert "  - 'mine' at r.py:3: KeyError: 'x'\n" in message
    assert "  - 'exact_match' (built-in): KeyError:" in message
    # what was kept is the training loop's to say (it knows the checkpoints): tests/integration/test_train_rl.py


@pytest.mark.parametrize("other_dead,stops", [(True, True), (False, False)])
def test_with_several_processes_the_run_stops_only_when_every_process_lost_its_signal(
    tmp_path, other_dead, stops
):
    from posttrain.errors import UserError

    src = _source(tmp_path, world=2)
    src.accelerator.device = "cpu"
    src.accelerator.reduce = lambda t, reduction: (
        t + float(other_dead)
    )  # the other process's flag, summed
    dead = _reward_result({"exact_match": 4})
    src.check_reward_signal(0, dead, 4)
    src.check_reward_signal(1, dead, 4)
    if stops:
        with pytest.raises(UserError, match="3 rollouts in a row"):
            src.check_reward_signal(2, dead, 4)
    else:
        src.check_reward_signal(2, dead, 4)
        assert src.dead_rewards == []


def _epoch_prompts(src, epoch=0):
    n = src.rollouts_per_epoch
    return [[e.prompt for e in src.rollout_prompts(epoch * n + i)] for i in range(n)]


def test_the_prompts_left_over_make_a_smaller_last_rollout(tmp_path):
    # 4 prompts per rollout (8 sequences / G 2), 2 steps per pass: 13 = 3 x 4 + 1, and 1 x 2 sequences still
    # give each of the 2 steps one sequence.
    src = _source(tmp_path, prompts=13)
    assert (src.rollouts_per_epoch, src.steps_per_epoch, src.plan.skipped) == (4, 8, 0)
    for epoch in (0, 1):
        rollouts = _epoch_prompts(src, epoch)
        assert [len(r) for r in rollouts] == [4, 4, 4, 1]
        assert sorted(p for r in rollouts for p in r) == sorted(f"p{i}" for i in range(13))
    steps = src.split(_tensors(2), index=3)  # the small rollout's 2 sequences: one per step
    assert [[mb["seq"].tolist() for mb in step.micro_batches] for step in steps] == [[[0]], [[1]]]


def test_prompts_too_few_to_fill_every_step_are_skipped_and_named(tmp_path):
    from posttrain.data.order import skipped_note

    # steps of 2 sequences: 4 steps per pass; 13 = 3 x 4 + 1 leaves 1 x 2 sequences for 4 steps.
    src = _source(tmp_path, prompts=13, **{"optim.batch_size": 2, "optim.micro_batch_size": 1})
    assert (src.rollouts_per_epoch, src.plan.skipped) == (3, 1)
    used = [p for r in _epoch_prompts(src) for p in r]
    [skipped] = src.plan.skipped_indices(0, seed=3, shuffle=True)
    assert sorted(used + [f"p{skipped}"]) == sorted(f"p{i}" for i in range(13))
    note = skipped_note(src.plan, source="prompts.jsonl", lines=[(i + 1,) for i in range(13)], seed=3,
                        shuffle=False, total_steps=src.steps_per_epoch)  # fmt: skip
    assert note == (
        "prompts.jsonl: 1 of 13 examples are not trained in each epoch (after 3 rollouts of 4 prompts, the 1 left "
        "would give 2 sequences, fewer than the 4 optimisation steps of a pass over a rollout): line 13"
    )


def test_with_two_processes_a_remainder_trains_only_when_each_gets_a_prompt(tmp_path):
    # 2 prompts per process per rollout, steps of 2 sequences per process, 2 steps per pass.
    kept = [_source(tmp_path, prompts=14, world=2, rank=r) for r in (0, 1)]
    assert kept[0].rollouts_per_epoch == 4 and kept[0].plan.skipped == 0
    assert sorted(p for s in kept for r in _epoch_prompts(s) for p in r) == sorted(f"p{i}" for i in range(14))
    assert [len(s.rollout_prompts(3)) for s in kept] == [1, 1]
    skipped = _source(tmp_path, prompts=13, world=2)  # one left: a process would have no prompt
    assert (skipped.rollouts_per_epoch, skipped.plan.skipped) == (3, 1)


def test_a_sharded_run_skips_a_last_rollout_that_splits_unevenly(tmp_path):
    """15 prompts = 3 rollouts of 4, and 3 left: two DDP processes sample a last rollout of 2 and 1 prompts. A
    sharded model (`run.sharding=fsdp2`: every forward is a collective) needs as many forwards on each process, so
    as many prompts: the 3 are skipped. 14 leave 2, one each: kept."""
    ddp = [_source(tmp_path, prompts=15, world=2, rank=r) for r in (0, 1)]
    assert ddp[0].rollouts_per_epoch == 4 and [len(s.rollout_prompts(3)) for s in ddp] == [2, 1]
    sharded = _source(tmp_path, prompts=15, world=2, **{"run.sharding": "fsdp2"})
    assert (sharded.rollouts_per_epoch, sharded.plan.skipped) == (3, 3)
    assert "do not split evenly over 2 processes" in sharded.plan.reason
    even = [_source(tmp_path, prompts=14, world=2, rank=r, **{"run.sharding": "fsdp2"}) for r in (0, 1)]
    assert (even[0].rollouts_per_epoch, even[0].plan.skipped) == (4, 0)
    assert [len(s.rollout_prompts(3)) for s in even] == [1, 1]


def test_row_streams_draw_exactly_from_the_distribution():
    from posttrain.rollout.engine import RowStreams

    probs = torch.tensor([0.5, 0.3, 0.0, 0.15, 0.05])  # token 2 impossible (e.g. outside the top-p set)
    scores = probs.log()[None].expand(2, -1)  # two rows, the same distribution, their own streams
    streams = RowStreams(seed=11, count=2)
    draws = torch.stack([streams(None, scores).argmax(-1) for _ in range(20_000)])  # (draws, 2)
    forced = streams(None, scores)
    assert ((forced == 0).sum(-1) == 1).all() and torch.isinf(forced).sum() == 2 * (len(probs) - 1)
    for row in range(2):
        freq = torch.bincount(draws[:, row], minlength=len(probs)).float() / len(draws)
        assert freq[2] == 0
        # binomial standard error at 20,000 draws is at most 0.0036: 4 of them
        torch.testing.assert_close(freq, probs, rtol=0, atol=4 * 0.0036)
    assert not torch.equal(draws[:, 0], draws[:, 1])  # each row has its own stream
    again = RowStreams(seed=11, count=2)
    assert torch.equal(torch.stack([again(None, scores).argmax(-1) for _ in range(50)]), draws[:50])


def test_samples_do_not_depend_on_the_batch(eos_model, tiny_tokenizer):
    whole = _generate(eos_model, tiny_tokenizer, seed=4, max_new_tokens=20)
    one_group = _generate(eos_model, tiny_tokenizer, seed=4, max_new_tokens=20, batch_size=4)  # n = 4
    assert torch.equal(one_group.completion_ids, whole.completion_ids)
    torch.testing.assert_close(one_group.sampling_logps, whole.sampling_logps, rtol=0, atol=1e-6)


def test_grouped_decoding_samples_what_one_generate_call_samples(eos_model, tiny_tokenizer, monkeypatch):
    """The grouped path (each prompt encoded once, rows leaving when they end) against the path a sharded model
    takes (one `generate` over the left-padded batch, every row to the end): the same tokens and log-probs."""
    import posttrain.rollout.engine as engine

    calls = []
    real_generate = eos_model.generate

    def generate(*args, **kwargs):
        kwargs.pop("synced_gpus", None)  # one process here: nothing to synchronise
        calls.append(("logits_processor" in kwargs, kwargs["input_ids"].shape[0]))  # sampling, or the prefill
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(eos_model, "generate", generate)
    grouped = _generate(eos_model, tiny_tokenizer, seed=6, max_new_tokens=20)
    sampled_rows = [b for sample, b in calls if sample]
    assert sampled_rows[0] == 12 and sampled_rows[-1] < 12  # rows that ended left the batch
    assert sampled_rows == sorted(sampled_rows, reverse=True)
    assert [b for sample, b in calls if not sample] == [3]  # the 3 prompts encoded once each, not 12 times
    monkeypatch.setattr(engine, "synced_forward", lambda model: True)
    calls.clear()
    one_call = _generate(eos_model, tiny_tokenizer, seed=6, max_new_tokens=20)
    assert calls == [(True, 12)]
    assert torch.equal(grouped.completion_mask, one_call.completion_mask)
    mask = grouped.completion_mask.bool()
    assert torch.equal(grouped.completion_ids[mask], one_call.completion_ids[mask])
    torch.testing.assert_close(grouped.sampling_logps, one_call.sampling_logps, rtol=0, atol=1e-5)
    assert grouped.texts == one_call.texts


def test_rollout_statistics_pool_every_process_s_samples():
    """Process 0 scored rewards a = [1, 3] (one failure), process 1 a = [5, 7]; totals 2a. Pooled: a's mean
    (1+3+5+7)/4 = 4 and population std sqrt((9+1+1+9)/4) = sqrt(5); totals 8 and 2 sqrt(5); failures 1 + 0;
    lengths [2, 4] + [6, 8] -> mean 5, max 8; truncated [1, 0] + [0, 0] -> 1/4. A method's own statistic: 0.5 over
    process 0's 2 samples and 0.25 over process 1's 2 -> (0.5 x 2 + 0.25 x 2) / 4 = 0.375; one both give alike
    (a KL coefficient) as given. Process 0's share alone would log a mean of 2. The sampler's summed -log p per
    sample, [3, 5] + [6, 10] over 2 + 4 + 6 + 8 = 20 tokens: sampling_entropy 24 / 20 = 1.2 (a token mean, not the
    mean of the samples' means)."""
    def share(a, failures, lengths, truncated, nll, extra):
        result = RewardResult(total=[2 * x for x in a], per_function={"a": a}, failures=failures)
        return {"result": result, "lengths": lengths, "truncated": truncated, "nll": nll, "extra": extra}

    shares = [share([1.0, 3.0], {"a": 1}, [2, 4], [True, False], [3.0, 5.0], {"frac": 0.5, "kl_coef": 0.1}),
              share([5.0, 7.0], {}, [6, 8], [False, False], [6.0, 10.0], {"frac": 0.25, "kl_coef": 0.1})]  # fmt: skip
    assert rollout_statistics(shares) == pytest.approx({
        "reward/a_mean": 4.0, "reward/a_std": 5**0.5, "reward/failures_a": 1.0, "reward/total_mean": 8.0,
        "reward/total_std": 2 * 5**0.5, "completion_length_mean": 5.0, "completion_length_max": 8.0,
        "truncated_fraction": 0.25, "sampling_entropy": 1.2, "frac": 0.375, "kl_coef": 0.1}, rel=1e-12)  # fmt: skip
    assert rollout_statistics(shares)["kl_coef"] == 0.1  # as given, not re-averaged
    assert rollout_statistics(shares[:1])["reward/a_mean"] == 2.0


def test_a_reward_failure_on_another_process_is_said_with_every_process_counted(capsys):
    """Failures and events are said after the gather, over every process's samples: a failure on rank 1 only
    was never printed (the main process read its own result)."""
    from types import SimpleNamespace

    from posttrain.rewards.compute import NamedReward, RewardResult
    from posttrain.rollout.source import RolloutSource

    def fn(prompts, completions, **kw):
        return [1.0] * len(completions)

    fn.event_notes = {"timeouts": "programs ran past the limit"}
    me = SimpleNamespace(accelerator=SimpleNamespace(is_main_process=True), warned=set(),
                         rewards=[NamedReward("r", fn)], cfg=SimpleNamespace(algorithm=SimpleNamespace(reward_fallback=0.0)))  # fmt: skip
    main = RewardResult([1.0] * 4, {"r": [1.0] * 4}, {"r": 0}, events={"r": {"timeouts": 0}})
    other = RewardResult([1.0, 0.0, 0.0, 1.0], {"r": [1.0, 0.0, 0.0, 1.0]}, {"r": 2}, errors={"r": "ValueError: x"},
                         events={"r": {"timeouts": 3}})  # fmt: skip
    for _ in range(2):  # said once
        RolloutSource.say_failures(me, 5, [main, other])
        RolloutSource.say_events(me, 5, [main, other])
    assert capsys.readouterr().out.splitlines() == [
        "warning: reward 'r' failed on 2 of 8 samples of rollout 5 (they got algorithm.reward_fallback = 0.0): "
        "ValueError: x; further failures are only counted (reward/failures_r in metrics.jsonl)",
        "warning: reward 'r': 3 of 8 samples of rollout 5: programs ran past the limit; further ones are only counted "
        "(reward/timeouts_r in metrics.jsonl)"]


def test_a_rollout_split_over_processes_samples_what_one_process_samples(eos_model, tiny_tokenizer):
    """Each process numbered its rows from 0 (and seeded by its rank), so 1 and 2 processes sampled other
    completions of the same prompts from step 1 (an audit). A row's stream is its place in the whole rollout:
    the prompts dealt round-robin over 2 processes, sampled there, give the one-process rollout's rows."""
    from posttrain.rollout.source import rollout_row_ids

    prompts, n = _prompt_ids(tiny_tokenizer), 2  # 3 prompts: process 0 samples prompts 0 and 2, process 1 prompt 1
    kwargs = dict(n=n, max_new_tokens=12, temperature=1.0, top_p=1.0, stop=[], seed=9)
    whole = HFEngine().generate(eos_model, tiny_tokenizer, prompts, **kwargs)
    shares = {rank: HFEngine().generate(eos_model, tiny_tokenizer, prompts[rank::2], **kwargs,
                                        row_ids=rollout_row_ids(rank, 2, len(prompts[rank::2]), n))
              for rank in (0, 1)}  # fmt: skip
    rows = {0: [0, 1, 4, 5], 1: [2, 3]}  # each share's rows in the whole rollout
    for rank, share in shares.items():
        got = [share.completion_ids[i][share.completion_mask[i].bool()].tolist() for i in range(len(rows[rank]))]
        want = [whole.completion_ids[r][whole.completion_mask[r].bool()].tolist() for r in rows[rank]]
        assert got == want
    unnumbered = HFEngine().generate(eos_model, tiny_tokenizer, prompts[1::2], **kwargs)  # numbered from 0: other
    assert unnumbered.completion_ids[0][unnumbered.completion_mask[0].bool()].tolist() != want[0]
