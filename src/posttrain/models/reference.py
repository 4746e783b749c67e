"""The frozen reference policy: its per-token log-probabilities, one implementation for DPO and RL alike.

A preference or RL loss compares the policy with the model it started from. `Reference.logps` gives that model's
log-probabilities of chosen positions of a batch, however it is held (`MODES`):

    adapter     the policy itself with its LoRA adapter disabled: the base, exactly, at no memory cost
    copy        a frozen second model, held as training holds the policy's weights (float32 under bf16 mixed
                precision), so its forward equals the untrained policy's exactly
    precompute  computed once, before training, by the policy that has not trained yet (it *is* the
                reference then), and cached in the run folder: no second model and no reference forward after
                step 0. Rows are looked up by their content (the real tokens and the scored positions), so the
                cache does not depend on how rows are batched, shuffled or split over processes
    none        the loss needs no reference (SFT, SimPO, GRPO at beta 0 without logged KL)

Every reference forward runs in eval mode (no dropout) without gradient, under whatever autocast the caller is
in (the run's). This module does not decide which mode a method uses (its `Algorithm.reference` does).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import torch

from posttrain.errors import UserError
from posttrain.files import write_whole
from posttrain.models.adapters import is_adapter_model
from posttrain.models.loading import load_model
from posttrain.models.logprobs import chunked_token_logps, target_positions

MODES = ("none", "adapter", "copy", "precompute")
CACHE_FILE = "reference_logps.pt"
_CACHE_VERSION = 3


def row_keys(batch: dict[str, torch.Tensor], target_key: str) -> list[str]:
    """A content key per row: its real tokens (the attention mask's) and which of them are scored. Two rows with
    equal keys have equal reference log-probs, whatever batch they come in."""
    mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
    target, _ = target_positions(batch[target_key])
    keys = []
    for ids, real, scored in zip(batch["input_ids"].cpu(), mask.cpu(), target.cpu()):
        h = hashlib.sha256(ids[real].numpy().astype("int64").tobytes())
        h.update(scored[real].numpy().tobytes())
        keys.append(h.hexdigest())
    return keys


class Reference:
    """The reference log-probs of a run (module docstring). Build it with `Reference.build`."""

    def __init__(self, mode: str, model: torch.nn.Module | None = None, table: dict[str, torch.Tensor] | None = None):
        if mode not in MODES:
            raise ValueError(f"unknown reference mode {mode!r}; choose one of {MODES}")
        self.mode, self.model, self.table = mode, model, table

    @classmethod
    def build(cls, mode: str, policy: torch.nn.Module, *, model_cfg, technique, device) -> Reference:
        """`policy`: the trained causal LM (for `adapter`, and for `precompute`, which fills its table with
        `precompute` before training). `copy` loads the frozen second model here."""
        if mode == "adapter" and not is_adapter_model(policy):
            raise UserError("the reference is the adapter disabled, but the model has no adapter (technique full)")
        if mode == "copy":
            return cls(mode, load_model(model_cfg, technique, device=device, train=False, as_trained=True))
        return cls(mode, policy if mode in ("adapter", "precompute") else None)

    @property
    def needed(self) -> bool:
        return self.mode != "none"

    def logps(self, batch: dict[str, torch.Tensor], target_key: str, *, chunk: int, temperature: float = 1.0
              ) -> torch.Tensor:  # fmt: skip
        """The reference's log-probs (B, T) of the positions `batch[target_key]` marks (0 elsewhere), float32 on
        the CPU; `chunk` rows per forward."""
        if self.mode == "none":
            raise RuntimeError("this run has no reference")
        if self.mode == "precompute":
            return self._lookup(batch, target_key)
        if self.mode == "adapter":
            with self.model.disable_adapter():
                return chunked_token_logps(self.model, batch, target_key, chunk, temperature=temperature)
        return chunked_token_logps(self.model, batch, target_key, chunk, temperature=temperature)

    # ---- precompute
    def precompute(self, batches: Iterable[dict[str, torch.Tensor]], target_key: str, *, chunk: int,
                   run_dir: Path, model_name: str, resuming: bool, save: bool, numerics: str = "") -> None:  # fmt: skip
        """Fill the table from `batches` (every row the run will score: training and held-out), by the policy
        before it has trained; a resumed run reuses the run folder's cache, which must hold every row (its policy
        has trained since; the resume's own checks have refused other data and other weights). A run that starts
        at step 1 computes it again, whatever the folder holds: one restarted before its first checkpoint reused
        the cache of weights that had since changed (a loss of 0.7034 at step 1, where policy = reference gives
        log 2), matched by the model's name alone. `save`: write the cache (the main process). `numerics`: the dtype
        and device the log-probs are computed in, kept with them; a resume that computes otherwise (`model.dtype:
        auto` is bfloat16 on a GPU, float32 on a CPU) is refused rather than mixing float32 reference log-probs into
        a bf16 policy's loss, unsaid (an audit)."""
        path = Path(run_dir) / CACHE_FILE
        batches = list(batches)
        wanted = {k for b in batches for k in row_keys(b, target_key)}
        cached = torch.load(path, weights_only=True) if resuming and path.is_file() else None
        made = cached.get("numerics") if cached else None
        if made and numerics and made != numerics:  # (a cache written before they were kept says nothing)
            raise UserError(
                f"{path}: this run's reference log-probs were computed in {made}, and this resume computes in "
                f"{numerics}: its loss would compare a policy in one with a reference in the other. Resume where "
                "the run started, or set model.dtype to what it computed in"
            )
        if cached and cached.get("version") == _CACHE_VERSION and cached.get("model") == model_name \
                and wanted <= set(cached["rows"]):  # fmt: skip
            self.table = cached["rows"]
            return
        if resuming:
            raise UserError(
                f"{path}: the reference log-probs this run was started with are missing or incomplete, and a resumed "
                "run's policy has trained since, so they cannot be computed again; restore the file or start a new "
                "run folder"
            )
        self.table = {}
        for b in batches:
            logps = chunked_token_logps(self.model, b, target_key, chunk)
            target, _ = target_positions(b[target_key])
            for key, row, scored in zip(row_keys(b, target_key), logps, target.cpu()):
                self.table[key] = row[scored].clone()
        if save:
            write_whole(path, lambda tmp: torch.save({"version": _CACHE_VERSION, "model": model_name,
                                                      "numerics": numerics, "rows": self.table}, tmp))  # fmt: skip

    def _lookup(self, batch: dict[str, torch.Tensor], target_key: str) -> torch.Tensor:
        target, _ = target_positions(batch[target_key])
        out = torch.zeros(target.shape, dtype=torch.float32)
        for r, key in enumerate(row_keys(batch, target_key)):
            if key not in self.table:
                raise RuntimeError("a row without precomputed reference log-probs: precompute saw other data")
            out[r, target[r].cpu()] = self.table[key]
        return out
