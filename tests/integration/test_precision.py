"""Mixed precision on the CPU: `model.dtype: bfloat16` trains float32 master weights (and float32 AdamW state)
under bf16 autocast, a frozen LoRA base is held in bf16, pure bf16 weights only behind `model.pure_bf16`, and
float16 is refused. The CUDA path is the same code (Accelerate's autocast on the GPU) but is not run here.

Why master weights matter: AdamW's first step moves every weight by about lr (its normalised update is +-1), so
at lr 1e-5 a weight of the tiny model (std 0.02) moves by ~5e-4 of its size, below bf16's resolution (2^-8 =
0.4%): held in bf16, most such updates round to nothing."""

from pathlib import Path

import pytest
import torch

from posttrain.algorithms import load_config
from posttrain.config import TechniqueConfig
from posttrain.train import train


def _moved_share(cfg, model) -> float:
    """Share of the decoder blocks' weight elements (every one of them gets a gradient) that training changed,
    against the starting weights held in the same dtype as the run holds them."""
    from posttrain.models import load_model

    before = dict(load_model(cfg.model, TechniqueConfig(name="full"), train=False, as_trained=True).named_parameters())
    moved = total = 0
    for name, p in model.named_parameters():
        if ".layers." in name:
            assert p.dtype == before[name].dtype
            moved += int((p.detach() != before[name]).sum())
            total += p.numel()
    return moved / total


@pytest.fixture()
def autocast_dtypes(monkeypatch):
    """Records the dtype of every q_proj output during training: bf16 when the forward is autocast."""
    import posttrain.train as train_module

    seen: set = set()
    real = train_module.load_model

    def load(*args, **kwargs):
        model = real(*args, **kwargs)
        for name, module in model.named_modules():
            if name.endswith(("q_proj", "q_proj.base_layer")) and isinstance(module, torch.nn.Linear):
                module.register_forward_hook(lambda m, a, out: seen.add(out.dtype))
        return model

    monkeypatch.setattr(train_module, "load_model", load)
    return seen


def test_bf16_full_finetuning_keeps_fp32_master_weights_and_autocasts(make_cfg, autocast_dtypes):
    cfg = make_cfg("mixed", **{"model.dtype": "bfloat16", "optim.lr": 1e-5, "run.max_steps": 1})
    result = train(cfg, return_model=True)
    assert {p.dtype for p in result.model.parameters()} == {torch.float32}  # the master copy
    assert autocast_dtypes == {torch.bfloat16}  # ... while the matmuls ran in bf16
    state = torch.load(Path(cfg.run.output_dir) / "checkpoints" / "step-000001" / "optimizer.pt", weights_only=False)
    moments = [t for s in state["state"].values() for k, t in s.items() if k in ("exp_avg", "exp_avg_sq")]
    assert moments and {t.dtype for t in moments} == {torch.float32}
    assert _moved_share(cfg, result.model) > 0.99  # every update landed


def test_pure_bf16_holds_bf16_weights_and_loses_small_updates(make_cfg, autocast_dtypes):
    cfg = make_cfg("pure", **{"model.dtype": "bfloat16", "model.pure_bf16": True, "optim.lr": 1e-5,
                              "run.max_steps": 1})  # fmt: skip
    result = train(cfg, return_model=True)
    assert {p.dtype for p in result.model.parameters()} == {torch.bfloat16}
    assert autocast_dtypes == {torch.bfloat16}
    assert _moved_share(cfg, result.model) < 0.5  # most updates rounded away: the cost pure_bf16 states


def test_bf16_lora_holds_the_frozen_base_in_bf16_and_the_adapters_in_fp32(make_cfg, autocast_dtypes):
    result = train(make_cfg("lora", **{"technique.name": "lora", "model.dtype": "bfloat16", "run.max_steps": 1}),
                   return_model=True)  # fmt: skip
    trained = {p.dtype for p in result.model.parameters() if p.requires_grad}
    frozen = {p.dtype for n, p in result.model.named_parameters() if not p.requires_grad}
    assert trained == {torch.float32} and frozen == {torch.bfloat16}
    assert autocast_dtypes == {torch.bfloat16}


def test_fp32_runs_do_not_autocast(make_cfg, autocast_dtypes):
    train(make_cfg("fp32", **{"run.max_steps": 1}))
    assert autocast_dtypes == {torch.float32}


@pytest.fixture()
def attention_dtypes(monkeypatch):
    """Records the dtype every torch attention call of a run (transformers' "sdpa") computes in: its queries',
    or autocast's when autocast is on (CPU autocast runs attention in its lower precision)."""
    seen: set = set()
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(query, *args, **kwargs):
        seen.add(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else query.dtype)
        return real(query, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return seen


@pytest.mark.parametrize("technique", ["full", "lora"])
def test_bf16_runs_on_cpu_compute_attention_in_float32_and_put_transformers_table_back(make_cfg, autocast_dtypes,
                                                                                        attention_dtypes, technique):  # fmt: skip
    """torch's CPU flash attention is slow backward in bf16 (`models.attention`): a bf16 run's projections are bf16
    but its attention gets float32 queries, in every forward (the training step and the final evaluation)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import AttentionInterface

    train(make_cfg(technique, **{"technique.name": technique, "model.dtype": "bfloat16", "run.max_steps": 2}))
    assert autocast_dtypes == {torch.bfloat16}
    assert attention_dtypes == {torch.float32}
    assert AttentionInterface._global_mapping["sdpa"] is sdpa_attention_forward  # put back after the run


def test_fp32_runs_leave_attention_as_transformers_runs_it(make_cfg, attention_dtypes, monkeypatch):
    import posttrain.models.attention as attention

    swapped = []
    monkeypatch.setattr(attention, "_in_float32", lambda sdpa: swapped.append(sdpa) or sdpa)
    train(make_cfg("fp32", **{"run.max_steps": 1}))
    assert attention_dtypes == {torch.float32} and not swapped


def test_float16_training_is_refused_before_anything_loads():
    from posttrain.errors import ConfigError

    with pytest.raises(ConfigError, match="float16 is not supported for training"):
        load_config(None, ["model.dtype=float16"])
    with pytest.raises(ConfigError, match="pure_bf16.*needs model.dtype=bfloat16"):
        load_config(None, ["model.pure_bf16=true"])


PAIRS = [{"prompt": f"add {a} {b}", "chosen": str(a + b), "rejected": f"{a + b + 1} maybe"}
         for a in range(4) for b in range(2)]  # fmt: skip


@pytest.mark.parametrize("technique,reference", [("lora", "adapter"), ("full", "precompute"), ("full", "copy")])
def test_bf16_dpo_first_step_is_log2_in_every_reference_mode(make_cfg, tmp_path, technique, reference):
    """The reference forward runs under the same autocast and from the same weights as the untrained policy."""
    import json
    import math

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in PAIRS), encoding="utf-8")
    first = train(make_cfg(f"dpo-{technique}-{reference}", **{
        "algorithm.name": "dpo", "technique.name": technique, "algorithm.reference": reference,
        "algorithm.beta": 1.0, "data.train": str(pairs), "model.dtype": "bfloat16", "run.max_steps": 1,
    })).history[0]  # fmt: skip
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["abs_logratio_per_token"] == pytest.approx(0.0, abs=1e-7)
