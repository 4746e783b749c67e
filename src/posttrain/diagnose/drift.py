"""The drift probe: how far the model has moved from a base model, on the task and on unrelated text.

- **On the task**: the model's greedy completions of the clean prompts are scored by both models, position by
  position, over the full vocabulary: the token mean of KL(pi || pi_base) = sum_v pi(v) (log pi(v) - log
  pi_base(v)) (the direction `posttrain` logs as the RL KL), of the reverse KL(pi_base || pi), and the share of
  positions where both models' most likely next token agree. Shenfeld et al. 2025 ("RL's Razor") report that
  forgetting tracks the KL between the fine-tuned and the base policy on the new task, and that on-policy RL reaches
  a given task accuracy with less of it than SFT; they write it KL(pi_base || pi), hence both directions here.
- **Forgetting, on unrelated text** (`PROBES`: 20 fixed short general prompts, no arithmetic or extraction): the
  base's own greedy continuation of each (`PROBE_TOKENS` tokens) is scored by both, and the probe reports the
  share of those positions where the model's top-1 next token equals the base's (next-token top-1 agreement,
  teacher-forced on the base's text, so every position counts once and no generation of the model is needed),
  and KL(pi || pi_base) there. 1.0 and 0.0 for the base itself.

Letters: N scored positions, V vocabulary. `token_kl` is pure; the rest runs forwards (`models.logprobs`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from posttrain.data import render_prompt
from posttrain.data.collate import collate
from posttrain.data.render import Rendered
from posttrain.errors import UserError
from posttrain.models.logprobs import selected_logits, target_positions

PROBES = (
    "What is the capital of France?", "Name three colours of the rainbow.", "Write one sentence about the sea.",
    "What do bees make?", "Give me a synonym for 'happy'.", "Which planet is known as the red planet?",
    "How many days are in a week?", "Translate 'thank you' into Spanish.", "What is water made of?",
    "Describe a cat in five words.", "Who wrote 'Romeo and Juliet'?", "What is the opposite of 'cold'?",
    "Suggest a name for a small bakery.", "Why do leaves fall in autumn?", "What is a haiku?",
    "List two fruits that are yellow.", "What does a thermometer measure?", "Say hello in a friendly way.",
    "What is the largest ocean on Earth?", "Finish this sentence: The early bird...",
)  # fmt: skip
PROBE_TOKENS = 16
CHUNK = 4  # rows per forward


def token_kl(logits: torch.Tensor, base_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position, p = softmax(logits), q = softmax(base_logits), over the full vocabulary.

    logits, base_logits: (N, V), any float dtype; returns (N,) float32. Terms where p is 0 count 0 (a -inf logit
    gives no NaN).

    Worked example (V = 2): p = [1/2, 1/2] (logits [0, 0]), q = [1/4, 3/4] (logits [0, ln 3]):
    KL = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3) = 0.1438; KL(p || p) = 0.

    >>> token_kl(torch.tensor([[0.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 1.0986123], [0.0, 0.0]]))
    tensor([0.1438, 0.0000])
    """
    logp = logits.float().log_softmax(-1)  # (N, V)
    logq = base_logits.float().log_softmax(-1)
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)  # (N,)


@dataclass
class Comparison:
    """Token means over the scored positions of two models' next-token distributions."""

    tokens: int
    kl_policy_base: float
    kl_base_policy: float
    top1_agreement: float


@torch.no_grad()
def compare(model, base, tokenizer, prompts: Sequence, completions: Sequence[str]) -> Comparison:
    """Score each completion after its prompt with both models and compare them at every completion token."""
    rendered = []
    for prompt, completion in zip(prompts, completions, strict=True):
        ids = tokenizer(completion, add_special_tokens=False)["input_ids"] if completion else []
        if ids:
            head = render_prompt(tokenizer, {"prompt": prompt})
            rendered.append(Rendered(head + ids, [0] * len(head) + [1] * len(ids)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sums, n = torch.zeros(3, dtype=torch.float64), 0
    was = model.training, base.training
    model.eval()
    base.eval()
    try:
        for s in range(0, len(rendered), CHUNK):
            batch = collate(rendered[s : s + CHUNK], pad_id=pad)
            logits, base_logits = (_target_logits(m, batch) for m in (model, base))  # (N, V) each
            if logits.shape[-1] != base_logits.shape[-1]:
                raise UserError(f"the base model scores {base_logits.shape[-1]} tokens, the model "
                                f"{logits.shape[-1]}: drift needs two models with the same tokenizer")  # fmt: skip
            sums += torch.stack([token_kl(logits, base_logits).sum(), token_kl(base_logits, logits).sum(),
                                 (logits.argmax(-1) == base_logits.argmax(-1)).sum()]).double()  # fmt: skip
            n += logits.shape[0]
    finally:
        model.train(was[0])
        base.train(was[1])
    # no scored token (every completion empty): nothing measured, not a KL of 0 and an agreement of 0
    means = (sums / n).tolist() if n else [math.nan] * 3
    return Comparison(n, *means)


def _target_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(N, V) logits at the positions that predict the masked tokens (only those are projected on the vocabulary)."""
    device = next(model.parameters()).device
    _, keep = target_positions(batch["loss_mask"])
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                use_cache=False, logits_to_keep=keep.to(device))  # fmt: skip
    return selected_logits(out.logits, keep.to(device)).float().cpu()
