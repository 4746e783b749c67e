"""The loop's NaN/inf guard under DeepSpeed (`trainer.loop._deepspeed_step`, `_handle_divergence`), with a stand-in
for DeepSpeed's engine that records what was called: the engine's step (and ZeRO's gradient check, a collective)
happen only past the guard. DeepSpeed itself runs in tests/integration/test_deepspeed.py."""

import math

import pytest

from posttrain.errors import TrainingDiverged
from posttrain.trainer.loop import _deepspeed_step, _handle_divergence


class Engine:
    """DeepSpeed's engine as `_deepspeed_step` sees it: a ZeRO stage, its optimizer's check of the reduced gradient
    partitions, a step, the norm and whether the step was applied, as DeepSpeed reports them after it."""

    def __init__(self, stage: int, overflow: bool = False, norm: float = 2.5, applied: bool = True) -> None:
        self.stage, self.overflow, self.norm, self.applied = stage, overflow, norm, applied
        self.calls: list[str] = []
        self.optimizer = self

    def zero_optimization_stage(self) -> int:
        return self.stage

    def has_overflow(self, partition_gradients: bool) -> bool:
        self.calls.append("has_overflow")
        return self.overflow

    def step(self) -> None:
        self.calls.append("step")

    def get_global_grad_norm(self) -> float:
        return self.norm

    def was_step_applied(self) -> bool:
        return self.applied


@pytest.mark.parametrize(
    ("engine", "loss_finite", "expected", "calls"),
    [
        (Engine(2), False, (None, False), []),  # a NaN loss anywhere: nothing runs, not even the collective check
        (Engine(3), False, (None, False), []),
        (Engine(2, overflow=True), True, (None, False), ["has_overflow"]),  # a NaN/inf in some process's partition
        (Engine(3, overflow=True), True, (None, False), ["has_overflow"]),
        (Engine(2), True, (2.5, True), ["has_overflow", "step"]),
        (Engine(3), True, (2.5, True), ["has_overflow", "step"]),
        # DeepSpeed skipped the step itself (its own check of the norm): not applied
        (Engine(3, norm=math.inf, applied=False), True, (math.inf, False), ["has_overflow", "step"]),
        # ZeRO-1 (not checked before the step) with DeepSpeed's check off: the step was applied with a NaN norm
        (Engine(1, norm=math.nan, applied=True), True, (math.nan, True), ["step"]),
    ],
)
def test_the_engine_steps_only_past_the_guard(engine, loss_finite, expected, calls):
    norm, applied = _deepspeed_step(engine, loss_finite)
    assert (norm is None, applied) == (expected[0] is None, expected[1])
    if norm is not None:
        assert norm == expected[0] or (math.isnan(norm) and math.isnan(expected[0]))
    assert engine.calls == calls


def test_a_diverged_step_the_weights_took_is_not_saved_and_the_note_says_so(tmp_path):
    """Step 3 diverged after DeepSpeed applied it (`updated`): no checkpoint of the state in memory is written (no
    accelerator, model or optimizer is touched: all None here), and the note does not claim the weights were kept."""
    run = type("Run", (), {"keep_checkpoints": 2, "sharding": "none", "whole_checkpoints": False})()
    with pytest.raises(TrainingDiverged) as err:
        _handle_divergence(None, tmp_path, 3, 0, None, None, None, run, math.nan, True, None, updated=True)
    message = str(err.value)
    assert message.startswith("step 3: the gradient norm (nan) became NaN or infinite, so the run stopped, but "
                              "DeepSpeed had already stepped the weights with it: the weights in memory were not "
                              "saved; no checkpoint had been written yet.")  # fmt: skip
    assert "before updating" not in message and not (tmp_path / "checkpoints").exists()
