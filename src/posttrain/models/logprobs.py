"""Per-token log-probabilities (and entropy) of chosen positions: the one place every method computes them.

SFT's cross-entropy, DPO's sequence log-probs and its reference, GRPO's and PPO's policy, old and reference
log-probs, the sampler/trainer gap and preference evaluation all call these, so there is one gather:

- `target_positions`: which positions predict a target (the logits at t - 1 predict token t);
- `gather_logps`: log softmax(logits / T)[target] (and the entropy) from the selected logits, in float32;
- `selected_token_logps`: a model forward that projects only those positions onto the vocabulary, then the
  gather, scattered back to (B, T);
- `no_grad_chunks`: any of these over a large batch, a chunk at a time, in eval mode and without gradient
  (old log-probs, references, values).

Everything is computed in float32 whatever the logits' dtype (bf16 has 8 bits of mantissa: a log-softmax over 49k
entries in bf16 is off by ~0.01 nats per token). Letters: B batch, T tokens, V vocabulary, N selected positions.
This module does not reduce over tokens for a loss (the algorithms' `masked_mean`/`aggregate` do).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def target_positions(target_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(target, keep), both (B, T) bool: `target` marks the tokens to score (never column 0: nothing predicts it),
    `keep` the positions whose logits predict them (position t - 1 for token t).

    >>> target, keep = target_positions(torch.tensor([[1, 1, 0, 1]]))
    >>> target.int().tolist(), keep.int().tolist()
    ([[0, 1, 0, 1]], [[1, 0, 1, 0]])
    """
    target = target_mask.bool().clone()
    target[:, 0] = False
    return target, F.pad(target[:, 1:], (0, 1))


def gather_logps(
    logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(logits / temperature)[target] for each row, and (no gradient) the entropy of that distribution.

    logits: (N, V), any float dtype; targets: (N,) ids. Returns ((N,), (N,) or None), float32. A -inf logit (a
    banned token) contributes 0 to the entropy, not NaN.

    Worked example (V = 3, T = 1): logits [0, 0, ln 2] -> p = [1/4, 1/4, 1/2]; target 2 -> log(1/2) = -0.6931;
    entropy = -(2 x 1/4 ln 1/4 + 1/2 ln 1/2) = 1.0397. Logits [0, 0, 0], target 0 -> -ln 3 = -1.0986, entropy ln 3.

    >>> lp, ent = gather_logps(torch.tensor([[0.0, 0.0, 0.6931472], [0.0, 0.0, 0.0]]), torch.tensor([2, 0]),
    ...                        with_entropy=True)
    >>> lp, ent
    (tensor([-0.6931, -1.0986]), tensor([1.0397, 1.0986]))
    """
    logp_all = (logits.float() / temperature).log_softmax(-1)  # (N, V)
    picked = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (N,)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            p = logp_all.exp()
            entropy = -torch.where(p > 0, p * logp_all, torch.zeros_like(p)).sum(-1)  # (N,)
    return picked, entropy


def scatter(values: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """(N,) values into a float32 (B, T) tensor of zeros at the N positions where `where` is True (row-major)."""
    out = torch.zeros(where.shape, dtype=torch.float32, device=values.device)
    out[where] = values.float()
    return out


def selected_logits(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The (N, V) logits at the `keep` positions: what a forward with a boolean `logits_to_keep` returns, or the
    rows of full (B, T, V) logits from a model that ignores it."""
    n = int(keep.sum())
    return logits if logits.dim() == 2 and logits.shape[0] == n else logits[keep]


def selected_token_logps(
    model,
    inputs: dict[str, torch.Tensor],
    target_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(token t | tokens < t) at the positions where `target_mask[:, t]` is 1; 0 elsewhere.

    inputs: the model's keyword inputs (`input_ids`, optional `attention_mask`, `position_ids`), (B, T);
    target_mask: (B, T), marks the tokens to score (response or completion tokens; column 0 is never scored).
    Returns (logps (B, T), entropy (B, T) or None), float32, aligned with `input_ids`.

    Only the positions that predict a target are projected onto the vocabulary (a boolean `logits_to_keep`,
    transformers >= 5): prompt positions need hidden states but no logits, and the (B, T, V) logits are the
    largest activation of a small model. The logits come from the model's own forward, with its own
    post-processing (Gemma's softcapping, Cohere's logit scale). `temperature` divides them first, so that the
    log-probabilities are those of the distribution the rollout sampled from.
    """
    target, keep = target_positions(target_mask)
    logits = selected_logits(model(**inputs, use_cache=False, logits_to_keep=keep).logits, keep)  # (N, V)
    # keep.nonzero() and target.nonzero() list the same rows in the same order (one shift within each row).
    picked, entropy = gather_logps(
        logits, inputs["input_ids"][target], temperature=temperature, with_entropy=with_entropy
    )
    return scatter(picked, target), (scatter(entropy, target) if entropy is not None else None)


def no_grad_chunks(
    fn: Callable[[dict[str, torch.Tensor]], torch.Tensor | tuple[torch.Tensor, ...]],
    model: torch.nn.Module,
    tensors: dict[str, torch.Tensor],
    chunk: int,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """`fn(part)` over `tensors` (each with a leading N dimension) `chunk` rows at a time, with `model` in eval
    mode (no dropout) and no gradient; the parts' outputs concatenated on the CPU. For whole rollouts or datasets
    whose forward does not fit in one go: old log-probs, reference log-probs, values."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outs = []
    try:
        with torch.no_grad():
            for s in range(0, next(iter(tensors.values())).shape[0], chunk):
                out = fn({k: v[s : s + chunk].to(device) for k, v in tensors.items()})
                outs.append(tuple(o.cpu() for o in out) if isinstance(out, tuple) else out.cpu())
    finally:
        model.train(was_training)
    if outs and isinstance(outs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outs))
    return torch.cat(outs)


def chunked_token_logps(
    model, tensors: dict[str, torch.Tensor], target_key: str, chunk: int, *, temperature: float = 1.0
) -> torch.Tensor:
    """`selected_token_logps` of `tensors[target_key]`'s positions (N, T), `chunk` rows per forward, no gradient."""
    inputs = ("input_ids", "attention_mask", "position_ids")

    def one(part):
        return selected_token_logps(
            model, {k: part[k] for k in inputs if k in part}, part[target_key], temperature=temperature
        )[0]

    return no_grad_chunks(one, model, {k: v for k, v in tensors.items() if k in (*inputs, target_key)}, chunk)
