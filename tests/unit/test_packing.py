"""Collation and packing: padded batches, and packed rows whose examples provably never see each other."""

import pytest
import torch

from posttrain.data import Rendered, collate, collate_packed, pack


def doc(n: int, seed: int) -> Rendered:
    g = torch.Generator().manual_seed(seed)
    return Rendered(torch.randint(3, 259, (n,), generator=g).tolist(), [0] * (n // 2) + [1] * (n - n // 2))


DOCS = [doc(n, i) for i, n in enumerate((7, 5, 9, 3, 12, 1))]


def test_collate_right_pads():
    out = collate([Rendered([5, 6, 7], [0, 1, 1]), Rendered([8], [1])], pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["loss_mask"].tolist() == [[0, 1, 1], [1, 0, 0]]
    assert {v.dtype for v in out.values()} == {torch.long}


def test_pack_is_first_fit_and_deterministic():
    bins = pack(DOCS, max_length=16)
    assert [[len(r) for r in b] for b in bins] == [[7, 5, 3, 1], [9], [12]]
    assert pack(DOCS, max_length=16) == bins
    assert sorted(id(r) for b in bins for r in b) == sorted(id(r) for r in DOCS)  # each exactly once
    with pytest.raises(ValueError, match="longer than max_length=8"):
        pack(DOCS, max_length=8)


def test_collate_packed_positions_and_first_token_masks():
    bins = pack(DOCS, max_length=16)
    out = collate_packed(bins, pad_id=0, max_length=16)
    assert out["input_ids"].shape == out["position_ids"].shape == out["loss_mask"].shape == (3, 16)
    assert "attention_mask" not in out  # its absence is what makes transformers split the documents
    assert out["position_ids"][0].tolist() == [*range(7), *range(5), *range(3), 0]
    assert out["position_ids"][1].tolist() == [
        *range(9),
        *range(7),
    ]  # padding restarts: a document of its own
    assert out["input_ids"][1, 9:].tolist() == [0] * 7 and out["loss_mask"][1, 9:].tolist() == [0] * 7
    starts = [0, 7, 12, 15]
    assert out["loss_mask"][0, starts].tolist() == [0, 0, 0, 0]
    # Everywhere else the mask is the example's own.
    expected = [m for r in bins[0] for m in [0, *r.loss_mask[1:]]]
    assert out["loss_mask"][0].tolist() == expected


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_examples_never_attend_to_each_other(tiny_model, attn):
    """Each example's logits inside a packed row equal its logits run alone: within 1e-6 in fp32 on logits of
    ~0.4 (measured 9e-8; a leak between examples moves them by more than 1e-3)."""
    tiny_model.set_attn_implementation(attn)
    tiny_model.train()  # training mode, as in the loop (the tiny model has no dropout)
    bins = pack(DOCS, max_length=16)
    batch = collate_packed(bins, pad_id=0, max_length=16)
    with torch.no_grad():
        packed = tiny_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
        leaky = tiny_model(
            input_ids=batch["input_ids"], use_cache=False
        )  # no position ids: one long sequence
        for b, docs in enumerate(bins):
            at = 0
            for r in docs:
                alone = tiny_model(input_ids=torch.tensor([r.input_ids]), use_cache=False).logits[0]  # (T, V)
                torch.testing.assert_close(packed.logits[b, at : at + len(r)], alone, rtol=0, atol=1e-6)
                if at > 0:  # the test can fail: without the reset, later examples see earlier ones
                    assert (leaky.logits[b, at : at + len(r)] - alone).abs().max() > 1e-3
                at += len(r)
