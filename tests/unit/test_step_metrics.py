"""Per-token diagnostics are token means over the whole step, whatever the micro-batch size.

A loss function returns its per-token metrics as `Mean(total, count)`; the loop sums both over the step's
micro-batches and logs total / count. Splitting one batch into micro-batches of different token counts must
then log exactly the token mean of the whole batch (a per-micro-batch mean weighted by loss units would not:
DPO weighs by pairs, GRPO's `grpo` loss type by sequences)."""

from types import SimpleNamespace

import pytest
import torch

from posttrain.algorithms import dpo, grpo, load_config
from posttrain.algorithms.common import masked_mean, masked_sum
from posttrain.trainer.loop import _MetricSums

ONE_PROCESS = SimpleNamespace(num_processes=1, device=torch.device("cpu"))


def _logged(loss_fn, model, batches, cfg, units_fn):
    sums, units = _MetricSums(), 0.0
    for b in batches:
        loss, metrics = loss_fn(model, b, cfg)
        units += float(units_fn(b, cfg))
        sums.add({"loss": loss, **metrics})
    return sums.reduce(ONE_PROCESS, units)


def _rows(batch, idx):
    return {k: v[idx] if isinstance(v, torch.Tensor) and v.dim() >= 1 else v for k, v in batch.items()}


def test_grpo_token_metrics_do_not_depend_on_micro_batches(tiny_model):
    torch.manual_seed(0)
    cfg = load_config(None, ["algorithm.name=grpo", "algorithm.rewards=[constant]", "algorithm.loss_type=grpo",
                             "algorithm.num_generations=2", "optim.batch_size=4",
                             "algorithm.rollout.max_new_tokens=6"])  # fmt: skip
    B, P, C = 4, 3, 6
    ids = torch.randint(3, 200, (B, P + C))
    lengths = torch.tensor([6, 1, 2, 5])  # completion tokens per row: micro-batches of 6 and 8 tokens
    completion = torch.zeros(B, P + C, dtype=torch.long)
    for i, n in enumerate(lengths):
        completion[i, P : P + n] = 1
    attention = torch.ones(B, P + C, dtype=torch.long)
    batch = {
        "input_ids": ids,
        "attention_mask": attention,
        "position_ids": torch.arange(P + C).expand(B, -1),
        "completion_mask": completion,
        "advantages": torch.tensor([1.0, -1.0, 0.5, -0.5]),
        "old_logps": torch.randn(B, P + C) * 0.1 - 5.0,  # off-policy: ratios != 1, some clipped
        "ref_logps": torch.randn(B, P + C) * 0.1 - 5.0,
    }
    model = tiny_model.eval()
    with torch.no_grad():
        whole = _logged(grpo.loss_fn, model, [batch], cfg, grpo.loss_units)
        split = _logged(grpo.loss_fn, model, [_rows(batch, [0]), _rows(batch, [1, 2, 3])], cfg, grpo.loss_units)
        from posttrain.models.logprobs import selected_token_logps

        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
        _, entropy = selected_token_logps(model, inputs, completion, with_entropy=True)
    want_entropy = float(masked_mean(entropy, completion))
    for key in ("entropy", "kl", "clip_fraction", "ratio_mean"):
        assert split[key] == pytest.approx(whole[key], rel=1e-6, abs=1e-7), key
    assert whole["entropy"] == pytest.approx(want_entropy, rel=1e-6)
    assert whole["clip_fraction"] > 0  # the check above compares something that moves
    # The loss itself is the per-sequence mean (loss type grpo): unchanged by splitting, as before.
    assert split["loss"] == pytest.approx(whole["loss"], rel=1e-6)


def test_dpo_abs_logratio_per_token_is_a_token_mean_over_the_step(tiny_model, tiny_tokenizer, tmp_path):
    from posttrain.data.preference import collate_pairs, render_preference_dataset
    from posttrain.data.schema import normalise_row
    from posttrain.models.logprobs import scatter, target_positions

    cfg = load_config(None, ["algorithm.name=dpo", "technique.name=full", "algorithm.reference=precompute"])
    rows = [
        normalise_row({"prompt": "q", "chosen": "a" * n, "rejected": "b" * (n + 1)}, "preference")
        for n in (1, 9, 2, 14)
    ]
    pairs = render_preference_dataset(tiny_tokenizer, rows, max_length=64)
    torch.manual_seed(1)  # reference log-probs a little off the policy's, so the drift is not 0; fixed per pair
    refs = {id(p): (torch.randn(sum(p.chosen_mask)) * 0.3 - 5.5, torch.randn(sum(p.rejected_mask)) * 0.3 - 5.5)
            for p in pairs}  # fmt: skip

    def collate(items):
        batch = collate_pairs(items, pad_id=0)
        target, _ = target_positions(batch["loss_mask"])
        flat = [refs[id(p)][0] for p in items] + [refs[id(p)][1] for p in items]  # chosen rows, then rejected
        batch["ref_logps"] = scatter(torch.cat(flat), target)
        return batch

    model = tiny_model.eval()
    with torch.no_grad():
        whole = _logged(dpo.loss_fn, model, [collate(pairs)], cfg, dpo.loss_units)
        split = _logged(dpo.loss_fn, model, [collate(pairs[:1]), collate(pairs[1:])], cfg, dpo.loss_units)
        batch = collate(pairs)
        logps, _ = _policy_logps(model, batch)
    target = batch["loss_mask"].bool().clone()
    target[:, 0] = False
    drift = (logps - batch["ref_logps"]).abs()
    want = float(masked_sum(drift, target) / target.sum())
    assert whole["abs_logratio_per_token"] == pytest.approx(want, rel=1e-6)
    assert split["abs_logratio_per_token"] == pytest.approx(want, rel=1e-6)
    assert want > 0.01
    assert split["loss"] == pytest.approx(whole["loss"], rel=1e-6)  # per-pair mean, as before


def _policy_logps(model, batch):
    from posttrain.models.logprobs import selected_token_logps

    return selected_token_logps(model, dpo._pair_inputs(batch), batch["loss_mask"])
