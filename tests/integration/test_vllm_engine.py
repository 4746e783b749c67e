"""The vLLM engine's weight sync and data flow, on CPU, with a fake backend in vLLM's place (`FakeVLLM`: the
`rollout.vllm_engine.Backend` interface over its own copy of the tiny model, sampling with `HFEngine`). What is
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
from posttrain.rollout.engine import HFEngine
from posttrain.rollout.vllm_engine import VLLMEngine
from posttrain.train import train
from posttrain.trainer.metrics import read_metrics


class FakeVLLM:
    """A stand-in for vLLM: holds its own copy of the base model, takes pushed weights by name like vLLM's
    `load_weights`, samples with HFEngine, and records every call."""

    def __init__(self, model_dir, *, keeps_pushes=True):
        self.model = load_model(ModelConfig(name=str(model_dir)), TechniqueConfig(name="full"), train=False)
        self.tokenizer = load_tokenizer(ModelConfig(name=str(model_dir)))
        self.keeps_pushes = keeps_pushes
        self.calls, self.pushed = [], []

    def load_weights(self, weights):
        self.calls.append("load_weights")
        self.pushed.append({n: t.detach().clone() for n, t in weights})
        if self.keeps_pushes:
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for n, t in weights:
                    params[n].copy_(t)

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")

    def sleep(self):
        self.calls.append("sleep")

    def wake_up(self, tags):
        self.calls.append(f"wake_up:{','.join(tags)}")

    def sample(self, prompt_ids, *, n, max_new_tokens, temperature, top_p, stop, stop_token_ids, seed):
        self.calls.append("sample")
        r = HFEngine().generate(self.model, self.tokenizer, prompt_ids, n=n, max_new_tokens=max_new_tokens,
                                temperature=temperature, top_p=top_p, stop=[], seed=seed)  # fmt: skip
        lengths = r.completion_mask.sum(-1).tolist()
        return [(ids[:k], lps[:k]) for ids, lps, k in zip(r.completion_ids.tolist(), r.sampling_logps.tolist(),
                                                          lengths)]  # fmt: skip


def _generate(engine, model, tokenizer):
    return engine.generate(model, tokenizer, [[5, 6, 7], [8, 9]], n=2, max_new_tokens=4, temperature=1.0,
                           top_p=1.0, stop=[], seed=3)  # fmt: skip


def test_lora_weights_are_pushed_merged_once_per_change_leaving_the_policy_untouched(tiny_model_dir):
    policy = load_model(ModelConfig(name=str(tiny_model_dir)), TechniqueConfig(name="lora", r=4))
    tokenizer = load_tokenizer(ModelConfig(name=str(tiny_model_dir)))
    with torch.no_grad():  # a trained-looking adapter: B away from its zero start
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    fake = FakeVLLM(tiny_model_dir)
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
def vllm_run(rl_cfg, tiny_model_dir, monkeypatch):
    """A GRPO run with engine=vllm, the fake backend in vLLM's place; returns (metrics, fake)."""
    monkeypatch.setattr(config_module, "vllm_available", lambda: True)

    def run(name, keeps_pushes=True):
        fakes = []

        def make(cfg):
            return VLLMEngine(lambda model: fakes.append(FakeVLLM(tiny_model_dir, keeps_pushes=keeps_pushes))
                              or fakes[-1])  # fmt: skip

        monkeypatch.setitem(engines.ENGINES, "vllm", make)
        cfg = rl_cfg(name, **{"algorithm.rollout.engine": "vllm"})
        result = train(cfg)
        return read_metrics(result.run_dir / "metrics.jsonl"), fakes[0]

    return run


@pytest.fixture()
def rl_cfg(make_cfg, tmp_path):
    import json

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"add {a} {b}", "answer": str(a + b)}) + "\n"
                               for a in range(4) for b in range(4)), encoding="utf-8")  # fmt: skip
    (tmp_path / "rewards.py").write_text(
        'def letters(prompts, completions, **kwargs):\n    return [sum("a" <= c <= "z" for c in x) / 8 for x in completions]\n'
    )

    def make(name, **overrides):
        base = {"algorithm.name": "grpo", "algorithm.rewards": f"[{tmp_path / 'rewards.py'}:letters]",
                "data.train": str(prompts), "technique.name": "full", "algorithm.rollout.max_new_tokens": 8,
                "algorithm.num_generations": 4, "optim.batch_size": 8, "optim.lr": 1e-2, "run.max_steps": 3}  # fmt: skip
        return make_cfg(name, **{**base, **overrides})

    return make


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
