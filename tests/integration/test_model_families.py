"""Model families whose forward differs from Llama's: post-processed logits (Gemma 2 softcapping, Cohere
`logit_scale`, Granite `logits_scaling`) and shipped dropout (GPT-2). Sampling, scoring and the reference must
agree on each of them, so that at step 0 the PPO ratio is 1 and every KL is 0."""

from types import SimpleNamespace

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
    from posttrain.algorithms.ppo import kl_penalty_rewards
    from posttrain.models.heads import ScalarHeadModel
    from posttrain.rollout.engine import HFEngine
    from posttrain.rollout.source import reference_logps, sequence_tensors

    folder = save_tiny_model(tmp_path / family, family=family, **config)
    mcfg = ModelConfig(name=str(folder))
    tokenizer = load_tokenizer(mcfg)
    model = ScalarHeadModel(load_model(mcfg, TechniqueConfig(name="lora")), kind="value")
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("add 1 2", "hello there")]
    rollout = HFEngine().generate(model.policy, tokenizer, prompts, n=2, max_new_tokens=6, temperature=0.7,
                                  top_p=1.0, stop=[], seed=0)  # fmt: skip
    tensors = sequence_tensors(rollout)
    ctx = SimpleNamespace(accelerator=OneProcess(), model=model, micro_batch_size=4)
    _, old = ppo._rollout_values_and_logps(ctx, tensors, 0.7)
    ref = reference_logps(ctx, tensors, 0.7)
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
