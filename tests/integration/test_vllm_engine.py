"""The vLLM engine's weight sync and data flow, on CPU, with a fake backend in vLLM's place (`FakeVLLM` of
conftest.py: the `rollout.vllm_engine.Backend` interface over its own copy of the tiny model, sampling with `HFEngine`). What is
checked: when weights are pushed (first rollout, then only after an optimizer step changed them), which weights
(every trainable one; under LoRA each adapted layer's merged weight, equal to peft's merged model, with the
policy left bit-for-bit as it was), the wake/push/reset/sample/sleep order, and through a tiny GRPO run that the samples come
back from synced weights (the sampler/trainer log-prob gap stays at float32 noise, while a backend that drops the
pushes makes it grow). vLLM itself is not installed here: the real backend (`ColocatedVLLM`) is untested."""

import copy

import pytest
import torch
from torch.testing import assert_close

from posttrain import config as config_module
from posttrain.config import ModelConfig, TechniqueConfig
from posttrain.errors import ConfigError
from posttrain.models import load_model, load_tokenizer
from posttrain.rollout import engines
from posttrain.rollout.vllm_engine import VLLMEngine
from posttrain.train import train
from posttrain.trainer.metrics import read_metrics


def _generate(engine, model, tokenizer):
    return engine.generate(model, tokenizer, [[5, 6, 7], [8, 9]], n=2, max_new_tokens=4, temperature=1.0,
                           top_p=1.0, stop=[], seed=3)  # fmt: skip


def test_lora_weights_are_pushed_merged_once_per_change_leaving_the_policy_untouched(tiny_model_dir, fake_vllm):
    policy = load_model(ModelConfig(name=str(tiny_model_dir)), TechniqueConfig(name="lora", r=4))
    tokenizer = load_tokenizer(ModelConfig(name=str(tiny_model_dir)))
    with torch.no_grad():  # a trained-looking adapter: B away from its zero start
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    fake = fake_vllm()
    engine = VLLMEngine(lambda model: fake)

    rollout = _generate(engine, policy, tokenizer)
    assert fake.calls == ["wake_up:weights", "load_weights", "reset_prefix_cache", "wake_up:kv_cache", "sample",
                          "sleep"]  # fmt: skip
    assert rollout.completion_ids.shape[0] == 4 and rollout.sampling_logps.shape == rollout.completion_ids.shape
    merged = dict(copy.deepcopy(policy).merge_and_unload().named_parameters())  # peft's own merge
    [pushed] = fake.pushed
    adapted = {n.replace(".base_layer.", ".").removeprefix("base_model.model.") for n in before if ".base_layer." in n}
    assert set(pushed) == adapted and adapted  # the adapted layers' weights, under the base model's names
    for n, t in pushed.items():
        assert_close(t, merged[n], rtol=0, atol=1e-6)
        assert not torch.equal(t, dict(fake.model.named_parameters())[n] * 0)  # not a zero tensor
    for n, p in policy.named_parameters():  # bit for bit: merging in place and back would leave rounding drift
        assert torch.equal(p.detach(), before[n]), n

    _generate(engine, policy, tokenizer)  # nothing trained since: no push
    assert len(fake.pushed) == 1 and fake.calls[6:] == ["wake_up:weights", "wake_up:kv_cache", "sample", "sleep"]
    optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.1)
    for p in policy.parameters():
        p.grad = torch.ones_like(p) if p.requires_grad else None
    optimizer.step()  # an optimizer step changes the adapter in place
    _generate(engine, policy, tokenizer)
    assert len(fake.pushed) == 2 and engine.pushes == 2
    assert not all(torch.equal(fake.pushed[0][n], fake.pushed[1][n]) for n in fake.pushed[0])


@pytest.fixture()
def vllm_run(rl_cfg, fake_vllm, monkeypatch):
    """A GRPO run with engine=vllm, the fake backend in vLLM's place; returns (metrics, fake)."""
    monkeypatch.setattr(config_module, "vllm_available", lambda: True)

    def run(name, keeps_pushes=True):
        fakes = []

        def make(cfg):
            return VLLMEngine(lambda model: fakes.append(fake_vllm(keeps_pushes=keeps_pushes)) or fakes[-1])

        monkeypatch.setitem(engines.ENGINES, "vllm", make)
        cfg = rl_cfg(name, **{"algorithm.rollout.engine": "vllm"})
        result = train(cfg)
        return read_metrics(result.run_dir / "metrics.jsonl"), fakes[0]

    return run


def test_a_grpo_run_samples_from_the_weights_it_pushed(vllm_run):
    """3 rollouts of one step each: a push before each (the first from the loaded weights, then after each step),
    and the sampler's log-probs equal the trainer's to float32 noise at every step; a backend that drops the
    pushes samples from the base model, and the gap shows it from the second rollout."""
    metrics, fake = vllm_run("vllm-grpo")
    assert fake.calls.count("load_weights") == 3 and fake.calls.count("sample") == 3
    assert fake.calls.count("reset_prefix_cache") == 3 and fake.calls.count("sleep") == 3
    gaps = [m["logp_gap_sampler_trainer"] for m in metrics]
    assert len(gaps) == 3 and max(gaps) < 1e-5, gaps

    stale_metrics, _ = vllm_run("vllm-grpo-stale", keeps_pushes=False)
    stale = [m["logp_gap_sampler_trainer"] for m in stale_metrics]
    assert stale[0] < 1e-5 and min(stale[1:]) > 1e-3, stale


def test_vllm_is_refused_before_anything_loads_when_not_installed(rl_cfg, monkeypatch):
    monkeypatch.setattr(config_module, "vllm_available", lambda: False)
    with pytest.raises(ConfigError, match=r"needs the vllm package.*posttrain\[vllm\]"):
        rl_cfg("no-vllm", **{"algorithm.rollout.engine": "vllm"})


def test_weights_deepspeed_zero3_partitioned_are_refused_not_pushed_empty(tiny_model_dir, fake_vllm):
    """ZeRO-3 leaves each process an empty placeholder per weight (marked `ds_id`); pushing those would give vLLM
    nothing, so the push refuses them with what to use instead."""
    policy = load_model(ModelConfig(name=str(tiny_model_dir)), TechniqueConfig(name="full"))
    tokenizer = load_tokenizer(ModelConfig(name=str(tiny_model_dir)))
    next(policy.parameters()).ds_id = 0  # as deepspeed.zero marks a partitioned parameter
    fake = fake_vllm()
    with pytest.raises(ConfigError, match="under DeepSpeed ZeRO-3 are not supported.*fsdp2.yaml"):
        _generate(VLLMEngine(lambda model: fake), policy, tokenizer)
    assert "load_weights" not in fake.calls
