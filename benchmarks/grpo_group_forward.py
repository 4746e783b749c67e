"""A GRPO group's training forward and backward, its prompt once: one row under an (S, S) mask against every
sequence attended on its own (one row, no mask).

The embedded SmolLM2-135M-Instruct with LoRA r=16 on every linear layer, fp32, one group of G random completions
behind one random prompt, the log-probs of the completion tokens summed and back-propagated, inside a run
(`attention_per_segment`, as `posttrain train` runs every forward). Two layouts of the same group
(`models.logprobs.selected_token_logps` with `groups`):

- masked: the group as one row [prompt, completion 1, ..., completion G] under a 4D mask
  (`prefix_sharing.share_prefix`), which SDPA computes over every (query, key) pair of the row and keeps for backward;
- one row: the same row, each sequence attended on its own with its own copy of the prompt's keys and values
  (`prefix_sharing.share_prefix_in_one_row`, `attention.packed_blocks`), what `train` runs since the sixteenth session.

Each layout runs in its own process (peak RSS is the process's), alternated A B A B; 3 timed repeats after a
warm-up, the median reported.

    python benchmarks/grpo_group_forward.py                          # prompt 200, 8 completions of 200-256 tokens
    python benchmarks/grpo_group_forward.py --prompt 75 --shortest 20 --longest 64   # trl_compare's GRPO lengths
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


def child(layout: str, prompt: int, shortest: int, longest: int, group: int) -> str:
    import torch

    from posttrain.config import ModelConfig, TechniqueConfig
    from posttrain.models import load_model, logprobs
    from posttrain.models.attention import attention_per_segment
    from posttrain.models.logprobs import selected_token_logps

    torch.manual_seed(0)
    model = load_model(ModelConfig(name="smollm2-135m-instruct"),
                       TechniqueConfig(name="lora", r=16, alpha=32, dropout=0.0))  # fmt: skip
    model.train()
    g = torch.Generator().manual_seed(1)
    head = torch.randint(100, 40000, (prompt,), generator=g)
    lengths = torch.randint(shortest, longest + 1, (group,), generator=g).tolist()
    ids = torch.zeros(group, prompt + max(lengths), dtype=torch.long)
    real, target = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :prompt], ids[i, prompt : prompt + n] = head, torch.randint(100, 40000, (n,), generator=g)
        real[i, : prompt + n], target[i, prompt : prompt + n] = 1, 1
    groups = torch.zeros(group, dtype=torch.long)
    if layout == "masked":  # the layout before: a row per group under a mask, whatever the attention can do
        logprobs._runs_packed = lambda m: False
    times = []
    with attention_per_segment():
        for repeat in range(4):
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            logps, _ = selected_token_logps(model, {"input_ids": ids, "attention_mask": real}, target, groups=groups)
            logps.sum().backward()
            if repeat:
                times.append(time.perf_counter() - start)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return f"| {layout} | {prompt + sum(lengths)} | {statistics.median(times):.2f} | {rss:.2f} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=200, help="prompt tokens")
    ap.add_argument("--shortest", type=int, default=200, help="the shortest completion's tokens")
    ap.add_argument("--longest", type=int, default=256, help="the longest completion's tokens")
    ap.add_argument("--group", type=int, default=8, help="completions in the group")
    ap.add_argument("--pairs", type=int, default=2, help="A B rounds")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(child(args.child, args.prompt, args.shortest, args.longest, args.group))
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from sft_speed import matmul_gflops

    from posttrain.cli import allocator

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if library := allocator.choose(os.environ):  # what `posttrain train` runs under
        env["LD_PRELOAD"] = library
    print(f"fp32 GEMM {matmul_gflops():.0f} GFLOP/s; a group of {args.group} completions of {args.shortest}-"
          f"{args.longest} tokens behind a {args.prompt}-token prompt, LoRA r=16, forward + backward\n")  # fmt: skip
    print("| layout | tokens in the row | forward + backward (s, median of 3) | peak RSS (GB) |\n|---|---|---|---|")
    for _ in range(args.pairs):
        for layout in ("masked", "one row"):
            out = subprocess.run([sys.executable, __file__, "--child", layout, "--prompt", str(args.prompt),
                                  "--shortest", str(args.shortest), "--longest", str(args.longest),
                                  "--group", str(args.group)], capture_output=True, text=True, env=env)  # fmt: skip
            if out.returncode:
                sys.exit(f"{layout} failed:\n{out.stderr[-2000:]}")
            print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
