"""The dataset batch source: deterministic order, exact sharding, and resumable positions."""

import pytest

from posttrain.errors import ConfigError
from posttrain.trainer.batches import ExampleBatchSource


def _collate(xs):
    return {"ids": list(xs)}


def _source(**kw):
    base = dict(examples=list(range(20)), collate=_collate, batch_size=4, micro_batch_size=2, seed=3)
    base.update(kw)
    return ExampleBatchSource(**base)


def test_each_epoch_is_a_permutation_and_depends_only_on_seed():
    s = _source()
    assert sorted(s.order(0)) == list(range(20))
    assert s.order(1) != s.order(0)
    assert _source().order(1) == s.order(1)
    assert _source(seed=4).order(0) != s.order(0)


def test_starting_at_a_step_replays_the_same_batches():
    s = _source()
    full = s(0)
    seq = [next(full) for _ in range(8)]  # crosses an epoch boundary (5 steps per epoch)
    resumed = s(5)
    assert [next(resumed) for _ in range(3)] == seq[5:]


def test_processes_split_each_step_without_overlap():
    a, b = _source(rank=0, world_size=2), _source(rank=1, world_size=2)
    for step in range(5):
        ia, ib = a.step_indices(step), b.step_indices(step)
        assert not set(ia) & set(ib)
        assert sorted(ia + ib) == sorted(_source(micro_batch_size=4).step_indices(step))


def test_micro_batches_cover_the_step():
    step = next(_source()(0))
    assert [len(mb["ids"]) for mb in step] == [2, 2]


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        (dict(batch_size=4, world_size=3), "multiple of the number of processes"),
        (dict(batch_size=4, micro_batch_size=3), "must divide"),
        (dict(examples=[1, 2], batch_size=4), "fewer than optim.batch_size"),
    ],
)
def test_impossible_batching_is_a_config_error(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        _source(**kw)
