"""SFT speed and memory on the embedded SmolLM2-135M-Instruct: full fine-tuning, LoRA and QLoRA.

For each technique, in a fresh child process (so that peak RSS is that technique's own), it runs the real
posttrain step (`algorithms.sft.loss_fn` + AdamW, as the trainer does) on batches of the built-in structured task,
and reports step time, trained tokens per second, peak RSS, and FLOP utilisation:

    utilisation = 6 x parameters x tokens/s  /  measured fp32 matmul throughput of this machine

(6 P per token: forward 2 P + backward 4 P; Kaplan et al. 2020, "Transformer Math 101"). The matmul throughput
is measured in the same run (square fp32 GEMMs). LoRA does less work than 6 P per token (no weight gradients
for the frozen base, about 4 P), so its utilisation by this formula can exceed full fine-tuning's: the number
to compare across techniques is tokens/s. The last column counts each technique's own FLOPs
(`own_flops_per_token`: 6 P full, 4 P + 6 x adapter parameters for LoRA). Both count the output layer at every
token, though posttrain runs it on the target tokens only, so they overstate the work done on prompt tokens.
Each technique's child runs under the malloc `posttrain train` would pick (`posttrain.cli.allocator`).

    python benchmarks/sft_speed.py                 # all three, 6 timed steps each
    python benchmarks/sft_speed.py --techniques lora --steps 3 --batch-size 8
    python benchmarks/sft_speed.py --techniques full lora --compile 1.0   # model.compile, memory budget 1
    python benchmarks/sft_speed.py --techniques lora --dtype bfloat16 --profile

`--dtype bfloat16` runs `model.dtype: bfloat16`: the frozen base held in bf16 and the step under bf16 autocast, as
the trainer runs it (Accelerate's `mixed_precision: bf16`), and the utilisation columns are then against the bf16
GEMM rate measured the same way (only meaningful on a CPU with bf16 instructions: AVX512-BF16 or AMX).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def matmul_gflops(n: int = 2048, repeats: int = 10, dtype: str = "float32") -> float:
    """Measured GEMM throughput (GFLOP/s, fp32 unless `dtype` says otherwise) with torch's default threads: the
    machine's practical peak."""
    import torch

    a, b = torch.randn(n, n, dtype=getattr(torch, dtype)), torch.randn(n, n, dtype=getattr(torch, dtype))
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t) / 1e9


def dense_parameter_count(model) -> int:
    """Parameters of the unquantised architecture (4-bit storage packs two weights per element, so count
    on a meta-device copy built from the config; tied embeddings count once)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        dense = AutoModelForCausalLM.from_config(model.config)
    return sum(p.numel() for p in dense.parameters())


def child(technique: str, steps: int, batch_size: int, max_length: int, lora_dropout: float,
          profile: bool = False, rebuild_pointwise: bool = True,
          compile_budget: float | None = None, dtype: str = "float32",
          bf16_attention: bool = False) -> dict:  # fmt: skip
    """One technique, measured inside this process; `compile_budget`: None uncompiled, else `model.compile` with
    that `model.compile_memory_budget`; `dtype`: the run's `model.dtype` (bfloat16: the step under bf16 autocast,
    the GEMM rate measured in bf16; attention in float32 as `train` runs it, or in bf16 with `bf16_attention`)."""
    import torch

    from posttrain.algorithms import config_from_dict, get_algorithm
    from posttrain.data import TASKS, write_jsonl
    from posttrain.models import describe_trainable, load_model, load_tokenizer
    from posttrain.models.attention import attention_per_segment, float32_attention_on_cpu
    from posttrain.models.prefix_sharing import group_layout
    from posttrain.trainer.optim import build_optimizer

    tmp = f"/tmp/posttrain-bench-{os.getpid()}.jsonl"
    write_jsonl(TASKS["structured"].make(batch_size * (steps + 1), seed=0, split="train"), tmp)
    cfg = config_from_dict(
        {
            "model": {"name": "smollm2-135m-instruct", "dtype": dtype,
                      **({"compile": True, "compile_memory_budget": compile_budget} if compile_budget
                         else {"rebuild_pointwise": rebuild_pointwise})},
            # LoRA settings only where they are read: a full run refuses them (config_rules.APPLIES)
            "technique": {"name": technique, **({} if technique == "full" else {"r": 16, "alpha": 32,
                                                                                  "dropout": lora_dropout})},
            "data": {"train": tmp, "max_length": max_length, "shuffle": False},
            "optim": {"lr": 1e-5, "batch_size": batch_size},
        }
    )
    algo = get_algorithm("sft")
    tok = load_tokenizer(cfg.model)
    data = algo.prepare(cfg, tok)
    model = load_model(cfg.model, cfg.technique)
    trainable, _ = describe_trainable(model)
    total = dense_parameter_count(model)
    opt = build_optimizer(model, cfg.optim)
    times, tokens, run_tokens, first = [], [], [], None
    if dtype == "bfloat16":  # the trainer's mixed precision: Accelerate wraps the model's forward in autocast
        from accelerate import Accelerator

        model = Accelerator(mixed_precision="bf16", cpu=True).prepare(model)

    def step(batch):
        # as `train` runs it: float32 attention in a bf16 run, padded rows packed into one row and attended per
        # example (`logprobs.packed_rows`), the rows' common prefix once (`data.share_prompt`)
        with float32_attention_on_cpu(dtype == "bfloat16" and not bf16_attention), attention_per_segment():
            loss_sum, _ = algo.loss_fn(model, batch, cfg)
            (loss_sum / algo.loss_units(batch)).backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    # The GEMM rate is measured in this process just before and just after the timed steps: measured once in
    # another process it varied by +-10% between runs of the same step time, and so did the utilisation.
    gemm = [matmul_gflops(dtype=dtype)]
    for i in range(steps + 1):  # step 0 is a warm-up, not timed
        batch = data.collate(list(data.train[i * batch_size : (i + 1) * batch_size]))
        t = time.perf_counter()
        step(batch)
        if not i:
            first = time.perf_counter() - t  # the warm-up step: model.compile compiles here
        else:
            times.append(time.perf_counter() - t)
            tokens.append(int(batch["attention_mask"].sum()))
            lengths = batch["attention_mask"].sum(-1)
            one_group = torch.zeros(len(lengths), dtype=torch.long)  # the rows' common prefix, as `packed_rows` finds it
            shared = group_layout(batch, one_group).groups[0][1] if cfg.data.share_prompt and len(lengths) > 1 else 0
            run_tokens.append(tokens[-1] - (len(lengths) - 1) * shared)  # the common prefix runs once
    gemm.append(matmul_gflops(dtype=dtype))
    top = profile_step(step, batch) if profile else None
    os.unlink(tmp)
    step_s = sum(times) / len(times)
    return {
        "technique": technique,
        "params": total,
        "trainable": trainable,
        "step_s": step_s,
        "first_step_s": first,
        "compile_memory_budget": compile_budget,
        "dtype": dtype,
        "bf16_attention": bf16_attention,
        "tokens_per_step": sum(tokens) / len(tokens),
        "tokens_per_s": sum(tokens) / sum(times),
        "run_tokens_per_step": sum(run_tokens) / len(run_tokens),  # through the decoder layers
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
        "gemm_gflops_before_after": gemm,
        **({"profile": top} if top else {}),
    }


def profile_step(step, batch, rows: int = 10) -> list[dict]:
    """One more step under `torch.profiler`: the ops with the most self CPU time, their share of the step, and
    the GFLOP/s of those whose FLOPs the profiler counts (the matrix products)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        step(batch)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:rows]
    return [{"op": e.key, "calls": e.count, "ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total,
             "gflops": e.flops / (e.self_cpu_time_total * 1e-6) / 1e9 if e.flops and e.self_cpu_time_total else None}
            for e in top]  # fmt: skip


def own_flops_per_token(row: dict) -> float:
    """The FLOPs a technique's step does per token by the issue's count: full fine-tuning 6P (forward 2P, input
    and weight gradients 4P); LoRA and QLoRA 4P for the frozen base (forward and input gradients, no weight
    gradient) plus 6 per adapter parameter."""
    if row["technique"] == "full":
        return 6 * row["params"]
    return 4 * row["params"] + 6 * row["trainable"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--techniques", nargs="+", default=["full", "lora", "qlora"])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=320)
    ap.add_argument("--lora-dropout", type=float, default=0.0)
    ap.add_argument("--profile", action="store_true", help="also profile one step per technique (torch.profiler)")
    ap.add_argument("--keep-pointwise", action="store_true",
                    help="model.rebuild_pointwise false: keep the pointwise results for backward (more memory)")
    ap.add_argument("--compile", type=float, metavar="BUDGET", default=None,
                    help="model.compile with model.compile_memory_budget BUDGET (0-1]; the first, untimed step "
                         "compiles")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="model.dtype: bfloat16 is bf16 autocast with the frozen base in bf16; the utilisation is "
                         "then against the bf16 GEMM rate")
    ap.add_argument("--bf16-attention", action="store_true",
                    help="with --dtype bfloat16: attention in bf16 (torch's CPU flash kernel) instead of the float32 "
                         "attention `posttrain train` runs on CPU (models.attention)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.batch_size, args.max_length, args.lora_dropout,
                               args.profile, not args.keep_pointwise, args.compile, args.dtype,
                               args.bf16_attention)))  # fmt: skip
        return

    from posttrain.cli import allocator

    peak = matmul_gflops(dtype=args.dtype)
    rows = []
    for technique in args.techniques:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            technique,
            "--steps",
            str(args.steps),
            "--batch-size",
            str(args.batch_size),
            "--max-length",
            str(args.max_length),
            "--lora-dropout",
            str(args.lora_dropout),
            *(["--profile"] if args.profile else []),
            *(["--keep-pointwise"] if args.keep_pointwise else []),
            *(["--compile", str(args.compile)] if args.compile else []),
            "--dtype",
            args.dtype,
            *(["--bf16-attention"] if args.bf16_attention else []),
        ]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        if library := allocator.choose(os.environ):  # what `posttrain train` runs under (posttrain.cli.allocator)
            env["LD_PRELOAD"] = library
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode:
            sys.exit(f"{technique} failed:\n{out.stderr[-2000:]}")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rate = sum(row["gemm_gflops_before_after"]) / 2  # around this technique's own steps
        row["flop_utilisation"] = 6 * row["params"] * row["tokens_per_s"] / (rate * 1e9)
        # own FLOPs over the tokens the layers ran (a shared prefix once): what the hardware did
        run_rate = row["tokens_per_s"] * row["run_tokens_per_step"] / row["tokens_per_step"]
        row["own_flop_utilisation"] = own_flops_per_token(row) * run_rate / (rate * 1e9)
        rows.append(row)
    if args.json:
        print(json.dumps({"matmul_gflops": peak, "rows": rows}, indent=1))
        return
    full = next((r for r in rows if r["technique"] == "full"), None)
    print(
        f"{args.dtype} matmul throughput (2048^3 GEMM): {peak:.1f} GFLOP/s at the start; batch {args.batch_size} "
        f"examples, {args.steps} timed steps; utilisation against the GEMM rate measured in each technique's "
        "process just before and after its steps (the GEMM column)\n"
    )
    print(
        "| technique | trainable params | first step (s) | step time (s) | tokens/step (through the layers) | tokens/s "
        "| vs full | peak RSS (GB) | GEMM (GFLOP/s) before / after | FLOP utilisation (6P, every token) "
        "| FLOP utilisation (own FLOPs, tokens run) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rel = f"{r['tokens_per_s'] / full['tokens_per_s']:.2f}x" if full else ""
        print(
            f"| {r['technique']} | {r['trainable'] / 1e6:.2f}M of {r['params'] / 1e6:.1f}M | "
            f"{r['first_step_s']:.1f} | {r['step_s']:.2f} | "
            f"{r['tokens_per_step']:.0f} ({r['run_tokens_per_step']:.0f}) | {r['tokens_per_s']:.0f} | {rel} | "
            f"{r['peak_rss_gb']:.2f} | "
            f"{r['gemm_gflops_before_after'][0]:.0f} / {r['gemm_gflops_before_after'][1]:.0f} | "
            f"{100 * r['flop_utilisation']:.0f}% | {100 * r['own_flop_utilisation']:.0f}% |"
        )
    for r in rows:
        if "profile" in r:
            print(f"\n{r['technique']}: one step under torch.profiler, the ops with the most self CPU time\n")
            print("| op | calls | ms | share of the step | GFLOP/s |\n|---|---|---|---|---|")
            for e in r["profile"]:
                rate = f"{e['gflops']:.0f}" if e["gflops"] else "-"
                print(f"| {e['op']} | {e['calls']} | {e['ms']:.0f} | {100 * e['share']:.1f}% | {rate} |")


if __name__ == "__main__":
    main()
