"""`model.compile`: compiled decoder layers train the same math as the eager ones (within float rounding: inductor's
fused loops sum in another order), keep less for backward under `compile_memory_budget`, and every combination not
tried is refused before a model loads."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from test_train_preference import PAIRS
from torch._dynamo.utils import counters
from torch.testing import assert_close

from posttrain.algorithms import load_config
from posttrain.errors import ConfigError
from posttrain.models.layers import compile_layers, cpp_compiler_missing, lean_mlps
from posttrain.models.logprobs import selected_token_logps
from posttrain.testing import tiny_model
from posttrain.train import train

# inductor builds its CPU kernels with a C++ compiler: where none is installed, the compiling tests cannot run
# (and a run is refused before the model loads, `test_a_missing_compiler_is_refused_before_the_model_loads`)
_NO_COMPILER = cpp_compiler_missing()
compiles = pytest.mark.skipif(_NO_COMPILER is not None, reason=f"no C++ compiler: {_NO_COMPILER}")


@pytest.fixture()
def pairs_file(tmp_path):
    p = tmp_path / "pairs.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in PAIRS), encoding="utf-8")
    return p


def _batch(seed: int = 0, rows: int = 4, length: int = 24):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 259, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0  # a padded row: the compiled layers see the attention mask too
    mask[3, 9:] = 0
    target = mask.clone()
    target[:, :5] = 0  # a "prompt" without loss
    return {"input_ids": ids, "attention_mask": mask}, target


def _loss_and_grads(model, inputs, target):
    logps, _ = selected_token_logps(model, inputs, target)
    loss = -logps.sum() / target[:, 1:].sum()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    return loss.detach(), grads


def _saved_bytes(model, inputs, target) -> int:
    """Bytes of the distinct storages autograd keeps for backward over one forward."""
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logps, _ = selected_token_logps(model, inputs, target)
    logps.sum().backward()
    return sum(seen.values())


@compiles
def test_compiled_layers_give_the_eager_loss_and_gradients():
    torch._dynamo.reset()
    counters.clear()
    eager = tiny_model(259, hidden_size=64, layers=2)
    lean_mlps(eager)  # what load_model gives a compiled run
    compiled = copy.deepcopy(eager)
    assert compile_layers(compiled) == 2  # both LlamaDecoderLayers, found through `_no_split_modules`
    inputs, target = _batch()
    loss_e, grads_e = _loss_and_grads(eager, inputs, target)
    for seed in (0, 1):  # a second batch of another length runs the same compiled code (dynamic shapes)
        inputs, target = _batch(seed, length=24 + 7 * seed)
        loss_e, grads_e = _loss_and_grads(eager, inputs, target)
        loss_c, grads_c = _loss_and_grads(compiled, inputs, target)
        # float32, ~5.5 nats: fused loops sum in another order, measured differences ~1e-7 relative
        assert_close(loss_c, loss_e, rtol=1e-6, atol=0)
        for gc, ge in zip(grads_c, grads_e, strict=True):
            assert_close(gc, ge, rtol=1e-5, atol=1e-7)
    # the compiled path ran: dynamo compiled the layer's forward (and only it; the loss around it stays eager)
    assert counters["stats"]["unique_graphs"] >= 1 and counters["graph_break"] == {}


@compiles
def test_a_lower_memory_budget_keeps_less_for_backward_and_changes_no_gradient():
    base = tiny_model(259, hidden_size=64, layers=2)
    lean_mlps(base)
    full_budget, low_budget = copy.deepcopy(base), copy.deepcopy(base)
    compile_layers(full_budget, 1.0)
    compile_layers(low_budget, 0.1)
    inputs, target = _batch(length=64)
    kept_full = _saved_bytes(full_budget, inputs, target)
    kept_low = _saved_bytes(low_budget, inputs, target)
    assert kept_low < 0.8 * kept_full, (kept_low, kept_full)
    _, grads_full = _loss_and_grads(full_budget, inputs, target)
    _, grads_low = _loss_and_grads(low_budget, inputs, target)
    for a, b in zip(grads_low, grads_full, strict=True):
        assert_close(a, b, rtol=1e-5, atol=1e-7)


@compiles
@pytest.mark.parametrize(
    ("method", "technique"), [("sft", "full"), ("sft", "lora"), ("dpo", "lora"), ("reward", "full")]
)
def test_a_compiled_run_trains_as_the_eager_run(make_cfg, pairs_file, method, technique):
    """SFT; DPO whose reference is the policy with its adapter disabled (its forward, without gradients, runs
    uncompiled); a reward model, whose scalar head sits outside the compiled layers."""
    runs = {}
    for compiled in (False, True):
        # AdamW's eps at 1 makes its step nearly linear in the gradient: at 1e-8, g / sqrt(v) turns last-bit
        # differences of near-zero gradients into whole steps (docs/scale.md says the same of process counts)
        overrides = {"algorithm.name": method, "technique.name": technique, "model.compile": compiled,
                     "run.max_steps": 3, "optim.eps": 1.0}  # fmt: skip
        if method != "sft":
            overrides["data.train"] = str(pairs_file)
        result = train(make_cfg(f"{method}-{technique}-{compiled}", **overrides), return_model=True)
        runs[compiled] = (result.history, {n: p.detach() for n, p in result.model.named_parameters()})
    (h_eager, w_eager), (h_comp, w_comp) = runs[False], runs[True]
    assert len(h_comp) == len(h_eager) == 3
    for a, b in zip(h_comp, h_eager):
        assert_close(a["loss"], b["loss"], rtol=1e-6, atol=0)
    assert w_comp.keys() == w_eager.keys()
    for name in w_eager:
        assert_close(w_comp[name], w_eager[name], rtol=1e-5, atol=1e-7, msg=name)


@compiles
@pytest.mark.parametrize(("method", "technique"), [("grpo", "lora"), ("ppo", "full")])
def test_a_compiled_rl_run_trains_as_the_eager_run_and_samples_uncompiled(make_cfg, tmp_path, method, technique):
    """GRPO with LoRA and a KL penalty to the adapter disabled; PPO, full, with its value head and a frozen-copy
    reference. Both steps train on one rollout (rollout.batch_size = 2 x optim.batch_size), sampled before any
    update, so the two runs score the same samples (sampling runs eager in both: `_compiled_with_grad`). Their
    losses and weights agree within float rounding, as for SFT; the compiled run's training forwards ran compiled
    (dynamo captured graphs), and no forward without gradients ran the compiled code (every call into it is
    recorded with whether gradients were on)."""
    from test_train_rl import PROMPTS, REWARDS

    from posttrain.models import layers

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS), encoding="utf-8")
    (tmp_path / "rewards.py").write_text(REWARDS, encoding="utf-8")
    group = {"algorithm.num_generations": 4} if method == "grpo" else {"algorithm.kl_coef": 0.1}
    beta = {"algorithm.beta": 0.04} if method == "grpo" else {}
    runs, calls = {}, []
    wrap = layers._compiled_with_grad

    def counted(compiled, eager):
        def compiled_counted(*a, **k):
            calls.append(torch.is_grad_enabled())
            return compiled(*a, **k)

        return wrap(compiled_counted, eager)

    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        overrides = {"algorithm.name": method, "technique.name": technique, "model.compile": compiled,
                     "algorithm.rewards": f"[{tmp_path / 'rewards.py'}:letters]", "data.train": str(prompts),
                     "algorithm.rollout.max_new_tokens": 8, "optim.batch_size": 8, "algorithm.rollout.batch_size": 16,
                     "optim.schedule": "constant", "run.max_steps": 2, "optim.eps": 1.0, **group, **beta}  # fmt: skip
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(layers, "_compiled_with_grad", counted)
            result = train(make_cfg(f"{method}-{compiled}", **overrides), return_model=True)
        runs[compiled] = (result.history, {n: p.detach() for n, p in result.model.named_parameters()})
    assert calls and all(calls)  # compiled code only ever ran with gradients
    assert counters["stats"]["unique_graphs"] >= 1
    (h_eager, w_eager), (h_comp, w_comp) = runs[False], runs[True]
    assert len(h_comp) == len(h_eager) == 2 and [h["rollout"] for h in h_comp] == [0, 0]
    for a, b in zip(h_comp, h_eager):
        assert a["completion_length_mean"] == b["completion_length_mean"] and a["reward/total_mean"] == b["reward/total_mean"]
        assert_close(a["loss"], b["loss"], rtol=1e-5, atol=1e-7)
    for name in w_eager:
        assert_close(w_comp[name], w_eager[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"technique.name": "qlora"}, "technique.name=qlora"),
        ({"model.gradient_checkpointing": "true"}, "model.gradient_checkpointing=true"),
        ({"model.dtype": "bfloat16"}, "model.dtype=bfloat16"),
        ({"model.rebuild_pointwise": "false"}, "model.rebuild_pointwise"),
    ],
)
def test_untried_combinations_are_refused_before_anything_loads(tmp_path, overrides, named):
    args = {"model.name": "missing-model-folder", "data.train": "x.jsonl", "model.compile": "true", **overrides}
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{k}={v}" for k, v in args.items()])
    assert named in str(err.value)


def test_a_memory_budget_without_compile_is_refused():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.train=x.jsonl", "model.compile_memory_budget=0.5"])
    assert "model.compile_memory_budget" in str(err.value) and "model.compile is true" in str(err.value)


@pytest.mark.parametrize(("processes", "device", "named"), [(2, "cpu", "2 processes"), (1, "cuda", "a cuda device")])
def test_a_launch_compile_was_not_tried_on_is_refused_before_the_model_loads(make_cfg, processes, device, named):
    from types import SimpleNamespace

    from posttrain.train import _check_compile

    launch = SimpleNamespace(num_processes=processes, device=torch.device(device))
    with pytest.raises(ConfigError) as err:
        _check_compile(make_cfg(**{"model.compile": "true"}), launch)
    assert named in str(err.value) and "remove model.compile" in str(err.value)
    _check_compile(make_cfg(**{"model.compile": "true"}), SimpleNamespace(num_processes=1, device=torch.device("cpu")))


def test_a_missing_compiler_is_refused_before_the_model_loads(make_cfg):
    from types import SimpleNamespace

    from torch._inductor import config as inductor_config
    from torch._inductor.cpp_builder import cpp_compiler_search

    from posttrain.train import _check_compile

    # inductor searches the compilers its config lists (CXX, then g++ and clang++): only a missing one here; its
    # own `patch` restores the setting (a monkeypatch of the config's attribute deleted it on undo)
    cpp_compiler_search.cache_clear()
    try:
        refused = pytest.raises(ConfigError, match=r"model.compile needs a C\+\+ compiler.*apt-get install g\+\+")
        with inductor_config.patch({"cpp.cxx": ("/nonexistent/c++",)}), refused:
            _check_compile(make_cfg(**{"model.compile": "true"}),
                           SimpleNamespace(num_processes=1, device=torch.device("cpu")))
    finally:
        cpp_compiler_search.cache_clear()


@compiles
def test_a_compiled_run_evaluates_saves_and_resumes(make_cfg, sft_file):
    """Held-out evaluation runs the compiled layers without gradients (another compiled graph); checkpoints hold
    the weights under their usual names (the layers are compiled in place, not wrapped); a compiled run resumed
    from its step-2 checkpoint ends where the uninterrupted compiled run ends."""
    import shutil

    overrides = {"technique.name": "lora", "model.compile": "true", "run.max_steps": 4, "run.save_every": 2,
                 "data.eval": str(sft_file), "run.eval_every": 2}  # fmt: skip
    whole = train(make_cfg("whole", **overrides), return_model=True)
    evals = [r["eval_loss"] for r in whole.history if "eval_loss" in r]
    assert len(evals) >= 2 and all(torch.isfinite(torch.tensor(evals)))
    ckpt = whole.run_dir / "checkpoints" / "step-000002"
    assert ckpt.is_dir()
    cut = make_cfg("cut", **overrides)
    shutil.copytree(whole.run_dir, cut.run.output_dir)
    for extra in ("step-000004",):
        shutil.rmtree(f"{cut.run.output_dir}/checkpoints/{extra}", ignore_errors=True)
    shutil.rmtree(f"{cut.run.output_dir}/final")
    resumed = train(cut, resume=True, return_model=True)
    a = {n: p.detach() for n, p in whole.model.named_parameters() if p.requires_grad}
    b = {n: p.detach() for n, p in resumed.model.named_parameters() if p.requires_grad}
    assert a.keys() == b.keys() and a
    for n in a:  # the same compiled code on the same inputs after the same restored state: bit for bit
        assert torch.equal(a[n], b[n]), n
