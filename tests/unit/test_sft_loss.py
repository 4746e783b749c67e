"""SFT loss math: hand-computed cross-entropy, masking, and the one global normaliser."""

import math

import torch
from torch.testing import assert_close

from posttrain.algorithms.common import masked_mean, masked_sum, normalise_loss
from posttrain.algorithms.sft import loss_units, sft_token_losses


def test_token_losses_match_hand_computed_cross_entropy():
    """V = 3, one row [2, 0, 1], targets are tokens 1 and 2 (token 0 is the prompt).

    position 0 logits [0, 0, 0] -> p(0) = 1/3 -> loss ln 3
    position 1 logits [0, ln 2, 0] -> softmax = [1/4, 2/4, 1/4] -> p(1) = 1/2 -> loss ln 2
    position 2 has no next token -> 0
    """
    logits = torch.tensor([[[0.0, 0.0, 0.0], [0.0, math.log(2.0), 0.0], [9.0, 0.0, 0.0]]])
    ids = torch.tensor([[2, 0, 1]])
    mask = torch.tensor([[0, 1, 1]])
    out = sft_token_losses(logits, ids, mask)
    assert_close(out, torch.tensor([[math.log(3.0), math.log(2.0), 0.0]]), rtol=0, atol=1e-6)


def test_prompt_tokens_do_not_count():
    """Masking target 1 away leaves only ln 2 for target 2 (entry 0 becomes exactly 0)."""
    logits = torch.tensor([[[0.0, 0.0, 0.0], [0.0, math.log(2.0), 0.0], [9.0, 0.0, 0.0]]])
    out = sft_token_losses(logits, torch.tensor([[2, 0, 1]]), torch.tensor([[0, 0, 1]]))
    assert out[0, 0].item() == 0.0
    assert_close(out.sum(), torch.tensor(math.log(2.0)), rtol=0, atol=1e-6)


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
    per_process = [sum(normalise_loss(torch.tensor(sum(parts[(p, m)])), total, world) for m in (0, 1))
                   for p in range(world)]
    assert_close(sum(per_process) / world, torch.tensor(21.0 / 6.0))
