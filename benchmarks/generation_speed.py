"""Sampling speed of posttrain's HF rollout engine against the machine's two limits: memory bandwidth and GEMM rate.

The work is a GRPO rollout of `trl_compare.py`: 4 arithmetic prompts x 8 completions of up to 64 tokens at T = 1,
on the embedded SmolLM2-135M-Instruct in fp32 (`rollout.engine.HFEngine.generate`, the call GRPO, RLOO and PPO
make). A decode step feeds one token per row: it must read every weight once (the tied output layer reads the whole
embedding matrix) and each row's KV cache, so

    bandwidth-bound step time = (weight bytes + KV-cache bytes read) / measured copy bandwidth
    compute-bound step time   = 2 x parameters x rows / measured fp32 GEMM rate

and the report gives the decode's measured time against each (100% = at the bound). The prefill (the prompts'
forward, compute-bound) is timed apart with `max_new_tokens=1`. Bandwidth: a 256 MB tensor copied (read + write
counted), best of several, the same yardstick as STREAM's "copy" (McCalpin). Both rates are measured in this run.

    python benchmarks/generation_speed.py
    python benchmarks/generation_speed.py --repeats 3 --json gen.json
    python benchmarks/generation_speed.py --dtype bfloat16   # weights, KV cache and GEMM rate in bfloat16

The report also gives the roofline: the larger of the two bounds, which no implementation can beat. A decode step
of 32 rows does ~14 FLOP per byte it reads (8.6 GFLOP against ~0.6 GB in fp32), so on a machine whose GEMM rate
is under ~14x its copy bandwidth (e.g. 187 GFLOP/s against 50 GB/s) the compute bound is the larger, and the
bandwidth bound cannot be reached at all.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def copy_bandwidth_gbs(mb: int = 256, repeats: int = 10) -> float:
    """Measured memory bandwidth (GB/s) of a large tensor copy, reads and writes both counted."""
    import torch

    src = torch.ones(mb * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="the weights' and the sampling's dtype (bfloat16: the bound counts bf16 bytes and the bf16 "
                         "GEMM rate)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from sft_speed import matmul_gflops

    from posttrain.config import ModelConfig, TechniqueConfig
    from posttrain.data import make_prompts
    from posttrain.data.tasks import Arithmetic
    from posttrain.models import load_model, load_tokenizer
    from posttrain.rollout.engine import HFEngine

    model_cfg = ModelConfig(dtype=args.dtype)
    tok = load_tokenizer(model_cfg)
    model = load_model(model_cfg, TechniqueConfig(name="full"), train=False)
    rows = make_prompts(Arithmetic(min_ops=1, max_ops=1, max_value=10), args.prompts, seed=0)
    prompt_ids = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False) for r in rows]  # fmt: skip
    engine = HFEngine()

    def run(max_new: int, seed: int):
        t = time.perf_counter()
        out = engine.generate(model, tok, prompt_ids, n=args.group, max_new_tokens=max_new, temperature=1.0,
                              top_p=1.0, stop=[], seed=seed)  # fmt: skip
        return time.perf_counter() - t, out

    gemm, bandwidth = matmul_gflops(dtype=args.dtype), copy_bandwidth_gbs()
    run(args.max_new_tokens, seed=99)  # warm-up
    results = []
    for r in range(args.repeats):
        prefill_s, _ = run(1, seed=r)
        total_s, out = run(args.max_new_tokens, seed=r)
        results.append((prefill_s, total_s, out))
    gemm_end, bandwidth_end = matmul_gflops(dtype=args.dtype), copy_bandwidth_gbs()

    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rows_n = args.prompts * args.group
    prompt_len = statistics.mean(len(p) for p in prompt_ids)
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    kv_per_token *= torch.finfo(getattr(torch, args.dtype)).bits // 8
    figures = []
    for prefill_s, total_s, out in results:
        steps = out.completion_ids.shape[1]  # decode steps run: until the longest row ended
        generated = int(out.completion_mask.sum())
        mean_ctx = prompt_len + steps / 2
        step_bytes = weight_bytes + rows_n * mean_ctx * kv_per_token
        decode_s = total_s - prefill_s
        bw_bound = steps * step_bytes / (min(bandwidth, bandwidth_end) * 1e9)
        compute_bound = steps * 2 * n_params * rows_n / (max(gemm, gemm_end) * 1e9)
        figures.append({"prefill_s": prefill_s, "decode_s": decode_s, "steps": steps, "generated_tokens": generated,
                        "tokens_per_s": generated / total_s, "step_ms": 1000 * decode_s / max(steps - 1, 1),
                        "of_bandwidth_bound": bw_bound / decode_s, "of_compute_bound": compute_bound / decode_s,
                        "of_roofline": max(bw_bound, compute_bound) / decode_s})  # fmt: skip
    med = {k: statistics.median(f[k] for f in figures) for k in figures[0]}
    print(f"{args.dtype} GEMM {gemm:.1f} -> {gemm_end:.1f} GFLOP/s, copy bandwidth {bandwidth:.1f} -> {bandwidth_end:.1f} GB/s; "
          f"{args.prompts} prompts x {args.group} completions, up to {args.max_new_tokens} tokens, T=1, {args.dtype}, "
          f"weights {weight_bytes / 1e9:.2f} GB, KV cache {kv_per_token / 1e3:.1f} kB per token and row")  # fmt: skip
    print("| repeat | prefill (s) | decode (s) | decode steps | generated tokens | tokens/s | ms per decode step | "
          "of bandwidth bound | of compute bound | of roofline |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for i, f in enumerate([*figures, med]):
        label = "median" if i == len(figures) else str(i + 1)
        print(f"| {label} | {f['prefill_s']:.2f} | {f['decode_s']:.2f} | {f['steps']:.0f} | {f['generated_tokens']:.0f} | "
              f"{f['tokens_per_s']:.0f} | {f['step_ms']:.0f} | {100 * f['of_bandwidth_bound']:.0f}% | "
              f"{100 * f['of_compute_bound']:.0f}% | {100 * f['of_roofline']:.0f}% |")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"gemm_gflops": [gemm, gemm_end], "bandwidth_gbs": [bandwidth, bandwidth_end],
                                               "repeats": figures, "median": med, "torch": torch.__version__}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
