"""`advise(profile)`: which pipeline (sft, sft -> dpo, sft -> reward -> ppo, ...), which technique, why, and
at what cost.

How a recommendation is made, in order:
  1. The profile's missing keys get stated assumptions (`_facts`); `--data` fills the data counts.
  2. The estimator sizes PPO on the profile's hardware as posttrain runs it (a value head on the policy, the
     reference, the reward model): does it fit?
  3. The framework's slots (rules.yaml `slots`: imitation, reward, preferences, verifier) are decided last
     to first: `method` rules support a method in a slot, `block` rules rule one out, and each slot takes the
     first supported, unblocked method in its precedence order; the pipeline is the chosen stages in training
     order.
  4. `technique` rules pick full, LoRA or QLoRA from what fits for the most demanding stage.
  5. `note` rules explain chosen stages, `risk` rules add what to watch; what-if `flips` re-run 1-4 on changed
     profiles.
Every rule that fired is reported with the inputs that triggered it; every stage has a fired rule behind it.
No torch import.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from posttrain.advisor import configs
from posttrain.advisor.datafile import SHAPE_METHODS, DataSummary, seq_len_for, summarise, tokens_per_row
from posttrain.advisor.profile import Profile, load_profile, profile_from_dict
from posttrain.advisor.rules import RuleTable, load_rules, matches
from posttrain.data.columns import Columns
from posttrain.errors import UserError
from posttrain.estimator import EstimateInputs, estimate_for
from posttrain.estimator.hardware import USABLE_FRACTION, custom_gpu, find_gpu
from posttrain.estimator.inputs import DEFAULT_GROUP_SIZE, DEFAULT_MICRO_BATCH

STAGES = ("sft", "reward", "dpo", "grpo", "ppo")
TECHNIQUES = ("full", "lora", "qlora")
COUNTS = ("demonstrations", "preference_pairs", "prompts")
FORMAT_WORDS = ("json", "schema", "format", "structured", "xml", "yaml")
DEFAULT_MODEL, DEFAULT_GPU = "7b", "H100-80GB"
GROUP_SIZE = DEFAULT_GROUP_SIZE["grpo"]  # TRL's default GRPO group size
MICRO_BATCH = DEFAULT_MICRO_BATCH  # per GPU, the estimator's defaults; GRPO: prompts x GROUP_SIZE
# The file fields that count each shape's rows in a profile.
_SHAPE_COUNTS = {"sft": "demonstrations", "preference": "preference_pairs", "prompts": "prompts"}


@dataclass
class Advice:
    fits: bool  # the pipeline fits the profile's GPUs with `technique`; if not, `estimate["would_fit"]` says what would
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
    seq = p.seq_len or seq_len_for(summary)
    also = {}
    if summary.shape == "sft" and p.verifiable and p.prompts is None:
        # demonstrations whose answers a program checks are prompts for RL too: "prompts not stated: assuming
        # none" beside a file of 1,200 of them recommended SFT alone and then "if a program could check answers"
        also["prompts"] = summary.rows
        notes.append(f"prompts: the {summary.rows:,} rows of {summary.file} can serve as RL prompts too (verifiable: "
                     "a program checks their answers); an RL stage's config names a placeholder file: write them "
                     "there as prompt and answer rows")
    return replace(
        p,
        **{key: summary.rows},
        **also,
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
    if f.get("verifiable") and p.success_rate is None:
        notes.append(
            "success_rate not stated: assuming the model passes the verifier on some prompts, which RL "
            "needs (a group whose samples all fail has zero advantage); measure it with `posttrain evaluate` "
            "before RL"
        )
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
    f["gpu_name"], f["gpu_gb"], f["usable_gb"] = gpu.name, gpu.memory_gb, gpu.usable_gb
    f["seq_len"] = p.seq_len or 1024
    if p.seq_len is None:
        notes.append("seq_len not stated: 1,024 tokens per example (prompt + response)")
    f["avg_tokens"] = p.avg_tokens or f["seq_len"] / 2
    if p.avg_tokens is None:
        notes.append(f"avg_tokens not stated: half of seq_len ({f['avg_tokens']:.0f})")
    micro = ", ".join(f"{m} {n}" for m, n in MICRO_BATCH.items() if m in STAGES)
    notes.append(
        f"sizing: gradient checkpointing on, micro-batch per GPU {micro} (pairs for reward and dpo, prompts for "
        f"ppo and grpo, grpo x {GROUP_SIZE} completions; halved down to 1 until it fits); "
        + ("FSDP full shard" if f["gpus"] > 1 else "one GPU")
        + f"; a stage fits when its peak is at most {USABLE_FRACTION:.0%} of the GPU's memory ({gpu.usable_gb:.1f} "
        f"of {gpu.memory_gb:g} GB), the rest kept for the CUDA context, allocator fragmentation and workspaces"
    )
    return f, notes


def _estimate(
    f: dict,
    method: str,
    technique: str,
    tokens: float | None = None,
    micro: int | None = None,
    rm: bool = False,
):
    """The estimate of one stage; `rm`: an RL stage that holds a reward model the policy's size."""
    seq = f["seq_len"]
    rl = method in ("ppo", "grpo")
    inputs = EstimateInputs(
        model=f["model"], method=method, technique=technique, batch_size=micro or MICRO_BATCH[method],
        seq_len=seq, gradient_checkpointing=True, num_gpus=f["gpus"], sharding="fsdp" if f["gpus"] > 1 else "none",
        tokens=tokens or 1e8,
        gpu=None if f.get("gpu_memory_gb") is not None else f["gpu_name"], gpu_memory_gb=f.get("gpu_memory_gb"),
        group_size=GROUP_SIZE if method == "grpo" else None, completion_len=seq // 2 if rl else None,
        reward_model=f["model"] if rl and rm else None, reward_function=rl and not rm,
        value_model="head" if method == "ppo" else None,  # posttrain's PPO, as the config it writes trains it
    )  # fmt: skip
    return estimate_for(inputs)


def _sized(f: dict, method: str, technique: str, tokens: float | None = None):
    """The estimate at the largest micro-batch (default, half, quarter, 1) that fits, and that micro-batch.

    A smaller micro-batch with gradient accumulation trains on the same global batch with less activation
    memory, so practitioners shrink it before changing technique. An RL stage chosen to learn from
    preferences holds a reward model the policy's size.
    """
    rm = method in ("grpo", "ppo") and f.get("preferences_stage") == method
    start = MICRO_BATCH[method]
    for micro in sorted({start, max(1, start // 2), max(1, start // 4), 1}, reverse=True):
        e = _estimate(f, method, technique, tokens, micro, rm)
        if e.fits_gpu:
            break
    return e, micro


def _stage_tokens(f: dict, stage: str) -> float:
    """The tokens a stage's config trains on: its rows x their tokens (`tokens_per_row`: GRPO's group of
    completions, PPO's one) x the epochs the config sets."""
    shape = next(s for s, stages in SHAPE_METHODS.items() if stage in stages)
    samples = GROUP_SIZE if stage == "grpo" else 1
    per, _ = tokens_per_row(shape, f["avg_tokens"], int(f["seq_len"]), samples)
    return max(1, f[_SHAPE_COUNTS[shape]]) * per * configs.stage_epochs(stage)


def _reason(rule: dict, facts: dict) -> str:
    return rule["reason"].format(**{k: (0 if v is None and k in COUNTS else v) for k, v in facts.items()})


def _fire(rule: dict, facts: dict, fired: list[dict]) -> dict:
    x = {
        "rule": rule["id"],
        "kind": rule["kind"],
        "slot": rule.get("slot"),
        "method": rule.get("method"),
        "reason": _reason(rule, facts),
        "principle": rule["principle"],
        "inputs": {k: facts.get(k) for k in rule["when"]},
    }
    fired.append(x)
    return x


def _choose(table: RuleTable, f: dict) -> tuple[dict[str, str], list[dict], list[dict]]:
    """Step 3: each slot's stage, decided last to first so a rule can see the stages after its slot.

    Returns ({slot: method}, the fired method and block rules in training order, the methods that had support
    but were not chosen, each with its reasons).
    """
    f.update({f"has_{m}": False for m in STAGES}, has_rl=False, final=None)
    f.update({f"{slot['name']}_stage": None for slot in table.slots})
    chosen: dict[str, str] = {}
    fired_by_slot: dict[str, list[dict]] = {}
    lost: list[dict] = []
    blocked_once: set[str] = set()
    for slot in reversed(table.slots):
        name, fired = slot["name"], []
        rules = [r for r in table.rules if r["kind"] == "method" and r["slot"] == name and matches(r, f)]
        support = {m: [r for r in rules if r["method"] == m] for m in slot["methods"]}
        reasons = {m: [_fire(r, f, fired)["reason"] for r in rs] for m, rs in support.items()}
        open_ = [m for m in slot["methods"] if support[m]]
        for r in table.rules:
            if r["kind"] != "block" or r.get("slot", name) != name or not matches(r, f):
                continue
            hit = [m for m in open_ if r.get("method", m) == m]  # a slot block hits every method in it
            if not hit:
                continue  # a block is reported only where it rules out a supported method
            if r["id"] not in blocked_once:  # ruled out in two slots: reported once
                _fire(r, f, fired)
                blocked_once.add(r["id"])
            open_ = [m for m in open_ if m not in hit]
            for m in hit:
                reasons[m].append(f"Ruled out: {_reason(r, f)}")
        fired_by_slot[name] = fired
        if open_:
            m = chosen[name] = open_[0]
            f[f"{name}_stage"], f[f"has_{m}"] = m, True
            f["final"] = f["final"] or m
        for m in slot["methods"]:
            if support[m] and m != chosen.get(name):
                lost.append(
                    {"method": m, "slot": name, "instead_of": chosen.get(name), "reasons": reasons[m]}
                )
    f["has_rl"] = f["has_grpo"] or f["has_ppo"]
    fired = [x for slot in table.slots for x in fired_by_slot[slot["name"]]]
    return chosen, fired, lost


def too_few(table: RuleTable, f: dict) -> list[str]:
    """The counts of the profile that fall short of what a method's rule asks, where that count alone stops the
    rule (its other conditions hold): "50 preference pairs (dpo needs 100)", the least each method needs.

    >>> t = RuleTable([], [{"kind": "method", "method": "dpo", "when": {"preference_pairs": ">= 100"}}], [])
    >>> too_few(t, {"preference_pairs": 50}), too_few(t, {"preference_pairs": 0}), too_few(t, {"prompts": 9})
    (['50 preference pairs (dpo needs 100)'], ['no preference pairs (dpo needs 100)'], [])
    """
    need: dict[str, dict[str, int]] = {}
    for r in table.rules:
        for key in COUNTS:
            cond, have = r["when"].get(key), f.get(key)
            if r["kind"] != "method" or not isinstance(cond, str) or have is None:
                continue
            least = [float(part.strip()[2:]) for part in cond.split(",") if part.strip().startswith(">=")]
            if least and have < least[0] and matches(r, {**f, key: least[0]}):
                methods = need.setdefault(key, {})
                methods[r["method"]] = int(min(methods.get(r["method"], least[0]), least[0]))
    return [f"{f'{f[key]:,}' if f[key] else 'no'} {key.replace('_', ' ')[: -1 if f[key] == 1 else None]} ("
            + ", ".join(f"{m} needs {n:,}" for m, n in sorted(methods.items(), key=lambda kv: kv[1])) + ")"
            for key, methods in need.items()]  # fmt: skip


def _no_stage(fired: list[dict], table: RuleTable, f: dict) -> UserError:
    blocks = " ".join(x["reason"] for x in fired if x["kind"] == "block")
    short = too_few(table, f)
    reward = ("prompts alone need a reward (set verifiable: true if a program can check answers, or reward_model: "
              "true)")  # fmt: skip
    why = [*([f"too few for any method: {'; '.join(short)}"] if short else []),
           *([reward] if f.get("prompts") and not (f.get("verifiable") or f.get("reward_model")) else [])]  # fmt: skip
    if not why:
        why = [f"{reward}, and SFT or DPO need demonstrations or preference pairs"]
    why = [why[0], *(w[0].upper() + w[1:] for w in why[1:])]
    return UserError(f"no method fits this profile: {'. '.join(why)}." + (f" Ruled out: {blocks}" if blocks else ""))


def _decide(p: Profile) -> dict:
    """Steps 1-5 of the module docstring, without what-ifs."""
    table = load_rules()
    f, notes = _facts(p)
    # PPO's reward comes from a program when one checks answers and no reward model is given, else a model.
    rm = bool(f.get("reward_model")) or not f.get("verifiable")
    ppo = {t: _estimate(f, "ppo", t, rm=rm) for t in ("full", "lora")}
    f["ppo_technique"] = min(ppo, key=lambda t: ppo[t].peak_memory_gb)
    f["ppo_fits"], f["ppo_gb"] = ppo[f["ppo_technique"]].fits_gpu, ppo[f["ppo_technique"]].peak_memory_gb

    chosen, fired, lost = _choose(table, f)
    if not chosen:
        raise _no_stage(fired, table, f)
    pipeline = list(dict.fromkeys(chosen[s["name"]] for s in table.slots if s["name"] in chosen))
    for r in table.rules:
        if r["kind"] == "note" and matches(r, f):
            _fire(r, f, fired)

    sizes = {}
    for t in TECHNIQUES:
        per_stage = {m: _sized(f, m, t)[0] for m in pipeline}
        heaviest = max(pipeline, key=lambda m: per_stage[m].peak_memory_gb)
        sizes[t], f[f"{t}_stage"] = per_stage[heaviest], heaviest
        f[f"{t}_fits"], f[f"{t}_gb"] = sizes[t].fits_gpu, sizes[t].peak_memory_gb
    technique = next(r for r in table.rules if r["kind"] == "technique" and matches(r, f))
    _fire(technique, f, fired)
    f["technique"] = technique = technique["technique"]

    sized = [_sized(f, m, technique, _stage_tokens(f, m)) for m in pipeline]
    stages = [e.to_dict() for e, _ in sized]
    f["micro_batches"] = [micro for _, micro in sized]
    costs = [s["cost_usd"] for s in stages]
    f["cost"] = None if None in costs else sum(costs)  # None: a stage does not fit, so it has no cost
    f["over_budget"] = p.budget_usd is not None and f["cost"] is not None and f["cost"] > p.budget_usd
    for r in table.rules:
        if r["kind"] == "risk" and matches(r, f):
            _fire(r, f, fired)
    return {
        "facts": f, "notes": notes, "fired": fired, "slots": chosen, "lost": lost, "pipeline": pipeline,
        "technique": technique, "sizes": sizes, "stages": stages,
    }  # fmt: skip


def _explains(fired: dict, d: dict) -> bool:
    """A fired rule explains the recommendation if it supports a chosen stage in its slot, rules a supported
    method out (why not PPO), notes a chosen stage, or picks the technique."""
    if fired["kind"] == "method":
        return d["slots"].get(fired["slot"]) == fired["method"]
    return fired["kind"] in ("block", "note", "technique")


def _alternatives(d: dict) -> list[dict]:
    """Methods that had support in a slot but were not chosen there (later in the slot's precedence, or ruled
    out), and other techniques that also fit."""
    out = list(d["lost"])
    for t, e in d["sizes"].items():
        if t != d["technique"] and e.fits_gpu:
            gb = round(e.peak_memory_gb, 2)
            out.append({"technique": t, "peak_memory_gb": gb, "reasons": [f"{t} also fits: {gb} GB per GPU"]})
    return out


def _flips(p: Profile, d: dict) -> list[str]:
    out = []
    for flip in load_rules().flips:
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


def _rewards(d: dict) -> dict[str, list[str]]:
    """What each RL stage is rewarded by: the verifier, the reward stage's model, or a given reward model."""
    out: dict[str, list[str]] = {}
    slots = d["slots"]
    if slots.get("verifier") in ("grpo", "ppo"):
        out.setdefault(slots["verifier"], []).append("verifier")
    if slots.get("preferences") in ("grpo", "ppo"):
        out.setdefault(slots["preferences"], []).append("trained" if "reward" in slots else "given")
    return out


def _configs(d: dict, summary: DataSummary | None) -> tuple[list[dict], list[str]]:
    f, notes = d["facts"], []
    name, note = configs.config_model_name(str(f["model"]))
    if note:
        notes.append(note)
    files = []
    for i, stage in enumerate(d["pipeline"], start=1):
        data = summary.file if summary and stage in SHAPE_METHODS[summary.shape] else None
        if data is None:
            data = f"data/{stage}.jsonl"
            notes.append(f"stage {i} ({stage}): data.train is a placeholder, {data}; put your file there")
        files.append(data)
    out = configs.pipeline_configs(
        d["pipeline"], rewards=_rewards(d), model_name=name, technique=d["technique"],
        seq_len=int(f["seq_len"]), micro_batches=f["micro_batches"], data_files=files, group_size=GROUP_SIZE,
        gpus=int(f["gpus"]),
    )  # fmt: skip
    if f["gpus"] > 1:
        notes.append(f"every stage is sized for FSDP full shard over {f['gpus']} GPUs, so its config sets "
                     f"run.sharding: fsdp2: launch it with `torchrun --nproc_per_node {f['gpus']} -m posttrain.cli train "
                     "FILE` (docs/scale.md); one process would hold the whole model")  # fmt: skip
    for stage, data in zip(out, files):  # the file's own column names travel with it
        if summary and data == summary.file:
            if summary.columns:
                stage["config"]["data"]["columns"] = dict(summary.columns)
            if summary.ignore_columns:
                stage["config"]["data"]["ignore_columns"] = list(summary.ignore_columns)
            for name in ("message_keys", "roles", "turns"):
                if getattr(summary, name):
                    stage["config"]["data"][name] = dict(getattr(summary, name))
            if note := _fit_batch(stage, summary.rows, int(f["gpus"])):
                notes.append(note)
            if note := _few_steps(stage, summary.rows):
                notes.append(note)
    return out, notes


FEW_STEPS = 30
"""Under this many optimiser steps a stage's config is said to train little (`_few_steps`)."""


def _few_steps(stage: dict, rows: int) -> str | None:
    """A note when a stage's config, on its file's `rows`, takes fewer than `FEW_STEPS` optimiser steps: at the
    learning rates it sets (2e-5 full, 2e-4 LoRA for SFT) that moves a model little, and the config does not say so
    by itself. The epochs are not raised for the user: how many passes a small set takes before it is memorised is
    the user's call (LIMA trained 1,000 demonstrations for 15 epochs; Alpaca 52k for 3).

    >>> print(_few_steps({"stage": "sft", "config": {"optim": {"batch_size": 16, "lr": 2e-4}, "run": {"epochs": 2.0},
    ...                                             "algorithm": {}}}, 40)[:53])
    sft: the file's 40 rows make 6 optimiser steps in the
    """
    cfg = stage["config"]
    per = cfg["algorithm"].get("num_generations", 1)  # a GRPO step's batch counts sequences: prompts x the group
    per_epoch = -(-rows * per // cfg["optim"]["batch_size"])
    steps = int(per_epoch * cfg["run"]["epochs"])
    if steps >= FEW_STEPS:
        return None
    return (f"{stage['stage']}: the file's {rows:,} rows make {steps} optimiser steps in the config's "
            f"{cfg['run']['epochs']:g} epoch(s) at optim.batch_size {cfg['optim']['batch_size']}, which moves a model "
            f"little at optim.lr {cfg['optim']['lr']:g}; raise run.epochs (LIMA trained 1,000 demonstrations for 15 "
            "epochs) or add rows, and watch a held-out loss (data.eval) for memorisation")


def _fit_batch(stage: dict, rows: int, gpus: int = 1) -> str | None:
    """A stage whose step would take more of its file's rows than the file holds (`train` refuses it: an 8-row file
    and batch_size 32) gets the largest power of two the rows allow (else, when the GPUs do not divide it, the
    largest multiple of the GPUs), at least one row per GPU, and a micro-batch that divides each GPU's share."""
    opt, alg = stage["config"]["optim"], stage["config"]["algorithm"]
    per = alg.get("num_generations", 1)  # a GRPO step's batch counts sequences: prompts x the group
    if rows < 1 or opt["batch_size"] <= rows * per:
        return None
    before = opt["batch_size"]
    prompts = 1 << (rows.bit_length() - 1)
    if prompts % gpus:  # every process takes the same number of rows (`train` refuses a batch they do not split)
        prompts = rows // gpus * gpus
    if prompts < gpus:
        raise UserError(f"{stage['config']['data']['train']} has {rows} rows, fewer than the {gpus} GPUs need for a "
                        f"{stage['stage']} step of one row each, so no config could train on it; give it more rows, "
                        "or advise for fewer GPUs (--gpus)")  # fmt: skip
    opt["batch_size"] = prompts * per
    share = opt["batch_size"] // gpus
    opt["micro_batch_size"] = min(opt["micro_batch_size"], share)
    while share % opt["micro_batch_size"]:
        opt["micro_batch_size"] -= 1
    return (f"{stage['stage']}: optim.batch_size {opt['batch_size']}, not {before}: the file has {rows} rows, fewer "
            "than a step of the usual size would take")


def _total(stages: list[dict]) -> dict:
    """The pipeline's estimate: the heaviest stage's memory; hours and cost summed, or None if a stage does not
    fit (then `would_fit` lists what would make the heaviest such stage fit)."""
    heaviest = max(stages, key=lambda s: s["peak_memory_gb"])
    misfits = [s for s in stages if not s["fits_gpu"]]
    return {
        "fits": not misfits,
        "peak_memory_gb": heaviest["peak_memory_gb"],
        "usable_memory_gb": heaviest["usable_memory_gb"],
        "hours": None if misfits else sum(s["hours"] for s in stages),
        "cost_usd": None if misfits else sum(s["cost_usd"] for s in stages),
        "gpu": stages[-1]["gpu"],
        "num_gpus": max(s["num_gpus"] for s in stages),
        "would_fit": max(misfits, key=lambda s: s["peak_memory_gb"])["would_fit"] if misfits else [],
        "stages": stages,
    }


def _as_profile(profile) -> Profile:
    if isinstance(profile, Profile):
        return profile
    if isinstance(profile, dict):
        return profile_from_dict(profile)
    if isinstance(profile, (str, Path)):
        return load_profile(profile)
    raise UserError(f"advise() takes a Profile, a dict or a profile YAML path, not {type(profile).__name__}")


def advise(
    profile: Profile | dict | str | Path, *, data: str | Path | None = None, what_if: bool = True,
    columns: Columns | None = None,
) -> Advice:
    """Recommend a pipeline and technique for `profile`, with reasons, risks, cost and configs.

    `data` (any file `posttrain data validate` reads: JSONL, JSON, CSV, Parquet, a `datasets` folder) fills the
    data counts and lengths from the file itself; `columns`, its own column names (`--column`), go into the configs
    of the stages that train on it as `data.columns` / `data.ignore_columns`. `what_if` re-runs
    the decision on the profile changes listed under `flips` in rules.yaml and reports those that change it.

    >>> a = advise({"task": "answer as JSON", "demonstrations": 3000, "model": "7b", "gpu_memory_gb": 24})
    >>> a.pipeline, a.technique
    (['sft'], 'lora')
    """
    p = _as_profile(profile)
    notes: list[str] = []
    summary = summarise(data, columns) if data is not None else None
    if summary is not None:
        p = _with_data(p, summary, notes)
    d = _decide(p)
    stage_cfgs, cfg_notes = _configs(d, summary)
    est = _total(d["stages"])
    fired = d["fired"]
    return Advice(
        fits=est["fits"],
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
