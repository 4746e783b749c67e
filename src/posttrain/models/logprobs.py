"""Log-probabilities and entropy from logits: the helpers every algorithm (SFT, DPO, PPO, GRPO) shares.

Pure functions of tensors (no config, no I/O), except `model_token_logps`, which runs a model forward and
shifts. Letters: B batch, T tokens, V vocabulary. Everything is computed in float32 whatever the logits' dtype
(bf16 has 8 bits of mantissa: a log-softmax over 49k entries in bf16 is off by ~0.01 nats per token), one batch
row at a time so the float32 copy is (T, V), never (B, T, V).

This module does not reduce over tokens for a loss (that is the algorithms' `masked_mean`/`aggregate`); it only
produces per-token and per-sequence quantities.
"""

from __future__ import annotations

import torch


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each label under its logits: log softmax(logits)[label].

    logits: (B, T, V), any float dtype; labels: (B, T) integer ids. Returns (B, T) float32.
    A negative label (the -100 "ignore" convention) gives 0 there; mask such positions anyway.

    Computed per row as logits[label] - logsumexp(logits): no (B, T, V) log-softmax is ever materialised.
    """
    ignored = labels < 0
    safe = labels.clamp(min=0).unsqueeze(-1)  # (B, T, 1)
    rows = []
    for row_logits, row_labels in zip(logits, safe):  # (T, V), (T, 1)
        row = row_logits.float()
        rows.append(row.gather(-1, row_labels).squeeze(-1) - row.logsumexp(-1))  # (T,)
    out = torch.stack(rows) if rows else logits.new_zeros(labels.shape, dtype=torch.float32)
    return out.masked_fill(ignored, 0.0)


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of per-token log-probabilities over a mask: log p(sequence) for the masked tokens.

    token_logps: (B, T); mask: (B, T) bool or 0/1. Returns (B,). A fully masked row gives 0. Masked positions are
    excluded with `where`, not multiplied by 0, so a -inf there cannot turn into NaN.
    """
    return torch.where(mask.bool(), token_logps, torch.zeros_like(token_logps)).sum(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax distribution at each position, in nats: H = -sum_v p_v log p_v.

    logits: (B, T, V). Returns (B, T) float32. Uniform logits give log V; -inf logits (banned tokens) contribute 0.
    """
    rows = []
    for row_logits in logits:  # (T, V)
        logp = row_logits.float().log_softmax(-1)
        p = logp.exp()
        # p * logp is 0 * -inf = NaN for a banned token; its true contribution is 0.
        rows.append(-torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1))
    return torch.stack(rows) if rows else logits.new_zeros(logits.shape[:-1], dtype=torch.float32)


def model_token_logps(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """log p(input_ids[:, t+1] | input_ids[:, :t+1]) for every t: the model's log-probability of each next token.

    input_ids, attention_mask, position_ids: (B, T). Returns (B, T-1) float32, aligned with `input_ids[:, 1:]`
    (so a completion mask for it is `mask[:, 1:]`). Gradients flow when the model has trainable parameters.
    """
    out = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    )
    logits = out.logits[:, :-1]  # (B, T-1, V): position t predicts token t+1
    return token_logps(logits, input_ids[:, 1:])


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
    target_mask: (B, T), marks the tokens to score (response or completion tokens; column 0 is never scored,
    nothing predicts it). Returns (logps (B, T), entropy (B, T) or None), float32, aligned with `input_ids`.

    Only the positions that predict a target are projected onto the vocabulary (a boolean `logits_to_keep`,
    transformers >= 5): prompt positions need hidden states but no logits, and the (B, T, V) logits are the
    largest activation of a small model. `temperature` divides the logits first, so that the log-probabilities
    are those of the distribution the rollout sampled from (before top-p truncation).
    """
    import torch.nn.functional as F

    input_ids = inputs["input_ids"]
    target = target_mask.bool().clone()
    target[:, 0] = False
    keep = F.pad(target[:, 1:], (0, 1))  # (B, T): position t - 1 predicts token t
    logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
    n = int(keep.sum())
    # keep.nonzero() and target.nonzero() list the same rows in the same order (one shift within each row).
    selected = logits if logits.dim() == 2 and logits.shape[0] == n else logits[keep]  # (N, V)
    logp_all = (selected.float() / temperature).log_softmax(-1)  # (N, V)
    picked = logp_all.gather(-1, input_ids[target].unsqueeze(-1)).squeeze(-1)  # (N,)
    logps = torch.zeros(target.shape, dtype=torch.float32, device=logits.device)
    logps[target] = picked
    entropy = None
    if with_entropy:
        with torch.no_grad():
            p = logp_all.exp()
            ent = -torch.where(p > 0, p * logp_all, torch.zeros_like(p)).sum(-1)  # (N,)
        entropy = torch.zeros_like(logps)
        entropy[target] = ent
    return logps, entropy
