"""Truncated importance sampling wired into the GRPO, RLOO and PPO runs: an engine whose log-probs disagree with
the trainer's changes each method's gradient exactly as min(pi_old / pi_sampler, cap) says (the math by hand:
tests/unit/test_tis.py). The engine is the colocated vLLM engine over the fake backend of conftest.py."""

import math

import pytest

from posttrain import config as config_module
from posttrain.rollout import engines
from posttrain.rollout.vllm_engine import VLLMEngine
from posttrain.train import train
from posttrain.trainer.metrics import read_metrics

METHODS = {
    "grpo": {},
    "rloo": {"algorithm.name": "rloo"},
    # no value loss: the gradient is the policy gradient's alone (the value loss is not weighted)
    "ppo": {"algorithm.name": "ppo", "algorithm.num_generations": None, "algorithm.vf_coef": 0.0},
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_tis_multiplies_the_first_steps_gradient_by_the_capped_ratio(method, rl_cfg, fake_vllm, monkeypatch):
    """The sampler reports every token 1 nat less likely than the trainer finds it under the same weights: each
    weight is min(e^1, 2) = 2, so the first step's gradient is exactly twice the one without TIS (the same samples
    and advantages: sampling log-probs enter nothing else); weight mean 2, every token capped, gap 1. With cap 4
    the weight is e itself."""
    monkeypatch.setattr(config_module, "vllm_available", lambda: True)
    monkeypatch.setitem(engines.ENGINES, "vllm", lambda cfg: VLLMEngine(lambda m: fake_vllm(logp_shift=-1.0)))

    def first_step(name, **overrides):
        cfg = rl_cfg(f"{method}-{name}", **{**METHODS[method], "algorithm.rollout.engine": "vllm",
                                            "run.max_steps": 1, **overrides})  # fmt: skip
        [m] = read_metrics(train(cfg).run_dir / "metrics.jsonl")
        return m

    off, capped, uncapped = (first_step("off"), first_step("cap2", **{"algorithm.rollout.tis_cap": 2.0}),
                             first_step("cap4", **{"algorithm.rollout.tis_cap": 4.0}))  # fmt: skip
    assert off["grad_norm"] > 1e-4 and "tis_weight_mean" not in off
    assert capped["grad_norm"] == pytest.approx(2 * off["grad_norm"], rel=1e-5)
    assert capped["tis_weight_mean"] == pytest.approx(2.0, rel=1e-6) and capped["tis_capped_fraction"] == 1.0
    # e: exp(1 + the float32 noise of the trainer's log-probs, ~1e-7)
    assert uncapped["grad_norm"] == pytest.approx(math.e * off["grad_norm"], rel=1e-5)
    assert uncapped["tis_weight_mean"] == pytest.approx(math.e, rel=1e-5) and uncapped["tis_capped_fraction"] == 0
    for m in (off, capped, uncapped):
        assert m["logp_gap_sampler_trainer"] == pytest.approx(1.0, abs=1e-5)
