"""`models.kv_cache.in_place_cache`: it holds exactly what transformers' `DynamicCache` holds through every operation
decoding does (prefill, repeat per group, steps, rows leaving, growing past its room, reordering, cropping) while
writing decode steps in place; and rows sampled through it, leaving the batch mid-way, get the tokens and log-probs
each row gets sampled alone."""

import pytest
import torch

from posttrain.testing import tiny_model


@pytest.fixture(scope="module")
def config():
    return tiny_model(64).config


def _kv(rows: int, tokens: int, config, gen: torch.Generator):
    shape = (rows, config.num_key_value_heads, tokens, config.hidden_size // config.num_attention_heads)
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


def test_in_place_layers_hold_what_dynamic_cache_holds(config):
    from transformers import DynamicCache

    from posttrain.models.kv_cache import InPlaceLayer, in_place_cache

    ours, reference = in_place_cache(config, spare=3), DynamicCache(config=config)
    assert len(ours.layers) == config.num_hidden_layers and all(type(x) is InPlaceLayer for x in ours.layers)
    gen = torch.Generator().manual_seed(0)

    def step(rows: int, tokens: int) -> None:
        for layer in range(config.num_hidden_layers):
            k, v = _kv(rows, tokens, config, gen)
            got, want = ours.update(k, v, layer), reference.update(k, v, layer)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert ours.get_seq_length() == reference.get_seq_length()

    def both(method: str, *args) -> None:
        getattr(ours, method)(*args)
        getattr(reference, method)(*args)

    step(2, 5)  # a prefill of 2 prompts
    both("batch_repeat_interleave", 3)  # 6 rows, room for 3 more positions
    buffers = [layer.keys.data_ptr() for layer in ours.layers]
    step(6, 1)
    step(6, 1)
    assert [layer.keys.data_ptr() for layer in ours.layers] == buffers  # written in place, no new tensor
    both("batch_select_indices", torch.tensor([0, 2, 3, 5]))  # rows 1 and 4 leave mid-way
    step(4, 1)  # 8 positions: the room reserved (5 + spare 3)
    step(4, 1)  # past it: grows by a copy
    step(4, 1)
    both("reorder_cache", torch.tensor([1, 0, 3, 2]))  # a base-class method that replaces `keys`
    step(4, 1)
    both("crop", -2)
    step(4, 1)
    both("batch_select_indices", torch.tensor([3]))
    step(1, 2)
    for a, b in zip(ours.layers, reference.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_room_is_at_most_twice_the_positions_held_up_to_what_is_expected(config):
    """Room for a long `max_new_tokens` is not reserved up front (completions may end early): 5 positions and 1000
    expected after them get room for 10, then the buffer doubles as it fills; 5 and 3 expected get room for 8."""
    from posttrain.models.kv_cache import in_place_cache

    gen = torch.Generator().manual_seed(0)
    long, short = in_place_cache(config, spare=1000), in_place_cache(config, spare=3)
    for cache in (long, short):
        cache.update(*_kv(2, 5, config, gen), 0)
    assert long.layers[0]._k.shape[-2] == 10 and short.layers[0]._k.shape[-2] == 8
    for _ in range(6):
        long.update(*_kv(2, 1, config, gen), 0)
    assert long.layers[0].get_seq_length() == 11 and long.layers[0]._k.shape[-2] == 22


def test_sliding_window_layers_keep_transformers_class():
    from transformers.cache_utils import DynamicSlidingWindowLayer

    from posttrain.models.kv_cache import InPlaceLayer, in_place_cache

    config = tiny_model(64, family="gemma2", sliding_window=16).config
    kinds = {type(layer) for layer in in_place_cache(config, spare=4).layers}
    assert kinds == {InPlaceLayer, DynamicSlidingWindowLayer}


def test_rows_leaving_mid_way_sample_what_each_row_samples_alone(tiny_tokenizer):
    """12 rows (3 prompts x 4) through one in-place cache, rows leaving at segment ends as they end, against each
    row decoded in a batch of its own, from its own random stream: the same tokens, log-probs within 1e-6."""
    from transformers import LogitsProcessorList

    from posttrain.models.generation import (
        SEGMENT_TOKENS,
        eos_token_ids,
        plain_generation_config,
        sample_groups,
    )
    from posttrain.rollout.engine import HFEngine, RowStreams, SampledLogps

    model = tiny_model(len(tiny_tokenizer)).eval()
    with torch.no_grad():
        model.lm_head.weight[2] *= 25  # a loud EOS: rows end at different steps
    prompts = [tiny_tokenizer(p)["input_ids"] for p in ["hi", "hello there, friend", "x"]]
    n, new = 4, 3 * SEGMENT_TOKENS
    together = HFEngine().generate(model, tiny_tokenizer, prompts, n=n, max_new_tokens=new, temperature=1.0,
                                   top_p=1.0, stop=[], seed=3)  # fmt: skip
    lengths = together.completion_mask.sum(-1)
    assert lengths.min() <= 2 * SEGMENT_TOKENS and lengths.max() == new  # rows left while others went on

    eos = eos_token_ids(model, tiny_tokenizer)
    cfg = plain_generation_config(max_new_tokens=new, sample=False, eos=eos, pad_id=tiny_tokenizer.pad_token_id)
    streams = RowStreams(3, len(prompts) * n)  # the engine's streams: seed 3, one per row
    for row in range(len(prompts) * n):

        def processors(alive, row=row):  # as the engine's: a recorder per `generate` segment, then the stream
            recorder, streams.rows = SampledLogps(), [row]
            return {"logits_processor": LogitsProcessorList([recorder, streams])}, recorder.finish

        with torch.no_grad():
            (ids,), (logps,) = sample_groups(model, [prompts[row // n]], 1, cfg, eos, tiny_tokenizer.pad_token_id,
                                             processors)  # fmt: skip
        k = int(lengths[row])
        assert ids[:k] == together.completion_ids[row, :k].tolist()
        torch.testing.assert_close(torch.tensor(logps[:k]), together.sampling_logps[row, :k], rtol=0, atol=1e-6)
