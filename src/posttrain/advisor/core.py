"""`advise(profile)`: which pipeline (sft, sft -> dpo, sft -> grpo, ...), which technique, why, and its cost.

How a recommendation is made, in order:
  1. The profile's missing keys get stated assumptions (`_facts`); `--data` fills the data counts.
  2. The estimator sizes the candidate setups on the profile's hardware (does PPO's critic fit?).
  3. `method` rules from rules.yaml add scores; the highest total picks the final stage.
  4. `order` rules prepend stages (SFT before preference or RL training).
  5. `technique` rules pick full, LoRA or QLoRA from what fits for the most demanding stage.
  6. `risk` rules add what to watch; what-if `flips` re-run 1-5 on changed profiles.
Every rule that fired is reported with the inputs that triggered it. No torch import.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from posttrain.advisor import configs
from posttrain.advisor.datafile import DataSummary, summarise
from posttrain.advisor.profile import Profile, load_profile, profile_from_dict
from posttrain.advisor.rules import load_rules, matches
from posttrain.errors import UserError
from posttrain.estimator import estimate
from posttrain.estimator.hardware import custom_gpu, find_gpu

METHOD_ORDER = ("sft", "dpo", "grpo", "ppo")  # ties go to the simpler method
COUNTS = ("demonstrations", "preference_pairs", "prompts")
FORMAT_WORDS = ("json", "schema", "format", "structured", "xml", "yaml")
DEFAULT_MODEL, DEFAULT_GPU = "7b", "H100-80GB"
GROUP_SIZE = 8  # TRL's default GRPO group size
MICRO_BATCH = {"sft": 4, "reward": 4, "dpo": 2, "ppo": 4, "grpo": 1}  # per GPU; GRPO: prompts x GROUP_SIZE
DATA_SHAPE_STAGES = {"sft": ("sft",), "preference": ("dpo", "reward"), "prompts": ("grpo", "ppo")}


@dataclass
class Advice:
    pipeline: list[str]
    technique: str
    reasons: list[str]
    alternatives: list[dict]
    estimate: dict
    config: dict  # the first stage's `posttrain train` config
    configs: list[dict] = field(default_factory=list)  # every stage: {stage, config, note}
    risks: list[str] = field(default_factory=list)
    would_change: list[str] = field(default_factory=list)
    assumptions: list[str] = field(default_factory=list)
    fired: list[dict] = field(default_factory=list)  # {rule, kind, reason, principle, inputs}
    profile: dict = field(default_factory=dict)
    data: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _with_data(p: Profile, summary: DataSummary, notes: list[str]) -> Profile:
    key = {"sft": "demonstrations", "preference": "preference_pairs", "prompts": "prompts"}[summary.shape]
    stated = getattr(p, key)
    if stated is not None and stated != summary.rows:
        notes.append(
            f"{key}: the profile says {stated:,}, {summary.file} has {summary.rows:,} rows; using the file"
        )
    seq = p.seq_len or min(8192, max(256, 1 << int(summary.p95_tokens * 1.5).bit_length()))
    return replace(
        p,
        **{key: summary.rows},
        avg_tokens=p.avg_tokens or summary.mean_tokens,
        seq_len=seq,
        data_file=summary.file,
    )


def _facts(p: Profile) -> tuple[dict, list[str]]:
    """The profile as facts for the rules, with every default stated."""
    f, notes = p.to_dict(), []
    for key in COUNTS:
        if f.get(key) is None:
            f[key] = 0
            notes.append(f"{key} not stated: assuming none")
    if not any(f[k] for k in COUNTS):
        raise UserError(
            "the profile states no data: demonstrations, preference_pairs and prompts are all 0 or missing. "
            "Every method learns from one of them; give their counts in the profile or pass --data FILE."
        )
    if f.get("quality") is None and f.get("verifiable"):
        f["quality"] = "objective"
        notes.append("quality not stated: objective, since a program can check answers")
    if f.get("format_compliance") is None and any(w in (p.task or "").lower() for w in FORMAT_WORDS):
        f["format_compliance"] = True
        notes.append("the task text mentions an output format: treating the goal as format compliance")
    if p.model is None:
        f["model"] = DEFAULT_MODEL
        notes.append(f"model not stated: assuming a {DEFAULT_MODEL} model")
    f["gpus"] = p.gpus or 1
    if p.gpus is None:
        notes.append("gpus not stated: assuming 1")
    if p.gpu_memory_gb is not None:
        gpu = custom_gpu(p.gpu_memory_gb)
    else:
        gpu = find_gpu(p.gpu or DEFAULT_GPU)
        if p.gpu is None:
            notes.append(f"gpu not stated: assuming {DEFAULT_GPU}")
    f["gpu_name"], f["gpu_gb"] = gpu.name, gpu.memory_gb
    f["seq_len"] = p.seq_len or 1024
    if p.seq_len is None:
        notes.append("seq_len not stated: 1,024 tokens per example (prompt + response)")
    f["avg_tokens"] = p.avg_tokens or f["seq_len"] / 2
    if p.avg_tokens is None:
        notes.append(f"avg_tokens not stated: half of seq_len ({f['avg_tokens']:.0f})")
    notes.append(
        "sizing: gradient checkpointing on, micro-batch per GPU sft 4, dpo 2 pairs, ppo 4, grpo 1 prompt x "
        f"{GROUP_SIZE} (halved down to 1 until it fits); {'FSDP full shard' if f['gpus'] > 1 else 'one GPU'}"
    )
    return f, notes


def _estimate(f: dict, method: str, technique: str, tokens: float | None = None, micro: int | None = None):
    seq = f["seq_len"]
    kw = dict(
        model=f["model"], method=method, technique=technique, batch_size=micro or MICRO_BATCH[method], seq_len=seq,
        gradient_checkpointing=True, num_gpus=f["gpus"], sharding="fsdp" if f["gpus"] > 1 else "none",
        tokens=tokens or 1e8,
    )  # fmt: skip
    if f.get("gpu_memory_gb") is not None:
        kw["gpu_memory_gb"] = f["gpu_memory_gb"]
    else:
        kw["gpu"] = f["gpu_name"]
    if method in ("ppo", "grpo"):
        kw.update(group_size=GROUP_SIZE, completion_len=seq // 2)
        uses_rm = f.get("reward_model") and (method == "ppo" or not f.get("verifiable"))
        kw.update(reward_model=f["model"]) if uses_rm else kw.update(reward_function=True)
    return estimate(**kw)


def _fits(f: dict, e) -> bool:
    return e.peak_memory_gb <= f["gpu_gb"]


def _sized(f: dict, method: str, technique: str, tokens: float | None = None):
    """The estimate at the largest micro-batch (default, half, quarter, 1) that fits, and that micro-batch.

    A smaller micro-batch with gradient accumulation trains on the same global batch with less activation
    memory, so practitioners shrink it before changing technique.
    """
    start = MICRO_BATCH[method]
    for micro in sorted({start, max(1, start // 2), max(1, start // 4), 1}, reverse=True):
        e = _estimate(f, method, technique, tokens, micro)
        if _fits(f, e):
            break
    return e, micro


def _stage_tokens(f: dict, stage: str) -> float:
    if stage == "sft":
        return max(1, f["demonstrations"]) * f["avg_tokens"] * 2  # 2 epochs
    if stage in ("dpo", "reward"):
        return max(1, f["preference_pairs"]) * 2 * f["avg_tokens"]  # chosen + rejected, 1 epoch
    return max(1, f["prompts"]) * GROUP_SIZE * f["seq_len"]  # one pass over the prompts, G samples each


def _fire(rule: dict, facts: dict, fired: list[dict]) -> None:
    shown = {k: (0 if v is None and k in COUNTS else v) for k, v in facts.items()}
    fired.append(
        {
            "rule": rule["id"],
            "kind": rule["kind"],
            "method": rule.get("method"),
            "score": rule.get("score", 0),
            "reason": rule["reason"].format(**shown),
            "principle": rule["principle"],
            "inputs": {k: facts.get(k) for k in rule["when"]},
        }
    )


def _decide(p: Profile) -> dict:
    """Steps 1-6 of the module docstring, without what-ifs."""
    rules, _ = load_rules()
    f, notes = _facts(p)
    ppo = min((_estimate(f, "ppo", t) for t in ("full", "lora")), key=lambda e: e.peak_memory_gb)
    f["ppo_fits"], f["ppo_gb"] = _fits(f, ppo), ppo.peak_memory_gb
    fired: list[dict] = []

    scores = dict.fromkeys(METHOD_ORDER, 0)
    for r in rules:
        if r["kind"] == "method" and matches(r, f):
            scores[r["method"]] += r["score"]
            _fire(r, f, fired)
    best = max(METHOD_ORDER, key=lambda m: (scores[m], -METHOD_ORDER.index(m)))
    if scores[best] <= 0:
        raise UserError(
            "no method fits this profile: prompts alone need a reward (set verifiable: true if a program can "
            "check answers, or reward_model: true), and SFT or DPO need demonstrations or preference pairs"
        )
    f["final"], pipeline = best, [best]
    for r in rules:
        if r["kind"] == "order" and matches(r, f) and r["stage"] not in pipeline:
            pipeline.insert(0, r["stage"])
            _fire(r, f, fired)
    for m in METHOD_ORDER:
        f[f"has_{m}"] = m in pipeline

    sizes = {t: _sized(f, best, t)[0] for t in ("full", "lora", "qlora")}
    for t, e in sizes.items():
        f[f"{t}_fits"], f[f"{t}_gb"] = _fits(f, e), e.peak_memory_gb
    technique = next(r for r in rules if r["kind"] == "technique" and matches(r, f))
    _fire(technique, f, fired)
    f["technique"] = technique = technique["technique"]

    sized = [_sized(f, m, technique, _stage_tokens(f, m)) for m in pipeline]
    stages = [e.to_dict() for e, _ in sized]
    f["micro_batches"] = [micro for _, micro in sized]
    f["cost"] = sum(s["cost_usd"] for s in stages)
    f["over_budget"] = p.budget_usd is not None and f["cost"] > p.budget_usd
    for r in rules:
        if r["kind"] == "risk" and matches(r, f):
            _fire(r, f, fired)
    return {
        "facts": f, "notes": notes, "fired": fired, "scores": scores, "pipeline": pipeline,
        "technique": technique, "sizes": sizes, "stages": stages,
    }  # fmt: skip


def _explains(fired: dict, d: dict) -> bool:
    """A fired rule explains the recommendation if it is an order or technique rule, supports a chosen stage,
    or counts against a method that had support of its own (why not PPO, when PPO was in the running)."""
    if fired["kind"] in ("order", "technique"):
        return True
    if fired["kind"] != "method":
        return False
    m = fired["method"]
    supported = any(x["method"] == m and x["kind"] == "method" and x is not fired for x in d["fired"])
    return m in d["pipeline"] or (supported and fired["score"] < 0)


def _alternatives(d: dict) -> list[dict]:
    """Methods that had rules for them but lost (with their score against the winner's), and other techniques
    that also fit."""
    out = []
    final_score = d["scores"][d["facts"]["final"]]
    for m in METHOD_ORDER:
        why = [x["reason"] for x in d["fired"] if x["method"] == m]
        if m not in d["pipeline"] and why:
            out.append(
                {"pipeline": [m], "score": d["scores"][m], "chosen_score": final_score, "reasons": why}
            )
    for t, e in d["sizes"].items():
        if t != d["technique"] and e.peak_memory_gb <= d["facts"]["gpu_gb"]:
            gb = round(e.peak_memory_gb, 2)
            out.append({"technique": t, "peak_memory_gb": gb, "reasons": [f"{t} also fits: {gb} GB per GPU"]})
    return out


def _flips(p: Profile, d: dict) -> list[str]:
    _, flips = load_rules()
    out = []
    for flip in flips:
        changes = flip["set"]
        if all(getattr(p, k) == v for k, v in changes.items()):
            continue
        try:
            other = _decide(replace(p, **changes))
        except UserError:
            continue
        if other["pipeline"] != d["pipeline"] or other["technique"] != d["technique"]:
            out.append(f"if {flip['says']}: {' -> '.join(other['pipeline'])} with {other['technique']}")
    return out


def _configs(d: dict, summary: DataSummary | None) -> tuple[list[dict], list[str]]:
    f, notes = d["facts"], []
    name, note = configs.config_model_name(str(f["model"]))
    if note:
        notes.append(note)
    out = []
    for i, stage in enumerate(d["pipeline"], start=1):
        data = summary.file if summary and stage in DATA_SHAPE_STAGES[summary.shape] else None
        if data is None:
            notes.append(
                f"stage {i} ({stage}): data.train is a placeholder, data/{stage}.jsonl; put your file there"
            )
        cfg = configs.stage_config(
            stage, index=i, previous=d["pipeline"][i - 2] if i > 1 else None, model_name=name,
            technique=d["technique"], seq_len=int(f["seq_len"]), micro_batch=f["micro_batches"][i - 1],
            data_file=data, epochs=2.0 if stage == "sft" else 1.0,
        )  # fmt: skip
        note = None if stage == "sft" else f"algorithm.name: {stage} lands with a later posttrain issue"
        out.append({"stage": stage, "config": cfg, "note": note})
    return out, notes


def _as_profile(profile) -> Profile:
    if isinstance(profile, Profile):
        return profile
    if isinstance(profile, dict):
        return profile_from_dict(profile)
    if isinstance(profile, (str, Path)):
        return load_profile(profile)
    raise UserError(f"advise() takes a Profile, a dict or a profile YAML path, not {type(profile).__name__}")


def advise(
    profile: Profile | dict | str | Path, *, data: str | Path | None = None, what_if: bool = True
) -> Advice:
    """Recommend a pipeline and technique for `profile`, with reasons, risks, cost and configs.

    `data` (a JSONL/JSON/CSV file) fills the data counts and lengths from the file itself. `what_if` re-runs
    the decision on the profile changes listed under `flips` in rules.yaml and reports those that change it.

    >>> a = advise({"task": "answer as JSON", "demonstrations": 3000, "model": "7b", "gpu_memory_gb": 24})
    >>> a.pipeline, a.technique
    (['sft'], 'lora')
    """
    p = _as_profile(profile)
    notes: list[str] = []
    summary = summarise(data) if data is not None else None
    if summary is not None:
        p = _with_data(p, summary, notes)
    d = _decide(p)
    stage_cfgs, cfg_notes = _configs(d, summary)
    stages = d["stages"]
    est = {
        "peak_memory_gb": max(s["peak_memory_gb"] for s in stages),
        "hours": sum(s["hours"] for s in stages),
        "cost_usd": sum(s["cost_usd"] for s in stages),
        "gpu": stages[-1]["gpu"],
        "num_gpus": max(s["num_gpus"] for s in stages),
        "stages": stages,
    }
    fired = d["fired"]
    return Advice(
        pipeline=d["pipeline"],
        technique=d["technique"],
        reasons=[f"{x['reason']} ({x['principle']})" for x in fired if _explains(x, d)],
        alternatives=_alternatives(d),
        estimate=est,
        config=stage_cfgs[0]["config"],
        configs=stage_cfgs,
        risks=[x["reason"] for x in fired if x["kind"] == "risk"],
        would_change=_flips(p, d) if what_if else [],
        assumptions=notes + d["notes"] + cfg_notes,
        fired=fired,
        profile=p.to_dict(),
        data=asdict(summary) if summary else None,
    )
