"""Bradley-Terry reward-model loss and pair accuracy, worked out by hand."""

import torch
from torch.testing import assert_close

from posttrain.algorithms.reward import bradley_terry_loss, pair_accuracy

CHOSEN = torch.tensor([2.0, 0.5, 1.0])
REJECTED = torch.tensor([1.0, 1.0, 1.0])  # differences chosen - rejected = [1, -0.5, 0]


def test_bradley_terry_without_margin():
    """-log sigma(d) = log(1 + e^-d):
    d = 1    -> log(1 + 0.3678794) = 0.3132617
    d = -0.5 -> log(1 + 1.6487213) = 0.9740770
    d = 0    -> log 2               = 0.6931472
    """
    assert_close(
        bradley_terry_loss(CHOSEN, REJECTED),
        torch.tensor([0.3132617, 0.9740770, 0.6931472]),
        rtol=0,
        atol=1e-6,
    )


def test_bradley_terry_with_float_margin():
    """margin 0.5 shifts every difference down: d - m = [0.5, -1, -0.5]
    -> log(1 + e^-0.5) = 0.4740770, log(1 + e) = 1.3132617, log(1 + e^0.5) = 0.9740770.
    """
    assert_close(
        bradley_terry_loss(CHOSEN, REJECTED, margin=0.5),
        torch.tensor([0.4740770, 1.3132617, 0.9740770]),
        rtol=0,
        atol=1e-6,
    )


def test_bradley_terry_with_per_pair_margin():
    """margins [1, 0, -3] (Llama 2: larger for clearly separated pairs): d - m = [0, -0.5, 3]
    -> log 2 = 0.6931472, 0.9740770, log(1 + e^-3) = 0.0485874.
    """
    out = bradley_terry_loss(CHOSEN, REJECTED, margin=torch.tensor([1.0, 0.0, -3.0]))
    assert_close(out, torch.tensor([0.6931472, 0.9740770, 0.0485874]), rtol=0, atol=1e-6)


def test_margin_none_equals_zero_margin_and_gradient_is_minus_sigma():
    """d loss / d chosen = -sigma(-d): at d = 0 it is -0.5, so training pushes the chosen score up."""
    chosen = torch.tensor([1.0], requires_grad=True)
    loss = bradley_terry_loss(chosen, torch.tensor([1.0]))
    assert_close(loss, bradley_terry_loss(chosen, torch.tensor([1.0]), margin=0.0), rtol=0, atol=0)
    loss.sum().backward()
    assert_close(chosen.grad, torch.tensor([-0.5]), rtol=0, atol=1e-7)


def test_large_negative_difference_stays_finite():
    """-log sigma(-1000) = 1000 (exactly, in float32), not inf."""
    assert_close(bradley_terry_loss(torch.tensor([-1000.0]), torch.tensor([0.0])), torch.tensor([1000.0]))


def test_pair_accuracy_counts_ties_as_half():
    """[win, loss, tie] -> [1, 0, 0.5]; mean 0.5."""
    acc = pair_accuracy(CHOSEN, REJECTED)
    assert_close(acc, torch.tensor([1.0, 0.0, 0.5]), rtol=0, atol=0)
    assert acc.dtype == torch.float32
