"""The vLLM engine's weight sync and data flow, on CPU, with a fake backend in vLLM's place (`FakeVLLM` of
conftest.py: the `rollout.vllm_engine.Backend` interface over its own copy of the tiny model, sampling with `HFEngine`). What is
checked: when weights are pushed (first rollout, then only after an optimizer step changed them), which weights
(every trainable one; under LoRA each adapted layer's merged weight, equal to peft's merged model, with the
policy left bit-for-bit as it was), the wake/push/reset/sample/sleep order, and through a tiny GRPO run that the samples come
back from synced weights (the sampler/trainer log-prob gap stays at float32 noise, while a backend that drops the
pushes makes it grow). vLLM itself is not installed here: the real backend (`ColocatedVLLM`) is untested."""

import contextlib
import copy
import sys
import types

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

    def run(name, keeps_pushes=True, **overrides):
        fakes = []

        def make(cfg):
            return VLLMEngine(lambda model: fakes.append(fake_vllm(keeps_pushes=keeps_pushes)) or fakes[-1])

        monkeypatch.setitem(engines.ENGINES, "vllm", make)
        cfg = rl_cfg(name, **{"algorithm.rollout.engine": "vllm", **overrides})
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


def test_qlora_pushes_every_4bit_layer_dequantised_plus_its_delta(tiny_model_dir, fake_vllm):
    """vLLM holds the unquantised base model, so a QLoRA policy pushes each 4-bit layer as the values its forward
    multiplies by: adapted layers W_4bit dequantised + B A s, the others (here k, o and the MLP) dequantised alone.
    The pushed weight reproduces each layer's output (4-bit base plus adapter) on random inputs."""
    pytest.importorskip("bitsandbytes")
    policy = load_model(ModelConfig(name=str(tiny_model_dir)),
                        TechniqueConfig(name="qlora", r=4, target_modules=["q_proj", "v_proj"]))  # fmt: skip
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    fake = fake_vllm()
    _generate(VLLMEngine(lambda model: fake), policy, load_tokenizer(ModelConfig(name=str(tiny_model_dir))))
    [pushed] = fake.pushed
    layers = {n.removeprefix("base_model.model."): m for n, m in policy.named_modules()
              if n.endswith(("_proj",)) and ".base_layer" not in n}  # fmt: skip
    assert set(pushed) == {f"{n}.weight" for n in layers} and len(pushed) == 2 * 7  # 2 layers x 7 linears
    for name, layer in layers.items():
        w = pushed[f"{name}.weight"]
        x = torch.randn(5, w.shape[1])
        assert_close(x @ w.T, layer(x), rtol=0, atol=1e-5)
    original = dict(load_model(ModelConfig(name=str(tiny_model_dir)), TechniqueConfig(name="full"),
                               train=False).named_parameters())  # fmt: skip
    k = "model.layers.0.self_attn.k_proj.weight"  # not adapted: the 4-bit approximation of the original
    assert 1e-4 < (pushed[k] - original[k]).abs().max() < 0.05


def test_a_qlora_grpo_run_samples_from_the_weights_it_scores(vllm_run):
    pytest.importorskip("bitsandbytes")
    metrics, fake = vllm_run("vllm-grpo-qlora", **{"technique.name": "qlora"})
    assert fake.calls.count("load_weights") == 3
    gaps = [m["logp_gap_sampler_trainer"] for m in metrics]
    assert len(gaps) == 3 and max(gaps) < 1e-5, gaps


def test_vllm_is_refused_before_anything_loads_when_not_installed(rl_cfg, monkeypatch):
    monkeypatch.setattr(config_module, "vllm_available", lambda: False)
    with pytest.raises(ConfigError, match=r"needs the vllm package.*posttrain\[vllm\]"):
        rl_cfg("no-vllm", **{"algorithm.rollout.engine": "vllm"})


class Zero3StandIn:
    """DeepSpeed ZeRO-3 as `policy_weights` meets it, without DeepSpeed (not installed here; the real one:
    test_deepspeed.py): each weight, marked `ds_id`, holds an empty placeholder, and the `deepspeed` module's
    `zero.GatheredParameters(params)` puts the whole data of those of `params` that are marked in for its block,
    then empties them again. Records the most elements held whole at once, and what each block gathered."""

    def __init__(self, model):
        self.whole: dict[int, torch.Tensor] = {}
        for p in model.parameters():
            p.ds_id = len(self.whole)
            self.whole[p.ds_id], p.data = p.data, torch.empty(0, dtype=p.dtype)
        self.zero = types.SimpleNamespace(GatheredParameters=self.gathered)
        self.now = self.most = 0
        self.blocks: list[set[int]] = []

    @contextlib.contextmanager
    def gathered(self, params):
        params = [p for p in params if hasattr(p, "ds_id")]
        for p in params:
            p.data = self.whole[p.ds_id]
        self.blocks.append({p.ds_id for p in params})
        self.now += sum(p.numel() for p in params)
        self.most = max(self.most, self.now)
        try:
            yield
        finally:
            self.now -= sum(p.numel() for p in params)
            for p in params:
                p.data = torch.empty(0, dtype=p.dtype)


@pytest.mark.parametrize("technique", ["full", "lora"])
def test_zero3_partitioned_weights_are_gathered_module_by_module_and_pushed_whole(tiny_model_dir, fake_vllm,
                                                                                   monkeypatch, technique):  # fmt: skip
    """Under ZeRO-3 each process holds a partition of each weight and an empty placeholder in its place. The push
    gathers one module's weights at a time (a LoRA layer's W, A and B together), so that a process never holds
    more than the largest module whole besides what it pushes, and pushes the whole weights: full, each trainable
    weight bit for bit; LoRA, each adapted layer's W + delta, as peft's merge gives it. Every weight is partitioned
    again afterwards."""
    policy = load_model(ModelConfig(name=str(tiny_model_dir)), TechniqueConfig(name=technique, r=4))
    with torch.no_grad():  # a trained-looking adapter: B away from its zero start
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    if technique == "full":
        expected = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    else:
        expected = dict(copy.deepcopy(policy).merge_and_unload().named_parameters())
    units = [m for m in policy.modules() if list(m.parameters(recurse=False))]
    if technique == "lora":
        from peft.tuners.lora import LoraLayer

        units = [m for m in policy.modules() if isinstance(m, LoraLayer)]
    largest = max(sum(p.numel() for p in m.parameters()) for m in units)
    zero3 = Zero3StandIn(policy)
    monkeypatch.setitem(sys.modules, "deepspeed", zero3)
    fake = fake_vllm()
    engine = VLLMEngine(lambda model: fake)
    engine.backend = fake
    assert engine.sync(policy)
    [pushed] = fake.pushed
    if technique == "full":
        assert pushed.keys() == expected.keys()
        for n, t in pushed.items():
            assert torch.equal(t, expected[n]), n
    else:
        adapted = {f"{n.removeprefix('base_model.model.')}.weight" for n, m in policy.named_modules()
                   if isinstance(m, LoraLayer)}  # fmt: skip
        assert pushed.keys() == adapted and adapted
        for n, t in pushed.items():
            assert_close(t, expected[n], rtol=0, atol=1e-6)  # as the unsharded LoRA push (test above)
    assert len(zero3.blocks) == len(units) and zero3.most == largest  # one module at a time
    assert zero3.most < sum(t.numel() for t in zero3.whole.values()) / 4
    assert zero3.now == 0 and all(p.numel() == 0 for p in policy.parameters())  # partitioned again


def test_under_deepspeed_each_optimizer_step_bumps_the_trained_weights_versions():
    """DeepSpeed steps the optimizer over its own float32 copies and writes the results back through `.data`,
    which moves no version counter, so `weight_versions` would see no step and vLLM would keep the first weights
    pushed (measured with DeepSpeed: no counter moved in 2 steps of ZeRO-2 or ZeRO-3). `_before_deepspeed` bumps
    the trained weights' counters after each step of the optimizer DeepSpeed steps, and gives DeepSpeed the
    run's batch settings (the micro-batch size Accelerate would take from a dataloader; no accumulation of its own,
    posttrain's loop marks each step's end) and `optim.max_grad_norm` as its clipping, replacing the config
    file's values (here an accumulation of 4 and clipping at 1.0), and loads no universal checkpoint (not a resume
    on another number of processes)."""
    from accelerate.utils import DistributedType

    from posttrain.rollout.vllm_engine import weight_versions
    from posttrain.train import _before_deepspeed

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    model[1].requires_grad_(False)
    master = [p.detach().clone().requires_grad_() for p in model[0].parameters()]  # DeepSpeed's float32 copies
    optimizer = torch.optim.SGD(master, lr=0.1)
    ds_config = {"gradient_accumulation_steps": 4, "gradient_clipping": 1.0}
    accelerator = types.SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=2,
                                        state=types.SimpleNamespace(deepspeed_plugin=types.SimpleNamespace(
                                            deepspeed_config=ds_config)))  # fmt: skip
    _before_deepspeed(accelerator, model, optimizer, 3, 0.5)
    expected = {"train_micro_batch_size_per_gpu": 3, "train_batch_size": 6, "gradient_accumulation_steps": 1,
                "gradient_clipping": 0.5, "checkpoint": {"load_universal": False}}  # fmt: skip (not a resume)
    assert ds_config == expected
    versions = weight_versions(model)
    frozen = [p._version for p in model[1].parameters()]
    for _ in range(2):
        for m in master:
            m.grad = torch.ones_like(m)
        optimizer.step()
        for p, m in zip(model[0].parameters(), master, strict=True):
            p.data.copy_(m.detach())  # as DeepSpeed writes the stepped weights back
        assert all(a > b for a, b in zip(weight_versions(model), versions, strict=True))
        versions = weight_versions(model)
    assert [p._version for p in model[1].parameters()] == frozen  # frozen weights: not pushed, not bumped
    accelerator.distributed_type = DistributedType.MULTI_CPU  # no DeepSpeed: nothing to do
    optimizer = torch.optim.SGD(master, lr=0.1)
    _before_deepspeed(accelerator, model, optimizer, 5, None)
    assert ds_config == expected and not optimizer._optimizer_step_post_hooks
