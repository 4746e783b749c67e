"""`run_diagnosis`: every probe on one model, then the recommendation, as one typed `Diagnosis`.

Order of work: one greedy pass over the clean prompts and their variants together (robustness; the clean
completions also serve drift), one sampled pass of n samples per clean prompt (headroom), the SFT data (no
model), the preference pairs (log-probabilities), the drift forwards against the base. Probes without their input
are skipped (None in the result) and fire no rule.

The model is reached through an `AnswerFn` (rows, temperature, seed) -> completions, so a test can stand in a
stub that answers by rule (`model_answers` wraps a real model); preference and drift need the model itself.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from posttrain.diagnose.ambiguity import DataAmbiguity, last_turn, measure_ambiguity
from posttrain.diagnose.drift import PROBE_TOKENS, PROBES, Comparison, compare
from posttrain.diagnose.headroom import Headroom, measure_headroom
from posttrain.diagnose.recommend import Recommendation, recommend
from posttrain.diagnose.robustness import Robustness, measure_robustness, row_id
from posttrain.diagnose.verifiers import Verifier
from posttrain.evaluation import generate_answers
from posttrain.evaluation.preference import preference_accuracy
from posttrain.models import generate, is_adapter_model

SFT_KEYS = ("messages", "completion_only", "n_prompt")  # what a normalised SFT row holds besides its columns
AnswerFn = Callable[[Sequence[dict], float, int], list[str]]
"""(rows with a ``prompt``, temperature (0: greedy), seed) -> one completion per row."""


@dataclass
class Settings:
    """How the probes run. `samples`: completions per clean prompt for pass@k (0: no headroom probe)."""

    samples: int = 8
    temperature: float = 1.0
    max_new_tokens: int = 128
    batch_size: int = 16
    seed: int = 0
    dup_threshold: float = 0.8
    beta: float = 0.1
    max_length: int = 512


@dataclass
class Drift:
    base: str
    task: Comparison  # on the model's greedy completions of the clean prompts
    probe: Comparison  # on the base's greedy continuations of `drift.PROBES`


@dataclass
class Diagnosis:
    """Everything `posttrain diagnose` measured (None: a probe that was not run) and what it recommends."""

    model: str
    verifier: str
    prompts: int
    greedy_accuracy: float
    settings: Settings
    robustness: Robustness | None
    headroom: Headroom | None
    data: DataAmbiguity | None
    preferences: dict | None
    drift: Drift | None
    recommendation: Recommendation | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def facts(self) -> dict:
        """The measurements the rules read (rules.yaml's header): None for what was not measured (NaN included:
        drift over completions that were all empty scored no token)."""
        worst = self.robustness.worst() if self.robustness else None
        h, d = self.headroom, self.data
        spans = h.intervals() if h else {}  # the 95% intervals that `recommend.borderline` reads thresholds against
        facts = {
            "clean_accuracy": self.greedy_accuracy,
            "worst_kind": worst.kind if worst else None,
            "worst_gap": worst.gap if worst else None,
            "worst_gap_low": worst.ci_low if worst else None,
            "worst_gap_high": worst.ci_high if worst else None,
            "worst_p": self.robustness.adjusted_p(worst) if worst else None,
            "kinds": len(self.robustness.kinds) if self.robustness else None,
            "samples": h.samples if h else None,
            "pass_at_1": h.pass_at_k[1] if h else None,
            "pass_at_n": h.pass_at_k[h.samples] if h else None,
            "headroom": h.headroom if h else None,
            "mixed_share": h.mixed_share if h else None,
            **{f"{k}_{end}": spans[k][i] if k in spans else None for k in ("headroom", "mixed_share")
               for i, end in enumerate(("low", "high"))},
            "wrong_share": d.wrong_share if d else None,
            "ambiguous_share": d.ambiguous_share if d else None,
            "pairs_logp_accuracy": self.preferences["logp_accuracy"] if self.preferences else None,
            "kl_policy_base": self.drift.task.kl_policy_base if self.drift else None,
            "probe_agreement": self.drift.probe.top1_agreement if self.drift else None,
            # the flags of the probes that did not run, for the reasons that ask for them (text, never tested)
            "probes_not_run": ", ".join(flag for flag, ran in (
                ("--perturbed (or a task's variants)", self.robustness is not None), ("--samples", h is not None),
                ("--sft-data", d is not None), ("--pairs", self.preferences is not None),
                ("--base", self.drift is not None)) if not ran) or "none, every probe ran",  # fmt: skip
        }
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in facts.items()}

    def to_dict(self) -> dict:
        """JSON-ready (docs/diagnose.md): dataclasses as objects, pass@k keys as strings."""
        out = asdict(self)
        if self.headroom is not None:
            out["headroom"].update(pass_at_k={str(k): v for k, v in self.headroom.pass_at_k.items()},
                                   mixed_share=self.headroom.mixed_share, headroom=self.headroom.headroom,
                                   intervals={k: list(v) for k, v in self.headroom.intervals().items()})  # fmt: skip
        if self.data is not None:
            out["data"].update(ambiguous_share=self.data.ambiguous_share, wrong_share=self.data.wrong_share)
        return out


def model_answers(model, tokenizer, *, max_new_tokens: int, batch_size: int = 16, progress: bool = False) -> AnswerFn:
    """A model's completions as an `AnswerFn` (`evaluation.generate_answers`: greedy at temperature 0, else
    seeded sampling). Its `finished` attribute says, after each call, which answers ended rather than being cut at
    `max_new_tokens` (a judge scores a cut one as an unfinished turn: `Verifier.check`'s `truncated`)."""

    def answer(rows: Sequence[dict], temperature: float, seed: int) -> list[str]:
        label = ("greedy" if temperature == 0 else "samples") if progress else None
        answer.finished = []
        return generate_answers(model, tokenizer, rows, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                temperature=temperature, sample_seed=seed, progress=label,
                                finished=answer.finished)  # fmt: skip

    return answer


def _cut(answer: AnswerFn) -> list[bool] | None:
    """Which answers of `answer`'s last call were cut at the token limit; None when it does not say."""
    finished = getattr(answer, "finished", None)
    return None if finished is None else [not f for f in finished]


def run_diagnosis(
    rows: Sequence[dict], verifier: Verifier, *, answer: AnswerFn | None = None, model=None, tokenizer=None,
    model_name: str = "model", variants: Sequence[dict] = (), variant_source: str = "",
    sft_rows: Sequence[dict] | None = None, sft_file: str = "", pairs: Sequence[dict] | None = None,
    reference=None, base=None, base_name: str = "", settings: Settings | None = None, progress: bool = False,
) -> Diagnosis:  # fmt: skip
    """Measure every probe whose input is given (module docstring) and recommend. `rows`: the clean prompts,
    each with its ``answer`` (or the columns the verifier reads) and ideally an ``id`` (variants name it);
    `variants`: rows with ``perturbs``, ``kind``, ``prompt`` and ``answer``."""
    s = settings or Settings()
    if answer is None:
        if model is None:
            raise ValueError("run_diagnosis needs a model (with its tokenizer) or an answer function")
        answer = model_answers(model, tokenizer, max_new_tokens=s.max_new_tokens, batch_size=s.batch_size,
                               progress=progress)  # fmt: skip
    seconds: dict[str, float] = {}
    ids = [row_id(r, i) for i, r in enumerate(rows)]

    clock = time.perf_counter()
    greedy = answer([*rows, *variants], 0.0, s.seed)
    right = verifier.check([*rows, *variants], greedy, truncated=_cut(answer))
    clean_right, clean_completions = right[: len(rows)], greedy[: len(rows)]
    robustness = None
    if variants:
        robustness = measure_robustness(variant_source, ids, clean_right, variants, right[len(rows) :])
    seconds["greedy"] = time.perf_counter() - clock

    headroom = None
    if s.samples > 0:
        clock = time.perf_counter()
        repeated = [r for r in rows for _ in range(s.samples)]  # each prompt n times, side by side in a batch
        sampled = answer(repeated, s.temperature, s.seed)
        verdicts = verifier.check(repeated, sampled, truncated=_cut(answer))
        per_prompt = [verdicts[i * s.samples : (i + 1) * s.samples] for i in range(len(rows))]
        headroom = measure_headroom(ids, per_prompt, s.temperature)
        seconds["samples"] = time.perf_counter() - clock

    data = None
    if sft_rows is not None:
        clock = time.perf_counter()
        data = measure_ambiguity(sft_file, sft_rows, demonstration_check(verifier), threshold=s.dup_threshold)
        seconds["data"] = time.perf_counter() - clock

    preferences = None
    if pairs is not None:
        clock = time.perf_counter()
        preferences = _preferences(model, tokenizer, pairs, reference, s, progress)
        seconds["preferences"] = time.perf_counter() - clock

    drift = None
    if base is not None:
        clock = time.perf_counter()
        drift = _drift(model, base, tokenizer, [r["prompt"] for r in rows], clean_completions, base_name)
        seconds["drift"] = time.perf_counter() - clock

    result = Diagnosis(
        model=model_name, verifier=verifier.name, prompts=len(rows),
        greedy_accuracy=sum(clean_right) / len(rows) if rows else float("nan"), settings=s,
        robustness=robustness, headroom=headroom, data=data, preferences=preferences, drift=drift, seconds=seconds,
    )  # fmt: skip
    if not variants:
        result.notes.append("robustness not measured: no perturbed prompts (a built-in task that makes variants, "
                            "or --perturbed FILE with your own)")  # fmt: skip
    elif robustness.without_variants:
        why = ("the task makes variants only of prompts its own `make` wrote" if variant_source.startswith("task ")
               else f"no row of {variant_source} `perturbs` them")  # fmt: skip
        result.notes.append(f"{robustness.without_variants} of {len(rows)} clean prompts have no variant ({why})")
    if verifier.failures:
        result.notes.append(f"a reward function could not score {verifier.failures} samples; they count as wrong")
    result.recommendation = recommend(result.facts())
    return result


def demonstration_check(verifier: Verifier):
    """The verifier on SFT rows: each row's last assistant turn is the completion, the messages before it the
    prompt, its other columns (``answer``, ...) go with it; None for a row it cannot check (a task's verifier on a
    row without ``answer``)."""

    def check(rows: Sequence[dict], responses: Sequence[str]) -> list[bool | None]:
        keep = [i for i, r in enumerate(rows) if "answer" in r or not verifier.needs_answer]
        as_prompts = [{"prompt": last_turn(rows[i])[0], **{k: v for k, v in rows[i].items() if k not in SFT_KEYS}}
                      for i in keep]  # fmt: skip
        verdicts = dict(zip(keep, verifier.check(as_prompts, [responses[i] for i in keep])))
        return [verdicts.get(i) for i in range(len(rows))]

    return check


def _preferences(model, tokenizer, pairs, reference, s: Settings, progress: bool) -> dict:
    """How the model (and the reference, when there is one) ranks the pairs (`preference_accuracy`); without a
    reference and for a model that is not an adapter, only the model's own ranking (`logp_accuracy`,
    `mean_logp_accuracy`): an implicit reward against itself would read 0.5 whatever the pairs."""
    own = reference is None and not is_adapter_model(model)
    result = preference_accuracy(model, tokenizer, pairs, reference=model if own else reference, beta=s.beta,
                                 max_length=s.max_length, progress=progress)  # fmt: skip
    if own:
        result = {k: v for k, v in result.items() if k in ("n", "logp_accuracy", "mean_logp_accuracy")}
    return result


def _drift(model, base, tokenizer, prompts: list, completions: list[str], base_name: str) -> Drift:
    """KL and top-1 agreement with the base on the task's greedy completions, and on the base's own greedy
    continuations of the unrelated `PROBES`."""
    continuations = generate(base, tokenizer, list(PROBES), max_new_tokens=PROBE_TOKENS, temperature=0.0)
    return Drift(base_name, compare(model, base, tokenizer, prompts, completions),
                 compare(model, base, tokenizer, list(PROBES), continuations))  # fmt: skip
