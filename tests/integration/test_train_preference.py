"""DPO and reward-model runs on the tiny model: what trains, what stays frozen, and the loss falls on pairs it
overfits. The reference is checked three ways (adapter disabled, precomputed, frozen copy)."""

import json
import math
from pathlib import Path

import pytest
import torch

from posttrain.train import train

PAIRS = [
    {"prompt": f"add {a} {b}", "chosen": str(a + b), "rejected": f"{a + b + 1} maybe"}
    for a in range(4)
    for b in range(2)
]


@pytest.fixture()
def pairs_file(tmp_path):
    p = tmp_path / "pairs.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in PAIRS), encoding="utf-8")
    return p


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "technique,reference",
    [("lora", "adapter"), ("full", "precompute"), ("full", "copy"), ("lora", "precompute")],
)
def test_dpo_trains_and_first_step_is_log2(make_cfg, pairs_file, technique, reference):
    """At step 1 the policy equals the reference: loss log 2, margin 0; then the loss falls."""
    cfg = make_cfg(
        f"dpo-{technique}-{reference}",
        **{
            "algorithm.name": "dpo",
            "technique.name": technique,
            "algorithm.reference": reference,
            "algorithm.beta": 0.5,
            "data.train": str(pairs_file),
            "run.max_steps": 8,
            "optim.lr": 5e-3 if technique == "lora" else 1e-3,
            "optim.schedule": "constant",
        },
    )
    from posttrain.config import TechniqueConfig
    from posttrain.models import load_model

    before = _snapshot(
        load_model(cfg.model, TechniqueConfig(name="full"))
    )  # the base weights (no random init)
    result = train(cfg, return_model=True)
    hist = _metrics(result.run_dir)
    assert hist[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert hist[0]["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    assert hist[0]["abs_logratio_per_token"] == pytest.approx(0.0, abs=1e-6)
    assert hist[-1]["loss"] < hist[0]["loss"] - 0.05
    assert hist[-1]["reward_accuracy"] > 0.5
    if technique == "lora":  # base weights bit-for-bit frozen, adapters moved (lora_B starts at exactly 0)
        from posttrain.testing import assert_base_unchanged

        assert_base_unchanged(result.model, cfg.model.name)
        lora_b = [p for n, p in result.model.named_parameters() if "lora_B" in n]
        assert lora_b and all(p.detach().abs().sum() > 0 for p in lora_b)
    else:  # full fine-tuning moved every weight matrix of the base
        after = dict(result.model.named_parameters())
        assert set(after) == set(before)
        moved = [n for n, p in after.items() if not torch.equal(before[n], p.detach())]
        assert len(moved) >= len(after) - 1, sorted(set(after) - set(moved))
    if reference == "precompute":
        assert (result.run_dir / "reference_logps.pt").is_file()


def test_precomputed_reference_logps_are_not_reused_in_other_numerics(make_cfg, pairs_file, monkeypatch):
    """The cache kept the model's name and rows, not what they were computed in: a run started where
    `model.dtype: auto` is float32 (a CPU) and resumed where it is bfloat16 (a GPU) mixed float32 reference
    log-probs into a bf16 policy's loss, unsaid (an audit). Kept with them now; another is refused."""
    import posttrain.train
    from posttrain.errors import UserError

    overrides = {"algorithm.name": "dpo", "technique.name": "lora", "algorithm.reference": "precompute",
                 "data.train": str(pairs_file), "run.save_every": 1}  # fmt: skip
    result = train(make_cfg("ref-numerics", **overrides, **{"run.max_steps": 1}))
    assert torch.load(result.run_dir / "reference_logps.pt", weights_only=True)["numerics"] == "float32 on cpu"
    monkeypatch.setattr(posttrain.train, "_numerics", lambda cfg, accelerator: "bfloat16 on cuda")
    with pytest.raises(UserError, match=r"computed in float32 on cpu, and this resume computes in bfloat16 on cuda"):
        train(make_cfg("ref-numerics", **overrides, **{"run.max_steps": 2}), resume=True)
    monkeypatch.undo()
    assert train(make_cfg("ref-numerics", **overrides, **{"run.max_steps": 2}), resume=True).steps == 2


def test_dpo_adapter_reference_equals_base_model(tiny_model_dir):
    """The adapter-disabled model gives exactly the base model's log-probs, even after the adapter has moved."""
    from posttrain.config import ModelConfig, TechniqueConfig
    from posttrain.models import load_model
    from posttrain.models.logprobs import selected_token_logps

    base = load_model(ModelConfig(name=str(tiny_model_dir)), TechniqueConfig(name="full"), train=False)
    policy = load_model(ModelConfig(name=str(tiny_model_dir)), TechniqueConfig(name="lora"))
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.add_(0.5)  # a non-zero adapter: the policy now differs from the base
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
    want, _ = selected_token_logps(base, inputs, mask)
    with torch.no_grad():
        moved, _ = selected_token_logps(policy, inputs, mask)
        with policy.disable_adapter():
            got, _ = selected_token_logps(policy, inputs, mask)
    assert not torch.allclose(moved, want)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("loss_type", ["ipo", "hinge", "simpo"])
def test_dpo_variants_run(make_cfg, pairs_file, loss_type):
    cfg = make_cfg(
        f"dpo-{loss_type}",
        **{
            "algorithm.name": "dpo",
            "technique.name": "lora",
            "algorithm.loss_type": loss_type,
            "data.train": str(pairs_file),
            "run.max_steps": 6,
            "optim.lr": 5e-3,
            "optim.schedule": "constant",
        },
    )
    hist = _metrics(train(cfg).run_dir)
    assert all(math.isfinite(h["loss"]) for h in hist)
    assert hist[-1]["loss"] < hist[0]["loss"]


def test_reward_model_trains_only_head_and_adapter(make_cfg, pairs_file):
    cfg = make_cfg(
        "rm",
        **{
            "algorithm.name": "reward",
            "technique.name": "lora",
            "data.train": str(pairs_file),
            "run.max_steps": 10,
            "optim.lr": 1e-2,
            "optim.schedule": "constant",
        },
    )
    result = train(cfg, return_model=True)
    hist = _metrics(result.run_dir)
    assert hist[0]["loss"] == pytest.approx(math.log(2), abs=0.05)  # small head init: scores near 0
    assert hist[-1]["loss"] < hist[0]["loss"] - 0.1
    assert hist[-1]["accuracy"] == 1.0
    trainable = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    from posttrain.testing import assert_base_unchanged

    assert_base_unchanged(result.model, cfg.model.name, prefix="policy.")  # the backbone's base is frozen
    lora_b = [p for n, p in result.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.detach().abs().sum() > 0 for p in lora_b)  # adapters moved from their zero init
    assert (result.final_dir / "score_head.safetensors").is_file()

    # the saved reward model scores like the trained one, as a reward function
    from posttrain.models.heads import RewardModelScorer

    scorer = RewardModelScorer(result.final_dir)
    good = scorer(["add 1 1", "add 2 0"], ["2", "2"])
    bad = scorer(["add 1 1", "add 2 0"], ["3 maybe", "3 maybe"])
    assert all(g > b for g, b in zip(good, bad))


@pytest.mark.parametrize(
    "technique,reference", [("full", "precompute"), ("full", "copy"), ("lora", "adapter")]
)
def test_dpo_evaluation_uses_the_reference_in_every_mode(make_cfg, pairs_file, technique, reference):
    """Evaluation pairs get reference log-probs in every mode (under full fine-tuning the run used to stop at its
    first evaluation); evaluated on the pairs it trains on, the loss falls below log 2, its value at the start."""
    cfg = make_cfg(
        f"dpo-eval-{technique}-{reference}",
        **{
            "algorithm.name": "dpo",
            "technique.name": technique,
            "algorithm.reference": reference,
            "algorithm.beta": 0.5,
            "data.train": str(pairs_file),
            "data.eval": str(pairs_file),
            "run.max_steps": 6,
            "run.eval_every": 3,
            "optim.lr": 5e-3 if technique == "lora" else 1e-3,
            "optim.schedule": "constant",
        },
    )
    hist = _metrics(train(cfg).run_dir)
    evals = [h for h in hist if "eval_loss" in h]
    assert [h["step"] for h in evals] == [3, 6]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] < math.log(2)


def test_dpo_reference_cache_does_not_depend_on_micro_batch_size(make_cfg, pairs_file, tmp_path):
    """The cached reference log-probs are per row (its real tokens and scored positions): a cache built from
    micro-batches of 2 gives the same values as one built from micro-batches of 8 (so a resumed run with another
    micro-batch size, or another process count, looks up the right ones)."""
    from posttrain.data.preference import prepare_pairs
    from posttrain.models import load_model, load_tokenizer
    from posttrain.models.reference import Reference
    from posttrain.trainer.batches import WithReference

    cfg = make_cfg("cache", **{"algorithm.name": "dpo", "technique.name": "full", "data.train": str(pairs_file)})
    data = prepare_pairs(cfg, load_tokenizer(cfg.model))
    model = load_model(cfg.model, cfg.technique)
    pairs = list(data.train)
    caches = []
    for micro in (2, 8):
        reference = Reference("precompute", model)
        reference.precompute([data.collate(pairs[i : i + micro]) for i in range(0, len(pairs), micro)], "loss_mask",
                             chunk=micro, run_dir=tmp_path / str(micro), model_name="tiny", resuming=False,
                             save=False)  # fmt: skip
        caches.append(reference)
    assert len(caches[0].table) == len(caches[1].table) == 2 * len(pairs) == 16
    for key, row in caches[0].table.items():
        torch.testing.assert_close(row, caches[1].table[key], rtol=0, atol=1e-5)  # padding differs
    batch = data.collate([pairs[5], pairs[2], pairs[7]])  # another composition than either cache saw
    looked_up = WithReference(None, caches[0], "loss_mask", chunk=3).add(dict(batch))["ref_logps"]
    direct = Reference("copy", model).logps(batch, "loss_mask", chunk=3)
    torch.testing.assert_close(looked_up, direct, rtol=0, atol=1e-5)


def test_a_run_restarted_at_step_1_computes_its_reference_again(make_cfg, pairs_file, tmp_path):
    """The cache of a run stopped before its first checkpoint was reused when it started again at step 1, matched by
    the model's name and the rows alone: after the weights under that name changed, DPO trained against the old
    model's log-probs (loss 0.7034 at step 1 where policy = reference gives log 2). Only a resumed run reuses it."""
    from posttrain.data.preference import prepare_pairs
    from posttrain.models import load_model, load_tokenizer
    from posttrain.models.reference import Reference

    cfg = make_cfg("restart", **{"algorithm.name": "dpo", "technique.name": "full", "data.train": str(pairs_file)})
    data = prepare_pairs(cfg, load_tokenizer(cfg.model))
    batches = [data.collate(list(data.train))]
    old, new = load_model(cfg.model, cfg.technique), load_model(cfg.model, cfg.technique)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.1)  # the weights under the same name, changed
    tables = {}
    for name, model, resuming in (("old", old, False), ("new", new, False), ("resumed", new, True)):
        reference = Reference("precompute", model)
        reference.precompute(batches, "loss_mask", chunk=8, run_dir=tmp_path, model_name="tiny", resuming=resuming,
                             save=True)  # fmt: skip
        tables[name] = reference.table
    key = next(iter(tables["old"]))
    assert not torch.equal(tables["new"][key], tables["old"][key])  # computed again from the new weights
    assert torch.equal(tables["resumed"][key], tables["new"][key])  # a resume reuses the cache (now the new one)


def test_reward_model_margin_column_enters_the_loss(make_cfg, tmp_path):
    """With algorithm.margin the loss is sum of -log sigma(s_w - s_l - m) with each row's `margin` m; without
    it the margin column is ignored. Checked against the model's own scores, on the same batch."""
    from posttrain.algorithms import reward
    from posttrain.models import load_model, load_tokenizer
    from posttrain.models.heads import ScalarHeadModel

    rows = [dict(r, margin=float(i % 3)) for i, r in enumerate(PAIRS)]
    f = tmp_path / "margins.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = make_cfg("rm-margin", **{"algorithm.name": "reward", "data.train": str(f)})
    data = reward.prepare(cfg, load_tokenizer(cfg.model))
    batch = data.collate(list(data.train))
    model = ScalarHeadModel(load_model(cfg.model, cfg.technique), kind="reward")
    with torch.no_grad():
        scores = model.scores(batch["input_ids"], batch["attention_mask"])  # (2B,)
        B = len(rows)
        margin = torch.tensor([float(i % 3) for i in range(B)])
        off, _ = reward.loss_fn(model, batch, cfg)
        cfg.algorithm.margin = True
        on, _ = reward.loss_fn(model, batch, cfg)
    want_off = reward.bradley_terry_loss(scores[:B], scores[B:]).sum()
    want_on = reward.bradley_terry_loss(scores[:B], scores[B:], margin=margin).sum()
    torch.testing.assert_close(off, want_off, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(on, want_on, rtol=1e-5, atol=1e-6)
    assert on > off  # margins of 1 and 2 on most pairs make every such pair's loss larger


def test_dpo_scores_chosen_and_rejected_in_one_forward(make_cfg, pairs_file):
    """One policy forward of all 2B rows (chosen then rejected), plus one no-grad forward of the same rows for the
    adapter-disabled reference (the batch source adds it, before the policy's): never a forward per side."""
    from posttrain.algorithms import dpo
    from posttrain.data.preference import prepare_pairs
    from posttrain.models import load_model, load_tokenizer
    from posttrain.models.reference import Reference
    from posttrain.trainer.batches import WithReference

    cfg = make_cfg("one-forward", **{"algorithm.name": "dpo", "technique.name": "lora", "data.train": str(pairs_file)})
    data = prepare_pairs(cfg, load_tokenizer(cfg.model))
    batch = data.collate(list(data.train))  # 8 pairs -> 16 rows
    model = load_model(cfg.model, cfg.technique)
    seen = []
    decoder = model.get_base_model().model
    handle = decoder.register_forward_hook(lambda mod, args, kwargs, out: seen.append(kwargs["input_ids"].shape[0]),
                                           with_kwargs=True)  # fmt: skip
    try:
        batch = WithReference(None, Reference("adapter", model), "loss_mask", chunk=16).add(batch)
        loss, metrics = dpo.loss_fn(model, batch, cfg)
    finally:
        handle.remove()
    assert seen == [16, 16]  # the reference, then the policy: each over all chosen and rejected rows at once
    assert loss.item() == pytest.approx(8 * math.log(2), rel=1e-6)  # policy == reference at the start


def test_reward_margin_without_margins_is_refused_and_unused_margins_are_noted(make_cfg, pairs_file, tmp_path):
    from posttrain.algorithms import reward
    from posttrain.errors import ConfigError
    from posttrain.models import load_tokenizer

    cfg = make_cfg("rm", **{"algorithm.name": "reward", "data.train": str(pairs_file), "algorithm.margin": "true"})
    with pytest.raises(ConfigError, match=r"algorithm.margin is true, but no pair of .* has a nonzero `margin`"):
        train(cfg)
    assert not Path(cfg.run.output_dir).exists()
    f = tmp_path / "margins.jsonl"
    f.write_text("".join(json.dumps(dict(r, margin=1.0 if i < 3 else 0.0)) + "\n" for i, r in enumerate(PAIRS)))
    data = reward.prepare(make_cfg("rm2", **{"algorithm.name": "reward", "data.train": str(f)}), load_tokenizer(cfg.model))
    assert f"{f}: 3 pairs have a `margin`, which this run does not use" in " ".join(data.notes)
    # DPO never reads a margin: said too, not dropped silently
    from posttrain.algorithms import dpo

    data = dpo.prepare(make_cfg("dpo-margin", **{"algorithm.name": "dpo", "data.train": str(f)}), load_tokenizer(cfg.model))
    assert (f"{f}: 3 pairs have a `margin`, which DPO does not read (a reward model does, with algorithm.margin=true)"
            in data.notes)  # fmt: skip


def test_dpo_trains_on_hh_transcripts_and_leaves_out_an_empty_response_when_asked(make_cfg, tmp_path, capsys):
    """Anthropic HH as it is downloaded: transcripts read by data.turns, and a pair with an empty response left
    out by data.skip_bad_rows with a run note naming it (without it, the file is refused, as before)."""
    from posttrain.errors import DataError

    convo = "\n\nHuman: add {i} and 2\n\nAssistant: "
    rows = [{"chosen": convo.format(i=i) + str(i + 2), "rejected": convo.format(i=i) + (str(i + 3) if i != 3 else "")}
            for i in range(9)]  # fmt: skip
    f = tmp_path / "hh.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    turns = 'data.turns={user: "\\n\\nHuman:", assistant: "\\n\\nAssistant:"}'
    base = {"algorithm.name": "dpo", "technique.name": "lora", "data.train": str(f), "run.max_steps": 1}
    cfg = make_cfg("hh", **base)  # (for the tiny model's name; the markers hold newlines: given as overrides below)
    from posttrain.algorithms import load_config

    overrides = [f"{k}={v}" for k, v in {"model.name": cfg.model.name, "data.max_length": 64, "optim.batch_size": 8,
                                         "optim.warmup_steps": 0, "run.progress": False, "run.report": False,
                                         "run.output_dir": str(tmp_path / "hh_run"), **base}.items()]  # fmt: skip
    with pytest.raises(DataError, match="hh.jsonl:4: rejected: empty response"):
        train(load_config(None, [*overrides, turns]))
    result = train(load_config(None, [*overrides, turns, "data.skip_bad_rows=true"]))
    assert result.steps_trained == 1
    assert f"warning: {f}: 1 of 9 rows left out (data.skip_bad_rows): {f}:4: rejected: empty response" in \
        capsys.readouterr().out  # fmt: skip
