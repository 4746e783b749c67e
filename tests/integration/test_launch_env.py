"""What an `accelerate launch` leaves in the environment cannot change a run (`train._accelerator`): Accelerate
read ACCELERATE_GRADIENT_ACCUMULATION_STEPS and divided every gradient by it (no accumulation happened: the
logged loss stayed, grad_norm fell 4x and the weights differed), and ACCELERATE_DYNAMO_BACKEND compiled the whole
model at `prepare`, past the model.compile checks (an audit, nineteenth session). Both are said to be unused
(`trainer.launch.launch_notes`)."""

import torch
from safetensors.torch import load_file

from posttrain.train import train
from posttrain.trainer.metrics import read_metrics


def _run(make_cfg, name):
    cfg = make_cfg(name, **{"optim.micro_batch_size": 4, "run.max_steps": 2})
    train(cfg)
    run_dir = cfg.run.output_dir
    return [r["grad_norm"] for r in read_metrics(f"{run_dir}/metrics.jsonl")], load_file(
        f"{run_dir}/final/model.safetensors")  # fmt: skip


def test_the_launch_environment_changes_neither_gradients_nor_weights(make_cfg, monkeypatch, capsys):
    plain_norms, plain = _run(make_cfg, "plain")
    capsys.readouterr()
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "INDUCTOR")
    norms, weights = _run(make_cfg, "launched")
    said = capsys.readouterr().out
    assert norms == plain_norms and len(norms) == 2
    assert weights.keys() == plain.keys() and all(torch.equal(weights[k], plain[k]) for k in plain)
    assert "gradient_accumulation_steps 4 (ACCELERATE_GRADIENT_ACCUMULATION_STEPS), which posttrain does not use" in said
    assert "dynamo_backend inductor (ACCELERATE_DYNAMO_BACKEND), which posttrain does not use" in said


def test_an_accelerator_made_earlier_in_the_process_lends_this_run_no_dynamo_backend(make_cfg):
    """AcceleratorState is one per process and kept the dynamo backend of the first Accelerator (a notebook's own
    `Accelerator(dynamo_backend="inductor")`), so the run's model was compiled at `prepare`."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from posttrain.train import _accelerator

    AcceleratorState._reset_state(reset_partial_state=False)  # as in a fresh process: the first one made sets it
    assert Accelerator(cpu=True, dynamo_backend="inductor").state.dynamo_plugin.backend.value == "INDUCTOR"
    assert _accelerator(make_cfg()).state.dynamo_plugin.backend.value == "NO"
