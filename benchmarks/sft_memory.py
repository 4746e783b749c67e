"""Where an SFT step's memory goes on the embedded SmolLM2-135M-Instruct: RSS at each stage, and the tensors
autograd keeps for backward, grouped by their last dimension.

Runs the real posttrain step (`algorithms.sft.loss_fn`, backward, clipping, AdamW) as `sft_speed.py` does, and
prints the resident set size (psutil) after imports, tokenizer, model load, and after each step's forward,
backward and optimiser step, with the process's peak (`ru_maxrss`). Then, for one more forward, the unique
storages saved for backward (`torch.autograd.graph.saved_tensors_hooks`; parameters excluded), i.e. the
activations a step holds at its peak whatever the allocator does.

    python benchmarks/sft_memory.py --technique lora --steps 2
    MALLOC_MMAP_THRESHOLD_=1048576 python benchmarks/sft_memory.py   # glibc returns every freed block >= 1 MB
"""

from __future__ import annotations

import argparse
import collections
import os
import resource
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--technique", default="lora", choices=["full", "lora"])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()

    import psutil

    proc = psutil.Process()

    def rss(tag: str) -> None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
        print(f"{tag:28s} RSS {proc.memory_info().rss / 1e9:5.2f} GB   peak {peak:5.2f} GB", flush=True)

    rss("start")
    import torch

    from posttrain.algorithms import config_from_dict, get_algorithm
    from posttrain.data import TASKS, write_jsonl
    from posttrain.models import load_model, load_tokenizer
    from posttrain.trainer.optim import build_optimizer

    rss("imports")
    bs = args.batch_size
    tmp = f"/tmp/posttrain-mem-{os.getpid()}.jsonl"
    write_jsonl(TASKS["structured"].make(bs * (args.steps + 1), seed=0, split="train"), tmp)
    lora = {} if args.technique == "full" else {"r": 16, "alpha": 32, "dropout": 0.0}
    cfg = config_from_dict({"model": {"name": "smollm2-135m-instruct"},
                            "technique": {"name": args.technique, **lora},
                            "data": {"train": tmp, "max_length": 320, "shuffle": False},
                            "optim": {"lr": 1e-5, "batch_size": bs}})  # fmt: skip
    algo = get_algorithm("sft")
    data = algo.prepare(cfg, load_tokenizer(cfg.model))
    os.unlink(tmp)
    rss("tokenizer + data")
    model = load_model(cfg.model, cfg.technique)
    rss("model loaded")
    opt = build_optimizer(model, cfg.optim)
    batches = [data.collate(list(data.train[i * bs : (i + 1) * bs])) for i in range(args.steps + 1)]
    for i, batch in enumerate(batches[:-1]):
        t = time.perf_counter()
        loss_sum, _ = algo.loss_fn(model, batch, cfg)
        rss(f"step {i} forward")
        (loss_sum / algo.loss_units(batch)).backward()
        rss(f"step {i} backward")
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        rss(f"step {i} optimiser ({time.perf_counter() - t:.1f} s)")

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}
    by_dim: collections.Counter = collections.Counter()

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in saved:
            saved[ptr] = t.untyped_storage().nbytes()
            by_dim[t.shape[-1] if t.dim() else 1] += saved[ptr]
        return t

    batch = batches[-1]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        algo.loss_fn(model, batch, cfg)
    print(f"\nsaved for backward, one forward of {tuple(batch['input_ids'].shape)} tokens "
          f"({algo.loss_units(batch)} targets): {sum(saved.values()) / 1e9:.2f} GB")  # fmt: skip
    for dim, nbytes in by_dim.most_common(8):
        print(f"  last dim {dim:6d}: {nbytes / 1e6:6.0f} MB")


if __name__ == "__main__":
    main()
