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
    full = s.steps(0)
    seq = [next(full) for _ in range(8)]  # crosses an epoch boundary (5 steps per epoch)
    resumed = s.steps(5)
    assert [next(resumed) for _ in range(3)] == seq[5:]


def test_processes_split_each_step_without_overlap():
    a, b = _source(rank=0, world_size=2), _source(rank=1, world_size=2)
    for step in range(5):
        ia, ib = a.step_indices(step), b.step_indices(step)
        assert not set(ia) & set(ib)
        assert sorted(ia + ib) == sorted(_source(micro_batch_size=4).step_indices(step))


def test_micro_batches_cover_the_step():
    step = next(_source().steps(0))
    assert [len(mb["ids"]) for mb in step.micro_batches] == [2, 2]


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


def _epoch(source, epoch=0):
    """Every process's indices for each step of one epoch."""
    spe = source.steps_per_epoch
    return [source.step_indices(epoch * spe + k) for k in range(spe)]


def test_every_example_is_used_once_per_epoch_and_the_last_step_takes_the_remainder():
    s = _source(examples=list(range(19)))  # 4 steps of 4 and one of 3
    assert s.steps_per_epoch == 5
    for epoch in (0, 1):
        steps = _epoch(s, epoch)
        assert [len(x) for x in steps] == [4, 4, 4, 4, 3]
        assert sorted(i for x in steps for i in x) == list(range(19))
    last = next(s.steps(4))  # micro-batches of 2: the smaller step is one of 2 and one of 1
    assert [len(mb["ids"]) for mb in last.micro_batches] == [2, 1]
    full = s.steps(0)
    seq = [next(full) for _ in range(7)]
    resumed = s.steps(4)  # the smaller step, then the next epoch: a resumed run sees the same batches
    assert [next(resumed) for _ in range(3)] == seq[4:]


def test_several_processes_split_a_remainder_they_can_all_share_and_skip_one_they_cannot():
    # 19 = 4 x 4 + 3: three left for two processes, one and two each: trained.
    ranks = [_source(examples=list(range(19)), rank=r, world_size=2, micro_batch_size=1) for r in (0, 1)]
    per_rank = [_epoch(s) for s in ranks]
    assert [len(x) for x in per_rank[0]] == [2, 2, 2, 2, 2] and [len(x) for x in per_rank[1]] == [2, 2, 2, 2, 1]
    assert sorted(i for steps in per_rank for x in steps for i in x) == list(range(19))
    # 17 = 4 x 4 + 1: one left cannot give both processes a row (the other would wait in the all-reduce).
    ranks = [_source(examples=list(range(17)), rank=r, world_size=2, micro_batch_size=1) for r in (0, 1)]
    plan = ranks[0].plan
    assert (ranks[0].steps_per_epoch, plan.skipped) == (4, 1)
    for epoch in (0, 1):
        used = sorted(i for s in ranks for x in _epoch(s, epoch) for i in x)
        skipped = plan.skipped_indices(epoch, seed=3, shuffle=True)
        assert len(skipped) == 1 and sorted(used + skipped) == list(range(17))


def test_the_run_names_the_rows_it_skips_by_file_line():
    from posttrain.data.order import plan_batches, skipped_note

    plan = plan_batches(17, 4, 2, 1)  # one row per epoch skipped
    lines = [(10 + i,) for i in range(17)]  # example i comes from line 10 + i
    note = skipped_note(plan, source="train.jsonl", lines=lines, seed=0, shuffle=False, total_steps=8)
    assert note == (
        "train.jsonl: 1 of 17 examples are not trained in each epoch (after 4 steps of optim.batch_size=4, the 1 "
        "left cannot be split over 2 processes): line 26 (the same in all 2 epochs)"
    )
    shuffled = skipped_note(plan, source="t", lines=lines, seed=0, shuffle=True, total_steps=20)
    expected = [f"epoch {e + 1}: line {10 + plan.skipped_indices(e, 0, True)[0]}" for e in range(3)]
    assert shuffled.endswith(": " + "; ".join(expected) + "; ... (5 epochs in all, other rows each epoch: "
                             "data.shuffle is true)")  # fmt: skip
    # a run that never completes an epoch skips nothing; neither does a plan without a remainder
    assert skipped_note(plan, source="t", lines=lines, seed=0, shuffle=True, total_steps=3) is None
    assert skipped_note(plan_batches(16, 4, 2, 1), source="t", lines=None, seed=0, shuffle=True, total_steps=8) is None


def test_a_run_ending_inside_its_first_epoch_counts_the_prompts_its_started_rollouts_use():
    from posttrain.data.order import EpochPlan, epoch_order, short_run_note

    plan = EpochPlan(examples=20, unit=4, units_per_epoch=5, steps_per_unit=2)  # rollouts of 4 prompts, 2 steps each
    note = short_run_note(plan, source="p.jsonl", total_steps=3, stop="run.max_steps=3", seed=0, shuffle=False,
                          noun="prompts")  # fmt: skip
    assert note == ("p.jsonl: run.max_steps=3 ends the run 3 steps into its first epoch of 10: 12 of its 20 prompts "
                    "are never used (prompts 9, 10, 11, 12, 13 and 7 more)")  # the second rollout, half trained, used
    shuffled = short_run_note(plan, source="p", total_steps=3, stop="s", seed=4, shuffle=True, noun="prompts")
    first = sorted(i + 1 for i in epoch_order(20, 4, 0, True)[8:])[:5]
    assert shuffled.endswith(f"(prompts {', '.join(map(str, first))} and 7 more, drawn by data.shuffle)")
    skipping = EpochPlan(examples=21, unit=4, units_per_epoch=5, steps_per_unit=2, skipped=1, reason="r")
    assert "1 of its 21 examples are never used (example 21)" in short_run_note(
        skipping, source="p", total_steps=9, stop="s", seed=0, shuffle=False)  # fmt: skip
    assert short_run_note(plan, source="p", total_steps=10, stop="s", seed=0, shuffle=True) is None


def test_a_short_run_of_packed_rows_names_the_file_lines_it_never_uses():
    """Packed rows hold several file rows: the note counts and names file rows, not packed rows (it said "2 of
    the 8 examples ... the last in the file" where lines 3-8 and 11-16 were never used)."""
    from posttrain.data.order import plan_batches, short_run_note

    packed = [(i, i + 8) for i in range(1, 9)]  # 16 file rows packed first-fit into 8 rows
    note = short_run_note(plan_batches(8, 2, 1, 2), source="t.jsonl", total_steps=1, stop="run.max_steps=1", seed=0,
                          shuffle=False, lines=packed)  # fmt: skip
    assert note == ("t.jsonl: run.max_steps=1 ends the run 1 steps into its first epoch of 4: 12 of its 16 rows are "
                    "never used (lines 3, 4, 5, 6, 7 and 7 more)")


def test_a_sharded_run_skips_a_last_step_that_gives_the_processes_unequal_micro_batches():
    """19 rows in steps of 8 over 2 processes, micro-batches of 1: the last step's 3 rows give one process 2
    forwards and the other 1, which DDP runs (tests/integration/test_distributed.py). A sharded model's forward is
    a collective, so the one with fewer would leave the other waiting: `same_micro_batches` skips the 3 rows.
    With micro-batches of 2 they make one forward on each process: kept."""
    ddp = [_source(examples=list(range(19)), batch_size=8, micro_batch_size=1, rank=r, world_size=2) for r in (0, 1)]
    assert ddp[0].steps_per_epoch == 3
    assert [len(next(s.steps(2)).micro_batches) for s in ddp] == [2, 1]
    sharded = [_source(examples=list(range(19)), batch_size=8, micro_batch_size=1, rank=r, world_size=2,
                       same_micro_batches=True) for r in (0, 1)]  # fmt: skip
    assert (sharded[0].steps_per_epoch, sharded[0].plan.skipped) == (2, 3)
    assert "different numbers of micro-batches of 1" in sharded[0].plan.reason
    assert [len(next(s.steps(2)).micro_batches) for s in sharded] == [4, 4]  # step 3 is the next epoch's first
    even = _source(examples=list(range(19)), batch_size=8, micro_batch_size=2, world_size=2, same_micro_batches=True)
    assert (even.steps_per_epoch, even.plan.skipped) == (3, 0)


@pytest.mark.parametrize("env, collective", [({}, False), ({"ACCELERATE_USE_DEEPSPEED": "true"}, False),
                                             ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"},
                                              False),
                                             ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
                                              True)])  # fmt: skip
def test_deepspeed_zero3_plans_as_many_micro_batches_per_process_as_fsdp2(monkeypatch, env, collective):
    """DeepSpeed ZeRO-3 gathers each layer's weights in every forward, as FSDP2 does: under an Accelerate launch
    of a ZeRO-3 config (the environment `accelerate launch` sets from it) a run plans as a sharded one, skipping
    the last step that would give the processes unequal micro-batches. ZeRO-2 (and Accelerate's default stage, 2)
    keeps the weights whole: planned as DDP."""
    from posttrain.algorithms import load_config
    from posttrain.data.order import plan_examples

    for key in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cfg = load_config(None, ["model.name=m", "data.train=t.jsonl", "optim.batch_size=8", "optim.micro_batch_size=1"])
    assert cfg.run.collective_forwards is collective
    assert plan_examples(cfg, 19, 2, 1).skipped == (3 if collective else 0)
