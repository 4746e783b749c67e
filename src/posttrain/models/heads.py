"""A causal LM with a scalar head on its last hidden state: a reward model's score or PPO's value function.

`ScalarHeadModel` keeps the language model whole (`.policy`: full, LoRA or QLoRA, as `load_model` built it) and
adds one linear layer `hidden -> 1`. The backbone runs once: a reward model reads the head at each sequence's
last real token; PPO reads it at every completion position of the same backbone pass whose hidden states give the
policy's logits (through the language model's own output layer and logit post-processing: `logprobs.head_logps`;
a value head on the policy backbone, as in Ziegler et al. 2019).

Saved next to the LM's own files as `score_head.safetensors` + `score_head.json`; `load_scalar_model` reads them
back (`RewardModelScorer` turns a trained reward model into a reward function).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from posttrain.data.render import answer_scaffold, chat_text
from posttrain.errors import ModelNotFoundError
from posttrain.models.loading import context_length
from posttrain.models.logprobs import decoder_of, hidden_and_logits, last_hidden_states
from posttrain.models.saving import HEAD_FILE, HEAD_INFO, _trained_dir, load_trained, save_model


def language_model(model: nn.Module) -> nn.Module:
    """The causal LM of a trained module: the policy inside a `ScalarHeadModel` (PPO's value head), or the module
    itself."""
    return model.policy if isinstance(model, ScalarHeadModel) else model


class ScalarHeadModel(nn.Module):
    """`policy` (a causal LM) + `head` (Linear(hidden, 1), float32)."""

    def __init__(self, policy: nn.Module, *, kind: str = "reward", init_std: float | None = None):
        super().__init__()
        self.policy = policy
        self.kind = kind
        hidden = policy.config.hidden_size
        device = next(policy.parameters()).device
        self.head = nn.Linear(hidden, 1, device=device, dtype=torch.float32)
        # Reward head: the usual std 1 / sqrt(hidden + 1), which gives scores of std ~1 when the final norm leaves
        # components of RMS ~1. Value head: zeros, so V = 0 at the start and the first advantages are the returns
        # themselves; random values of std ~1 would swamp small rewards with noise in GAE (measured on the tiny
        # test model: the policy then drifted without learning a reward it learns from a zero-init head).
        std = init_std if init_std is not None else (0.0 if kind == "value" else 1.0 / (hidden + 1) ** 0.5)
        if std > 0:
            nn.init.normal_(self.head.weight, std=std)
        else:
            nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @property
    def config(self):
        return self.policy.config

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
        """Last hidden states (B, T, H), after the final norm: what the LM head and the scalar head read."""
        out = decoder_of(self.policy)(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        return out.last_hidden_state

    def scores(self, input_ids, attention_mask) -> torch.Tensor:
        """One score per right-padded sequence, read at its last real token. Returns (B,) float32.

        Through the causal LM's own forward (`last_hidden_states`), not its decoder's: sharded (FSDP2), the LM is
        the unit that holds the embeddings, gathered only around that forward (`models.sharding.shard`)."""
        hidden = last_hidden_states(self.policy, {"input_ids": input_ids, "attention_mask": attention_mask})
        last = attention_mask.long().sum(-1) - 1  # (B,)
        h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
        return self.head(h.float()).squeeze(-1)

    def forward(self, input_ids, attention_mask=None, position_ids=None, keep=None, with_logits=False):
        """Values at the positions `keep` (B, T) bool, or everywhere, and the hidden states they were read from:
        ((N,) or (B, T), (N, H) or (B, T, H)); with `with_logits`, also the output layer's logits (N, V) at the
        `keep` positions, from the same forward (third).

        One backbone pass serves the value head and the policy: PPO turns the same hidden states into
        log-probabilities with `models.logprobs.head_logps`, which runs the language model's own output layer and
        logit post-processing (Gemma 2/3 `final_logit_softcapping`, Cohere `logit_scale`, Granite
        `logits_scaling`), as generation and the reference do, so PPO scores the distribution it samples from. An
        FSDP2-sharded policy gathers its output layer only inside its own forward (`models.sharding`), so PPO asks
        for the logits here instead (`with_logits`): the model's own logits still, all N rows at once."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        inputs = {k: v for k, v in inputs.items() if v is not None}
        logits = None
        if with_logits:
            hidden, logits = hidden_and_logits(self.policy, inputs, keep)  # (B, T, H), (N, V)
        else:
            hidden = last_hidden_states(self.policy, inputs)  # (B, T, H)
        h = hidden[keep] if keep is not None else hidden
        values = self.head(h.float()).squeeze(-1)
        return (values, h, logits) if with_logits else (values, h)


def save_head(model: ScalarHeadModel, out_dir: str | Path, tensors: dict | None = None) -> None:
    """`score_head.safetensors` and `score_head.json`; `tensors`: the head's weights to write instead of its own
    (a sharded head's, gathered)."""
    out = Path(out_dir)
    state = tensors if tensors is not None else model.head.state_dict()
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(out / HEAD_FILE))
    (out / HEAD_INFO).write_text(
        json.dumps({"kind": model.kind, "hidden_size": model.config.hidden_size}) + "\n", encoding="utf-8"
    )


def save_scalar_model(model: ScalarHeadModel, tokenizer, out_dir: str | Path, cfg,
                      state_dict: dict[str, torch.Tensor] | None = None, step: int | None = None) -> None:  # fmt: skip
    """The LM (adapter or full weights, via `save_model`) plus the head. `state_dict`: the whole model's weights
    to write instead of its own (a sharded model's, gathered by `models.sharding.full_state`); `step`: as
    `save_model` records it."""
    policy_state = head_state = None
    if state_dict is not None:
        policy_state = {k.removeprefix("policy."): v for k, v in state_dict.items() if k.startswith("policy.")}
        head_state = {k.removeprefix("head."): v for k, v in state_dict.items() if k.startswith("head.")}
    save_model(model.policy, tokenizer, out_dir, base_model=cfg.model.name, state_dict=policy_state, step=step)
    save_head(model, out_dir, head_state)


def reward_model_problem(path: str | Path) -> str | None:
    """Why `path` (a reward-model run or final/ folder) cannot serve as a reward model, or None if it can.
    Cheap: reads only file names and score_head.json, so it can run before any model loads."""
    p = Path(path)
    if not p.is_dir():
        return f"{p} is not a folder (give the final/ folder, or the run folder, of an algorithm.name=reward run)"
    try:
        folder = _trained_dir(p)
    except ModelNotFoundError as err:
        return str(err)
    if not (folder / HEAD_FILE).is_file():
        return f"{folder} has no {HEAD_FILE}: it is not a reward model (train one with algorithm.name=reward)"
    info = (
        json.loads((folder / HEAD_INFO).read_text(encoding="utf-8")) if (folder / HEAD_INFO).is_file() else {}
    )
    if info.get("kind", "reward") != "reward":
        return f"{folder} holds a {info['kind']} head (a PPO policy's value head), not a reward model"
    return None


def load_scalar_model(path: str | Path, *, device=None) -> tuple[ScalarHeadModel, object]:
    """A saved reward (or value) model, frozen, in eval mode: (model, tokenizer)."""
    folder = _trained_dir(path)
    if not (folder / HEAD_FILE).is_file():
        raise ModelNotFoundError(
            f"{folder} has no {HEAD_FILE}: it is not a reward model (train one with algorithm.name=reward)"
        )
    lm, tokenizer = load_trained(folder, device=device)
    info = (
        json.loads((folder / HEAD_INFO).read_text(encoding="utf-8")) if (folder / HEAD_INFO).is_file() else {}
    )
    model = ScalarHeadModel(lm, kind=info.get("kind", "reward"))
    model.head.load_state_dict(load_file(str(folder / HEAD_FILE)))
    model.requires_grad_(False)
    model.eval()
    return model, tokenizer


class RewardModelScorer:
    """A trained reward model as a reward function: `scorer(prompts, completions, truncated=None) -> list[float]`.

    Each (prompt, completion) is rendered as a user turn and an assistant turn with the model's chat template,
    exactly as the preference pairs were during training, and scored at its last token. A completion flagged
    in `truncated` (cut by the generation limit) is rendered with its assistant turn left open (the prompt
    with the generation prompt, then the completion's text, no end-of-turn token): scoring it as a closed turn
    would tell the reward model that the answer ended there.

    `prepare`, when given, is applied to the loaded model before its first forward (`run.sharding=fsdp2`:
    shard it, `models.sharding.shard`; DeepSpeed ZeRO-3: partition it, `models.sharding.zero3_inference`). A
    sharded model's forward is a collective, so every process must run as many: the number of forwards is
    `ceil(len(completions) / batch_size)` everywhere (none for an empty list), whatever the texts. A sample
    that cannot be scored (its rendering or tokenisation raises, it renders to no tokens, or to more than the
    model's `max_position_embeddings`) gets NaN, which `rewards.compute` counts as that sample's failure and
    replaces by the fallback (why, by sample index, is in `unscored` after each call), and a one-token
    placeholder row takes its place in the batch, its score discarded: one process's odd sample never changes how
    many forwards it runs, where a raised error would have sent `compute_rewards` to score its samples one by one
    while the other processes ran one forward per batch, and the run would hang. A forward that raises on one
    process only (out of memory) cannot be made safe so: a sharded model's failed batch stops the run on that
    process instead (`rewards.compute`, `errors.CollectiveRewardFailed`), and the launcher stops the others.
    """

    def __init__(self, path: str | Path, *, batch_size: int = 8, device=None, prepare=None):
        model, self.tokenizer = load_scalar_model(path, device=device)
        # the longest row the model can place (its position table); None when its config names no limit
        self.max_length = context_length(model.policy.config)
        self.model = prepare(model) if prepare is not None else model
        self.batch_size = batch_size
        self.unscored: dict[int, str] = {}  # the last call's samples that got NaN: index -> why

    def render(self, prompt, completion: str, truncated: bool = False) -> list[int]:
        """The token ids the model scores for one sample (a string prompt is one user turn)."""
        tok = self.tokenizer
        msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if truncated:  # the answer as sampled: the scaffold the rollout took off it (the fallback's space) first
            text = chat_text(tok, msgs, add_generation_prompt=True) + answer_scaffold(tok) + completion
        else:
            text = chat_text(tok, [*msgs, {"role": "assistant", "content": completion}])
        return tok(text, add_special_tokens=False)["input_ids"]

    def _row(self, prompt, completion, truncated: bool) -> list[int] | str:
        """`render`'s ids, or why the sample cannot be scored (class docstring)."""
        try:
            ids = self.render(prompt, completion, truncated)
        except Exception as e:  # noqa: BLE001 - one sample's failure (rewards.compute counts it), not the batch's
            return f"it could not be rendered with the reward model's chat template ({type(e).__name__}: {e})"
        if not ids:
            return "it renders to no tokens"
        if self.max_length is not None and len(ids) > self.max_length:
            return (f"it renders to {len(ids)} tokens, more than the reward model's {self.max_length} positions "
                    "(max_position_embeddings, or what its rope scaling extends it to)")  # fmt: skip
        return list(ids)

    @torch.no_grad()
    def __call__(
        self, prompts: list, completions: list[str], truncated: list[bool] | None = None, **columns
    ) -> list[float]:
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        device = next(self.model.parameters()).device
        cut = list(truncated) if truncated is not None else [False] * len(completions)
        out: list[float] = []
        self.unscored = {}
        for s in range(0, len(completions), self.batch_size):
            end = s + self.batch_size
            rows = [self._row(*sample) for sample in zip(prompts[s:end], completions[s:end], cut[s:end])]
            self.unscored.update({s + i: r for i, r in enumerate(rows) if isinstance(r, str)})
            placed = [r if isinstance(r, list) else [pad] for r in rows]  # a placeholder keeps the forward
            T = max(len(r) for r in placed)
            ids = torch.full((len(placed), T), pad, dtype=torch.long)
            mask = torch.zeros((len(placed), T), dtype=torch.long)
            for i, r in enumerate(placed):
                ids[i, : len(r)] = torch.tensor(r)
                mask[i, : len(r)] = 1
            # each row's score at its last real token (as `ScalarHeadModel.scores` reads it), through the
            # model's own forward: a DeepSpeed engine's forward runs its ZeRO-3 hooks, the root module's included
            last = torch.zeros_like(mask, dtype=torch.bool)  # (B, T), one position per row
            last[torch.arange(len(placed)), mask.sum(-1) - 1] = True
            scores, _ = self.model(ids.to(device), mask.to(device), keep=last.to(device))  # (B,)
            out.extend(x if isinstance(r, list) else math.nan for x, r in zip(scores.tolist(), rows, strict=True))
        return out
