"""vLLM in server mode on CPU: `GenerationServer` in a thread on a free port, holding the fake backend of the
colocated tests (`FakeVLLM`, conftest.py) in vLLM's place; the trainer's side is `ServerBackend` under the same
`VLLMEngine`. What is checked: which calls reach the server and when (a push of merged LoRA weights W + delta at
the first rollout and after each optimizer step only, then a prefix cache reset), that the pushed weights are the
policy's (also when split into several requests), that samples and log-probs cross the wire bit for bit, a GRPO
run's data flow through the server, the config checks, the errors when the server is unreachable, lost or failing,
and `posttrain vllm-serve`'s wiring. vLLM itself is not installed here: `serve` with a real `LLM` is untested."""

import copy

import pytest
import torch
from support import free_port
from torch.testing import assert_close

from posttrain import config as config_module
from posttrain.cli import main
from posttrain.config import ModelConfig, TechniqueConfig
from posttrain.errors import ConfigError, UserError
from posttrain.models import load_model, load_tokenizer
from posttrain.rollout import vllm_server
from posttrain.rollout.vllm_engine import VLLMEngine
from posttrain.rollout.vllm_server import GenerationServer, GenerationServerError, ServerBackend
from posttrain.train import _check_sharding, train
from posttrain.trainer.metrics import read_metrics


@pytest.fixture()
def served(fake_vllm):
    """A generation server over a `FakeVLLM` on a free port: yields (server, fake)."""
    fake = fake_vllm()
    server = GenerationServer(fake, port=0, model="tiny").start()
    yield server, fake
    server.close()


def _lora_policy(tiny_model_dir):
    policy = load_model(ModelConfig(name=str(tiny_model_dir)), TechniqueConfig(name="lora", r=4))
    with torch.no_grad():  # a trained-looking adapter: B away from its zero start
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    return policy


def _generate(engine, model, tokenizer):
    return engine.generate(model, tokenizer, [[5, 6, 7], [8, 9]], n=2, max_new_tokens=4, temperature=1.0,
                           top_p=1.0, stop=[], seed=3)  # fmt: skip


def test_lora_weights_reach_the_server_merged_once_per_change_and_samples_cross_bit_for_bit(
    served, tiny_model_dir, fake_vllm
):
    server, fake = served
    torch.manual_seed(0)
    policy = _lora_policy(tiny_model_dir)
    tokenizer = load_tokenizer(ModelConfig(name=str(tiny_model_dir)))
    engine = VLLMEngine(lambda model: ServerBackend(server.url, wait_s=5), sleep=False)

    rollout = _generate(engine, policy, tokenizer)
    assert fake.calls == ["load_weights", "reset_prefix_cache", "sample"]  # no sleep/wake: the server keeps its GPU
    merged = dict(copy.deepcopy(policy).merge_and_unload().named_parameters())  # peft's own merge
    [pushed] = fake.pushed
    adapted = {n.replace(".base_layer.", ".").removeprefix("base_model.model.")
               for n, _ in policy.named_parameters() if ".base_layer." in n}  # fmt: skip
    assert set(pushed) == adapted and adapted
    for n, t in pushed.items():
        assert_close(t, merged[n], rtol=0, atol=1e-6)
    # The same backend in-process (colocated), given the same weights: the same rollout, bit for bit, so ids and
    # log-probs lose nothing on the wire (JSON numbers hold a float32 exactly).
    local = fake_vllm()
    direct = _generate(VLLMEngine(lambda model: local, sleep=False), policy, tokenizer)
    for field in ("completion_ids", "completion_mask", "sampling_logps", "truncated"):
        assert torch.equal(getattr(rollout, field), getattr(direct, field)), field
    assert rollout.texts == direct.texts

    _generate(engine, policy, tokenizer)  # nothing trained since: no push
    assert fake.calls[3:] == ["sample"]
    optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.1)
    for p in policy.parameters():
        p.grad = torch.ones_like(p) if p.requires_grad else None
    optimizer.step()
    _generate(engine, policy, tokenizer)
    assert fake.calls[4:] == ["load_weights", "reset_prefix_cache", "sample"]
    assert ServerBackend(server.url).info == {"status": "ok", "model": "tiny", "pushes": 2}
    merged = dict(copy.deepcopy(policy).merge_and_unload().named_parameters())
    for n, t in fake.pushed[1].items():
        assert_close(t, merged[n], rtol=0, atol=1e-6)
        assert not torch.equal(t, fake.pushed[0][n])


def test_full_weights_pushed_in_several_requests_are_the_policys_bit_for_bit(served, tiny_model_dir):
    server, fake = served
    policy = load_model(ModelConfig(name=str(tiny_model_dir)), TechniqueConfig(name="full"))
    weights = {n: p.detach() for n, p in policy.named_parameters()}
    largest = max(t.numel() * t.element_size() for t in weights.values())
    client = ServerBackend(server.url, chunk_bytes=largest)  # at most one large tensor per request
    client.load_weights(list(weights.items()))
    assert len(fake.pushed) > 2 and fake.calls == ["load_weights"] * len(fake.pushed)
    received = {n: t for push in fake.pushed for n, t in push.items()}
    assert sum(len(push) for push in fake.pushed) == len(received) == len(weights)  # each weight once
    for n, t in weights.items():
        assert torch.equal(received[n], t), n


def test_a_grpo_run_through_the_server_samples_from_the_merged_weights_it_pushed(served, rl_cfg):
    """3 rollouts of one step each, LoRA: a push (merged W + delta) and a reset before each, no sleep; the
    sampler's log-probs equal the trainer's to float32 noise at every step, the server's weights being the
    policy's (a server that kept its base weights would read above 1e-3 from the second step: test_vllm_engine)."""
    server, fake = served
    cfg = rl_cfg("server-grpo", **{"algorithm.rollout.engine": "vllm-server", "technique.name": "lora",
                                   "technique.r": 4, "algorithm.rollout.vllm_server_url": server.url,
                                   "algorithm.rollout.vllm_server_timeout": 5})  # fmt: skip
    metrics = read_metrics(train(cfg).run_dir / "metrics.jsonl")
    assert fake.calls == ["load_weights", "reset_prefix_cache", "sample"] * 3
    assert [len(p) for p in fake.pushed] == [14] * 3  # 2 layers x 7 adapted linear layers (all-linear)
    gaps = [m["logp_gap_sampler_trainer"] for m in metrics]
    assert len(gaps) == 3 and max(gaps) < 1e-5, gaps
    assert not torch.equal(fake.pushed[1]["model.layers.0.self_attn.q_proj.weight"],
                           fake.pushed[0]["model.layers.0.self_attn.q_proj.weight"])  # fmt: skip


def test_an_unreachable_server_stops_the_run_with_what_to_do(rl_cfg):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cfg = rl_cfg("no-server", **{"algorithm.rollout.engine": "vllm-server", "algorithm.rollout.vllm_server_url": url,
                                 "algorithm.rollout.vllm_server_timeout": 0.5})  # fmt: skip
    with pytest.raises(GenerationServerError) as err:
        train(cfg)
    message = str(err.value)
    assert isinstance(err.value, UserError)  # exit 2, no traceback
    assert f"no generation server answered at {url} (algorithm.rollout.vllm_server_url) within 0.5 s" in message
    assert "algorithm.rollout.vllm_server_timeout" in message and "posttrain vllm-serve --model" in message


def test_a_lost_or_failing_server_is_a_clear_error(served):
    server, fake = served
    client = ServerBackend(server.url)
    with pytest.raises(GenerationServerError, match=r"failed on POST /load_weights \(HTTP 500\): KeyError: "
                                                    r"'model.nope.weight'"):  # fmt: skip
        client.load_weights([("model.nope.weight", torch.zeros(2))])  # not a weight the served model has
    with pytest.raises(GenerationServerError, match=r"HTTP 400\): /generate needs the fields n, max_new_tokens"):
        client._call("POST", "/generate", b'{"prompt_ids": [[1]]}')
    with pytest.raises(GenerationServerError, match=r"HTTP 404\): no POST /sleep; this server answers GET /health"):
        client._call("POST", "/sleep", b"{}")
    server.close()
    with pytest.raises(GenerationServerError, match=rf"lost the generation server at {server.url} \(POST /generate\)"):
        client.sample([[1, 2]], n=1, max_new_tokens=2, temperature=1.0, top_p=1.0, stop=[], stop_token_ids=[],
                      seed=0)  # fmt: skip


@pytest.mark.parametrize("url, says", [
    (None, "engine=vllm-server needs algorithm.rollout.vllm_server_url"),
    ("localhost:8000", "must be http://HOST:PORT"),
    ("http://127.0.0.1", "must be http://HOST:PORT"),
    ("http://127.0.0.1:8000/v1", "nothing after the port"),
])  # fmt: skip
def test_server_mode_needs_a_server_address(rl_cfg, url, says):
    overrides = {"algorithm.rollout.engine": "vllm-server"}
    if url is not None:
        overrides["algorithm.rollout.vllm_server_url"] = url
    with pytest.raises(ConfigError, match=says):
        rl_cfg("bad-url", **overrides)


def test_server_mode_needs_no_vllm_in_the_training_process_and_runs_sharded(rl_cfg, monkeypatch):
    monkeypatch.setattr(config_module, "vllm_available", lambda: False)
    cfg = rl_cfg("ok", **{"algorithm.rollout.engine": "vllm-server",
                          "algorithm.rollout.vllm_server_url": "http://127.0.0.1:8000"})  # fmt: skip
    assert cfg.algorithm.rollout.vllm_server_url == "http://127.0.0.1:8000"
    # FSDP2: each process pushes the weights gathered whole (the push under torchrun: test_sharding.py)
    _check_sharding(cfg.model_copy(update={"run": cfg.run.model_copy(update={"sharding": "fsdp2"})}), 2)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    for stage in ("2", "3"):  # ZeRO-3's partitioned weights are gathered for the push (test_vllm_engine.py)
        monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", stage)  # as `accelerate launch` sets it
        _check_sharding(cfg, 2)


def test_vllm_serve_without_vllm_is_a_user_error(tiny_model_dir, capsys):
    assert main(["vllm-serve", "--model", str(tiny_model_dir), "--port", "0"]) == 2
    assert "posttrain vllm-serve needs the vllm package" in capsys.readouterr().err


def test_vllm_serve_builds_vllm_from_the_resolved_model_and_serves_it(tiny_model_dir, fake_vllm, monkeypatch, capsys):
    """The command's wiring, vLLM's `LLM` (`ColocatedVLLM`) replaced by the fake: what it is built with, the address
    printed, and a server that answers there until interrupted."""
    built, answered = [], []
    monkeypatch.setattr(vllm_server, "vllm_available", lambda: True)
    monkeypatch.setattr(vllm_server, "ColocatedVLLM", lambda path, **kw: built.append((path, kw)) or fake_vllm())

    def serve_briefly(self):  # serve from a thread, ask it once, then stop as Ctrl-C would
        self.start()
        answered.append(ServerBackend(self.url, wait_s=5).info)
        raise KeyboardInterrupt

    monkeypatch.setattr(GenerationServer, "serve_forever", serve_briefly)
    assert main(["vllm-serve", "--model", str(tiny_model_dir), "--port", "0", "--gpu-memory-utilization", "0.5",
                 "--max-model-len", "256"]) == 0  # fmt: skip
    assert built == [(str(tiny_model_dir.resolve()), {"gpu_memory_utilization": 0.5, "sleep": False, "seed": 0,
                                                      "max_model_len": 256})]  # fmt: skip
    assert answered == [{"status": "ok", "model": str(tiny_model_dir), "pushes": 0}]
    err = capsys.readouterr().err
    assert f"serving {tiny_model_dir} at http://127.0.0.1:" in err
    assert "algorithm.rollout.engine=vllm-server algorithm.rollout.vllm_server_url=http://127.0.0.1:" in err


def test_vllm_serve_on_a_taken_port_is_refused_before_vllm_loads(tiny_model_dir, fake_vllm, monkeypatch, capsys):
    """vLLM takes minutes to load: a port another server holds is named first, and vLLM is never built; a failed
    vLLM load frees the port it had bound."""
    built = []
    monkeypatch.setattr(vllm_server, "vllm_available", lambda: True)
    monkeypatch.setattr(vllm_server, "ColocatedVLLM", lambda path, **kw: built.append(path) or fake_vllm())
    taken = GenerationServer(fake_vllm(), port=0)
    try:
        port = taken.url.rsplit(":", 1)[1]
        assert main(["vllm-serve", "--model", str(tiny_model_dir), "--port", port]) == 2
    finally:
        taken.close()
    assert built == []
    err = capsys.readouterr().err
    assert f"error: cannot listen on 127.0.0.1:{port}: " in err and "give another --port, or --port 0" in err

    def fails(path, **kw):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(vllm_server, "ColocatedVLLM", fails)
    port = free_port()
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        vllm_server.serve(str(tiny_model_dir), port=port)
    GenerationServer(fake_vllm(), port=port).close()  # the port is free again
