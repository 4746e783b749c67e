"""Saving, loading back and merging: the reloaded or merged model computes the same logits as the trained one."""

import json

import pytest
import torch
from torch.testing import assert_close

from posttrain.config import ModelConfig, TechniqueConfig
from posttrain.errors import ModelNotFoundError, UserError
from posttrain.models import load_model, load_trained, merge_adapter, read_info, save_model

IDS = torch.tensor([[3, 10, 20, 30, 40, 50], [3, 60, 61, 62, 63, 64]])


def _trained(tiny_dir, technique):
    """A model as a run leaves it: adapters (or weights) moved away from their initial values."""
    torch.manual_seed(0)
    model = load_model(ModelConfig(name=str(tiny_dir)), TechniqueConfig(name=technique, r=4, dropout=0.0))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("technique", ["full", "lora", "qlora"])
def test_save_and_load_trained_roundtrip(tmp_path, tiny_dir, tiny_tokenizer, technique):
    model = _trained(tiny_dir, technique)
    run = tmp_path / "run"
    save_model(model, tiny_tokenizer, run / "final")
    folder = run / "final"
    info = json.loads((folder / "posttrain_model.json").read_text())
    assert info["technique"] == technique and info["base_model"] == str(tiny_dir)
    if technique == "full":
        assert info["kind"] == "full" and (folder / "model.safetensors").is_file()
    else:
        assert info["kind"] == "adapter" and (folder / "adapter_model.safetensors").is_file()
        assert not (folder / "model.safetensors").exists()  # only the adapter is saved
    assert (folder / "tokenizer.json").is_file()

    loaded, tok = load_trained(run)  # a run folder means <run>/final
    assert len(tok) == len(tiny_tokenizer) and not loaded.training
    assert sum(p.requires_grad for p in loaded.parameters()) == 0
    # A QLoRA adapter is reloaded on the same deterministic 4-bit base it was trained with: equal logits too.
    assert_close(_logits(loaded), _logits(model), rtol=1e-5, atol=1e-5)


def test_merge_equals_adapter_model(tmp_path, tiny_dir, tiny_tokenizer):
    model = _trained(tiny_dir, "lora")
    save_model(model, tiny_tokenizer, tmp_path / "adapter")
    out = merge_adapter(tmp_path / "adapter", tmp_path / "merged")
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    assert read_info(out)["technique"] == "merged"
    merged, _ = load_trained(out)
    assert not hasattr(merged, "peft_config")
    # W + (alpha/r) B A folded into one matrix: only float32 rounding differs.
    assert_close(_logits(merged), _logits(model), rtol=1e-5, atol=1e-5)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


def test_merge_qlora_into_the_base_it_trained_on_or_the_original(tmp_path, tiny_dir, tiny_tokenizer):
    """By default a QLoRA adapter is merged into its 4-bit base, dequantised: the merged model computes what the
    QLoRA model as trained (and as evaluated) computes. Merged into the base's own full-precision weights (the only
    way before), it differed from the trained model by ~1e-2 in the logits; that stays as `qlora_base="original"`."""
    from peft import PeftModel

    qmodel = _trained(tiny_dir, "qlora")
    save_model(qmodel, tiny_tokenizer, tmp_path / "adapter")
    as_trained, _ = load_trained(tmp_path / "adapter")  # the 4-bit base with the adapter, as evaluated
    merged, _ = load_trained(merge_adapter(tmp_path / "adapter", tmp_path / "merged"))
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    assert read_info(tmp_path / "merged")["qlora_base"] == "trained"
    assert_close(_logits(merged), _logits(as_trained), rtol=1e-5, atol=1e-5)
    original, _ = load_trained(merge_adapter(tmp_path / "adapter", tmp_path / "original", qlora_base="original"))
    base = load_model(ModelConfig(name=str(tiny_dir)), TechniqueConfig(name="full"), train=False)
    full_precision = PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert_close(_logits(original), _logits(full_precision), rtol=1e-5, atol=1e-5)
    assert (_logits(original) - _logits(as_trained)).abs().max() > 1e-3  # the two merges are different models


def test_merge_refuses_full_model(tmp_path, tiny_dir, tiny_tokenizer):
    save_model(_trained(tiny_dir, "full"), tiny_tokenizer, tmp_path / "full")
    with pytest.raises(UserError, match="nothing to merge"):
        merge_adapter(tmp_path / "full", tmp_path / "merged")


def test_merge_refuses_an_output_that_would_lose_work(tmp_path, tiny_dir, tiny_tokenizer, monkeypatch):
    """`merge RUN --out RUN/final` deleted the adapter it merged, and --out another run's final/ deleted that model
    (any folder with posttrain_model.json was replaced; an audit, nineteenth session). Refused before anything
    loads; an earlier merge is still replaced."""
    from posttrain.models import saving

    save_model(_trained(tiny_dir, "lora"), tiny_tokenizer, tmp_path / "run" / "final")
    save_model(_trained(tiny_dir, "full"), tiny_tokenizer, tmp_path / "other" / "final")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    kept = sorted(p.name for p in (tmp_path / "run" / "final").iterdir())
    loads = []
    monkeypatch.setattr(saving, "_load_base_and_adapter", lambda *a, **k: loads.append(a))
    for out, says in ((tmp_path / "run" / "final", "is the adapter being merged"),
                      (tmp_path / "run", "holds the adapter being merged"),
                      (tmp_path / "run" / "final" / "merged", "is inside the adapter being merged"),
                      (tmp_path / "other" / "final", "exists and is not an earlier merge"),
                      (tmp_path / "notes", "exists and is not an earlier merge")):  # fmt: skip
        with pytest.raises(UserError, match=says):
            merge_adapter(tmp_path / "run", out)
    assert loads == [] and sorted(p.name for p in (tmp_path / "run" / "final").iterdir()) == kept
    assert (tmp_path / "other" / "final" / "model.safetensors").is_file() and (tmp_path / "notes" / "keep.txt").is_file()
    monkeypatch.undo()
    merge_adapter(tmp_path / "run", tmp_path / "merged")
    assert read_info(merge_adapter(tmp_path / "run", tmp_path / "merged"))["technique"] == "merged"  # replaced


def test_load_trained_missing(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not found"):
        load_trained(tmp_path / "nope")
    (tmp_path / "run").mkdir()
    with pytest.raises(ModelNotFoundError, match="did the run finish"):
        load_trained(tmp_path / "run")


def test_generate_with_reloaded_adapter(tmp_path, tiny_dir, tiny_tokenizer):
    from posttrain.models import generate

    save_model(_trained(tiny_dir, "lora"), tiny_tokenizer, tmp_path / "adapter")
    model, tok = load_trained(tmp_path / "adapter")
    outs = generate(model, tok, ["hi", "there"], max_new_tokens=4, stop=["\n"])
    assert len(outs) == 2 and all(isinstance(o, str) for o in outs)


def test_a_saved_model_stops_on_its_templates_end_of_turn_in_plain_transformers(tmp_path):
    """A base whose EOS is `<|endoftext|>` and whose ChatML template closes turns with `<|im_end|>` (Qwen2.5 and
    Gemma bases): its merged or full-model folders kept `eos_token_id` = EOS in generation_config.json, so
    `transformers`' own `generate` ran past every stop SFT trained. Both ids are written now, EOS first; the
    model's own generation config is as it was, and an adapter folder writes none."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    from posttrain.testing import CHATML_TEMPLATE, SPECIAL_TOKENS, byte_tokenizer, tiny_model

    tok = byte_tokenizer([*SPECIAL_TOKENS, "<|endoftext|>"], eos="<|endoftext|>", pad="<|pad|>",
                         chat_template=CHATML_TEMPLATE)  # fmt: skip
    eos, end = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    model = tiny_model(len(tok), eos_token_id=eos)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=0)
    save_model(model, tok, tmp_path / "base")
    saved = json.loads((tmp_path / "base" / "generation_config.json").read_text())
    assert saved["eos_token_id"] == [eos, end] and model.generation_config.eos_token_id == eos
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    assert reloaded.generation_config.eos_token_id == [eos, end]
    # LoRA on it, saved (an adapter: no generation config), then merged: the merged folder stops on both
    lora = load_model(ModelConfig(name=str(tmp_path / "base")), TechniqueConfig(name="lora", r=4))
    save_model(lora, tok, tmp_path / "adapter")
    assert not (tmp_path / "adapter" / "generation_config.json").exists()
    merged = merge_adapter(tmp_path / "adapter", tmp_path / "merged")
    assert json.loads((merged / "generation_config.json").read_text())["eos_token_id"] == [eos, end]


def test_a_run_resumed_past_its_final_model_is_said_when_final_is_used(tmp_path, tiny_dir, tiny_tokenizer, capsys):
    """A finished run resumed for more steps and stopped: its checkpoints went on to step 50 while final/ still
    held step 30, and merging (or generating from) the run folder used step 30 without a word."""
    run = tmp_path / "run"
    save_model(_trained(tiny_dir, "lora"), tiny_tokenizer, run / "final", step=30)
    (run / "checkpoints" / "step-000030").mkdir(parents=True)
    merge_adapter(run, tmp_path / "merged")
    assert "warning" not in capsys.readouterr().err  # final/ is the newest weights
    assert read_info(tmp_path / "merged")["step"] == 30
    (run / "checkpoints" / "step-000050").mkdir()
    merge_adapter(run, tmp_path / "merged")
    load_trained(run)
    err = capsys.readouterr().err
    assert err.count("holds the weights of step 30, but the run's newest checkpoint is step 50") == 2
    merge_adapter(run / "final", tmp_path / "merged")  # the final/ folder named itself: what was asked for
    assert "warning" not in capsys.readouterr().err


def test_a_merge_is_stored_in_the_bases_dtype(tmp_path, tiny_tokenizer):
    """A bf16 base merged into a float32 folder: twice its size (28 GB for a 7B model). The merge is computed in the
    precision the base loads in (float32 here) and written as the base stores its weights."""
    from posttrain.testing import tiny_model

    base = tiny_model(len(tiny_tokenizer)).to(torch.bfloat16)
    base.save_pretrained(tmp_path / "base")
    tiny_tokenizer.save_pretrained(tmp_path / "base")
    model = _trained(tmp_path / "base", "lora")
    save_model(model, tiny_tokenizer, tmp_path / "adapter")
    merged_dir = merge_adapter(tmp_path / "adapter", tmp_path / "merged")
    assert json.loads((merged_dir / "config.json").read_text())["dtype"] == "bfloat16"
    from safetensors.torch import load_file

    stored = load_file(merged_dir / "model.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    # the adapter model in float32, rounded once to bf16: the merged weights are W + BA rounded once
    expected = model.merge_and_unload().to(torch.bfloat16).state_dict()
    assert stored.keys() <= expected.keys()
    for name, t in stored.items():
        assert torch.equal(t, expected[name]), name


def test_merge_refuses_a_qlora_base_choice_for_a_lora_adapter(tmp_path, tiny_dir, tiny_tokenizer, capsys):
    from posttrain.cli import main

    save_model(_trained(tiny_dir, "lora"), tiny_tokenizer, tmp_path / "adapter")
    code = main(["merge", str(tmp_path / "adapter"), "--out", str(tmp_path / "m"), "--qlora-base", "original"])
    assert code == 2 and "is not a QLoRA adapter" in capsys.readouterr().err and not (tmp_path / "m").exists()


def test_sigterm_stops_a_merge_as_ctrl_c_does_and_leaves_no_half_written_folder(
    tmp_path, tiny_dir, tiny_tokenizer, capsys, monkeypatch
):
    """Only `train` turned SIGTERM into an interrupt: `merge` (and `generate`, `evaluate`, `data pairs`) died at
    once, printing nothing (`--json`: no document), and a merge left its hidden temporary folder, the size of the
    model, which nothing ever removed."""
    import os
    import signal

    import posttrain.models.saving as saving
    from posttrain.cli import main

    save_model(_trained(tiny_dir, "lora"), tiny_tokenizer, tmp_path / "adapter")
    real_save = saving.save_model

    def save_then_term(*args, **kwargs):
        real_save(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(saving, "save_model", save_then_term)
    code = main(["merge", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")])
    assert code == 130 and "interrupted" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no merged folder, no temporary one
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_an_adapter_whose_base_weights_changed_is_said_to_be_on_other_weights(tmp_path, tiny_tokenizer, capsys):
    """A LoRA adapter was loaded onto whatever its base path held now (the SFT run it came from trained further):
    another model, generating and scoring without a word. The base's digest is recorded and compared."""
    from posttrain.testing import save_tiny_model, tiny_model

    base = save_tiny_model(tmp_path / "base")
    save_model(_trained(base, "lora"), tiny_tokenizer, tmp_path / "adapter")
    assert read_info(tmp_path / "adapter")["base_sha256"]
    load_trained(tmp_path / "adapter")
    assert "warning" not in capsys.readouterr().err
    tiny_model(len(tiny_tokenizer), seed=1).save_pretrained(base)  # other weights under the same path
    load_trained(tmp_path / "adapter")
    assert "is an adapter trained on the weights of" in capsys.readouterr().err


def test_an_adapter_names_a_local_base_by_its_absolute_path(tmp_path, tiny_dir, tiny_tokenizer, monkeypatch):
    """An adapter trained on `runs/sft_math/final` recorded that relative path: from any other working folder it
    could not be loaded ("no such local model folder", naming a path the user never gave)."""
    import shutil

    shutil.copytree(tiny_dir, tmp_path / "runs" / "base")
    monkeypatch.chdir(tmp_path)
    model = load_model(ModelConfig(name="runs/base"), TechniqueConfig(name="lora", r=4))
    save_model(model, tiny_tokenizer, tmp_path / "adapter", base_model="runs/base")
    assert read_info(tmp_path / "adapter")["base_model"] == str((tmp_path / "runs" / "base").resolve())
    monkeypatch.chdir(tmp_path / "runs")
    load_trained(tmp_path / "adapter")  # from another folder
