"""Step time and peak memory of DPO (each way of holding the reference), GRPO and PPO on the embedded model.

Every case is a real `posttrain.train.train` run of a few steps in a fresh child process (so peak RSS is that
case's own), LoRA r=16 on every linear layer of the embedded SmolLM2-135M-Instruct, the built-in arithmetic
task at one operation with amounts up to 10 (the quickstart recipes' setting). From the run's metrics.jsonl it
reports the mean step time over the steps after the first (the first includes one-off warm-up), split for RL
into generation (`gen_time_s`) and training, and the setup time before the first step (model load, plus the
reference pass for DPO `precompute`).

    python benchmarks/method_speed.py                        # every case, 3 steps each (~20 min on 2 cores)
    python benchmarks/method_speed.py --cases dpo-adapter dpo-copy --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

PAIRS, PROMPTS = 64, 64  # training rows written for the runs (more than the steps use)
CASES: dict[str, dict] = {
    # DPO: 8 pairs per step (16 sequences in one concatenated forward)
    "dpo-adapter": {"algorithm": {"name": "dpo", "dpo": {"reference": "adapter"}}},
    "dpo-precompute": {"algorithm": {"name": "dpo", "dpo": {"reference": "precompute"}}},
    "dpo-copy": {"algorithm": {"name": "dpo", "dpo": {"reference": "copy"}}},
    "dpo-simpo": {"algorithm": {"name": "dpo", "dpo": {"loss_type": "simpo", "beta": 2.0}}},
    # RL: 32 completions per step (GRPO: 4 prompts x 8, its KL logged), up to 64 new tokens at temperature 0.7
    "grpo": {
        "algorithm": {"name": "grpo", "rewards": ["task"],
                      "rollout": {"batch_size": 32, "max_new_tokens": 64, "temperature": 0.7},
                      "grpo": {"num_generations": 8}},
        "optim": {"batch_size": 32, "micro_batch_size": 8},
    },
    "ppo": {
        "algorithm": {"name": "ppo", "rewards": ["task"],
                      "rollout": {"batch_size": 32, "max_new_tokens": 64, "temperature": 0.7}},
        "optim": {"batch_size": 32, "micro_batch_size": 8},
    },
}  # fmt: skip


def child(case: str, steps: int, workdir: str) -> dict:
    """Run one case inside this process; returns its measurements."""
    from posttrain.algorithms import config_from_dict
    from posttrain.data import make_pairs, make_prompts, write_jsonl
    from posttrain.data.tasks import Arithmetic
    from posttrain.train import train

    spec = CASES[case]
    task = Arithmetic(min_ops=1, max_ops=1, max_value=10)
    name = spec["algorithm"]["name"]
    rows = make_pairs(task, PAIRS) if name == "dpo" else make_prompts(task, PROMPTS)
    data = write_jsonl(rows, os.path.join(workdir, "train.jsonl"))
    cfg = {
        "model": {"name": "smollm2-135m-instruct"},
        "technique": {"name": "lora", "r": 16, "alpha": 32},
        "data": {"train": str(data), "max_length": 320, "shuffle": False},
        "algorithm": spec["algorithm"],
        "optim": {"lr": 1e-4, "batch_size": 8, "schedule": "constant", **spec.get("optim", {})},
        "run": {"output_dir": os.path.join(workdir, "run"), "max_steps": steps, "progress": False},
    }
    started = time.perf_counter()
    result = train(config_from_dict(cfg, source=case))
    wall = time.perf_counter() - started
    hist = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = hist[1:] or hist

    def mean(key: str) -> float:
        return sum(h.get(key, 0.0) for h in timed) / len(timed)

    return {
        "case": case,
        "steps": len(hist),
        "step_s": mean("step_time_s"),
        "gen_s": mean("gen_time_s"),
        "prepare_s": mean("prepare_time_s"),
        "train_s": mean("train_time_s"),
        "tokens_per_step": mean("tokens"),
        "setup_s": wall - hist[-1]["elapsed_s"],
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    args = ap.parse_args()
    if args.child:
        with tempfile.TemporaryDirectory(prefix="posttrain-bench-") as workdir:
            print(json.dumps(child(args.child, args.steps, workdir)))
        return
    from sft_speed import matmul_gflops  # the same machine-speed yardstick as the SFT benchmark

    peak = matmul_gflops()
    rows = []
    for case in args.cases:
        cmd = [sys.executable, __file__, "--child", case, "--steps", str(args.steps)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode:
            sys.exit(f"{case} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"done: {case}", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps({"matmul_gflops": peak, "rows": rows}, indent=1))
        return
    print(f"fp32 matmul throughput (2048^3 GEMM): {peak:.1f} GFLOP/s; {args.steps} steps per case, the first "
          "not averaged\n")  # fmt: skip
    print("| case | step time (s) | generation (s) | old/ref/value forwards (s) | training (s) | tokens/step "
          "| setup before step 1 (s) | peak RSS (GB) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        gen = f"{r['gen_s']:.1f}" if r["gen_s"] else "-"
        prep = f"{r['prepare_s']:.1f}" if r["gen_s"] else "-"
        print(f"| {r['case']} | {r['step_s']:.1f} | {gen} | {prep} | {r['train_s']:.1f} | {r['tokens_per_step']:.0f} | "
              f"{r['setup_s']:.0f} | {r['peak_rss_gb']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
