"""Full fine-tuning of a model with tied embeddings through `posttrain train`: the output layer's gradient goes by
the embedding's backward (`models.tied_embeddings`, installed by `load_model`), and the trained weights are those
of the same run without it, bit for bit, in fp32 and bf16 autocast; SFT and DPO (a frozen copy as reference)."""

import pytest
import torch

import posttrain.models.loading as loading
from posttrain.testing import save_tiny_model
from posttrain.train import train


@pytest.fixture(scope="module")
def tied_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-tied"), hidden_size=64, tie_word_embeddings=True)


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _installed(monkeypatch) -> list[bool]:
    """Whether each `load_model` of a run installed the hand-over (the reference copy is loaded untrained)."""
    installed: list[bool] = []
    real = loading.tie_output_gradient

    def spy(model):
        installed.append(real(model))
        return installed[-1]

    monkeypatch.setattr(loading, "tie_output_gradient", spy)
    return installed


def _moved(weights: dict[str, torch.Tensor], model_dir) -> bool:
    """Whether training moved the tied matrix from the saved model's."""
    from safetensors.torch import load_file

    start = load_file(str(model_dir / "model.safetensors"))["model.embed_tokens.weight"]
    return not torch.equal(weights["model.embed_tokens.weight"], start)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tied_runs_train_the_same_weights_with_the_hand_over(make_cfg, tied_model_dir, monkeypatch, dtype):
    installed = _installed(monkeypatch)
    overrides = {"model.name": str(tied_model_dir), "model.dtype": dtype, "run.max_steps": 3}
    handed = train(make_cfg("handed", **overrides), return_model=True).model
    assert installed == [True]
    monkeypatch.setattr(loading, "tie_output_gradient", lambda model: False)
    plain = train(make_cfg("plain", **overrides), return_model=True).model
    assert handed.get_output_embeddings().weight is handed.get_input_embeddings().weight
    want, got = _weights(plain), _weights(handed)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[n], got[n]) for n in want) and _moved(got, tied_model_dir)


def test_tied_dpo_with_a_frozen_copy_trains_the_same_weights(make_cfg, tied_model_dir, tmp_path, monkeypatch):
    import json

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"add {a} {b}", "chosen": str(a + b), "rejected": str(a * b + 7)})
                             + "\n" for a in range(3) for b in range(3)), encoding="utf-8")  # fmt: skip
    overrides = {"model.name": str(tied_model_dir), "algorithm.name": "dpo", "algorithm.reference": "copy",
                 "data.train": str(pairs), "run.max_steps": 2, "optim.batch_size": 4}  # fmt: skip
    installed = _installed(monkeypatch)
    handed = _weights(train(make_cfg("handed", **overrides), return_model=True).model)
    assert installed == [True]
    monkeypatch.setattr(loading, "tie_output_gradient", lambda model: False)
    plain = _weights(train(make_cfg("plain", **overrides), return_model=True).model)
    assert handed.keys() == plain.keys() and all(torch.equal(handed[n], plain[n]) for n in plain)
    assert _moved(handed, tied_model_dir)
