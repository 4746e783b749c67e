"""IPO scores length-averaged log-probabilities by default (`algorithm.ipo_logps: mean`), sums on request.

Worked by hand on the batch the DPO loss function sees: the policy's and the reference's per-token
log-probabilities of each response, averaged over its scored tokens, give the margin h, and the loss is
(h - 1/(2 beta))^2 per pair."""

import pytest
import torch

from posttrain.algorithms import dpo, load_config
from posttrain.data.preference import collate_pairs
from posttrain.models.logprobs import scatter, selected_token_logps, target_positions


@pytest.fixture()
def batch(tiny_tokenizer):
    from posttrain.data.preference import render_preference_dataset
    from posttrain.data.schema import normalise_row

    rows = [normalise_row({"prompt": "q", "chosen": "ab", "rejected": "cdefghij"}, "preference"),
            normalise_row({"prompt": "r", "chosen": "klmnopq", "rejected": "s"}, "preference")]  # fmt: skip
    pairs = render_preference_dataset(tiny_tokenizer, rows, max_length=64)
    batch = collate_pairs(pairs, pad_id=0)
    torch.manual_seed(0)  # reference log-probs a little off the policy's, at the scored positions
    target, _ = target_positions(batch["loss_mask"])
    batch["ref_logps"] = scatter(torch.randn(int(target.sum())) * 0.5 - 5.5, target)
    return batch


def _by_hand(model, batch, beta, reduce):
    with torch.no_grad():
        logps, _ = selected_token_logps(model, {k: batch[k] for k in ("input_ids", "attention_mask")},
                                        batch["loss_mask"])  # fmt: skip
    target = batch["loss_mask"].bool().clone()
    target[:, 0] = False
    n = target.sum(-1).float()
    pol, ref = (logps * target).sum(-1), (batch["ref_logps"] * target).sum(-1)
    if reduce == "mean":
        pol, ref = pol / n, ref / n
    h = (pol[:2] - ref[:2]) - (pol[2:] - ref[2:])
    return ((h - 1 / (2 * beta)) ** 2).sum()


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_ipo_loss_uses_the_configured_reduction(tiny_model, batch, reduce):
    cfg = load_config(None, ["algorithm.name=dpo", "technique.name=full", "algorithm.reference=precompute",
                             "algorithm.loss_type=ipo", "algorithm.beta=0.5",
                             f"algorithm.ipo_logps={reduce}"])  # fmt: skip
    model = tiny_model.eval()
    with torch.no_grad():
        loss, metrics = dpo.loss_fn(model, batch, cfg)
    want = _by_hand(model, batch, 0.5, reduce)
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)
    other = _by_hand(model, batch, 0.5, "sum" if reduce == "mean" else "mean")
    assert abs(float(want - other)) > 0.1  # the two reductions give different losses on these lengths


def test_ipo_defaults_to_the_length_averaged_form():
    assert load_config(None, ["algorithm.name=dpo", "algorithm.loss_type=ipo"]).algorithm.ipo_logps == "mean"
