"""SFT end to end on a tiny model: learning, run folder, accumulation invariance, adapters, divergence guard."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from posttrain.errors import ConfigError, TrainingDiverged, UserError
from posttrain.train import train
from posttrain.trainer.metrics import read_metrics


def test_loss_falls_when_overfitting_and_run_folder_is_complete(make_cfg):
    cfg = make_cfg(**{"run.max_steps": 30, "run.save_every": 10, "optim.lr": 3e-3})
    result = train(cfg)
    losses = [r["loss"] for r in read_metrics(result.run_dir / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 30
    assert losses[-1] < 0.5 * losses[0]
    run = result.run_dir
    assert (run / "config.yaml").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000020", "step-000030"]
    assert (run / "final" / "posttrain_model.json").is_file()
    assert not any(p.name.startswith(".tmp") for p in run.rglob("*"))


def test_a_run_that_ends_inside_its_first_epoch_says_how_many_examples_it_never_uses(make_cfg, capsys):
    """16 rows in steps of 8: one step uses half of them, said at the start (`data.order.short_run_note`)."""
    train(make_cfg("steps", **{"run.max_steps": 1}))
    assert ("note: " + str(make_cfg().data.train) + ": run.max_steps=1 ends the run 1 steps into its first epoch of "
            "2: 8 of its 16 rows are never used (lines ") in capsys.readouterr().out
    train(make_cfg("epochs", **{"run.max_steps": "null", "run.epochs": 0.5, "data.shuffle": "false"}))
    assert "run.epochs=0.5 ends the run 1 steps into its first epoch of 2: 8 of its 16 rows are never used (lines 9, " \
           "10, 11, 12, 13 and 3 more)" in capsys.readouterr().out
    train(make_cfg("whole", **{"run.max_steps": 2}))
    assert "ends the run" not in capsys.readouterr().out


def _one_sgd_step(cfg, micro):
    """Run the real loop for one step with SGD, so the parameter change is exactly -lr * gradient."""
    from accelerate import Accelerator

    from posttrain.algorithms import get_algorithm
    from posttrain.models import load_model, load_tokenizer
    from posttrain.trainer.batches import ExampleBatchSource
    from posttrain.trainer.loop import training_loop

    acc = Accelerator(cpu=True)
    algo = get_algorithm("sft")
    tok = load_tokenizer(cfg.model)
    data = algo.prepare(cfg, tok)
    model = load_model(cfg.model, cfg.technique)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    source = ExampleBatchSource(data.train, data.collate, batch_size=8, micro_batch_size=micro, shuffle=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    training_loop(
        accelerator=acc,
        model=model,
        optimizer=opt,
        scheduler=sched,
        algorithm=algo,
        batch_source=source,
        cfg=cfg,
        run_dir=Path(cfg.run.output_dir),
        total_steps=1,
    )
    return {n: before[n] - p.detach() for n, p in model.named_parameters()}  # = gradient (lr = 1)


def test_micro_batches_with_accumulation_equal_the_full_batch(make_cfg):
    """Examples have different numbers of target tokens, so a per-micro-batch mean would NOT match."""
    cfg = make_cfg(**{"optim.max_grad_norm": "null", "run.max_steps": 1})
    full = _one_sgd_step(cfg, micro=8)
    accumulated = _one_sgd_step(
        make_cfg("run2", **{"optim.max_grad_norm": "null", "run.max_steps": 1}), micro=2
    )
    assert max(g.abs().max().item() for g in full.values()) > 1e-4  # the step did something
    for name, g in full.items():
        assert_close(accumulated[name], g, rtol=1e-5, atol=1e-7)


def _rows_of_many_lengths(tmp_path) -> Path:
    """16 SFT rows of 12 lengths, all beginning "add 0" (batches of 8 have padding, and a common prefix)."""
    rows = [{"prompt": "add " + " ".join(map(str, range(a + 1))), "completion": str(a * (a + 1) // 2) + "!" * b}
            for a in range(4) for b in range(4)]  # fmt: skip
    path = tmp_path / "varied.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("technique", ["full", "lora"])
def test_gradient_checkpointing_trains_the_same_weights(make_cfg, tmp_path, technique):
    """`model.gradient_checkpointing: true` recomputes each layer in backward; the batches of 8 rows of different
    lengths run as one packed row attended per example, and the recompute must be too (it stopped the run with
    torch's CheckpointError before `attention.checkpoint_contexts`). The same weights, bit for bit."""
    kw = {"technique.name": technique, "run.max_steps": 2, "data.train": _rows_of_many_lengths(tmp_path)}
    plain = train(make_cfg("plain", **kw), return_model=True).model
    ckpt = train(make_cfg("ckpt", **kw, **{"model.gradient_checkpointing": "true"}), return_model=True).model
    want = dict(plain.named_parameters())
    moved = 0
    for name, p in ckpt.named_parameters():
        assert torch.equal(p, want[name]), name
        moved += p.requires_grad
    assert moved


def test_rows_that_begin_alike_run_it_once_and_train_the_same_weights(make_cfg, tmp_path, monkeypatch, capsys):
    """SFT under `data.share_prompt` (the default): each micro-batch's rows (the chat template's start and "add 0")
    run their common prefix once, and one step trains the weights that `data.share_prompt: false` trains, to float
    rounding (AdamW eps 1 keeps the step nearly linear in the gradient, as in the resume tests)."""
    from posttrain.models import logprobs

    packed_tokens = []
    original = logprobs.packed_rows

    def spy(model, inputs, **kw):
        out = original(model, inputs, **kw)
        packed_tokens.append((out[0]["input_ids"].shape[1], int(inputs["attention_mask"].sum()), out[1][0][0]))
        return out

    monkeypatch.setattr(logprobs, "packed_rows", spy)
    monkeypatch.setattr(logprobs, "_NOTED", set())  # a note another test printed in this process is said again
    kw = {"run.max_steps": 1, "optim.eps": 1.0, "optim.max_grad_norm": "null",
          "data.train": _rows_of_many_lengths(tmp_path), "data.shuffle": "false"}
    models = {}
    for share in (True, False):
        packed_tokens.clear()
        models[share] = train(make_cfg(f"share-{share}", **kw, **{"data.share_prompt": str(share).lower()}),
                              return_model=True).model  # fmt: skip
        (row, real, prefix), = packed_tokens
        assert (row, prefix) == ((real - 7 * prefix, prefix) if share else (real, 0))
        if share:  # said once, not silently
            assert f"run them once ({prefix} tokens in the first such batch" in capsys.readouterr().out
    want = dict(models[False].named_parameters())
    for name, p in models[True].named_parameters():
        assert_close(p, want[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("technique", ["lora", "qlora"])
def test_adapters_are_the_only_parameters_that_change(make_cfg, technique):
    result = train(make_cfg(**{"technique.name": technique, "run.max_steps": 3}), return_model=True)
    model = result.model
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    from posttrain.testing import tiny_model

    reference = tiny_model(259, hidden_size=64).state_dict()
    base = model.get_base_model().state_dict()
    changed_lora = [n for n, p in model.named_parameters() if "lora_B" in n and p.abs().max() > 0]
    assert changed_lora  # lora_B starts at zero; training moved it
    if technique == "lora":  # qlora stores 4-bit weights, compared in the models tests
        for key, value in reference.items():
            mapped = key.replace(".weight", ".base_layer.weight")
            tensor = base.get(key, base.get(mapped))
            assert tensor is not None, key
            assert torch.equal(tensor, value), key


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(make_cfg, monkeypatch):
    from posttrain.algorithms import ALGORITHMS, sft

    calls = {"n": 0}
    real = sft.loss_fn

    def flaky(model, batch, cfg):
        calls["n"] += 1
        loss, metrics = real(model, batch, cfg)
        return (loss * float("nan") if calls["n"] == 3 else loss), metrics

    monkeypatch.setitem(ALGORITHMS, "sft", dataclasses.replace(sft.ALGORITHM, loss_fn=flaky))
    cfg = make_cfg(**{"run.max_steps": 5})
    with pytest.raises(TrainingDiverged) as err:
        train(cfg)
    assert "step 3" in str(err.value) and "step-000002" in str(err.value)
    kept = Path(cfg.run.output_dir) / "checkpoints" / "step-000002"
    assert kept.is_dir()
    assert json.loads((kept / "trainer_state.json").read_text())["step"] == 2


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                 "tried to allocate 4398046511104 bytes. Error code 12 (Cannot allocate memory)"),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 8 GiB"),
], ids=["cpu", "cuda"])  # fmt: skip
def test_out_of_memory_stops_with_what_to_change_and_keeps_the_last_checkpoint(make_cfg, monkeypatch, error):
    """An allocation failure in step 3 (the CPU allocator's error, or CUDA's) ends the run with one paragraph (a
    UserError: exit 2, no traceback) naming the step, what torch asked for, the settings that need less with this
    run's values (those --resume takes apart from those that need a new run), and the checkpoint kept; any other
    RuntimeError still escapes as itself (a bug)."""
    from posttrain.algorithms import ALGORITHMS, sft
    from posttrain.errors import OutOfMemory

    calls = {"n": 0}
    real = sft.loss_fn

    def failing(model, batch, cfg, *, raise_=error):
        calls["n"] += 1
        if calls["n"] == 3:
            raise raise_
        return real(model, batch, cfg)

    monkeypatch.setitem(ALGORITHMS, "sft", dataclasses.replace(sft.ALGORITHM, loss_fn=failing))
    cfg = make_cfg("oom", **{"run.max_steps": 5, "run.save_every": 1, "technique.name": "lora"})
    with pytest.raises(OutOfMemory) as err:
        train(cfg)
    message = str(err.value)
    kept = Path(cfg.run.output_dir) / "checkpoints" / "step-000002"
    asked = "you tried to allocate 4398046511104 bytes" if "alloc_cpu" in str(error) else "Tried to allocate 2.00 GiB"
    assert message.startswith("Out of memory at step 3 (cpu): ") and asked in message and "alloc_cpu" not in message
    # what --resume takes (test_resume.py resumes with them), and what needs a new run
    assert (f"The last checkpoint, {kept}, is kept: continue from it with --resume and a smaller "
            "optim.micro_batch_size (now 8 per process; the step's batch stays optim.batch_size=8 through "
            "accumulation) or model.gradient_checkpointing=true; or start a new run (another run.output_dir) with a "
            "lower data.max_length (now 64) or technique.name=qlora. No final model was written.") in message
    assert kept.is_dir() and not (Path(cfg.run.output_dir) / "final").exists()
    calls["n"] = 0
    monkeypatch.setitem(ALGORITHMS, "sft", dataclasses.replace(
        sft.ALGORITHM, loss_fn=lambda m, b, c: failing(m, b, c, raise_=RuntimeError("shapes cannot be multiplied"))))
    with pytest.raises(RuntimeError, match="^shapes cannot be multiplied$"):
        train(make_cfg("bug", **{"run.max_steps": 5}))


def test_existing_run_is_not_overwritten_without_resume(make_cfg):
    cfg = make_cfg(**{"run.max_steps": 1})
    train(cfg)
    with pytest.raises(ConfigError, match="--resume"):
        train(cfg)


def test_a_checkpoint_written_without_deepspeed_is_refused_under_deepspeed_before_the_model_loads(make_cfg):
    """Found by review: resumed under an Accelerate DeepSpeed config, the plain checkpoint's AdamW state went to
    ZeRO's optimizer and crashed with a traceback (KeyError 0) after the model had loaded."""
    from posttrain.trainer.checkpoint import check_resumable

    run = train(make_cfg(**{"run.max_steps": 1}))
    ckpt = run.run_dir / "checkpoints" / "step-000001"
    check_resumable(ckpt, deepspeed=False)
    with pytest.raises(UserError, match="written without DeepSpeed.*Resume it as it was launched"):
        check_resumable(ckpt, deepspeed=True, stage=2)


def test_resume_refuses_a_changed_config(make_cfg):
    train(make_cfg(**{"run.max_steps": 1}))
    with pytest.raises(ConfigError, match="optim.lr"):
        train(make_cfg(**{"run.max_steps": 2, "optim.lr": 1e-3}), resume=True)


def test_equal_seeds_give_equal_runs_and_other_seeds_differ(make_cfg):
    overrides = {"technique.name": "lora", "technique.dropout": 0.1, "run.max_steps": 3}
    a = [r["loss"] for r in train(make_cfg("a", **overrides)).history]
    b = [r["loss"] for r in train(make_cfg("b", **overrides)).history]
    c = [r["loss"] for r in train(make_cfg("c", **{**overrides, "run.seed": 1})).history]
    assert a == b
    assert a != c


def test_periodic_evaluation_logs_eval_loss(make_cfg, sft_file):
    cfg = make_cfg(**{"data.eval": str(sft_file), "run.eval_every": 2, "run.max_steps": 4})
    result = train(cfg)
    evals = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]  # training on the same rows lowers their loss


def test_packed_training_learns(make_cfg):
    cfg = make_cfg(**{"data.packing": "true", "optim.batch_size": 1, "run.max_steps": 20, "optim.lr": 3e-3})
    losses = [r["loss"] for r in train(cfg).history]
    assert losses[-1] < 0.6 * losses[0]


@pytest.mark.parametrize("family", ["bloom", "mpt"])
def test_packing_is_refused_for_a_model_that_cannot_keep_packed_examples_apart(make_cfg, tmp_path, family):
    """BLOOM's and MPT's forwards take no position ids (ALiBi counts slots), so transformers never sees where a
    packed example starts, and each attended to those before it in its row, silently (an audit: log-probs 7.5e-3
    and 0.35 off). Refused after the model loads, before the run folder is written; unpacked, they train."""
    from posttrain.errors import ConfigError
    from posttrain.testing import save_tiny_model

    model_dir = save_tiny_model(tmp_path / family, family=family)
    cfg = make_cfg(**{"model.name": str(model_dir), "data.packing": "true", "run.max_steps": 1})
    with pytest.raises(ConfigError, match=rf"data.packing: ALiBi attention \({family}\) measures distances in slots, "
                                          r"not position ids, so examples packed into one row would attend to each "
                                          r"other. Set data.packing=false"):  # fmt: skip
        train(cfg)
    assert not Path(cfg.run.output_dir).exists()
    assert train(make_cfg(**{"model.name": str(model_dir), "run.max_steps": 1})).steps == 1


@pytest.mark.parametrize("technique", ["lora", "qlora"])
def test_packing_trains_under_an_adapter(make_cfg, technique):
    """peft's wrapper names no position_ids in its forward (it passes them on): the packing check reads the wrapped
    model's (a review found every LoRA run with packing refused)."""
    cfg = make_cfg(technique, **{"technique.name": technique, "data.packing": "true", "run.max_steps": 1})
    assert train(cfg).steps == 1


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_qlora_in_bfloat16_trains(make_cfg, tmp_path, method):
    """QLoRA with model.dtype=bfloat16 failed at step 1 ("expected m1 and m2 to have the same dtype"): peft keeps the
    final norm in float32, and the output layer, cast back to bf16, was applied to its float32 output outside the
    autocast the model's own forward runs under (an audit). DPO's first step, policy = reference, is log 2."""
    pytest.importorskip("bitsandbytes")
    overrides = {"technique.name": "qlora", "model.dtype": "bfloat16", "run.max_steps": 1, "optim.batch_size": 4}
    if method == "dpo":
        pairs = tmp_path / "pairs.jsonl"
        pairs.write_text("".join(json.dumps({"prompt": f"add {a} 2", "chosen": str(a + 2), "rejected": f"{a}?"}) + "\n"
                                 for a in range(4)), encoding="utf-8")  # fmt: skip
        overrides.update({"algorithm.name": "dpo", "data.train": str(pairs)})
    result = train(make_cfg(f"qlora-bf16-{method}", **overrides))
    loss = result.history[-1]["loss"]
    assert math.isfinite(loss) and (method == "sft" or loss == pytest.approx(math.log(2), abs=1e-6))


def test_tensorboard_events_mirror_the_metrics(make_cfg):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = train(make_cfg(**{"run.tensorboard": "true", "run.max_steps": 3}))
    events = EventAccumulator(str(result.run_dir / "tensorboard"))
    events.Reload()
    logged = [e.value for e in events.Scalars("loss")]
    assert logged == pytest.approx([r["loss"] for r in result.history], rel=1e-6)


def test_finished_run_without_checkpoints_is_not_overwritten(make_cfg):
    import shutil

    cfg = make_cfg(**{"run.max_steps": 1})
    result = train(cfg)
    shutil.rmtree(result.run_dir / "checkpoints")
    with pytest.raises(ConfigError, match="already holds a run"):
        train(cfg)
    with pytest.raises(ConfigError, match="no checkpoint to continue from"):
        train(cfg, resume=True)


def test_resume_below_the_checkpoint_step_is_refused(make_cfg):
    train(make_cfg(**{"run.max_steps": 3}))
    with pytest.raises(ConfigError, match="already past"):
        train(make_cfg(**{"run.max_steps": 2}), resume=True)


def test_resume_refuses_a_changed_seed(make_cfg):
    train(make_cfg(**{"run.max_steps": 1}))
    with pytest.raises(ConfigError, match="run.seed"):
        train(make_cfg(**{"run.max_steps": 2, "run.seed": 5}), resume=True)


def test_nan_gradient_with_finite_loss_is_caught_without_clipping(make_cfg, monkeypatch):
    """With optim.max_grad_norm null the norm is still computed, so an inf gradient never reaches the weights."""
    from posttrain.algorithms import ALGORITHMS, sft

    class InfGrad(torch.autograd.Function):
        """Forward 0 (the loss stays finite), backward inf into its input."""

        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x.new_zeros(())

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            return torch.full_like(x, float("inf"))

    calls = {"n": 0}
    real = sft.loss_fn

    def inf_grad(model, batch, cfg):
        calls["n"] += 1
        loss, metrics = real(model, batch, cfg)
        if calls["n"] == 2:
            weight = next(p for p in model.parameters() if p.requires_grad)
            loss = loss + InfGrad.apply(weight)
        return loss, metrics

    monkeypatch.setitem(ALGORITHMS, "sft", dataclasses.replace(sft.ALGORITHM, loss_fn=inf_grad))
    cfg = make_cfg(**{"run.max_steps": 4, "optim.max_grad_norm": "null"})
    with pytest.raises(TrainingDiverged, match="step 2: the gradient norm"):
        train(cfg)
    kept = Path(cfg.run.output_dir) / "checkpoints" / "step-000001"
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(str(kept / "trainable.safetensors")).values())


def test_logged_lr_is_the_rate_each_step_used(make_cfg):
    """Warmup of 2 steps to lr 0.01, then constant: the steps use 1/3, 2/3, 1, 1 of it; step 1 is not at lr 0
    (a step at lr 0 trains nothing: transformers' warmup starts there)."""
    cfg = make_cfg(**{"optim.warmup_steps": 2, "optim.schedule": "constant", "run.max_steps": 4})
    result = train(cfg, return_model=True)
    assert [r["lr"] for r in result.history] == pytest.approx([0.01 / 3, 0.02 / 3, 0.01, 0.01], abs=1e-12)


def test_first_warmup_step_updates_the_weights(make_cfg):
    """With warmup, step 1 changes the model (it trained at lr 0 before)."""
    from posttrain.config import TechniqueConfig
    from posttrain.models import load_model

    cfg = make_cfg(**{"optim.warmup_steps": 5, "run.max_steps": 1})
    before = {n: p.detach().clone() for n, p in load_model(cfg.model, TechniqueConfig(name="full")).named_parameters()}
    after = dict(train(cfg, return_model=True).model.named_parameters())
    moved = [n for n, p in after.items() if not torch.equal(p.detach(), before[n])]
    assert len(moved) == len(before)


def _target_tokens(cfg) -> int:
    """Target tokens of every row of `data.train`, rendered as the run renders them."""
    from posttrain.algorithms import sft
    from posttrain.models import load_tokenizer

    data = sft.prepare(cfg, load_tokenizer(cfg.model))
    return sum(sft.loss_units(data.collate([e])) for e in data.train)


def test_an_epoch_trains_every_row_and_accumulation_is_exact_on_the_smaller_last_step(make_cfg, tmp_path):
    """19 rows in steps of 8: 8, 8 and 3. Every row's target tokens are trained once (the loss units of the
    three steps add up to all of them), and micro-batches of 2 (the last step: 2 + 1) give the losses of one
    forward of the whole step."""
    rows = tmp_path / "19.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"add {a} {b}", "completion": str(a + b)}) + "\n"
                            for a in range(4) for b in range(5) if a + b < 7))  # fmt: skip
    common = {"data.train": str(rows), "run.max_steps": "null", "run.epochs": 1, "optim.max_grad_norm": "null"}
    whole = train(make_cfg("whole", **common, **{"optim.micro_batch_size": 8}))
    micro = train(make_cfg("micro", **common, **{"optim.micro_batch_size": 2}))
    assert whole.steps == micro.steps == whole.steps_trained == 3
    units = [r["loss_units"] for r in whole.history]
    assert units[2] < units[0] and sum(units) == _target_tokens(make_cfg("x", **common))
    assert [r["loss_units"] for r in micro.history] == units
    assert_close(torch.tensor([r["loss"] for r in micro.history]), torch.tensor([r["loss"] for r in whole.history]),
                 rtol=1e-5, atol=1e-6)  # fmt: skip  # only the float summation order differs


def test_held_out_data_without_eval_every_is_evaluated_once_at_the_end(make_cfg, sft_file, tmp_path, capsys):
    result = train(make_cfg(**{"data.eval": str(sft_file), "run.max_steps": 3}))
    evals = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3] and evals[0]["eval_loss"] > 0
    # the held-out file here is the training file: said, since its loss is then no held-out loss (a copy too)
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(sft_file.read_bytes())
    capsys.readouterr()
    train(make_cfg("copy", **{"data.eval": str(copy), "run.max_steps": 1}))
    assert (f"warning: data.eval ({copy}) holds the same bytes as data.train ({sft_file}): its loss is the training "
            "rows' loss, not a held-out one; give rows the run does not train on") in capsys.readouterr().out
    held_out = tmp_path / "other.jsonl"
    held_out.write_text('{"prompt": "add 9 9", "completion": "18"}\n')
    train(make_cfg("other", **{"data.eval": str(held_out), "run.max_steps": 1}))
    assert "holds the same bytes" not in capsys.readouterr().out


def test_a_config_changed_after_loading_is_checked_again_before_training(make_cfg):
    """From Python, `cfg.run.epochs = 2.0` beside `run.max_steps` (refused when both come from the file) trained 3
    steps and ignored the epochs, and the run's config.yaml was then refused by --resume; a string for the config
    raised an AttributeError from deep inside. Both are refused before anything is written."""
    cfg = make_cfg("edited", **{"run.max_steps": 3})
    cfg.run.epochs = 2.0
    with pytest.raises(ConfigError, match=r"(?s)the config given to train\(\).*run\.epochs = 2\.0 would be ignored"):
        train(cfg)
    assert not Path(cfg.run.output_dir).exists()
    cfg = make_cfg("edited", **{"technique.name": "lora", "technique.r": 4})
    cfg.technique.name = "full"  # the LoRA rank left behind would be ignored
    with pytest.raises(ConfigError, match=r"technique\.r"):
        train(cfg)
    with pytest.raises(ConfigError, match=r"train\(\) takes a run config, not a str"):
        train("configs/sft_lora.yaml")
