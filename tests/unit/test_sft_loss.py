"""SFT loss math: hand-computed cross-entropy, masking, and the one global normaliser."""

import copy
import math
from types import SimpleNamespace

import torch
from torch.testing import assert_close

from posttrain.algorithms.common import masked_mean, masked_sum, normalise_loss
from posttrain.algorithms.sft import loss_fn, loss_units
from posttrain.testing import assert_as_accurate


class FixedLogits(torch.nn.Module):
    """A stand-in causal LM whose logits are fixed (B, T, V): its decoder returns them as the last hidden states
    and its output layer is the identity, with a transformers-style forward (`logits_to_keep`, `get_decoder`)."""

    base_model_prefix = "model"

    def __init__(self, logits):
        super().__init__()
        self.model = _FixedHidden(logits)
        self.lm_head = torch.nn.Identity()
        self.config = SimpleNamespace(get_text_config=lambda: SimpleNamespace(vocab_size=logits.shape[-1]))

    def get_decoder(self):
        return self.model

    def forward(self, input_ids, logits_to_keep=0, **kwargs):
        hidden = self.model(input_ids).last_hidden_state
        keep = logits_to_keep
        return SimpleNamespace(logits=self.lm_head(hidden[keep] if isinstance(keep, torch.Tensor) else hidden))


class _FixedHidden(torch.nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.hidden = hidden

    def forward(self, input_ids, **kwargs):
        return SimpleNamespace(last_hidden_state=self.hidden)


LOGITS = torch.tensor([[[0.0, 0.0, 0.0], [0.0, math.log(2.0), 0.0], [9.0, 0.0, 0.0]]])


def test_loss_matches_hand_computed_cross_entropy():
    """V = 3, one row [2, 0, 1], targets are tokens 1 and 2 (token 0 is the prompt).

    position 0 logits [0, 0, 0] -> p(0) = 1/3 -> loss ln 3
    position 1 logits [0, ln 2, 0] -> softmax = [1/4, 2/4, 1/4] -> p(1) = 1/2 -> loss ln 2
    position 2 has no next token -> nothing
    """
    batch = {"input_ids": torch.tensor([[2, 0, 1]]), "loss_mask": torch.tensor([[0, 1, 1]])}
    loss, _ = loss_fn(FixedLogits(LOGITS), batch)
    assert_close(loss, torch.tensor(math.log(3.0) + math.log(2.0)), rtol=0, atol=1e-6)


def test_prompt_tokens_do_not_count():
    """Masking target 1 away leaves only ln 2 for target 2."""
    batch = {"input_ids": torch.tensor([[2, 0, 1]]), "loss_mask": torch.tensor([[0, 0, 1]])}
    loss, _ = loss_fn(FixedLogits(LOGITS), batch)
    assert_close(loss, torch.tensor(math.log(2.0)), rtol=0, atol=1e-6)


def test_loss_units_skip_first_position():
    """Position 0 cannot be a target (nothing predicts it), even if the mask says 1."""
    assert loss_units({"loss_mask": torch.tensor([[1, 1, 0], [0, 1, 1]])}) == 3


def test_masked_reductions_ignore_nan_under_mask_and_empty_rows():
    values = torch.tensor([[1.0, float("nan")], [2.0, 4.0], [float("inf"), 5.0]])
    mask = torch.tensor([[1, 0], [1, 1], [0, 0]])
    assert_close(masked_sum(values, mask, dim=1), torch.tensor([1.0, 6.0, 0.0]))
    assert_close(masked_mean(values, mask, dim=1), torch.tensor([1.0, 3.0, 0.0]))
    assert not torch.isnan(masked_mean(values, mask)).any()


def test_normalise_loss_makes_micro_batches_and_processes_equal_the_global_mean():
    """Token losses 1..6 split unevenly over 2 processes x 2 micro-batches: sum of scaled parts / world = mean."""
    parts = {(0, 0): [1.0], (0, 1): [2.0, 3.0], (1, 0): [4.0, 5.0], (1, 1): [6.0]}
    total = sum(len(v) for v in parts.values())
    world = 2
    # DDP averages the per-process (accumulated) values over processes.
    per_process = [
        sum(normalise_loss(torch.tensor(sum(parts[(p, m)])), total, world) for m in (0, 1))
        for p in range(world)
    ]
    assert_close(sum(per_process) / world, torch.tensor(21.0 / 6.0))


def test_selected_logits_path_equals_full_logits_path(tiny_model):
    """loss_fn projects only target positions; value and gradients equal the full-logits computation."""
    from posttrain.algorithms.sft import loss_fn

    torch.manual_seed(0)
    ids = torch.randint(3, 259, (3, 12))
    mask = torch.zeros(3, 12, dtype=torch.long)
    mask[0, 5:] = 1
    mask[1, 2:9] = 1
    mask[2, 11] = 1
    attn = torch.ones_like(ids)
    attn[1, 9:] = 0
    batch = {"input_ids": ids, "attention_mask": attn, "loss_mask": mask}
    loss, _ = loss_fn(tiny_model, batch)
    loss.backward()
    fast_grads = [p.grad.clone() for p in tiny_model.parameters()]

    def full_loss(model):  # (B, T, V) logits, then cross-entropy, independently
        model.zero_grad()
        logits = model(input_ids=ids, attention_mask=attn).logits
        labels = torch.where(mask[:, 1:].bool(), ids[:, 1:], -100)
        full = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=-100, reduction="sum")  # fmt: skip
        full.backward()
        return full

    full = full_loss(tiny_model)
    exact = copy.deepcopy(tiny_model).double()
    full_loss(exact)
    assert_close(loss, full, rtol=1e-6, atol=1e-6)
    for g, p, e in zip(fast_grads, tiny_model.parameters(), exact.parameters()):
        assert_as_accurate(g, p.grad, e.grad)  # as accurate as the full-logits float32 gradient, against float64
