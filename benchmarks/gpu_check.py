"""The Python half of `benchmarks/gpu_check.sh` (issue 16's GPU checks): what each check trains, in one process
per group, and the results table. The shell script runs these steps, each under its own `timeout`:

    python benchmarks/gpu_check.py device OUT            versions and GPUs -> OUT/device.txt
    python benchmarks/gpu_check.py data OUT              small built-in datasets -> OUT/data/*.jsonl
    python benchmarks/gpu_check.py train OUT RUN [RUN]   the named `RUNS`, one after the other in this process
    python benchmarks/gpu_check.py table OUT             OUT/results.md: every check's status, measured peak
                                                         memory against `posttrain estimate`'s figure, log-prob gaps

The table ends with the vLLM verdicts (`engine_comparison`): grpo_vllm's reward curve against grpo_hf's within noise,
and its sampler/trainer log-prob gap under the stated `LOGP_GAP_BOUND`.

`train` records each run as it ends (OUT/status.txt, OUT/RUN/gpu_check_rankR.json), so a group stopped by its
timeout still reports the runs it finished. Peak memory is `torch.cuda.max_memory_allocated` of the run alone (the
counter is reset before each run) on the process's own GPU; under torchrun each process writes its own. vLLM's
memory is not in it (its engine runs in another process, and its sleep mode allocates outside PyTorch's caching
allocator), while the estimate for `rollout_engine=vllm` counts vLLM's weights and KV cache: for grpo_vllm compare
the estimate with `device used GB` (the GPU's used memory when the run ended, every process included) as well. The
server-mode run gets no estimate (the server's memory is another process's).

`--cpu`: a dry run on the CPU with a tiny random model, 2 steps a run and float32, to check this script and the
shell script where no GPU is (`GPU_CHECK_CPU=1 bash benchmarks/gpu_check.sh`). It measures nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"  # the embedded model: no download on the GPU machine
COMMON = ["run.progress=false", "run.report=false", "data.eval=null", "run.save_every=1000"]
# GRPO: 2 prompts x 8 completions of at most 32 tokens per step; one prompt's group per micro-batch, so that the
# estimate (whose batch is prompts, each with its group) describes the same forward.
GRPO = ["algorithm.rollout.batch_size=16", "optim.batch_size=16", "optim.micro_batch_size=8",
        "algorithm.rollout.max_new_tokens=32"]  # fmt: skip
SERVER_URL = os.environ.get("GPU_CHECK_VLLM_URL", "http://127.0.0.1:8765")
LOGP_GAP_BOUND = 0.05
"""The stated bound for colocated vLLM (bf16) against the trainer (bf16 autocast over float32 weights): the mean per
token |log pi_sampler - log pi_trainer| (`logp_gap_sampler_trainer`) at every step that trains a completion. Both score the same weights at
the same temperature, so what is left is kernels and rounding: bf16 carries ~3 significant digits, so a few 1e-3
per token is rounding alone; 0.05 leaves room for attention kernels and batching, and is an order of magnitude under
what a missed weight push gives (0.1-0.2 on the test model after one step: docs/scale.md)."""
SE_BOUND = 3.0
"""How many standard errors apart two engines' mean rewards at a step may be and still count as the same curve."""


@dataclass
class Run:
    """One training run of a check: a config of configs/, its overrides ({out}: the check's folder), its steps."""

    config: str
    overrides: list[str]
    steps: int
    data: str
    estimate: dict = field(default_factory=dict)  # what the estimator is told beyond the run's config


RUNS = {
    # 1. the CUDA/bf16 training path: bf16 mixed precision (fp32 master weights + autocast), LoRA
    "sft_bf16": Run("configs/sft_lora.yaml", ["run.eval_every=null"], 4, "sft.jsonl"),
    # full fine-tuning in one process: the tied embeddings' gradient handed over by the graph, the output layer's
    # row blocks and weight-gradient slices, the SFT rows' common prefix once (per-example attention) on CUDA
    "sft_full_bf16": Run("configs/sft_full.yaml", ["run.eval_every=null"], 4, "sft.jsonl"),
    "dpo_bf16": Run("configs/dpo_lora.yaml", ["run.eval_every=null"], 4, "pairs.jsonl"),
    "grpo_hf": Run("configs/grpo_lora.yaml", GRPO, 3, "prompts.jsonl", {"reward_function": True}),
    # the same, sampling from merged LoRA weights (off on GPUs by default: its sampling time and peak decide that)
    "grpo_hf_merged": Run("configs/grpo_lora.yaml", [*GRPO, "algorithm.rollout.merge_adapters=true"], 3,
                          "prompts.jsonl", {"reward_function": True}),
    # 2. vLLM colocated (sleeps between rollouts) and in server mode (`posttrain vllm-serve`, started by the script)
    "grpo_vllm": Run("configs/grpo_lora.yaml", [*GRPO, "algorithm.rollout.engine=vllm"], 3, "prompts.jsonl",
                     {"reward_function": True}),
    "grpo_vllm_server": Run("configs/grpo_lora.yaml", [*GRPO, "algorithm.rollout.engine=vllm-server",
                            f"algorithm.rollout.vllm_server_url={SERVER_URL}", "algorithm.rollout.vllm_server_timeout=150",
                            "algorithm.rollout.tis_cap=2"], 3, "prompts.jsonl"),  # fmt: skip
    # 3. FSDP2 over 2 processes (torchrun): full fine-tuning of SFT, and PPO with its value head sharded too
    "fsdp2_sft": Run("configs/sft_full.yaml", ["run.sharding=fsdp2", "optim.micro_batch_size=2"], 3, "sft.jsonl",
                     {"num_gpus": 2, "sharding": "fsdp"}),
    "fsdp2_ppo": Run("configs/ppo_lora.yaml", ["run.sharding=fsdp2", "technique.name=full", "optim.lr=1e-5",
                     "algorithm.rollout.max_new_tokens=16", "algorithm.rollout.epochs=1", "optim.micro_batch_size=4"],
                     2, "prompts.jsonl", {"num_gpus": 2, "sharding": "fsdp", "value_model": "head",
                                          "reward_function": True}),  # fmt: skip
}


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _cpu_model(out: Path) -> str:
    """The dry run's model: a tiny random Llama with a byte tokenizer, made once in OUT/tiny-model."""
    from posttrain.testing import save_tiny_model

    path = out / "tiny-model"
    if not (path / "config.json").exists() and _rank() == 0:
        save_tiny_model(path, hidden_size=64)
    for _ in range(600):  # another process of a torchrun launch may still be writing it
        if (path / "tokenizer_config.json").exists():
            break
        time.sleep(0.1)
    return str(path)


def overrides(name: str, out: Path, cpu: bool) -> list[str]:
    """The run's overrides: bf16 mixed precision on a GPU; float32 on the CPU (the FSDP2 check where one GPU
    cannot hold two processes), where `cpu` (the dry run) also swaps in the tiny model."""
    import torch

    run = RUNS[name]
    dtype = "model.dtype=bfloat16" if torch.cuda.is_available() and not cpu else "model.dtype=float32"
    model = [f"model.name={_cpu_model(out)}", dtype] if cpu else [dtype]
    return [*COMMON, *run.overrides, *model, f"data.train={out / 'data' / run.data}",
            f"run.max_steps={2 if cpu else run.steps}", f"run.output_dir={out / name}"]


# ---- steps


def device(out: Path) -> None:
    import accelerate
    import peft
    import torch
    import transformers

    lines = [f"gpu: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NONE'}",
             f"gpus: {torch.cuda.device_count()} bf16: {torch.cuda.is_available() and torch.cuda.is_bf16_supported()}",
             f"torch {torch.__version__} cuda {torch.version.cuda} transformers {transformers.__version__} "
             f"accelerate {accelerate.__version__} peft {peft.__version__}"]  # fmt: skip
    try:
        import vllm

        lines.append(f"vllm {vllm.__version__}")
    except ImportError:
        lines.append("vllm not installed")
    (out / "device.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


def data(out: Path) -> None:
    """The built-in tasks' data, small, made in this one process (one interpreter start, not three)."""
    from posttrain.cli import main

    d = out / "data"
    d.mkdir(parents=True, exist_ok=True)
    for argv in (["data", "make", "structured", "--n", "64", "--out", str(d / "sft.jsonl")],
                 ["data", "make", "arithmetic", "--kind", "preference", "--n", "64", "--out", str(d / "pairs.jsonl")],
                 ["data", "make", "arithmetic", "--kind", "prompts", "--n", "64", "--max-ops", "1", "--max-value",
                  "10", "--out", str(d / "prompts.jsonl")]):  # fmt: skip
        if main(argv) != 0:
            raise SystemExit(f"posttrain {' '.join(argv)} failed")


def train(out: Path, names: list[str], cpu: bool) -> int:
    """Train each named run in this process; record its status, time and peak memory as soon as it ends."""
    import torch

    from posttrain.algorithms import load_config
    from posttrain.train import train as train_run

    cuda = torch.cuda.is_available() and not cpu
    if cuda:  # under torchrun, this process's GPU before anything touches one (Accelerate would set it later)
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    failed = 0
    for name in names:
        started = time.monotonic()
        if cuda:  # this run's peak, not the process's
            torch.cuda.reset_peak_memory_stats()
        try:
            train_run(load_config(REPO / RUNS[name].config, overrides(name, out, cpu)))
            status = "PASS"
        except Exception as err:  # one failed run must not hide the next: report it and go on
            traceback.print_exc()
            status = f"FAIL ({type(err).__name__}: {' '.join(str(err).split())[:240]})"
            failed += 1
        record = {"status": status, "seconds": round(time.monotonic() - started, 1)}
        if cuda:
            free, total = torch.cuda.mem_get_info()
            record.update(peak_allocated_gb=torch.cuda.max_memory_allocated() / 1e9,
                          device_used_gb=(total - free) / 1e9)  # fmt: skip
        (out / name).mkdir(parents=True, exist_ok=True)
        (out / name / f"gpu_check_rank{_rank()}.json").write_text(json.dumps(record) + "\n", encoding="utf-8")
        if _rank() == 0:
            with open(out / "status.txt", "a", encoding="utf-8") as f:
                f.write(f"{name} {status} {record['seconds']}s\n")
        print(f"{name}: {status} in {record['seconds']}s", flush=True)
    return 1 if failed else 0


# ---- the table


def engine_comparison(hf: list[dict], vllm: list[dict], n: int) -> list[str]:
    """grpo_vllm against grpo_hf, each a run's step records: the reward curves agree within noise (at each step the
    mean rewards differ by at most `SE_BOUND` standard errors of their difference, sqrt(s_hf^2 + s_vllm^2) / sqrt(n)
    over the step's n completions each, and at least 1/n: two runs whose rewards happen to be all equal) and vLLM's
    sampler/trainer gap stays under `LOGP_GAP_BOUND` at every step. Lines for results.md, each ending PASS or FAIL.

    >>> engine_comparison([{"reward/total_mean": 0.5, "reward/total_std": 0.5}],
    ...                   [{"reward/total_mean": 0.6, "reward/total_std": 0.5, "logp_gap_sampler_trainer": 0.01}], 16)[1]
    'log-prob gap (vLLM sampler against the trainer), max over 1 steps: 1.00e-02 (bound 0.05): PASS'
    >>> engine_comparison([{"reward/total_mean": 0.0, "reward/total_std": 0.0}] * 2,
    ...                   [{"reward/total_mean": 0.0, "reward/total_std": 0.0, "skipped_fraction": 1.0},
    ...                    {"reward/total_mean": 0.0, "reward/total_std": 0.0, "skipped_fraction": 0.5}], 16)[1]
    'log-prob gap (vLLM sampler against the trainer), max over 0 steps, 1 step(s) trained no completion: inf (bound 0.05): FAIL'
    """
    if not hf or not vllm:
        return ["vLLM against HF: not compared (" + ("grpo_hf" if not hf else "grpo_vllm") + " has no steps)"]
    worst = 0.0
    for h, v in zip(hf, vllm):
        se = max(((h["reward/total_std"] ** 2 + v["reward/total_std"] ** 2) / n) ** 0.5, 1 / n)
        worst = max(worst, abs(h["reward/total_mean"] - v["reward/total_mean"]) / se)
    steps = min(len(hf), len(vllm))
    gaps = [r["logp_gap_sampler_trainer"] for r in vllm if "logp_gap_sampler_trainer" in r]
    gap = max(gaps) if gaps else float("inf")
    # A step whose completions all had advantage 0 trains none of them (`skip_zero_advantage`): no trainer forward,
    # no gap. Every other step must have one.
    trained = [r for r in vllm if r.get("skipped_fraction", 0.0) < 1.0]
    skipped = f", {len(vllm) - len(trained)} step(s) trained no completion" if len(trained) < len(vllm) else ""
    return [f"reward curve, vLLM against HF over {steps} steps of {n} completions: largest difference "
            f"{worst:.2f} standard errors (bound {SE_BOUND:g}): {'PASS' if worst <= SE_BOUND else 'FAIL'}",
            f"log-prob gap (vLLM sampler against the trainer), max over {len(gaps)} steps{skipped}: {gap:.2e} "
            f"(bound {LOGP_GAP_BOUND:g}): {'PASS' if gaps and len(gaps) == len(trained) and gap <= LOGP_GAP_BOUND else 'FAIL'}"]  # fmt: skip



def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r for r in (json.loads(line) for line in path.read_text().splitlines() if line.strip()) if "loss" in r]


def _estimate(name: str, run_dir: Path, metrics: list[dict], model: str) -> tuple[str, str]:
    """`posttrain estimate`'s peak memory per GPU (GB) for the run as configured, at data.max_length and at the
    mean tokens per sequence it trained on (batches are padded to their longest row, not to max_length)."""
    import yaml

    from posttrain.estimator import estimate

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    alg, optim, tech = cfg["algorithm"], cfg["optim"], cfg["technique"]
    method = alg["name"]
    if method == "rloo":
        return "-", "-"  # not a method the estimator knows
    precision = "bf16-mixed" if cfg["model"]["dtype"] == "bfloat16" else "fp32"
    micro = optim.get("micro_batch_size") or optim["batch_size"]
    kw = dict(RUNS[name].estimate)
    if method in ("grpo", "ppo", "rloo"):
        group = alg.get("num_generations", 1)
        kw.update(completion_len=alg["rollout"]["max_new_tokens"],
                  rollout_engine="vllm" if alg["rollout"]["engine"] == "vllm" else "hf")  # fmt: skip
        if method != "ppo":  # PPO samples one completion a prompt: the estimator refuses a group size for it
            kw["group_size"] = group
        micro = max(1, micro // group)  # prompts, each with its group
        if method == "grpo" and not alg.get("beta"):
            kw["reference"] = "none"
    # `tokens`: a step's, over its batch_size sequences (pairs for DPO and reward models: two sequences each)
    per_step = optim["batch_size"] * (2 if method in ("dpo", "reward") else 1)
    tokens = [r["tokens"] / per_step for r in metrics if "tokens" in r]
    out = []
    for seq in (cfg["data"]["max_length"], round(sum(tokens) / len(tokens)) if tokens else None):
        if seq is None:
            out.append("-")
            continue
        est = estimate(model, method=method, technique=tech["name"], precision=precision, batch_size=micro,
                       seq_len=max(seq, kw.get("completion_len", 0) + 1), lora_rank=tech.get("r", 16),
                       gradient_checkpointing=cfg["model"].get("gradient_checkpointing", False), **kw)  # fmt: skip
        out.append(f"{est.peak_memory_gb:.2f}")
    return out[0], out[1]


def table(out: Path, cpu: bool) -> None:
    status = (out / "status.txt").read_text(encoding="utf-8").splitlines() if (out / "status.txt").exists() else []
    lines = ["# GPU check", "", "```", (out / "device.txt").read_text(encoding="utf-8").strip() if
             (out / "device.txt").exists() else "no device.txt", "```", "", "```",
             (out / "status.txt").read_text(encoding="utf-8").strip() if (out / "status.txt").exists() else "",
             "```", "",
             "| run | status | steps | s | last loss | peak allocated GB (measured) | estimate GB at max_length / at "
             "mean length | device used GB | logp gap max | tis capped max | reward mean per step |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---|"]  # fmt: skip
    model = str(out / "tiny-model") if cpu else "smollm2-135m"
    for name in RUNS:
        run_dir = out / name
        rec_path = run_dir / "gpu_check_rank0.json"
        rec = json.loads(rec_path.read_text()) if rec_path.exists() else None
        metrics = _metrics(run_dir)
        if rec is None and not metrics:
            said = [line.split(" ", 1)[1] for line in status if line.split(" ", 1)[0] == name]
            lines.append(f"| {name} | {said[-1] if said else 'not run, or stopped by its timeout'} | | | | | | | | | |")
            continue
        ranks = sorted(run_dir.glob("gpu_check_rank*.json"))
        peaks = [json.loads(p.read_text()).get("peak_allocated_gb") for p in ranks]
        peak = " / ".join(f"{p:.2f}" for p in peaks if p is not None) or "-"
        est = "-"
        if (run_dir / "config.yaml").exists() and name != "grpo_vllm_server":  # server: its memory is elsewhere
            try:
                est = " / ".join(_estimate(name, run_dir, metrics, model))
            except Exception as err:  # the table must still be written
                est = f"error: {type(err).__name__}"
        gap = max((r["logp_gap_sampler_trainer"] for r in metrics if "logp_gap_sampler_trainer" in r), default=None)
        capped = max((r["tis_capped_fraction"] for r in metrics if "tis_capped_fraction" in r), default=None)
        reward = [round(r["reward/total_mean"], 3) for r in metrics if "reward/total_mean" in r]
        used = rec.get("device_used_gb") if rec else None
        lines.append(
            f"| {name} | {rec['status'] if rec else 'no record'} | {len(metrics)} | {rec['seconds'] if rec else ''} | "
            f"{metrics[-1]['loss']:.4f} | {peak} | {est} | {f'{used:.1f}' if used is not None else '-'} | "
            f"{'-' if gap is None else f'{gap:.2e}'} | {'-' if capped is None else f'{capped:.3f}'} | {reward} |"
            if metrics else f"| {name} | {rec['status']} | 0 | {rec['seconds']} | | | | | | | |"
        )  # fmt: skip
    if (out / "grpo_vllm" / "config.yaml").exists():
        import yaml

        rollout = yaml.safe_load((out / "grpo_vllm" / "config.yaml").read_text(encoding="utf-8"))["algorithm"]["rollout"]
        lines += ["", *engine_comparison(_metrics(out / "grpo_hf"), _metrics(out / "grpo_vllm"), rollout["batch_size"])]
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("step", choices=["device", "data", "train", "table"])
    ap.add_argument("out", type=Path)
    ap.add_argument("runs", nargs="*", help=f"train: the runs, in order ({', '.join(RUNS)})")
    ap.add_argument("--cpu", action="store_true", default=os.environ.get("GPU_CHECK_CPU") == "1",
                    help="dry run on the CPU with a tiny model (also GPU_CHECK_CPU=1)")  # fmt: skip
    args = ap.parse_args(argv)
    if unknown := [r for r in args.runs if r not in RUNS]:
        ap.error(f"unknown runs {unknown}; choose from {', '.join(RUNS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.step == "device":
        device(args.out)
    elif args.step == "data":
        data(args.out)
    elif args.step == "train":
        return train(args.out, args.runs, args.cpu)
    else:
        table(args.out, args.cpu)
    return 0


if __name__ == "__main__":
    sys.exit(main())
