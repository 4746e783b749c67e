"""posttrain against Hugging Face TRL 1.16 doing the same work: step time, tokens/s, peak RSS and the curves.

One sitting runs every (tool, method) pair in its own child process (so a process's peak RSS, `ru_maxrss`, is
that run's own), alternating the tools method by method and repeat by repeat (posttrain, TRL, posttrain, TRL,
...), with the fp32 GEMM rate measured at the start and at the end of the sitting (`sft_speed.matmul_gflops`) so
that a machine that changed speed under the runs shows. Both tools read the same model folder (the embedded
SmolLM2-135M-Instruct, converted once from its GGUF by `posttrain.models.resolve_model`), the same data files
(written once from posttrain's built-in tasks, as chat messages, which both tools render with the model's chat
template) and the settings of `MATCHED`; the report states them, including where the two tools cannot be made
to agree (`MATCHED["known differences"]`).

Per method it reports the median step time (the first step of each run, a warm-up, is left out), tokens/s
(SFT and DPO: the non-padding tokens of the training forward; GRPO and PPO: the generated completion tokens),
peak RSS through the last training step, the posttrain/TRL ratios, and both tools' per-step loss (SFT, DPO) or
mean reward (GRPO) so that speed is never bought with different math. Everything also goes to a JSON file.

    pip install -e ".[bench]"                                   # TRL 1.16.0, only for this benchmark
    python benchmarks/trl_compare.py                            # everything, 8 steps per run, 2 repeats
    python benchmarks/trl_compare.py --methods dpo-lora --steps 3 --repeats 1
    python benchmarks/trl_compare.py --smoke                    # tiny random model, 2 steps: checks the plumbing
    python benchmarks/trl_compare.py --trl-path /tmp/trl-site   # TRL installed with pip --target in a folder

The child side (what one run does in each tool) is `trl_runners.py`. TRL 1.16 has no PPO trainer (it was
removed from the library), so PPO runs in posttrain only, for its own figures.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOOLS = ("posttrain", "trl")

# What each method is, as both tools run it; `trl` says why TRL does not run it, where it has no trainer for it.
METHODS: dict[str, dict] = {
    "sft-full": {"kind": "sft", "technique": "full", "measure": "loss"},
    "sft-lora": {"kind": "sft", "technique": "lora", "measure": "loss"},
    "dpo-lora": {"kind": "dpo", "technique": "lora", "measure": "loss"},
    "grpo-lora": {"kind": "grpo", "technique": "lora", "measure": "reward"},
    "ppo-lora": {"kind": "ppo", "technique": "lora", "measure": "reward",
                 "trl": "TRL 1.16 has no PPO trainer (PPOTrainer was removed from TRL; nothing under trl/ or "
                        "trl/experimental/ implements PPO), so PPO runs in posttrain only"},
}  # fmt: skip
DEFAULT_METHODS = ("sft-full", "sft-lora", "dpo-lora", "grpo-lora")

# The shared hyperparameters; both runners read them from here.
SETTINGS = {
    "batch_size": 8,  # SFT rows, DPO pairs, RL completions per micro-batch
    "max_length": 256,
    "lr": 1e-4,
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.0,
    "dpo_beta": 0.1,
    "rl_prompts": 4,  # GRPO: prompts per step, each sampled `rl_group` times
    "rl_group": 8,
    "rl_completions": 32,  # per optimisation step (PPO: 32 prompts, one completion each)
    "max_new_tokens": 64,
    "temperature": 1.0,
    "seed": 0,
    "dtype": "float32",  # --dtype bfloat16: both tools autocast to bf16 (posttrain model.dtype, TRL bf16=True)
}

MATCHED: dict[str, str] = {
    "model": "the same HF folder (embedded SmolLM2-135M-Instruct, converted once from its GGUF), fp32 weights and "
             "fp32 compute in both (TRL: bf16=False; its default is bf16 autocast, even on CPU)",
    "batch": "8 rows (SFT), 8 pairs = 16 sequences (DPO), 4 prompts x 8 completions = 32 sequences per step in "
             "micro-batches of 8 (GRPO; TRL: per_device_train_batch_size 8, gradient_accumulation_steps 4, one "
             "generation per step)",
    "data order": "file order, no shuffling (TRL: train_sampling_strategy=sequential, GRPO shuffle_dataset=False; "
                  "posttrain: data.shuffle=false); every row is used once",
    "max length": "256 tokens (no row of these files reaches it)",
    "LoRA": "r=16, alpha=32, dropout 0, every linear layer but the LM head (peft all-linear), fresh adapters",
    "optimiser": "AdamW lr 1e-4, betas (0.9, 0.999), eps 1e-8, weight decay 0, gradient clipping at norm 1.0",
    "schedule": "constant learning rate, no warmup (TRL: lr_scheduler_type=constant; its default is linear decay)",
    "gradient checkpointing": "off in both (TRL's default is on)",
    "dropout": "the model's own is 0; LoRA dropout 0",
    "SFT loss": "cross-entropy on the completion tokens only, summed over the step and divided by the step's "
                "target tokens (both tools normalise over the whole step, not per micro-batch)",
    "DPO loss": "sigmoid, beta 0.1, sequence log-prob = sum over the response tokens, mean over pairs; reference "
                "= the base model with the adapter disabled, one extra no-grad forward every step in both "
                "(posttrain reference=adapter; TRL precompute_ref_log_probs=False)",
    "GRPO": "T=1.0, top_p 1, top_k 0, up to 64 new tokens, beta 0 (no reference forward: posttrain "
            "grpo.log_kl=false, TRL loads none at beta 0), loss dapo (token mean over the step), advantages "
            "normalised by the group std, clip 0.2, one optimisation step per rollout (old log-probs = the "
            "detached new ones in both), truncated completions keep their reward and their loss (posttrain "
            "rollout.overlong=score, TRL mask_truncated_completions=False), reward = posttrain's built-in "
            "arithmetic `task` score in both",
    "extra forwards for logging": "none in either: TRL's SFT/DPO entropy and token accuracy come out of its fused "
                                  "LM head in the training forward; posttrain's GRPO KL log is switched off",
    "timing": "a step = the wall time between the ends of two consecutive optimisation steps (TRL: on_step_end "
              "callback; posttrain: metrics.jsonl elapsed_s), so it includes batch collation, generation (RL) "
              "and logging; the first step of each run is a warm-up and is not counted",
    "peak RSS": "ru_maxrss of the run's own process at the end of its last step (model load included, final "
                "save excluded)",
    "known differences": "TRL renders a completion as prompt+completion minus prompt, so it also trains (SFT) "
                         "and scores (DPO) the newline the chat template writes after <|im_end|>: one token more "
                         "per sequence than posttrain, which stops at <|im_end|>. Both use torch's fused AdamW "
                         "kernel (TRL's default adamw_torch_fused; posttrain's build_optimizer where it applies)",
}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Pure helpers (tested in tests/unit/test_trl_compare.py)


def step_times(step_ends: list[float], start: float) -> list[float]:
    """Durations of each step from the times its end was reached; the first step runs from `start`.

    >>> step_times([3.0, 5.0, 6.5], start=1.0)
    [2.0, 2.0, 1.5]
    """
    marks = [start, *step_ends]
    return [b - a for a, b in zip(marks, marks[1:])]


def timed_steps(runs: list[dict], warmup: int = 1) -> tuple[list[float], list[float]]:
    """(step times, tokens per step) of every step after the first `warmup` of each run, pooled over runs."""
    times, tokens = [], []
    for run in runs:
        times += run["step_s"][warmup:]
        tokens += run["tokens"][warmup:]
    return times, tokens


def summarise(runs: list[dict], warmup: int = 1) -> dict | None:
    """One tool's figures for one method over its repeats: median step time, tokens/s (total tokens over total
    time of the timed steps), the highest peak RSS, and each repeat's own median (the spread). None if no run
    has a step past the warm-up.

    >>> r = summarise([{"step_s": [9.0, 2.0, 4.0], "tokens": [5, 100, 100], "peak_rss_gb": 1.5},
    ...                {"step_s": [8.0, 3.0, 3.0], "tokens": [5, 100, 100], "peak_rss_gb": 1.7}])
    >>> r["step_s"], r["tokens_per_s"], r["peak_rss_gb"], r["repeat_step_s"]
    (3.0, 33.333333333333336, 1.7, [3.0, 3.0])
    """
    times, tokens = timed_steps(runs, warmup)
    if not times:
        return None
    return {
        "step_s": statistics.median(times),
        "tokens_per_s": sum(tokens) / sum(times),
        "peak_rss_gb": max(r["peak_rss_gb"] for r in runs),
        "repeat_step_s": [statistics.median(r["step_s"][warmup:]) for r in runs if r["step_s"][warmup:]],
        "timed_steps": len(times),
    }


def ratio(ours: float | None, theirs: float | None) -> float | None:
    """posttrain / TRL, or None when either is missing or TRL's is 0.

    >>> ratio(3.0, 4.0), ratio(None, 4.0), ratio(1.0, 0.0)
    (0.75, None, None)
    """
    if ours is None or not theirs:
        return None
    return ours / theirs


def schedule(methods: list[str], repeats: int, tools_of) -> list[tuple[int, str, str]]:
    """The sitting's order: for each repeat, method by method, posttrain then TRL (A B A B), so that a machine
    whose speed drifts during the sitting weighs on both tools alike. `tools_of(method)` gives the tools that run
    it (PPO: posttrain only).

    >>> schedule(["a", "b"], 2, lambda m: ("posttrain", "trl") if m == "a" else ("posttrain",))
    [(0, 'a', 'posttrain'), (0, 'a', 'trl'), (0, 'b', 'posttrain'), (1, 'a', 'posttrain'), (1, 'a', 'trl'), (1, 'b', 'posttrain')]
    """
    return [(rep, m, tool) for rep in range(repeats) for m in methods for tool in tools_of(m)]


def tools_of(method: str) -> tuple[str, ...]:
    """The tools that run `method`: both, or posttrain alone where TRL has no trainer for it."""
    return TOOLS if METHODS[method].get("trl", True) is True else ("posttrain",)


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def curve_spread(runs: list[dict]) -> float | None:
    """The largest difference between the repeats' curves of one tool at the same step (0.0: the runs are
    deterministic); None with a single repeat.

    >>> curve_spread([{"curve": [0.7, 0.5]}, {"curve": [0.7, 0.45]}])
    0.05
    """
    if len(runs) < 2:
        return None
    return round(max(abs(a - b) for r in runs[1:] for a, b in zip(runs[0]["curve"], r["curve"])), 12)


def speed_table(summaries: dict[str, dict[str, dict | None]]) -> str:
    """The results table in Markdown: one row per method, each figure for posttrain, TRL and their ratio.

    >>> print(speed_table({"sft-lora": {"posttrain": {"step_s": 3.0, "tokens_per_s": 300.0, "peak_rss_gb": 3.2},
    ...                                 "trl": {"step_s": 4.0, "tokens_per_s": 240.0, "peak_rss_gb": 4.0}}}))
    | method | step time (s) posttrain / TRL | ratio | tokens/s posttrain / TRL | ratio | peak RSS (GB) posttrain / TRL | ratio |
    |---|---|---|---|---|---|---|
    | sft-lora | 3.00 / 4.00 | 0.75x | 300 / 240 | 1.25x | 3.20 / 4.00 | 0.80x |
    """
    lines = [
        "| method | step time (s) posttrain / TRL | ratio | tokens/s posttrain / TRL | ratio "
        "| peak RSS (GB) posttrain / TRL | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, by_tool in summaries.items():
        ours, theirs = by_tool.get("posttrain") or {}, by_tool.get("trl") or {}
        cells = [method]
        for key, spec in (("step_s", ".2f"), ("tokens_per_s", ".0f"), ("peak_rss_gb", ".2f")):
            a, b = ours.get(key), theirs.get(key)
            cells += [f"{_fmt(a, spec)} / {_fmt(b, spec)}", _fmt(ratio(a, b), ".2f", "x")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curve_table(curves: dict[str, list[float]], label: str) -> str:
    """Per-step values of each tool side by side (Markdown), and their difference.

    >>> print(curve_table({"posttrain": [0.6931, 0.5], "trl": [0.6931, 0.52]}, "loss"))
    | step | loss posttrain | loss TRL | posttrain - TRL |
    |---|---|---|---|
    | 1 | 0.6931 | 0.6931 | +0.0000 |
    | 2 | 0.5000 | 0.5200 | -0.0200 |
    """
    ours, theirs = curves.get("posttrain", []), curves.get("trl", [])
    lines = [f"| step | {label} posttrain | {label} TRL | posttrain - TRL |", "|---|---|---|---|"]
    for i in range(max(len(ours), len(theirs))):
        a = ours[i] if i < len(ours) else None
        b = theirs[i] if i < len(theirs) else None
        diff = _fmt(a - b, "+.4f") if a is not None and b is not None else "-"
        lines.append(f"| {i + 1} | {_fmt(a, '.4f')} | {_fmt(b, '.4f')} | {diff} |")
    return "\n".join(lines)


def matched_settings(dtype: str = "float32") -> dict[str, str]:
    """`MATCHED`, with the model row saying bf16 autocast in both where `--dtype bfloat16` ran."""
    if dtype != "bfloat16":
        return MATCHED
    return {**MATCHED, "model": "the same HF folder (embedded SmolLM2-135M-Instruct, converted once from its GGUF), "
                                "bf16 autocast in both (posttrain model.dtype=bfloat16, TRL bf16=True; --dtype "
                                "bfloat16), weights that train in fp32"}  # fmt: skip


def settings_text(matched: dict[str, str] = MATCHED) -> str:
    """The matched settings as a Markdown list (printed with every report)."""
    return "\n".join(f"- {k}: {v}" for k, v in matched.items())


TRL_MISSING = (
    "trl_compare.py needs Hugging Face TRL 1.16.0 to run the TRL side, and it is not importable here{where}. "
    "Install the benchmark extra with `pip install -e \".[bench]\"` (TRL is never a dependency of posttrain "
    "itself), or install it into a separate folder with `pip install --no-deps --target DIR trl==1.16.0` and pass "
    "`--trl-path DIR`; or run posttrain alone with `--tools posttrain`."
)


def trl_missing(trl_path: str | None) -> str | None:
    """None when trl can be imported (from `trl_path` when given, else the environment), else the one-paragraph
    message saying how to install it."""
    if trl_path is not None:
        found = (Path(trl_path) / "trl" / "__init__.py").is_file()
        return None if found else TRL_MISSING.format(where=f" (no trl/ package in --trl-path {trl_path})")
    return None if importlib.util.find_spec("trl") is not None else TRL_MISSING.format(where="")


# ---------------------------------------------------------------------------------------------------------------
# The data, written once per sitting


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def write_data(workdir: Path, kinds: set[str], steps: int, s: dict = SETTINGS) -> dict[str, Path]:
    """One JSONL file per method kind, exactly the rows `steps` steps use (one pass, file order), as chat
    messages, which posttrain and TRL both render with the model's chat template (a plain-string row would go
    through the template in posttrain but reach the model as raw text in TRL):
    sft: the built-in structured task (the quickstart's); dpo: arithmetic pairs (one operation, amounts up to 10,
    the quickstart recipes' setting), chosen = the task's answer, rejected = a wrong, off-format or rambling one;
    grpo, ppo: arithmetic prompts with their `answer` column for the reward."""
    from posttrain.data import TASKS, make_pairs, make_prompts, write_jsonl
    from posttrain.data.tasks import Arithmetic

    b, seed = s["batch_size"], s["seed"]
    arith = Arithmetic(min_ops=1, max_ops=1, max_value=10)
    makers = {
        "sft": lambda: [{"prompt": _user(r["prompt"]), "completion": _assistant(r["completion"])}
                        for r in TASKS["structured"].make(b * steps, seed=seed, split="train")],
        "dpo": lambda: [{"prompt": _user(r["prompt"]), "chosen": _assistant(r["chosen"]),
                         "rejected": _assistant(r["rejected"])} for r in make_pairs(arith, b * steps, seed=seed)],
        "grpo": lambda: [{"prompt": _user(r["prompt"]), "answer": r["answer"]}
                         for r in make_prompts(arith, s["rl_prompts"] * steps, seed=seed)],
        "ppo": lambda: [{"prompt": _user(r["prompt"]), "answer": r["answer"]}
                        for r in make_prompts(arith, s["rl_completions"] * steps, seed=seed)],
    }  # fmt: skip
    return {k: write_jsonl(makers[k](), workdir / f"{k}.jsonl") for k in sorted(kinds)}


# ---------------------------------------------------------------------------------------------------------------
# The sitting


def _child(tool: str, method: str, workdir: Path, args, trl_path: str | None) -> dict:
    """Run one (tool, method) in a fresh process; its JSON result (the last stdout line)."""
    cmd = [sys.executable, str(Path(__file__).with_name("trl_runners.py")), tool, method,
           "--workdir", str(workdir), "--steps", str(args.steps),
           *(f"--posttrain-set={item}" for item in args.posttrain_set)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_OFFLINE": "1"}
    repo_src = str(Path(__file__).resolve().parents[1] / "src")
    paths = [repo_src, *([trl_path] if tool == "trl" and trl_path else []), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.pop("LD_PRELOAD", None)
    if library := malloc_library(tool, args.trl_malloc):
        env["LD_PRELOAD"] = library
    log = workdir / f"{tool}-{method}.log"
    with log.open("a") as err:
        out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    if out.returncode:
        tail = log.read_text()[-3000:]
        sys.exit(f"{tool} {method} failed (exit {out.returncode}); the end of {log}:\n{tail}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def malloc_library(tool: str, trl_malloc: str) -> str | None:
    """The library a run's process preloads: posttrain's what `posttrain train` re-executes under
    (`posttrain.cli.allocator`: tcmalloc where installed, honouring POSTTRAIN_MALLOC); TRL's `--trl-malloc`
    (default glibc's, as `python train.py` runs it)."""
    from posttrain.cli import allocator

    if tool == "posttrain":
        return allocator.choose(os.environ)
    return None if trl_malloc == "system" else allocator.choose({allocator.VARIABLE: trl_malloc})


# The smoke run's tiny model reads one byte per token, so the structured task's rows (~420 bytes with the chat
# template) need more than 256 positions; 512 is the tiny model's own limit.
SMOKE_SETTINGS = {**SETTINGS, "max_length": 512}


def prepare(workdir: Path, methods: list[str], steps: int, smoke: bool, dtype: str = "float32") -> dict:
    """Write what every run reads into `workdir/setup.json`: the model folder (the embedded model's cached
    conversion; smoke: a tiny random model), one data file per method kind, and the settings (`dtype`: both
    tools' compute dtype)."""
    workdir.mkdir(parents=True, exist_ok=True)
    if smoke:
        from posttrain.testing import save_tiny_model

        model = save_tiny_model(workdir / "tiny-model", hidden_size=64)
    else:
        from posttrain.models.loading import resolve_model

        model = resolve_model("smollm2-135m-instruct").path  # converted once, then cached
    settings = {**(SMOKE_SETTINGS if smoke else SETTINGS), "dtype": dtype}
    files = write_data(workdir, {METHODS[m]["kind"] for m in methods}, steps, settings)
    setup = {"model": str(model), "steps": steps, "smoke": smoke, "settings": settings,
             "data": {k: str(v) for k, v in files.items()}}  # fmt: skip
    (workdir / "setup.json").write_text(json.dumps(setup, indent=1))
    return setup


def versions(trl_path: str | None) -> dict[str, str]:
    """Installed versions of the libraries both tools run on (trl's from `trl_path` when given)."""
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for pkg in ("posttrain", "torch", "transformers", "peft", "accelerate", "trl"):
        found = [d.version for d in md.distributions(name=pkg, path=[trl_path, *sys.path] if trl_path else sys.path)]
        out[pkg] = found[0] if found else "-"
    return out


def report(result: dict) -> str:
    """The printed report: setting, GEMM rates, the speed table, then each method's curves."""
    g0, g1 = result["gemm_gflops"]
    parts = [
        f"posttrain vs TRL, {result['steps']} steps per run, {result['repeats']} repeat(s), runs alternated "
        f"A B A B; fp32 GEMM (2048^3) {g0:.1f} GFLOP/s at the start, {g1:.1f} at the end of the sitting "
        f"({result['wall_s'] / 60:.1f} min)",
        "versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
        "malloc: " + ", ".join(f"{k} {v}" for k, v in result.get("malloc", {}).items()),
        *(["both tools in bf16 autocast (posttrain model.dtype=bfloat16, TRL bf16=True), not the fp32 of the "
           "matched settings"] if result["settings"].get("dtype") == "bfloat16" else []),
        *([f"posttrain settings over the matched config: {' '.join(result['posttrain_set'])}"]
          if result.get("posttrain_set") else []),
        *(["SMOKE RUN: a tiny random model (max length 512); the figures check the plumbing and mean nothing"]
          if result["smoke"] else []),
        "",
        speed_table(result["summary"]),
        "",
        "tokens/s: SFT and DPO count the non-padding tokens of the training forward (each tool's own count), "
        "GRPO and PPO the generated completion tokens.",
    ]
    for method in result["summary"]:
        spec = METHODS[method]
        if spec.get("trl", True) is not True:
            parts += ["", f"{method}: {spec['trl']}."]
        label = "mean reward" if spec["measure"] == "reward" else "loss"
        parts += ["", f"{method} ({label} per step, repeat 1):", "",
                  curve_table(result["curves"][method], label), ""]  # fmt: skip
        for tool, runs in result["runs"][method].items():
            s, spread = result["summary"][method][tool], curve_spread(runs)
            per_repeat = ", ".join(f"{t:.2f}" for t in s["repeat_step_s"]) if s else "-"
            parts.append(f"{tool}: median step time per repeat {per_repeat} s"
                         + (f"; largest {label} difference between repeats {spread:.2g}" if spread is not None
                            else ""))  # fmt: skip
    parts += ["", "Matched settings:", settings_text(result.get("matched", MATCHED))]
    return "\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=list(METHODS))
    ap.add_argument("--tools", nargs="+", default=list(TOOLS), choices=list(TOOLS))
    ap.add_argument("--steps", type=int, default=8, help="optimisation steps per run (the first is a warm-up)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--trl-path", help="a folder holding the trl package (pip install --target), put on the "
                                       "TRL runs' PYTHONPATH; default: import trl from this environment")  # fmt: skip
    ap.add_argument("--trl-malloc", default="system", choices=["system", "tcmalloc", "jemalloc"],
                    help="the malloc TRL's runs preload (default: glibc's, as TRL runs unless its user preloads one; "
                         "posttrain's runs use what `posttrain train` picks, see POSTTRAIN_MALLOC)")  # fmt: skip
    ap.add_argument("--posttrain-set", action="append", default=[], metavar="KEY=VALUE",
                    help="a posttrain setting over the matched config, e.g. model.compile=true (repeatable); "
                         "recorded in the JSON")  # fmt: skip
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="both tools' compute dtype: bfloat16 is bf16 autocast in both (posttrain model.dtype, TRL "
                         "bf16=True); default float32, as the matched settings say")  # fmt: skip
    ap.add_argument("--smoke", action="store_true", help="a tiny random model, 2 steps, 1 repeat (plumbing only)")
    ap.add_argument("--workdir", help="where setup.json, the data files and the runs' logs go (default: a temporary folder)")
    ap.add_argument("--json", default="trl_compare.json", help="where to write every figure and curve")
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.repeats = 2, 1
    if "trl" in args.tools and (missing := trl_missing(args.trl_path)):
        sys.exit(missing)
    sys.path.insert(0, str(Path(__file__).parent))
    from sft_speed import matmul_gflops  # the same machine-speed yardstick as the SFT benchmark

    started = time.perf_counter()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="trl-compare-"))
    setup = prepare(workdir, args.methods, args.steps, args.smoke, args.dtype)
    gemm = [matmul_gflops()]
    runs: dict[str, dict[str, list[dict]]] = {m: {} for m in args.methods}
    plan = schedule(args.methods, args.repeats, lambda m: [t for t in tools_of(m) if t in args.tools])
    for i, (rep, method, tool) in enumerate(plan, 1):
        t = time.perf_counter()
        row = _child(tool, method, workdir, args, args.trl_path)
        runs[method].setdefault(tool, []).append(row)
        print(f"[{i}/{len(plan)}] repeat {rep + 1} {method} {tool}: {time.perf_counter() - t:.0f} s",
              file=sys.stderr, flush=True)  # fmt: skip
    gemm.append(matmul_gflops())
    result = {
        "steps": args.steps,
        "repeats": args.repeats,
        "smoke": args.smoke,
        "gemm_gflops": gemm,
        "wall_s": time.perf_counter() - started,
        "versions": versions(args.trl_path),
        "date": time.strftime("%Y-%m-%d"),
        "matched": matched_settings(args.dtype),
        "malloc": {t: malloc_library(t, args.trl_malloc) or "glibc" for t in args.tools},
        "model": setup["model"],
        "settings": setup["settings"],
        "posttrain_set": args.posttrain_set,
        "summary": {m: {t: summarise(r) for t, r in by_tool.items()} for m, by_tool in runs.items()},
        "curves": {m: {t: r[0]["curve"] for t, r in by_tool.items()} for m, by_tool in runs.items()},
        "runs": runs,
    }
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(report(result))
    print(f"\n(every figure and curve: {args.json}; logs: {workdir})")


if __name__ == "__main__":
    main()
