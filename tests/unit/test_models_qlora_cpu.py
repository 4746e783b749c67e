"""QLoRA computes the same on every CPU: bitsandbytes' AVX512-BF16 weight repacking is switched off.

bitsandbytes decides per layer, in `Linear4bit.__init__`, from `has_avx512bf16()`; the tests force that answer
each way, so both paths run on any CPU, and check that a short QLoRA session (train step, eval forward, greedy
generation, training after the evaluation, save, reload) gives identical numbers either way.
"""

import pytest
import torch
from torch.testing import assert_close

from posttrain.config import ModelConfig, TechniqueConfig
from posttrain.models import generate, load_model, load_trained, save_model

bnb_modules = pytest.importorskip("bitsandbytes.nn.modules")

IDS = torch.tensor([[3, 10, 20, 30, 40, 50], [3, 60, 61, 62, 63, 64]])


@pytest.fixture(scope="module", params=[32, 64], ids=["hidden32", "hidden64"])
def model_dir(request, tmp_path_factory):
    """32 wide: narrower than bitsandbytes' 64-value quantisation block (the repack raised there); 64 wide: the
    repack worked but computed in bf16."""
    from posttrain.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp(f"tiny{request.param}"), hidden_size=request.param)


def _session(model_dir, tokenizer, out_dir, monkeypatch, *, avx512bf16: bool) -> dict:
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: avx512bf16)
    torch.manual_seed(0)
    model = load_model(ModelConfig(name=str(model_dir)), TechniqueConfig(name="qlora", r=4, dropout=0.0))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.5)
    model(input_ids=IDS, labels=IDS).loss.backward()  # one step, so B != 0 and the adapters matter
    opt.step()
    opt.zero_grad()

    out = {"train": model(input_ids=IDS).logits.detach()}  # training mode, with grad
    model(input_ids=IDS, labels=IDS).loss.backward()
    out["grads"] = [p.grad.clone() for p in trainable]
    opt.zero_grad()

    model.eval()
    with torch.no_grad():
        out["eval"] = model(input_ids=IDS).logits
    out["generate"] = generate(model, tokenizer, ["hi", "a longer prompt"], max_new_tokens=8)

    model.train()  # training goes on after an evaluation: same gradients as before it
    model(input_ids=IDS, labels=IDS).loss.backward()
    out["grads_after_eval"] = [p.grad.clone() for p in trainable]

    model.eval()
    save_model(model, tokenizer, out_dir)
    loaded, _ = load_trained(out_dir)
    with torch.no_grad():
        out["reloaded"] = loaded(input_ids=IDS).logits
    return out


def test_qlora_same_on_cpus_with_and_without_avx512bf16(model_dir, tiny_tokenizer, tmp_path, monkeypatch):
    without = _session(model_dir, tiny_tokenizer, tmp_path / "a", monkeypatch, avx512bf16=False)
    with_ = _session(model_dir, tiny_tokenizer, tmp_path / "b", monkeypatch, avx512bf16=True)
    for name in ("train", "eval", "reloaded", "grads", "grads_after_eval"):
        # One code path whatever the CPU claims: bit-for-bit equal.
        assert_close(with_[name], without[name], rtol=0, atol=0, msg=name)
    assert with_["generate"] == without["generate"]
    for out in (without, with_):
        # Eval mode, generation and a reload compute what training computes (float32 dequantise-then-matmul
        # both ways: equal up to the order of float32 sums).
        assert_close(out["eval"], out["train"], rtol=0, atol=1e-6)
        assert_close(out["reloaded"], out["train"], rtol=0, atol=1e-6)
        assert_close(out["grads_after_eval"], out["grads"], rtol=0, atol=1e-7)


@pytest.mark.parametrize(("installed", "says"), [
    (None, "needs the bitsandbytes package: `pip install 'bitsandbytes>=0.46.1'`"),
    ("0.45.0", "needs bitsandbytes >= 0.46.1 (the first with a CPU backend, and the oldest transformers quantises "
               "with); this environment has 0.45.0"),
    ("0.46.1", None),
])  # fmt: skip
def test_an_absent_or_old_bitsandbytes_is_the_users_to_fix_before_any_model_loads(monkeypatch, tmp_path, installed,
                                                                                  says):  # fmt: skip
    """An older bitsandbytes failed inside transformers' load, reported as a bug of posttrain's (an audit)."""
    import importlib.metadata

    from posttrain.algorithms import load_config
    from posttrain.errors import ConfigError
    from posttrain.models.adapters import bitsandbytes_problem
    from posttrain.train import train

    real = importlib.metadata.version

    def version(name):
        if name != "bitsandbytes":
            return real(name)
        if installed is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed

    monkeypatch.setattr(importlib.metadata, "version", version)
    if says is None:
        assert bitsandbytes_problem() is None
        return
    assert says in bitsandbytes_problem()
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "a", "completion": "b"}\n', encoding="utf-8")
    cfg = load_config(None, ["technique.name=qlora", f"run.output_dir={tmp_path / 'run'}", f"data.train={rows}"])
    with pytest.raises(ConfigError, match="bitsandbytes"):
        train(cfg)
    assert not (tmp_path / "run").exists()  # refused before anything is written
