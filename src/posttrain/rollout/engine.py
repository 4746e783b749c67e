"""Sampling engines: prompts in, `Rollout` out (token ids, completion masks, the sampler's log-probabilities).

One interface (`Engine`): `HFEngine` (transformers `generate` with a KV cache; any machine) implements it here, and
`rollout.vllm_engine.VLLMEngine` (vLLM on a GPU, optional; in the training process, or a separate server's:
`rollout.vllm_server`) behind the same interface; both hand their samples to
`build_rollout`, so masks, truncation and texts mean the same whatever sampled them. The RL batch source (`posttrain.rollout.source`) only sees `Rollout`s, so it does not care which
engine made them.

Letters: N sequences (prompts x samples), P prompt tokens (left-padded), C completion tokens (right-padded).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Protocol

import torch
from tqdm.auto import tqdm

from posttrain.algorithms.base import Rollout
from posttrain.data.render import answer_scaffold, strip_scaffold
from posttrain.models.adapters import merged_for_sampling, unmergeable
from posttrain.models.generation import (
    RowStreams,
    eos_token_ids,
    model_generation_defaults_off,
    plain_generation_config,
    sample_groups,
    sampling_processors,
    weights_in,
)
from posttrain.models.sharding import synced_forward


class Engine(Protocol):
    def generate(
        self,
        model,
        tokenizer,
        prompt_ids: list[list[int]],
        *,
        n: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        stop: list[str],
        seed: int,
        batch_size: int | None = None,
        row_ids: list[int] | None = None,
    ) -> Rollout: ...


def completion_mask(
    ids: torch.Tensor, eos: list[int], stop_ends: list[int | None] | None = None
) -> torch.Tensor:
    """1 on each row's tokens up to and including its first EOS (or the token ending a stop string).

    ids: (N, C). `stop_ends[i]` is the index of the token that completes row i's first stop string, if any.

    >>> completion_mask(torch.tensor([[5, 2, 0, 0], [5, 6, 7, 8]]), [2]).tolist()
    [[1, 1, 0, 0], [1, 1, 1, 1]]
    """
    N, C = ids.shape
    is_eos = (
        torch.isin(ids, torch.tensor(eos, device=ids.device))
        if eos
        else torch.zeros_like(ids, dtype=torch.bool)
    )
    ends = torch.where(is_eos.any(-1), is_eos.int().argmax(-1), torch.full((N,), C - 1, device=ids.device))
    if stop_ends is not None:
        for i, e in enumerate(stop_ends):
            if e is not None and e < int(ends[i]):
                ends[i] = e
    return (torch.arange(C, device=ids.device)[None, :] <= ends[:, None]).long()


def stop_string_ends(tokenizer, rows: list[list[int]], stop: list[str]) -> list[int | None]:
    """For each row of token ids, the index of the token at which the decoded text first contains a stop string."""
    out: list[int | None] = []
    for row in rows:
        end = None
        if stop:
            text = tokenizer.decode(row, skip_special_tokens=False)
            if any(s in text for s in stop):
                # The shortest prefix that contains a stop string, by bisection: containing one is monotone in
                # the prefix length, so O(log C) decodes instead of C.
                lo, hi = 1, len(row)  # the answer k lies in [lo, hi]; row[:hi] contains a stop string
                while lo < hi:
                    mid = (lo + hi) // 2
                    prefix = tokenizer.decode(row[:mid], skip_special_tokens=False)
                    lo, hi = (lo, mid) if any(s in prefix for s in stop) else (mid + 1, hi)
                end = lo - 1
        out.append(end)
    return out


def _cut(text: str, stop: list[str]) -> str:
    ends = [text.find(s) for s in stop if s and s in text]
    return text[: min(ends)] if ends else text


class SampledLogps:
    """A logits processor, placed last, that records log p(sampled token) under the distribution sampled from.

    transformers calls the processors once per generated token with the scores the sampler is about to draw from
    (here: after temperature and top-p), then samples and appends the token. The token is therefore only known
    at the next call (as the last column of `input_ids`) or, for the last one, from the returned sequences
    (`finish`). Between calls this keeps one step's scores (b, V) and their logsumexp (b,): memory O(b x V),
    where `output_logits`/`output_scores` would keep every step, O(b x C x V) (about 10 GB for 32 x 1024 tokens
    of a 152k vocabulary in bf16).
    """

    def __init__(self) -> None:
        self.picked: list[torch.Tensor] = []  # (b,) per generated token, in order
        self._scores: torch.Tensor | None = None  # (b, V) the last step's scores, not yet resolved
        self._lse: torch.Tensor | None = None  # (b,) their logsumexp

    def _resolve(self, tokens: torch.Tensor) -> None:
        if self._scores is not None:
            self.picked.append(self._scores.gather(-1, tokens[:, None])[:, 0] - self._lse)
            self._scores = self._lse = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._resolve(input_ids[:, -1])  # the token sampled from the previous call's scores
        self._scores, self._lse = scores, scores.float().logsumexp(-1)
        return scores  # unchanged: recording only

    def finish(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """(b, c) log-probs of `new_tokens` (b, c), the tokens generate returned after the prompt."""
        c = new_tokens.shape[1]
        if len(self.picked) < c:  # the last token was sampled after the last call
            self._resolve(new_tokens[:, len(self.picked)])
        self._scores = self._lse = None
        # A generate that ran one step past the end (deferred stop checks) drops that token: so do we.
        return torch.stack(self.picked[:c], dim=1)  # generate makes at least one token


class HFEngine:
    """transformers `generate`: sampling with a KV cache.

    The generation settings are built from scratch (`models.generation.model_generation_defaults_off`): only
    `max_new_tokens`, the EOS ids, the pad id, `temperature` and `top_p` come from us, nothing from the model's
    `generation_config.json`, so the samples are drawn from top-p(softmax(logits / temperature)), the
    distribution the losses score (at top_p = 1). The processors `generate` runs are exactly
    [temperature, top-p (when < 1), `SampledLogps`, `RowStreams`], and `sampling_logps` are the log-probs of that
    distribution.

    With `dtype` (`algorithm.rollout.dtype`) the model samples from a copy of its weights in that dtype
    (`models.generation.weights_in`; merged LoRA weights are made in it directly), and `sampling_logps` are that
    copy's log-probs: the losses still score the tokens with the trainer's own weights, so the two differ by the
    precision gap, which the rollout logs (`logp_gap`) and `rollout.tis_cap` can correct.

    A LoRA model samples from a merged copy of its adapted weights, its adapters off (`merge_adapters`, the run's
    `algorithm.rollout.merge_adapters`; `models.adapters.merged_for_sampling`), on CPU by default.
    Each group's prompt is encoded once and the rows that end leave the batch (`models.generation.sample_groups`);
    every row draws from its own random stream (`RowStreams`), so the samples are the same whatever the batch.
    A sharded model (FSDP2, ZeRO-3) instead runs one `generate` per batch with every row to the end, through its
    adapters: each of its
    forwards is a collective that every process must join, and processes whose rows end at different times would
    otherwise run different numbers of forwards.
    """

    name = "hf"

    def __init__(self, *, merge_adapters: bool | None = None, dtype: torch.dtype | None = None) -> None:
        self.merge_adapters = merge_adapters  # `algorithm.rollout.merge_adapters`; None: on CPU only
        self.dtype = dtype  # `algorithm.rollout.dtype`: sample from a copy of the weights in it; None: as they are
        self.said_unmerged = False  # whether the note that true could not be honoured was printed

    def generate(
        self,
        model,
        tokenizer,
        prompt_ids: list[list[int]],
        *,
        n: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        stop: list[str],
        seed: int,
        batch_size: int | None = None,
        row_ids: list[int] | None = None,
    ) -> Rollout:
        # `row_ids`: each of the len(prompt_ids) * n rows' stream number (`RowStreams`): its place in the whole
        # rollout, whatever share of it this process samples; None: its place here.
        # transformers is imported where it is used, like everywhere in posttrain: huggingface_hub reads
        # HF_HUB_OFFLINE once, at import, and posttrain settles it first (`models.hub`).
        from transformers import LogitsProcessorList

        eos = eos_token_ids(model, tokenizer)  # before the model's generation config is hidden below
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
        # n contiguous samples per prompt: the group layout GRPO's advantages expect.
        rows = [list(p) for p in prompt_ids for _ in range(n)]
        device = next(model.parameters()).device
        prompt, pmask = left_pad(rows, pad_id)
        P = prompt.shape[1]
        # Greedy: `RowStreams` leaves its draw the only finite score, so the argmax is that draw; `generate`'s own
        # sampling would redraw it at the cost of a softmax and a multinomial over the vocabulary per row and step.
        gen_cfg = plain_generation_config(max_new_tokens=max_new_tokens, sample=False, eos=eos, pad_id=pad_id)
        streams = RowStreams(seed, len(rows), row_ids)

        def processors(first: int, alive: list[int]):
            """The processors of one `generate` call over rows `first + alive[j]`, and the recorder's finish."""
            recorder = SampledLogps()
            streams.rows = [first + j for j in alive]
            chain = LogitsProcessorList([*sampling_processors(temperature, top_p), recorder, streams])
            return {"logits_processor": chain}, recorder.finish

        new_ids: list[list[int]] = []
        new_logps: list[list[float]] = []
        was_training = model.training
        model.eval()  # no dropout while sampling
        try:
            with (
                torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
                torch.no_grad(),
                model_generation_defaults_off(model),
                contextlib.ExitStack() as stack,
            ):
                torch.manual_seed(seed)  # leaves the training RNG untouched
                if synced_forward(model):
                    # the config refuses `rollout.dtype` for a sharded model (`RLSection.rules`)
                    assert self.dtype is None, "algorithm.rollout.dtype with a sharded model"
                    step = batch_size or len(rows)
                    for s in range(0, len(rows), step):
                        kwargs, finish = processors(s, list(range(min(step, len(rows) - s))))
                        out = model.generate(input_ids=prompt[s : s + step].to(device),
                                             attention_mask=pmask[s : s + step].to(device),
                                             generation_config=gen_cfg, synced_gpus=True, **kwargs)  # fmt: skip
                        new = out[:, P:]  # (b, c)
                        new_ids += new.tolist()
                        new_logps += finish(new).tolist()
                else:
                    per_call = max(1, (batch_size or len(rows)) // n)  # whole groups per call
                    merge = device.type == "cpu" if self.merge_adapters is None else self.merge_adapters
                    merging = merged_for_sampling(model, self.dtype) if merge else contextlib.nullcontext()
                    merged = stack.enter_context(merging)  # LoRA: sampled from W + delta, the adapters off
                    stack.enter_context(weights_in(model, self.dtype))  # the rest of the weights in that dtype
                    if self.merge_adapters and not merged and not self.said_unmerged:  # asked for, not possible
                        self.said_unmerged = True
                        tqdm.write(f"note: algorithm.rollout.merge_adapters=true, but the policy's adapters cannot "
                                   f"be merged for sampling ({unmergeable(model)}): it samples unmerged",
                                   file=sys.stderr)  # under the training progress bar  # fmt: skip
                    for g in range(0, len(prompt_ids), per_call):
                        ids, logps = sample_groups(model, [list(p) for p in prompt_ids[g : g + per_call]], n, gen_cfg,
                                                   eos, pad_id, lambda alive, first=g * n: processors(first, alive))  # fmt: skip
                        new_ids += ids
                        new_logps += logps
        finally:
            model.train(was_training)
        C = max(len(r) for r in new_ids)
        ids = torch.full((len(rows), C), pad_id, dtype=torch.long)
        sampled = torch.zeros((len(rows), C), dtype=torch.float32)
        for i, (r, lp) in enumerate(zip(new_ids, new_logps, strict=True)):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            sampled[i, : len(lp)] = torch.tensor(lp, dtype=torch.float32)
        return build_rollout(tokenizer, prompt, pmask, ids, sampled, eos=eos, stop=stop)


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, P) prompt ids left-padded with `pad_id`, and their attention mask: every prompt ends in the last column."""
    P = max(len(r) for r in rows)
    prompt = torch.full((len(rows), P), pad_id, dtype=torch.long)
    pmask = torch.zeros((len(rows), P), dtype=torch.long)
    for i, r in enumerate(rows):
        prompt[i, P - len(r) :] = torch.tensor(r, dtype=torch.long)
        pmask[i, P - len(r) :] = 1
    return prompt, pmask


def build_rollout(tokenizer, prompt, pmask, ids, sampled, *, eos: list[int], stop: list[str]) -> Rollout:
    """A `Rollout` from sampled ids (N, C) (right-padded) and their sampler log-probs (N, C), whatever the engine:
    completion masks (first EOS or stop string), truncation flags and the texts the rewards see."""
    stop_ends = stop_string_ends(tokenizer, ids.tolist(), stop) if stop else None
    mask = completion_mask(ids, eos, stop_ends)
    is_eos = torch.isin(ids, torch.tensor(eos)) if eos else torch.zeros_like(ids, dtype=torch.bool)
    ended = (is_eos & mask.bool()).any(-1)
    if stop_ends is not None:
        ended |= torch.tensor([e is not None for e in stop_ends])
    scaffold = answer_scaffold(tokenizer)  # the rewards see the answer, not the template's wrapping of it
    texts = [
        strip_scaffold(_cut(tokenizer.decode(row[: int(m.sum())], skip_special_tokens=True), stop), scaffold)
        for row, m in zip(ids.tolist(), mask)
    ]
    return Rollout(
        prompt_ids=prompt,
        prompt_mask=pmask,
        completion_ids=ids,
        completion_mask=mask,
        # where, not *: the pad a finished row is given may lie outside the top-p set (log-prob -inf)
        sampling_logps=torch.where(mask.bool(), sampled, torch.zeros_like(sampled)),
        texts=texts,
        truncated=~ended,
    )
