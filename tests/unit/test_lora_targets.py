"""`technique.target_modules` is checked on a copy of the model built from its config alone (no weights), before
any load: every refusal an audit found wrong or late (after a 7B model would have loaded)."""

import pytest
import torch
from accelerate import init_empty_weights
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from posttrain.config import TechniqueConfig
from posttrain.errors import UserError
from posttrain.models.adapters import check_lora_targets, lora_target_problem

LLAMA = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=2)  # fmt: skip


def _meta(config):
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config)


def _problem(model, targets):
    return lora_target_problem(model, TechniqueConfig(name="lora", target_modules=targets))


def test_what_applies_passes_and_what_cannot_is_said_precisely():
    untied = _meta(LlamaConfig(**LLAMA, tie_word_embeddings=False))
    assert next(untied.parameters()).device == torch.device("meta")  # no weights were made
    assert _problem(untied, ["q_proj", "v_proj"]) is None and _problem(untied, "all-linear") is None
    assert _problem(untied, ["q_proj", "lm_head"]) is None  # an untied output layer is a layer of its own
    assert _problem(untied, r".*\.self_attn\.(q|v)_proj") is None  # a regex over whole names
    # one string is a regex over the whole name: "q_proj" matches nothing, and the message says why
    assert "a single string is a regular expression that must match a module's whole name" in _problem(untied, "q_proj")
    assert _problem(untied, ["q_proj", "vproj"]).startswith("technique.target_modules = ['q_proj', 'vproj']: vproj "
                                                           "matches no layer of this model")  # fmt: skip
    # a block matched by name: it was "matches no layer" (peft had refused its activation function)
    assert "matches mlp (LlamaMLP), which LoRA cannot adapt" in _problem(untied, ["mlp"])


def test_gpt2s_linear_layers_are_named_and_a_tied_output_layer_is_refused():
    gpt2 = _meta(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2))
    # its linear layers are transformers' Conv1D: they were left out of the names the message offered
    assert "its linear layers are named c_attn, c_fc, c_proj, lm_head" in _problem(gpt2, ["q_proj"])
    assert _problem(gpt2, ["c_attn"]) is None
    tied = _meta(LlamaConfig(**LLAMA, tie_word_embeddings=True))
    for targets in (["q_proj", "lm_head"], ["embed_tokens"]):
        why = _problem(tied, targets)
        assert "share one weight (tie_word_embeddings)" in why and "a merged model would differ" in why
    assert _problem(tied, ["q_proj"]) is None and _problem(tied, "all-linear") is None


def test_the_check_runs_from_a_model_folder_before_its_weights_load(tmp_path, monkeypatch):
    from posttrain.config import ModelConfig
    from posttrain.testing import save_tiny_model

    folder = save_tiny_model(tmp_path / "tiny")
    loads = []
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loads.append(a))
    with pytest.raises(UserError, match=r"\['mlp'\] matches mlp \(LlamaMLP\)"):
        check_lora_targets(ModelConfig(name=str(folder)), TechniqueConfig(name="lora", target_modules=["mlp"]))
    check_lora_targets(ModelConfig(name=str(folder)), TechniqueConfig(name="lora", target_modules=["q_proj"]))
    assert loads == []
