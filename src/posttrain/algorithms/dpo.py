"""Direct preference optimisation and its relatives: per-pair losses on sequence log-probabilities.

DPO (Rafailov et al. 2023) reads a policy as an implicit reward model, r(x, y) = beta * log(pi(y|x) /
pi_ref(y|x)) (sec. 5), and fits it with the Bradley-Terry likelihood of the preference pairs (eq. 7). Every
loss here is a function of the reference-normalised log-ratio margin of a pair (chosen w, rejected l)

    h = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))

selected from `LOSSES` by name:

    sigmoid  -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)
             DPO, Rafailov et al. 2023, eq. 7 (eps = 0); with eps > 0 the labels are taken to be flipped with
             probability eps: conservative DPO, Mitchell 2023 ("A note on DPO with noisy preferences").
    ipo      (h - 1/(2 beta))^2
             IPO, Azar et al. 2023 ("A General Theoretical Paradigm to Understand Learning from Human
             Preferences", sec. 5): regresses h to a finite target instead of pushing it to infinity.
    hinge    max(0, 1 - beta h)
             the hinge calibration loss of SLiC, Zhao et al. 2023 (SLiC-HF), on the DPO margin.

`simpo_loss` is the reference-free variant of Meng et al. 2024 (SimPO, eq. 6): the reward is the
length-normalised log-probability and a target margin gamma replaces the reference model.

Log-probabilities are per completion: the sum over its tokens, shape (B,). Losses come back per pair,
unreduced (a loss function sums them; the loop divides by the pairs of the whole step). This section is the
math only: no model, data or I/O.

Letters: B batch (pairs).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field

from posttrain.algorithms.base import Algorithm, Mean
from posttrain.algorithms.common import masked_sum
from posttrain.algorithms.reward import pair_accuracy
from posttrain.config import AlgorithmSection
from posttrain.config_rules import When, is_, is_not
from posttrain.data.collate import GROUP_KEY
from posttrain.data.preference import prepare_pairs
from posttrain.models.logprobs import selected_token_logps


class Config(AlgorithmSection):
    """`algorithm: {name: dpo, ...}`: the DPO family on preference pairs (docs/preference.md)."""

    name: Literal["dpo"] = "dpo"
    """Direct preference optimisation and its relatives (IPO, hinge, SimPO)."""
    data_kind: ClassVar[str] = "preference"
    beta: float = Field(0.1, gt=0)
    """Strength of the KL anchor to the reference: implicit reward = beta * (log pi - log pi_ref)."""
    loss_type: Literal["sigmoid", "ipo", "hinge", "simpo"] = "sigmoid"
    """`sigmoid` (DPO), `ipo`, `hinge` (SLiC), or `simpo` (reference-free: no reference model at all)."""
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    """Conservative DPO: the assumed share of flipped labels (sigmoid loss only)."""
    ipo_logps: Literal["mean", "sum"] = "mean"
    """How IPO (loss_type=ipo) reduces each response's token log-probabilities before the loss: `mean`
    (length-averaged, the form the IPO authors' results rest on, so beta values from the IPO literature carry
    over) or `sum` (the sequence log-probability: the target 1/(2 beta) is then spread over the whole answer and
    the loss grows with length squared). See docs/preference.md."""
    simpo_gamma: float = Field(0.5, ge=0.0)
    """SimPO target reward margin gamma (loss_type=simpo)."""
    reference: Literal["auto", "adapter", "precompute", "copy"] = "auto"
    """How the frozen reference is held. `adapter`: the base with the LoRA adapter disabled (lora/qlora, no
    extra memory); `precompute`: reference log-probs computed in one pass before training and cached in the
    run folder (one model in memory); `copy`: a second frozen model. `auto`: adapter under lora/qlora, else
    precompute."""

    run_fields: ClassVar[frozenset[str]] = frozenset({"data.eval", "data.share_prompt"})
    rules: ClassVar[dict[str, When]] = {
        "label_smoothing": is_("algorithm.loss_type", "sigmoid"),
        "ipo_logps": is_("algorithm.loss_type", "ipo"),
        "simpo_gamma": is_("algorithm.loss_type", "simpo"),
        "reference": is_not("algorithm.loss_type", "simpo").because(
            "SimPO is reference-free: no reference model is used at all."
        ),
    }

    def check(self, run) -> None:
        if self.reference == "adapter" and run.technique.name == "full":
            raise ValueError(
                "algorithm.reference=adapter needs technique lora or qlora (full fine-tuning has no adapter to "
                "disable); use precompute or copy"
            )


class DPOOutput(NamedTuple):
    """Per-pair results, all (B,). Rewards are detached: they are diagnostics, not part of the graph."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def _sigmoid(h: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    # Rafailov et al. 2023 eq. 7, mixed with the flipped-label term (Mitchell 2023) when label_smoothing > 0.
    return -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def _ipo(h: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    # Azar et al. 2023: beta is the regularisation strength tau; the optimum margin is h = 1 / (2 tau).
    return (h - 1.0 / (2.0 * beta)).square()


def _hinge(h: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    # Zhao et al. 2023 (SLiC-HF): zero loss once the scaled margin exceeds 1, so confident pairs stop pulling.
    return F.relu(1.0 - beta * h)


LOSSES: dict[str, Callable[[torch.Tensor, float, float], torch.Tensor]] = {
    "sigmoid": _sigmoid,
    "ipo": _ipo,
    "hinge": _hinge,
}


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> DPOOutput:
    """Per-pair DPO-family loss and the implicit rewards beta * (policy_logps - ref_logps).

    All inputs (B,): summed log-probabilities of the chosen / rejected completions under the policy and the
    frozen reference. `label_smoothing` (the assumed label-flip rate, in [0, 0.5]) applies to "sigmoid" only.

    Worked example (beta = 0.1): policy == reference gives h = 0, so the sigmoid loss is -log sigma(0) = log 2
    and both rewards are 0. With policy chosen +1 and rejected -1 relative to the reference, h = 2 and the
    loss is -log sigma(0.2) = 0.5981, rewards 0.1 and -0.1.

    >>> out = dpo_loss(torch.tensor([-4.0]), torch.tensor([-6.0]), torch.tensor([-5.0]), torch.tensor([-5.0]))
    >>> out.losses, out.chosen_rewards, out.rejected_rewards
    (tensor([0.5981]), tensor([0.1000]), tensor([-0.1000]))
    """
    if loss_type not in LOSSES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; choose one of {sorted(LOSSES)}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing is a label-flip rate in [0, 0.5], got {label_smoothing}")
    if label_smoothing and loss_type != "sigmoid":
        # Silently ignoring it would run a different experiment than the one configured.
        raise ValueError(f"label_smoothing applies to loss_type 'sigmoid' only, not {loss_type!r}")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (B,)
    h = chosen_logratios - rejected_logratios  # (B,)
    losses = LOSSES[loss_type](h, beta, label_smoothing)
    return DPOOutput(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
) -> DPOOutput:
    """SimPO (Meng et al. 2024, eq. 6): reference-free, length-normalised rewards with a target margin.

    reward r(y) = beta * log pi(y|x) / |y| (the mean log-probability per token, scaled);
    loss = -log sigma(r(y_w) - r(y_l) - gamma).

    `gamma` is the target reward margin itself, as in eq. 6, *not* the gamma/beta ratio that the later paper
    versions and the authors' code tune (their `gamma_beta_ratio`); to reproduce a ratio rho, pass
    gamma = rho * beta. Inputs (B,): summed completion log-probabilities and completion token counts
    (clamped to >= 1, so an empty completion gives a finite reward).

    Worked example (beta = 2, gamma = 0.5): chosen -4 over 4 tokens -> r_w = 2 * -1 = -2; rejected -6 over
    3 tokens -> r_l = 2 * -2 = -4; loss = -log sigma(-2 + 4 - 0.5) = -log sigma(1.5) = 0.2014.

    >>> out = simpo_loss(torch.tensor([-4.0]), torch.tensor([-6.0]), torch.tensor([4]), torch.tensor([3]))
    >>> out.losses, out.chosen_rewards, out.rejected_rewards
    (tensor([0.2014]), tensor([-2.]), tensor([-4.]))
    """
    chosen_rewards = beta * policy_chosen_logps / chosen_lengths.clamp(min=1)  # (B,)
    rejected_rewards = beta * policy_rejected_logps / rejected_lengths.clamp(min=1)  # (B,)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return DPOOutput(losses, chosen_rewards.detach(), rejected_rewards.detach())


# ---------------------------------------------------------------------------------------------------------------
# On the shared loop: pairs (`data.preference.prepare_pairs`) -> one concatenated forward (B chosen rows, then B
# rejected rows; under `data.share_prompt`, B rows [prompt, chosen, rejected], each prompt encoded once:
# `models.prefix_sharing`) -> dpo_loss. The reference (`models.reference`) is held one of three ways
# (`algorithm.reference`): the base with the adapter disabled (LoRA/QLoRA: no second model), log-probs
# precomputed in one pass and cached in the run folder (one model in memory), or a frozen copy; the batch source
# adds its log-probs to every batch (`ref_logps`; its forwards share the prompts too). `simpo` needs no reference
# at all.


def reference_mode(cfg) -> str:
    """How this run holds its reference (`models.reference.MODES`)."""
    d = cfg.algorithm
    if d.loss_type == "simpo":
        return "none"
    if d.reference != "auto":
        return d.reference
    return "adapter" if cfg.technique.name in ("lora", "qlora") else "precompute"


def prepare(cfg, tokenizer):
    """The run's pairs, in batches that say which rows share a prompt under `data.share_prompt`."""
    data = prepare_pairs(cfg, tokenizer, share_prompt=cfg.data.share_prompt)
    if with_margin := sum(1 for p in data.train if p.margin):  # said, as a reward-model run says it
        data.notes.append(f"{cfg.data.train}: {with_margin} pairs have a `margin`, which DPO does not read (a reward "
                          "model does, with algorithm.margin=true)")  # fmt: skip
    return data


def _pair_inputs(batch):
    return {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}


def loss_units(batch, cfg=None) -> int:
    """Pairs: every pair weighs the same, whatever its length."""
    return batch["input_ids"].shape[0] // 2


def loss_fn(model, batch, cfg) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    d = cfg.algorithm
    B = loss_units(batch)
    mask = batch["loss_mask"]
    ref = batch["ref_logps"] if reference_mode(cfg) != "none" else None  # (2B, T), from the batch source
    # (2B, T), one forward for both sides; each pair in one row, its prompt once, when the batch says so
    logps, _ = selected_token_logps(model, _pair_inputs(batch), mask, groups=batch.get(GROUP_KEY))
    seq = logps.sum(-1)  # (2B,)
    target = mask.bool().clone()
    target[:, 0] = False  # the scored response tokens (nothing predicts column 0)
    lengths = target.sum(-1).float()  # (2B,)
    metrics: dict[str, torch.Tensor] = {}
    if ref is None:
        out = simpo_loss(seq[:B], seq[B:], lengths[:B], lengths[B:], beta=d.beta, gamma=d.simpo_gamma)
    else:
        pol_seq, ref_seq = seq, ref.sum(-1)
        if d.loss_type == "ipo" and d.ipo_logps == "mean":
            # IPO on length-averaged log-probabilities: the IPO authors' own results use the per-token average,
            # which keeps the target 1/(2 beta) independent of the answer's length (Hugging Face, "Preference
            # Tuning LLMs with Direct Preference Optimization Methods", 2024, after consulting the IPO authors).
            # The pure dpo_loss still takes per-sequence values; only what is passed in changes.
            pol_seq, ref_seq = seq / lengths.clamp(min=1), ref_seq / lengths.clamp(min=1)
        out = dpo_loss(
            pol_seq[:B], pol_seq[B:], ref_seq[:B], ref_seq[B:],
            beta=d.beta, loss_type=d.loss_type, label_smoothing=d.label_smoothing,
        )  # fmt: skip
        # How far the policy moved from the reference on the pairs' tokens: the mean |log pi - log pi_ref| per
        # response token (0 at the start). Not a KL estimate: the tokens come from the data, not from the policy,
        # and k3 = exp(ref - pol) - (ref - pol) - 1 on them grows exponentially on every token DPO pushes down
        # (the embedded recipe's rejected tokens reached 4e6 per token by step 12, a number nobody can read).
        drift = (logps.detach() - ref).abs()
        metrics["abs_logratio_per_token"] = Mean(masked_sum(drift, target), target.sum())  # a token mean
    margin = out.chosen_rewards - out.rejected_rewards
    metrics.update(
        # ties count 1/2 (chance), so the first step, where every implicit reward is exactly 0, reads 0.5
        reward_accuracy=pair_accuracy(out.chosen_rewards, out.rejected_rewards).sum(),
        reward_margin=margin.sum(),
        chosen_reward=out.chosen_rewards.sum(),
        rejected_reward=out.rejected_rewards.sum(),
        chosen_logps=seq[:B].detach().sum(),
        rejected_logps=seq[B:].detach().sum(),
    )
    return out.losses.sum(), metrics


ALGORITHM = Algorithm(
    name="dpo", config=Config, prepare=prepare, loss_fn=loss_fn, loss_units=loss_units, reference=reference_mode,
    key_metric="reward_accuracy",
)  # fmt: skip
