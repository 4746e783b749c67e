"""Model families whose forward differs from Llama's: post-processed logits (Gemma 2 softcapping, Cohere
`logit_scale`, Granite `logits_scaling`) and shipped dropout (GPT-2). Sampling, scoring and the reference must
agree on each of them, so that at step 0 the PPO ratio is 1 and every KL is 0."""


import pytest
import torch

from posttrain.config import ModelConfig, TechniqueConfig
from posttrain.models import load_model, load_tokenizer
from posttrain.testing import save_tiny_model

# Post-processing strong enough to matter on a tiny random model (logits of a few tenths).
LOGIT_FAMILIES = [("gemma2", {"final_logit_softcapping": 0.2}), ("cohere", {"logit_scale": 8.0}),
                  ("granite", {"logits_scaling": 0.1})]  # fmt: skip


class OneProcess:
    num_processes, process_index, is_main_process, device = 1, 0, True, torch.device("cpu")

    def unwrap_model(self, model):
        return model


@pytest.mark.parametrize("family,config", LOGIT_FAMILIES, ids=[f for f, _ in LOGIT_FAMILIES])
def test_ppo_old_logps_equal_the_samplers_and_the_references_at_step_0(tmp_path, family, config):
    from posttrain.algorithms import ppo
    from posttrain.algorithms.base import RolloutContext, sequence_tensors
    from posttrain.algorithms.ppo import kl_penalty_rewards
    from posttrain.models.heads import ScalarHeadModel
    from posttrain.models.reference import Reference
    from posttrain.rollout.engine import HFEngine

    folder = save_tiny_model(tmp_path / family, family=family, **config)
    mcfg = ModelConfig(name=str(folder))
    tokenizer = load_tokenizer(mcfg)
    model = ScalarHeadModel(load_model(mcfg, TechniqueConfig(name="lora")), kind="value")
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("add 1 2", "hello there")]
    rollout = HFEngine().generate(model.policy, tokenizer, prompts, n=2, max_new_tokens=6, temperature=0.7,
                                  top_p=1.0, stop=[], seed=0)  # fmt: skip
    tensors = sequence_tensors(rollout)
    reference = Reference.build("adapter", model.policy, model_cfg=mcfg, technique=TechniqueConfig(name="lora"),
                                device="cpu")  # fmt: skip
    ctx = RolloutContext(cfg=None, model=model, accelerator=OneProcess(), micro_batch_size=4, reference=reference)
    _, old = ppo._rollout_values_and_logps(ctx, tensors, 0.7)
    ref = reference.logps(tensors, "completion_mask", chunk=4, temperature=0.7)
    mask = tensors["completion_mask"].bool()
    P = rollout.prompt_ids.shape[1]
    torch.testing.assert_close(old[:, P:][mask[:, P:]], rollout.sampling_logps[mask[:, P:]], rtol=0, atol=1e-5)
    torch.testing.assert_close(ref[mask], old[mask], rtol=0, atol=1e-6)
    rewards = kl_penalty_rewards(torch.zeros(4), old[:, P:], ref[:, P:], mask[:, P:], kl_coef=0.1)
    assert rewards.abs().max() < 1e-6  # the KL penalty is 0 while the adapter is a no-op
    # The output embedding applied to the last hidden state (what PPO scored before) is another distribution.
    with torch.no_grad():
        hidden = model.hidden_states(tensors["input_ids"], tensors["attention_mask"], tensors["position_ids"])
        raw = (model.policy.get_output_embeddings()(hidden).float() / 0.7).log_softmax(-1)
    raw_logps = raw[:, :-1].gather(-1, tensors["input_ids"][:, 1:, None])[..., 0][mask[:, 1:]]
    assert (raw_logps - old[:, 1:][mask[:, 1:]]).abs().max() > 0.05


# ------------------------------------------------------------------------------------------------------ dropout
# A Llama with attention dropout 0.1 (a float rate on each attention module) and GPT-2, which ships dropout 0.1 on
# residuals, embeddings and attention (nn.Dropout modules).
DROPOUT_FAMILIES = [("llama", {"attention_dropout": 0.1}), ("gpt2", {})]


@pytest.fixture(scope="module", params=DROPOUT_FAMILIES, ids=[f for f, _ in DROPOUT_FAMILIES])
def dropout_model_dir(request, tmp_path_factory):
    family, config = request.param
    return save_tiny_model(tmp_path_factory.mktemp(family), hidden_size=64, family=family, **config)


def test_disable_dropout_makes_the_training_forward_deterministic(dropout_model_dir):
    from posttrain.models import disable_dropout

    model = load_model(ModelConfig(name=str(dropout_model_dir)), TechniqueConfig(name="full"))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    model.train()
    assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)  # dropout is on
    assert disable_dropout(model)
    torch.testing.assert_close(model(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    assert disable_dropout(model) == []  # nothing left to switch off
    assert any(v > 0 for k, v in model.config.to_dict().items() if "drop" in k)  # the config stays as shipped


@pytest.mark.parametrize("setting", ["keep", "off"])
def test_a_dropout_setting_on_a_model_without_dropout_is_said(dropout_model_dir, tiny_model_dir, setting, capsys):
    """model.dropout keep or off on a model whose every rate is 0 changed nothing, silently (an audit, nineteenth
    session): the load says so; on a model with dropout it says nothing, and `auto` never."""
    load_model(ModelConfig(name=str(tiny_model_dir), dropout=setting), TechniqueConfig(name="full"))
    said = capsys.readouterr().out
    assert f"note: model.dropout={setting} changes nothing: {tiny_model_dir} has no dropout of its own" in said
    load_model(ModelConfig(name=str(dropout_model_dir), dropout=setting), TechniqueConfig(name="full"))
    load_model(ModelConfig(name=str(tiny_model_dir)), TechniqueConfig(name="full"))
    load_model(ModelConfig(name=str(tiny_model_dir), dropout=setting), TechniqueConfig(name="full"), train=False)
    assert "model.dropout" not in capsys.readouterr().out


PAIRS = [{"prompt": f"add {a} {b}", "chosen": str(a + b), "rejected": f"{a + b + 1} maybe"}
         for a in range(4) for b in range(2)]  # fmt: skip


@pytest.mark.parametrize("technique,reference", [("lora", "adapter"), ("lora", "precompute"), ("full", "precompute"),
                                                 ("full", "copy")])  # fmt: skip
def test_dpo_first_step_is_log2_in_every_reference_mode(make_cfg, dropout_model_dir, tmp_path, technique, reference):
    import json
    import math

    from posttrain.train import train

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in PAIRS), encoding="utf-8")
    common = {"model.name": str(dropout_model_dir), "algorithm.name": "dpo", "technique.name": technique,
              "algorithm.reference": reference, "algorithm.beta": 1.0, "data.train": str(pairs),
              "run.max_steps": 1}  # fmt: skip
    first = train(make_cfg(f"dpo-{technique}-{reference}", **common)).history[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    kept = train(make_cfg(f"keep-{technique}-{reference}", **common, **{"model.dropout": "keep"})).history[0]
    assert abs(kept["loss"] - math.log(2)) > 1e-4  # model.dropout=keep does keep it: step 1 is noisy


PROMPTS = [{"prompt": f"add {a} {b}", "answer": str(a + b)} for a in range(4) for b in range(4)]


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_rl_ratio_is_one_on_the_first_step_of_a_rollout_used_twice(make_cfg, dropout_model_dir, tmp_path, algorithm):
    """A rollout that feeds two optimisation steps takes its old log-probs from a separate (eval-mode) forward
    before the first update; the first step's loss forward must give the same log-probs: ratio 1, nothing
    clipped, approx KL 0."""
    import json

    from posttrain.train import train

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS), encoding="utf-8")
    (tmp_path / "r.py").write_text("def letters(prompts, completions, **kw):\n"
                                   "    return [sum(c.isalpha() for c in x) / 8 for x in completions]\n")  # fmt: skip
    cfg = make_cfg(f"{algorithm}-twice", **{
        "model.name": str(dropout_model_dir), "algorithm.name": algorithm, "technique.name": "lora",
        "algorithm.rewards": f"[{tmp_path / 'r.py'}:letters]", "data.train": str(prompts),
        "algorithm.rollout.max_new_tokens": 8, "algorithm.rollout.epochs": 2, "optim.batch_size": 8,
        "run.max_steps": 2, **({"algorithm.num_generations": 4} if algorithm == "grpo" else {}),
    })  # fmt: skip
    first = train(cfg).history[0]
    assert first["clip_fraction"] == 0.0
    if algorithm == "grpo":
        assert first["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    else:
        assert first["approx_kl"] == pytest.approx(0.0, abs=1e-7)
