"""Shared-prompt packing (`models.prefix_sharing`): rows that share a prompt run as one row, the prompt once, and
every log-prob and gradient equals the padded forward's.

The padded forward is the reference implementation: each sequence in its own right-padded (DPO) or left-padded
prompt + right-padded completion (RL) row. All in float32 on the tiny random model, where the two differ only by
the summation order of GEMMs of other shapes (~1e-7 here), so atol 1e-5 is tight. Each equality test also
counts the tokens the model's embedding layer saw, so it cannot pass by silently running the padded rows.
"""

import contextlib
from unittest import mock

import pytest
import torch

from posttrain.algorithms import dpo, grpo, load_config, rloo
from posttrain.algorithms.base import RolloutContext, ScoredRollout
from posttrain.data.collate import GROUP_KEY
from posttrain.data.preference import RenderedPair, collate_pairs
from posttrain.models import logprobs
from posttrain.models.attention import attention_per_segment
from posttrain.models.logprobs import chunked_token_logps, selected_token_logps
from posttrain.models.prefix_sharing import mask_kind, share_prefix, share_prefix_in_one_row
from posttrain.models.reference import Reference
from posttrain.rollout.engine import Rollout
from posttrain.testing import tiny_model

TIGHT = dict(rtol=0, atol=1e-5)
GRADS = dict(rtol=1e-5, atol=1e-5)  # float32 rounding is relative: IPO's gradients here reach ~60 (off by ~3e-5)


def _ids(n: int, g: torch.Generator) -> list[int]:
    return torch.randint(3, 250, (n,), generator=g).tolist()


def _right_padded(rows: list[tuple[list[int], list[int]]], extra: int = 2):
    """(prompt, continuation) rows right-padded by `extra` columns past the longest: inputs, target mask."""
    T = max(len(p) + len(c) for p, c in rows) + extra
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    am, tm = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (p, c) in enumerate(rows):
        n = len(p) + len(c)
        ids[i, :n] = torch.tensor(p + c)
        am[i, :n] = 1
        tm[i, len(p) : n] = 1
    return {"input_ids": ids, "attention_mask": am}, tm


def _left_padded(rows: list[tuple[list[int], list[int]]]):
    """The RL layout (`algorithms.base.sequence_tensors`): left-padded prompts, right-padded continuations,
    positions counting the real tokens."""
    P, C = max(len(p) for p, _ in rows), max(len(c) for _, c in rows) + 1
    ids = torch.zeros(len(rows), P + C, dtype=torch.long)
    am, tm = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (p, c) in enumerate(rows):
        ids[i, P - len(p) : P] = torch.tensor(p)
        am[i, P - len(p) : P] = 1
        ids[i, P : P + len(c)] = torch.tensor(c)
        am[i, P : P + len(c)] = 1
        tm[i, P : P + len(c)] = 1
    return {"input_ids": ids, "attention_mask": am, "position_ids": (am.cumsum(-1) - 1).clamp(min=0)}, tm


def _rows(seed: int = 0):
    """Three prompts of 6, 3 and 9 tokens; continuations of 1 to 7 tokens, one of them the start of another;
    groups of 2, 2 and 4 rows, interleaved as DPO's halves are."""
    g = torch.Generator().manual_seed(seed)
    p = [_ids(6, g), _ids(3, g), _ids(9, g)]
    same = _ids(3, g)
    rows = [(p[0], _ids(4, g)), (p[1], _ids(1, g)), (p[2], same), (p[0], _ids(2, g)), (p[1], _ids(7, g)),
            (p[2], _ids(1, g)), (p[2], same + _ids(2, g)), (p[2], _ids(5, g))]  # fmt: skip
    return rows, torch.tensor([0, 1, 2, 0, 1, 2, 2, 2])


class Tokens:
    """Counts the token slots (padding included) the model's embedding layer is given."""

    def __init__(self, model):
        self.seen = 0
        model.get_input_embeddings().register_forward_hook(self._count)

    def _count(self, module, args, out):
        self.seen += args[0].numel()


# ---- the layout


@pytest.mark.parametrize("layout", [_right_padded, _left_padded])
def test_each_token_sees_in_the_packed_row_exactly_what_it_sees_in_its_own_row(layout):
    rows, groups = _rows()
    inputs, _ = layout(rows)
    packed = share_prefix(inputs, groups)
    R, S = packed.input_ids.shape
    # group 2's prefix is its prompt: rows 2 and 6 begin alike past it, rows 5 and 7 do not
    assert R == 3 and S == max(6 + 4 + 2, 3 + 1 + 7, 9 + 3 + 1 + 5 + 5)
    flat_ids, flat_pos = packed.input_ids.flatten(), packed.position_ids.flatten()
    allowed = packed.allowed.flatten(0, 1)  # (R x S, S): row r's queries
    real = inputs["attention_mask"].bool()
    seen_by_real = torch.zeros(R * S, dtype=torch.bool)
    for b in range(len(rows)):
        where = packed.index[b][real[b]]  # (n,) flat packed positions of row b's tokens, in order
        assert (packed.index[b][~real[b]] == -1).all()
        assert torch.equal(flat_ids[where], inputs["input_ids"][b][real[b]])
        assert flat_pos[where].tolist() == list(range(len(where)))
        r, cols = where // S, where % S
        assert (r == r[0]).all()  # one packed row per group
        for i in range(len(where)):
            keys = allowed[where[i]].nonzero().flatten()
            assert sorted(keys.tolist()) == sorted(cols[: i + 1].tolist()), (b, i)  # its own earlier tokens only
        seen_by_real[where] = True
    # padding: after every real token of its row, attends to itself only, and nothing real attends to it
    pad = ~seen_by_real.view(R, S)
    for r in range(R):
        for s in pad[r].nonzero().flatten().tolist():
            assert packed.allowed[r, s].nonzero().flatten().tolist() == [s]
            assert not packed.allowed[r, ~pad[r], s].any()


def test_a_group_of_one_row_identical_rows_and_continuations_that_begin_alike():
    inputs, _ = _right_padded([([5, 6], [7]), ([5, 6], [7]), ([9], [8, 8]), ([4], [3, 1]), ([4], [3, 2, 2])], extra=0)
    packed = share_prefix(inputs, torch.tensor([0, 0, 1, 2, 2]))
    # identical rows: all prefix; a group of one: the row itself; continuations that begin alike: a longer prefix
    assert packed.input_ids.tolist() == [[5, 6, 7, 0, 0], [9, 8, 8, 0, 0], [4, 3, 1, 2, 2]]
    assert packed.position_ids[2].tolist() == [0, 1, 2, 2, 3]
    assert packed.index.tolist() == [[0, 1, 2, -1], [0, 1, 2, -1], [5, 6, 7, -1], [10, 11, 12, -1],
                                     [10, 11, 13, 14]]  # fmt: skip


def test_rows_with_holes_or_shifted_positions_are_not_packed():
    ids = torch.tensor([[5, 6, 7, 8]])
    assert share_prefix({"input_ids": ids, "attention_mask": torch.tensor([[1, 0, 1, 1]])}, torch.tensor([0])) is None
    shifted = {"input_ids": ids, "attention_mask": torch.tensor([[0, 1, 1, 1]])}  # left padding, default positions
    assert share_prefix(shifted, torch.tensor([0])) is None
    assert share_prefix({**shifted, "position_ids": torch.tensor([[0, 0, 1, 2]])}, torch.tensor([0])) is not None


def test_mask_kind_refuses_what_cannot_take_a_custom_mask():
    model = tiny_model(259)
    cfg = model.config
    for impl, kind in (("sdpa", "bool"), ("eager", "additive")):
        cfg._attn_implementation = impl
        assert mask_kind(cfg, 100) == (kind, "")
    for impl in ("flash_attention_2", "flex_attention"):
        cfg._attn_implementation = impl
        kind, why = mask_kind(cfg, 100)
        assert kind is None and impl in why
    gemma = tiny_model(259, family="gemma2").config  # sliding_window 64 on every other layer
    assert mask_kind(gemma, 64)[0] is not None
    kind, why = mask_kind(gemma, 65)
    assert kind is None and "sliding-window" in why


# ---- log-probs and gradients equal the padded forward's


def _logps_and_grads(model, inputs, target_mask, groups, weights):
    model.zero_grad(set_to_none=True)
    logps, entropy = selected_token_logps(model, inputs, target_mask, with_entropy=True, groups=groups)
    (logps * weights).sum().backward()  # any weighting of the tokens: a gradient of every log-prob
    return logps.detach(), entropy, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _family(name: str):
    """A tiny random model: Llama (SmolLM2's family), Qwen2, or Gemma 2 (logit softcapping, and a sliding window
    of 64 tokens on every other layer that the packed rows here stay within)."""
    if name != "qwen2":
        return tiny_model(259, family=name)
    import transformers as tf

    torch.manual_seed(0)
    return tf.Qwen2ForCausalLM(tf.Qwen2Config(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                              tie_word_embeddings=False))  # fmt: skip


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("layout", [_right_padded, _left_padded])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
@pytest.mark.parametrize("in_run", [False, True])
def test_packed_logps_entropy_and_gradients_equal_the_padded_forward(attn, layout, family, in_run):
    """Outside a run each group is a row of its own under a 4D mask; inside one (`attention_per_segment`), for the
    families whose attention runs one example at a time (Llama, Qwen2 with sdpa), every group in one row with no
    padding, each prompt once, and attention one example at a time with no mask (`share_prefix_in_one_row`)."""
    if family == "gemma2" and attn == "sdpa":
        pytest.skip("transformers runs Gemma 2 with eager attention only (its attention logits are softcapped)")
    model = _family(family)
    model.set_attn_implementation(attn)
    model.train()
    rows, groups = _rows(seed=1)
    inputs, target_mask = layout(rows)
    weights = torch.randn(target_mask.shape, generator=torch.Generator().manual_seed(2))
    tokens = Tokens(model)
    padded = _logps_and_grads(model, inputs, target_mask, None, weights)
    assert tokens.seen == inputs["input_ids"].numel()
    tokens.seen = 0
    one_row = in_run and attn == "sdpa" and family != "gemma2"
    masks = []
    with attention_per_segment() if in_run else contextlib.nullcontext():
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def spy(q, k, v, attn_mask=None, **kw):
            masks.append(attn_mask is not None)
            return sdpa(q, k, v, attn_mask=attn_mask, **kw)

        with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", spy):
            packed = _logps_and_grads(model, inputs, target_mask, groups, weights)
    want = share_prefix_in_one_row(inputs, groups).input_ids.numel() if one_row else share_prefix(inputs, groups).tokens
    assert tokens.seen == want < 0.6 * inputs["input_ids"].numel()
    if attn == "sdpa":
        assert masks and not any(masks) if one_row else all(masks)
    assert (padded[0][target_mask.bool()] != 0).all()  # every target scored
    torch.testing.assert_close(packed[0], padded[0], **TIGHT)
    torch.testing.assert_close(packed[1], padded[1], **TIGHT)
    assert packed[2].keys() == padded[2].keys() and len(padded[2]) > 10
    for name, grad in padded[2].items():
        torch.testing.assert_close(packed[2][name], grad, **GRADS, msg=name)


def test_the_sharded_one_forward_path_projects_each_shared_position_once(monkeypatch):
    """The FSDP2/ZeRO-3 path (one forward that projects the kept positions, `logits_to_keep`), run on a plain model: a
    prompt's last position predicts the first token of every continuation and is projected once."""
    model = tiny_model(259)
    rows, groups = _rows(seed=3)
    inputs, target_mask = _right_padded(rows)
    weights = torch.randn(target_mask.shape, generator=torch.Generator().manual_seed(4))
    padded = _logps_and_grads(model, inputs, target_mask, None, weights)
    monkeypatch.setattr(logprobs, "gathers_in_forward", lambda m: True)
    packed = _logps_and_grads(model, inputs, target_mask, groups, weights)
    torch.testing.assert_close(packed[0], padded[0], **TIGHT)
    torch.testing.assert_close(packed[1], padded[1], **TIGHT)
    for name, grad in padded[2].items():
        torch.testing.assert_close(packed[2][name], grad, **GRADS, msg=name)


def test_a_model_that_cannot_take_the_mask_runs_the_padded_rows(capsys):
    model = tiny_model(259, family="gemma2")  # a sliding window of 64 tokens
    rows, groups = _rows(seed=5)
    rows = [(p * 8, c) for p, c in rows]  # packed rows longer than the window
    inputs, target_mask = _right_padded(rows)
    tokens = Tokens(model)
    with torch.no_grad():
        padded = selected_token_logps(model, inputs, target_mask)[0]
        packed = selected_token_logps(model, inputs, target_mask, groups=groups)[0]
    assert tokens.seen == 2 * inputs["input_ids"].numel()
    torch.testing.assert_close(packed, padded, rtol=0, atol=0)
    assert "sliding-window attention (window 64)" in capsys.readouterr().out


@pytest.mark.parametrize("family", ["bloom", "mpt", "falcon_alibi"])
def test_alibi_models_score_shared_prompts_as_the_padded_rows_they_are(family, capsys):
    """ALiBi measures distances in slots and reads no position ids: in a packed row MPT biased each continuation as
    if it sat after the others (log-probs 1.3e-2 off, silently) and BLOOM and Falcon's ALiBi failed on the 4D mask
    (an audit). Such rows run padded, with a note, and score what each sequence scores alone."""
    model = tiny_model(259, family=family).eval()
    rows, groups = _rows(seed=5)
    inputs, target_mask = _right_padded(rows)
    with torch.no_grad():
        padded = selected_token_logps(model, inputs, target_mask)[0]
        shared = selected_token_logps(model, inputs, target_mask, groups=groups)[0]
        for b, (prompt, completion) in enumerate(rows):  # each sequence alone
            ids = torch.tensor([prompt + completion])
            alone = model(ids).logits[0].log_softmax(-1)[:-1].gather(-1, ids[0, 1:, None])[:, 0]
            torch.testing.assert_close(padded[b, 1 : ids.shape[1]][target_mask[b, 1 : ids.shape[1]].bool()],
                                       alone[target_mask[b, 1 : ids.shape[1]].bool()], rtol=0, atol=2e-6)  # fmt: skip
    torch.testing.assert_close(shared, padded, rtol=0, atol=0)
    assert f"prompts are not shared between rows (ALiBi attention ({family.split('_')[0]}) measures distances in " \
           "slots, not position ids)" in capsys.readouterr().out  # fmt: skip


def test_chunks_keep_groups_together_and_return_rows_in_their_order():
    """DPO's chosen half then rejected half, in chunks of half the rows: sorted by group first, so each chunk
    holds whole pairs and packs them."""
    model = tiny_model(259)
    g = torch.Generator().manual_seed(6)
    prompts = [_ids(n, g) for n in (5, 8, 2, 6)]
    rows = [(p, _ids(k, g)) for p, k in zip(prompts, (3, 1, 4, 2))] + [(p, _ids(k, g)) for p, k in zip(prompts, (2, 5, 1, 3))]
    inputs, target_mask = _right_padded(rows)
    tensors = {**inputs, "loss_mask": target_mask}
    tokens = Tokens(model)
    padded = chunked_token_logps(model, tensors, "loss_mask", chunk=4)
    padded_tokens, tokens.seen = tokens.seen, 0
    packed = chunked_token_logps(model, {**tensors, GROUP_KEY: torch.arange(4).repeat(2)}, "loss_mask", chunk=4)
    torch.testing.assert_close(packed, padded, **TIGHT)
    assert tokens.seen < padded_tokens // 2  # 2 forwards of 2 packed rows, not 2 of 4 padded rows


# ---- DPO


def _lora(model):
    from peft import get_peft_model

    from posttrain.config import TechniqueConfig
    from posttrain.models.adapters import lora_config

    peft = get_peft_model(model, lora_config(TechniqueConfig()))
    with torch.no_grad():  # adapters that move the policy away from the reference (B starts at 0)
        g = torch.Generator().manual_seed(7)
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return peft


def _pairs():
    g = torch.Generator().manual_seed(8)
    return [RenderedPair(_ids(p, g), _ids(c, g), _ids(r, g), chosen_mask=None)
            for p, c, r in ((7, 3, 5), (2, 1, 6), (11, 4, 1), (4, 6, 6))]  # fmt: skip


@pytest.mark.parametrize("in_run", [False, True])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "simpo"])
def test_dpo_step_with_shared_prompts_equals_the_padded_step(loss_type, in_run):
    """Reference (the adapter disabled, chunks of 4 rows as `WithReference` runs them), policy forward, loss,
    metrics and gradients: the same with `prompt_group` as without, from fewer tokens; inside a run (the pairs in
    one row, attention per example) as outside (a row per pair under a mask)."""
    model = _lora(tiny_model(259))
    model.train()
    cfg = load_config(None, ["algorithm.name=dpo", f"algorithm.loss_type={loss_type}"])
    assert cfg.data.share_prompt
    reference = Reference("adapter", model)
    tokens = Tokens(model)
    results, seen = {}, {}
    for share in (False, True):
        batch = collate_pairs(_pairs(), pad_id=0, share_prompt=share)
        assert (GROUP_KEY in batch) is share
        tokens.seen = 0
        with attention_per_segment() if in_run else contextlib.nullcontext():
            if loss_type != "simpo":
                batch["ref_logps"] = reference.logps(batch, "loss_mask", chunk=4)
            model.zero_grad(set_to_none=True)
            loss, metrics = dpo.loss_fn(model, batch, cfg)
            loss.backward()
        seen[share] = tokens.seen
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[share] = (batch.get("ref_logps"), loss.detach(), metrics, grads)
    if in_run:  # the padded rows run their real tokens only there too: each pair's prompt (24 tokens) once less
        assert seen[True] == seen[False] - 24 * (1 if loss_type == "simpo" else 2)
    else:
        assert seen[True] < 0.7 * seen[False]
    (ref0, loss0, m0, g0), (ref1, loss1, m1, g1) = results[False], results[True]
    if ref0 is not None:
        torch.testing.assert_close(ref1, ref0, **TIGHT)
    torch.testing.assert_close(loss1, loss0, **TIGHT)
    assert m1.keys() == m0.keys()
    for k in m0:
        a, b = (m[k].total if hasattr(m[k], "total") else m[k] for m in (m0, m1))
        torch.testing.assert_close(b, a, **TIGHT, msg=k)
    assert g1.keys() == g0.keys() and g0
    for name, grad in g0.items():
        torch.testing.assert_close(g1[name], grad, **GRADS, msg=name)


@pytest.mark.parametrize("in_run", [False, True])
def test_while_dropout_is_on_each_row_of_a_pair_draws_its_own_masks(monkeypatch, capsys, in_run):
    """LoRA dropout in a training forward: a pair whose chosen and rejected are the same tokens gives two different
    log-probs (each row its own masks), bit for bit what the padded rows give under the same seed, with a note;
    the prompt run once would have given both rows one mask and equal log-probs. In eval mode the prompt is
    shared."""
    from peft import get_peft_model

    from posttrain.config import TechniqueConfig
    from posttrain.models.adapters import lora_config

    monkeypatch.setattr(logprobs, "_NOTED", set())
    model = get_peft_model(tiny_model(259), lora_config(TechniqueConfig(dropout=0.5)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    row = torch.tensor([11, 12, 13, 14, 15, 20])
    inputs = {"input_ids": torch.stack([row, row]), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    target_mask = torch.zeros(2, 6, dtype=torch.long)
    target_mask[:, -1] = 1
    tokens = Tokens(model)

    def logps(**kw):
        torch.manual_seed(0)
        with attention_per_segment() if in_run else contextlib.nullcontext(), torch.no_grad():
            return selected_token_logps(model, inputs, target_mask, **kw)[0][:, -1]

    model.train()
    padded = logps()
    tokens.seen = 0
    grouped = logps(groups=torch.tensor([0, 0]))
    assert tokens.seen == 12  # both rows, every token
    assert padded[0] != padded[1]
    torch.testing.assert_close(grouped, padded, rtol=0, atol=0)
    assert "not shared while dropout is on" in capsys.readouterr().out
    model.eval()
    tokens.seen = 0
    logps(groups=torch.tensor([0, 0]))
    assert tokens.seen == 6  # the two rows are one prefix: it runs once


def test_dpo_prepare_marks_pairs_only_under_share_prompt(tmp_path, tiny_tokenizer):
    import json

    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "2+2?", "chosen": "4", "rejected": "5"}) + "\n")
    on = dpo.ALGORITHM.prepare(load_config(None, ["algorithm.name=dpo", f"data.train={path}"]), tiny_tokenizer)
    off = dpo.ALGORITHM.prepare(load_config(None, ["algorithm.name=dpo", f"data.train={path}",
                                                   "data.share_prompt=false"]), tiny_tokenizer)  # fmt: skip
    assert on.collate(on.train)[GROUP_KEY].tolist() == [0, 0]
    assert GROUP_KEY not in off.collate(off.train)


# ---- GRPO and RLOO


def _scored(G: int, seed: int = 9):
    """Two prompts (5 and 2 tokens, left-padded) x G completions of 1 to 6 tokens (right-padded)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [_ids(5, g), _ids(2, g)]
    lengths = torch.randint(1, 7, (2 * G,), generator=g).tolist()
    C = max(lengths)
    n = 2 * G
    prompt_ids, prompt_mask = torch.zeros(n, 5, dtype=torch.long), torch.zeros(n, 5, dtype=torch.long)
    completion_ids, completion_mask = torch.zeros(n, C, dtype=torch.long), torch.zeros(n, C, dtype=torch.long)
    for i in range(n):
        p = prompts[i // G]
        prompt_ids[i, 5 - len(p) :], prompt_mask[i, 5 - len(p) :] = torch.tensor(p), 1
        completion_ids[i, : lengths[i]], completion_mask[i, : lengths[i]] = torch.tensor(_ids(lengths[i], g)), 1
    rollout = Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                      completion_mask=completion_mask, sampling_logps=torch.zeros(n, C), texts=["x"] * n,
                      truncated=torch.zeros(n, dtype=torch.bool))  # fmt: skip
    rewards = torch.randn(n, generator=g)
    return ScoredRollout(rollout, [None] * n, rewards, {}, trains=torch.ones(n, dtype=torch.bool))


class OneProcess:
    num_processes, process_index, device = 1, 0, torch.device("cpu")


@pytest.mark.parametrize("in_run", [False, True])
@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_rl_step_with_shared_prompts_equals_the_padded_step(method, in_run):
    """Old log-probs (two steps per rollout), the reference (beta > 0), the training forward in micro-batches of
    3 rows (whole groups of 4 cannot fit: a micro-batch holds parts of groups), loss and gradients: the same with
    `data.share_prompt` as without."""
    module = {"grpo": grpo, "rloo": rloo}[method]
    G = 4
    model = _lora(tiny_model(259))
    model.train()
    tokens = Tokens(model)
    results, seen = {}, {}
    for share in (False, True):
        cfg = load_config(None, [f"algorithm.name={method}", "algorithm.rewards=[constant]", f"algorithm.num_generations={G}",
                                 "algorithm.beta=0.1", "optim.batch_size=4", "algorithm.rollout.batch_size=8",
                                 f"data.share_prompt={str(share).lower()}"])  # fmt: skip
        ctx = RolloutContext(cfg=cfg, model=model, accelerator=OneProcess(), micro_batch_size=3,
                             reference=Reference("adapter", model))  # fmt: skip
        tokens.seen = 0
        with attention_per_segment() if in_run else contextlib.nullcontext():
            tensors, _ = module._process(_scored(G), ctx)
            assert (GROUP_KEY in tensors) is share
            model.zero_grad(set_to_none=True)
            losses = []
            for lo in range(0, 8, 3):  # micro-batches of 3 rows: [0 1 2] [3 4 5] [6 7]
                batch = {k: v[lo : lo + 3] for k, v in tensors.items()}
                loss, _ = module.loss_fn(model, batch, cfg)
                loss.backward()
                losses.append(loss.detach())
        seen[share] = tokens.seen
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[share] = (tensors, torch.stack(losses), grads)
    assert seen[True] < 0.8 * seen[False]
    (t0, l0, g0), (t1, l1, g1) = results[False], results[True]
    for key in ("old_logps", "ref_logps", "advantages"):
        if key in t0:
            torch.testing.assert_close(t1[key], t0[key], **TIGHT, msg=key)
    assert "old_logps" in t0
    torch.testing.assert_close(l1, l0, **TIGHT)
    assert g1.keys() == g0.keys() and g0
    for name, grad in g0.items():
        torch.testing.assert_close(g1[name], grad, **GRADS, msg=name)


@pytest.mark.parametrize("sharded_path", [False, True, "in a run"])
def test_a_shared_prompt_gives_the_same_gradient_bits_every_run(monkeypatch, sharded_path):
    """One prompt with 400 three-token continuations: its last position predicts the first token of every
    continuation, so the gather of the packed positions repeats it 400 times, spread over all N positions. Its
    gradient must sum those repeats in a fixed order: with `x[index]` two threads added them with atomic float
    adds in whatever order they met (last-bit differences between runs, GRPO steps that were not repeatable)."""
    if sharded_path is True:
        monkeypatch.setattr(logprobs, "gathers_in_forward", lambda m: True)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))  # the race needs two threads; CI's machines have 2 cores
    try:
        model = tiny_model(259)
        g = torch.Generator().manual_seed(6)
        prompt = _ids(4, g)
        rows = [(prompt, _ids(3, g)) for _ in range(400)]
        inputs, target_mask = _right_padded(rows, extra=0)
        groups = torch.zeros(len(rows), dtype=torch.long)
        weights = torch.randn(target_mask.shape, generator=g)
        # in a run: one row, attention per example, the prompt's copies added back by index_add_
        with attention_per_segment() if sharded_path == "in a run" else contextlib.nullcontext():
            first = _logps_and_grads(model, inputs, target_mask, groups, weights)[2]
            for _ in range(5):
                again = _logps_and_grads(model, inputs, target_mask, groups, weights)[2]
                for name, grad in first.items():
                    torch.testing.assert_close(again[name], grad, rtol=0, atol=0, msg=name)
    finally:
        torch.set_num_threads(threads)


def test_one_row_is_taken_where_it_keeps_less_for_backward():
    """`_one_row_pays` on SmolLM2-135M's shapes (hidden 576, 9 heads and 3 kv heads of 64, intermediate 1,536): Q =
    2 x 12 x 64 = 1,536 and A = 4 x 576 + 2 x 1,536 = 5,376 elements a token. Worked by hand:
    - a 1,000-token prompt, 8 completions of 100: one row 1,800 A + 8,800 Q = 23.2M, masked 1,800 (A + Q) + 1,800^2
      = 15.7M: masked;
    - a 200-token prompt, 8 completions of 228: 2,024 A + 3,424 Q = 16.14M against 2,024 (A + Q) + 2,024^2 = 18.09M:
      one row (measured: 17.2-17.4 s -> 12.5-14.0 s forward and backward, 3.05 -> 2.90 GB);
    - trl_compare's GRPO group, a 75-token prompt and 356 completion tokens in 8: 3.785M against 3.165M: masked
      (measured: one row held 0.1 GB more);
    - two DPO pairs of uneven length, (75; 30, 30) and (20; 5, 5): 165 A + 260 Q = 1.286M against two rows of 135,
      1.902M: one row (no padding)."""
    import transformers as tf

    config = tf.LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                            intermediate_size=1536)  # fmt: skip
    assert not logprobs._one_row_pays(config, ((1000, (100,) * 8),))
    assert logprobs._one_row_pays(config, ((200, (228,) * 8),))
    assert not logprobs._one_row_pays(config, ((75, (23, 40, 59, 64, 45, 41, 47, 37)),))
    assert logprobs._one_row_pays(config, ((75, (30, 30)), (20, (5, 5))))


def test_in_a_run_a_group_that_one_row_would_not_pay_for_runs_masked():
    """Inside a run, a 60-token prompt with six 2-token continuations (the tiny model): one row would copy the
    prompt into six sequences, so the group runs as one row under its mask, with the padded rows' log-probs."""
    model = tiny_model(259)
    g = torch.Generator().manual_seed(11)
    prompt = _ids(60, g)
    rows = [(prompt, _ids(2, g)) for _ in range(6)]
    inputs, target_mask = _right_padded(rows)
    groups = torch.zeros(6, dtype=torch.long)
    row = share_prefix_in_one_row(inputs, groups)
    assert not logprobs._one_row_pays(model.config, row.blocks)
    masks = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        masks.append(attn_mask is not None)
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    with torch.no_grad():
        padded = selected_token_logps(model, inputs, target_mask)[0]
        with attention_per_segment(), mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", spy):
            shared = selected_token_logps(model, inputs, target_mask, groups=groups)[0]
    assert masks and all(masks)
    torch.testing.assert_close(shared, padded, **TIGHT)
