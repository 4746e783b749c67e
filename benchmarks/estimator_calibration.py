"""Calibrate `posttrain estimate` against real runs: predicted vs measured peak memory, as a markdown table.

For SFT with full fine-tuning, LoRA and QLoRA on the embedded SmolLM2-135M-Instruct, this script
  1. makes a small dataset:   posttrain data make structured --n 64 --out DIR/train.jsonl
  2. runs a few real steps:   posttrain train DIR/CASE.yaml run.max_steps=3
     as a child process, polling its resident set size (RSS, with its own children) every 20 ms with psutil;
  3. measures a baseline child that only imports torch, transformers, peft and posttrain (the interpreter and
     libraries are in RSS but not in the estimate), and
  4. prints predicted (estimate with precision fp32 on CPU, the model's real shape from the table) against
     measured RSS and measured minus baseline. Batches are padded to their longest row, not to max_length, so
     the estimate is shown at max_length (an upper bound) and at the mean tokens per sequence the run logged.

RSS is what the operating system gives the process: it includes the allocator's cached free memory, the
tokenizer and the data, so it is an upper bound on what the estimate models. On a GPU the comparable number is
`torch.cuda.max_memory_allocated` (not measured here).

Usage:  python benchmarks/estimator_calibration.py [--steps 3] [--batch-size 8] [--max-length 320] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

from posttrain.estimator import estimate

MODEL = "smollm2-135m-instruct"
CASES = [  # (name, technique, gradient checkpointing)
    ("sft-full", "full", False),
    ("sft-lora", "lora", False),
    ("sft-qlora", "qlora", True),
]
BASELINE = "import torch, transformers, peft, posttrain.train"


def posttrain_cmd() -> list[str]:
    exe = shutil.which("posttrain") or str(Path(sys.executable).with_name("posttrain"))
    return [exe]


def peak_rss(cmd: list[str], cwd: Path, poll_s: float = 0.02) -> tuple[float, int, str]:
    """Run `cmd`; return (peak RSS in bytes over the process and its children, exit code, output tail)."""
    log = cwd / f"log-{time.monotonic_ns()}.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        ps = psutil.Process(proc.pid)
        peak = 0
        while proc.poll() is None:
            try:
                procs = [ps, *ps.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                pass  # the child exited between poll() and memory_info()
            time.sleep(poll_s)
    return float(peak), proc.returncode, log.read_text()[-2000:]


def mean_tokens_per_sequence(run_dir: Path, batch_size: int) -> int | None:
    """Mean tokens per sequence over the run's steps, from metrics.jsonl's `tokens` (per step), if logged."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    steps = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    tokens = [m["tokens"] for m in steps if "tokens" in m]
    return round(sum(tokens) / len(tokens) / batch_size) if tokens else None


def case_config(technique: str, checkpointing: bool, data: Path, out: Path, args) -> dict:
    tech = {"name": technique}
    if technique != "full":
        tech.update(r=16, alpha=32, dropout=0.0)  # posttrain's default
    return {
        "model": {"name": MODEL, "dtype": "float32", "gradient_checkpointing": checkpointing},
        "technique": tech,
        "data": {"train": str(data), "max_length": args.max_length, "packing": False},
        "algorithm": {"name": "sft"},
        "optim": {"lr": 1e-4, "batch_size": args.batch_size, "micro_batch_size": args.batch_size},
        "run": {"output_dir": str(out), "max_steps": args.steps, "progress": False},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=320, help="data.max_length; the estimate's seq_len")
    ap.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    args = ap.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="posttrain-calib-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "train.jsonl"
    made = subprocess.run([*posttrain_cmd(), "data", "make", "structured", "--n", "64", "--out", str(data)])
    if made.returncode != 0:
        print("`posttrain data make structured` failed", file=sys.stderr)
        return 1
    base, rc, tail = peak_rss([sys.executable, "-c", BASELINE], work)
    if rc != 0:
        print(f"baseline import failed:\n{tail}", file=sys.stderr)
        return 1

    rows = []
    for name, technique, ckpt in CASES:
        cfg_path = work / f"{name}.yaml"
        cfg = case_config(technique, ckpt, data, work / "runs" / name, args)
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        cmd = [*posttrain_cmd(), "train", str(cfg_path), f"run.max_steps={args.steps}"]
        measured, rc, tail = peak_rss(cmd, work)
        if rc != 0:
            print(f"{name}: training failed (exit {rc}):\n{tail}", file=sys.stderr)
            rows.append((name, None, measured, rc, None))
            continue
        seq = mean_tokens_per_sequence(work / "runs" / name, args.batch_size)
        preds = [
            estimate(
                "smollm2-135m", method="sft", technique=technique, precision="fp32", batch_size=args.batch_size,
                seq_len=length, gradient_checkpointing=ckpt, lora_rank=16, lora_dropout=0.0, attention="flash",
            ).peak_memory_gb * 1e9
            for length in (args.max_length, seq or args.max_length)
        ]  # fmt: skip
        rows.append((name, preds, measured, rc, seq))

    print(f"Peak memory of {args.steps} SFT steps of {MODEL} on CPU (fp32, micro-batch {args.batch_size}, "
          f"max_length {args.max_length}); baseline RSS of `{BASELINE}`: {base / 1e9:.2f} GB\n")  # fmt: skip
    print(
        "| case | predicted at max_length (GB) | predicted at measured mean length (GB) | measured RSS (GB) "
        "| measured - baseline (GB) | error at mean length |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, preds, measured, rc, seq in rows:
        if preds is None:
            print(f"| {name} | - | - | {measured / 1e9:.2f} | - | run failed (exit {rc}) |")
            continue
        net = measured - base
        err = (preds[1] - net) / net if net > 0 else float("nan")
        print(
            f"| {name} | {preds[0] / 1e9:.2f} | {preds[1] / 1e9:.2f} ({seq} tokens) | {measured / 1e9:.2f} "
            f"| {net / 1e9:.2f} | {err:+.0%} |"
        )
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
