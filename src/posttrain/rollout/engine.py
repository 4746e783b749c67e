"""Sampling engines: prompts in, `Rollout` out (token ids, completion masks, the sampler's log-probabilities).

One interface (`Engine`): `HFEngine` (transformers `generate` with a KV cache; any machine) implements it. A vLLM
engine for GPU machines (optional, imported only when chosen) is meant to sit behind the same interface; it is
not implemented yet (`VLLMEngine` only explains that, and the config refuses `rollout.engine=vllm` before any
model loads). The RL batch source (`posttrain.rollout.source`) only sees `Rollout`s, so it does not care which
engine made them.

Letters: N sequences (prompts x samples), P prompt tokens (left-padded), C completion tokens (right-padded).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class Rollout:
    """N sampled completions, `n` contiguous ones per prompt (prompt 0's samples first)."""

    prompt_ids: torch.Tensor  # (N, P) left-padded
    prompt_mask: torch.Tensor  # (N, P) 1 on real prompt tokens
    completion_ids: torch.Tensor  # (N, C) right-padded
    completion_mask: torch.Tensor  # (N, C) 1 up to and including the EOS token or the end of a stop string
    sampling_logps: (
        torch.Tensor
    )  # (N, C) log-prob of each sampled token under the sampler (temperature-scaled)
    texts: list[str]  # decoded completions (no special tokens, cut before a stop string)
    truncated: torch.Tensor  # (N,) bool: hit max_new_tokens without an EOS or a stop string

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)


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


class HFEngine:
    """transformers `generate`: sampling with a KV cache, left-padded prompt batches."""

    name = "hf"

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
    ) -> Rollout:
        from transformers import GenerationConfig

        from posttrain.models.generation import eos_token_ids

        eos = eos_token_ids(model, tokenizer)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
        # n contiguous samples per prompt: the group layout GRPO's advantages expect.
        rows = [list(p) for p in prompt_ids for _ in range(n)]
        device = next(model.parameters()).device
        P = max(len(r) for r in rows)
        prompt = torch.full((len(rows), P), pad_id, dtype=torch.long)
        pmask = torch.zeros((len(rows), P), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding: every prompt ends in the last column
            prompt[i, P - len(r) :] = torch.tensor(r, dtype=torch.long)
            pmask[i, P - len(r) :] = 1
        # Every field left None is filled from the model's own generation_config.json (transformers >= 4.5x),
        # and some ship sampling defaults (e.g. Qwen2.5-Instruct's repetition_penalty 1.05, top_k 20). Any such
        # processor would sample from something other than softmax(logits / temperature) (top-p truncated), the
        # distribution the RL losses score, so each one that changes the distribution is pinned to neutral here.
        gen_cfg = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            top_k=0,
            min_p=0.0,
            typical_p=1.0,
            epsilon_cutoff=0.0,
            eta_cutoff=0.0,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            min_new_tokens=0,
            eos_token_id=eos or None,
            pad_token_id=pad_id,
            use_cache=True,
            return_dict_in_generate=True,
            output_logits=True,
        )
        step = batch_size or len(rows)
        completions: list[torch.Tensor] = []
        logps: list[torch.Tensor] = []
        was_training = model.training
        model.eval()  # no dropout while sampling
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
                torch.manual_seed(seed)  # repeatable rollouts that leave the training RNG untouched
                for s in range(0, len(rows), step):
                    out = model.generate(
                        input_ids=prompt[s : s + step].to(device),
                        attention_mask=pmask[s : s + step].to(device),
                        generation_config=gen_cfg,
                    )
                    new = out.sequences[:, P:]  # (b, c)
                    # output_logits: the raw logits of every step, (b, V) each; the sampler drew from
                    # softmax(logits / temperature) (then top-p truncated).
                    # One step at a time: a stacked float32 (b, c, V) copy would cost b * c * V * 4 bytes
                    # (about 20 GB for 32 x 1024 tokens of a 150k vocabulary).
                    lp = torch.stack(
                        [
                            (step_logits.float() / temperature)
                            .log_softmax(-1)
                            .gather(-1, new[:, t : t + 1])[:, 0]
                            for t, step_logits in enumerate(out.logits)
                        ],
                        dim=1,
                    )  # (b, c)
                    completions.append(new.cpu())
                    logps.append(lp.cpu())
        finally:
            model.train(was_training)
        C = max(c.shape[1] for c in completions)
        ids = torch.full((len(rows), C), pad_id, dtype=torch.long)
        sampled = torch.zeros((len(rows), C), dtype=torch.float32)
        r0 = 0
        for c, lp in zip(completions, logps):
            ids[r0 : r0 + c.shape[0], : c.shape[1]] = c
            sampled[r0 : r0 + c.shape[0], : c.shape[1]] = lp
            r0 += c.shape[0]
        stop_ends = stop_string_ends(tokenizer, ids.tolist(), stop) if stop else None
        mask = completion_mask(ids, eos, stop_ends)
        is_eos = torch.isin(ids, torch.tensor(eos)) if eos else torch.zeros_like(ids, dtype=torch.bool)
        ended = (is_eos & mask.bool()).any(-1)
        if stop_ends is not None:
            ended |= torch.tensor([e is not None for e in stop_ends])
        texts = [
            _cut(tokenizer.decode(row[: int(m.sum())], skip_special_tokens=True), stop)
            for row, m in zip(ids.tolist(), mask)
        ]
        return Rollout(
            prompt_ids=prompt,
            prompt_mask=pmask,
            completion_ids=ids,
            completion_mask=mask,
            sampling_logps=sampled * mask,
            texts=texts,
            truncated=~ended,
        )


class VLLMEngine:
    """vLLM sampling for GPU machines (`pip install vllm`); the policy's weights are pushed to vLLM each rollout.

    Not available on CPU machines; chosen with `algorithm.rollout.engine=vllm`.
    """

    name = "vllm"

    def __init__(self) -> None:
        try:
            import vllm  # noqa: F401
        except ImportError:
            from posttrain.errors import ConfigError

            raise ConfigError(
                "algorithm.rollout.engine=vllm needs the vllm package (a CUDA machine: pip install vllm); "
                "use algorithm.rollout.engine=hf on this machine"
            ) from None

    def generate(self, model, tokenizer, prompt_ids, **kwargs) -> Rollout:  # pragma: no cover - needs a GPU
        raise NotImplementedError(
            "the vLLM engine is not implemented yet: posttrain has been tested with the hf engine only"
        )


ENGINES = {"hf": HFEngine, "vllm": VLLMEngine}


def get_engine(name: str) -> Engine:
    return ENGINES[name]()
