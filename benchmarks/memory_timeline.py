"""When a real training run's memory peaks, and what the allocator holds then: RSS and tcmalloc's counters sampled
every few milliseconds over a `posttrain.train.train` run of `trl_compare.py`'s config, with the step's phases
(forward, backward, clipping, optimiser step) marked.

    LD_PRELOAD=libtcmalloc_minimal.so.4 python benchmarks/memory_timeline.py --workdir /tmp/tcf --method sft-full

`--workdir` is a folder `trl_compare.py` prepared (setup.json and the data files). Prints, per phase, the largest
RSS seen and, under tcmalloc, the bytes the program had allocated (`generic.current_allocated_bytes`: live tensors
and Python objects) and the heap tcmalloc held (`generic.heap_size`: allocated + free in its caches). What RSS
holds beyond the heap is outside malloc: the memory-mapped weights and the libraries. Without tcmalloc the two
allocator columns read 0.
"""

from __future__ import annotations

import argparse
import bisect
import ctypes
import json
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

PAGE = os.sysconf("SC_PAGE_SIZE")


def _tcmalloc_counter():
    """A function of a tcmalloc property name returning its value (0 when tcmalloc is not loaded)."""
    try:
        lib = ctypes.CDLL("libtcmalloc_minimal.so.4", mode=os.RTLD_NOLOAD)
    except OSError:
        return lambda name: 0
    lib.MallocExtension_GetNumericProperty.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_size_t)]

    def read(name: str) -> int:
        value = ctypes.c_size_t(0)
        lib.MallocExtension_GetNumericProperty(name.encode(), ctypes.byref(value))
        return value.value

    return read


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--method", default="sft-full", choices=["sft-full", "sft-lora"])
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    counter = _tcmalloc_counter()
    samples: list[tuple[float, int, int, int]] = []  # (time, RSS, allocated, heap)
    marks: list[tuple[float, str]] = []
    t0 = time.perf_counter()
    running = True

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE

    def sample() -> None:
        while running:
            samples.append((time.perf_counter() - t0, rss(), counter("generic.current_allocated_bytes"),
                            counter("generic.heap_size")))  # fmt: skip
            time.sleep(0.003)

    def mark(name: str) -> None:
        marks.append((time.perf_counter() - t0, name))

    threading.Thread(target=sample, daemon=True).start()
    import accelerate
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from trl_runners import posttrain_config

    import posttrain.algorithms.sft as sft
    from posttrain.algorithms import config_from_dict
    from posttrain.train import train

    loss_fn = sft.ALGORITHM.loss_fn

    def marked_loss(model, batch, cfg=None):
        mark("forward")
        out = loss_fn(model, batch, cfg)
        mark("backward")
        return out

    object.__setattr__(sft.ALGORITHM, "loss_fn", marked_loss)  # a frozen dataclass: this run only
    clip = accelerate.Accelerator.clip_grad_norm_

    def marked_clip(self, *a, **kw):
        mark("clip + optimiser")
        return clip(self, *a, **kw)

    accelerate.Accelerator.clip_grad_norm_ = marked_clip
    register_optimizer_step_post_hook(lambda *_: mark("between steps"))
    setup = json.loads((Path(args.workdir) / "setup.json").read_text())
    with tempfile.TemporaryDirectory(prefix="memory-timeline-") as tmp:
        cfg = config_from_dict(posttrain_config(args.method, setup["model"], setup["data"]["sft"], args.steps,
                                                str(Path(tmp) / "run"), setup["settings"]), source=args.method)  # fmt: skip
        mark("load")
        train(cfg)
        mark("end")
    running = False
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9:.2f} GB (final save included)")
    print("| phase | max RSS (GB) | allocated then (GB) | tcmalloc heap then (GB) | max allocated (GB) |")
    print("|---|---:|---:|---:|---:|")
    times = [s[0] for s in samples]
    step = 0
    for (start, name), (end, _) in zip(marks, marks[1:]):
        step += name == "forward"
        part = samples[bisect.bisect_left(times, start) : bisect.bisect_right(times, end)]
        if part:
            top = max(part, key=lambda s: s[1])
            label = name if name in ("load", "between steps") else f"step {step} {name}"
            label = "after the last step (final save)" if end == marks[-1][0] else label
            print(f"| {label} | {top[1] / 1e9:.2f} | {top[2] / 1e9:.2f} | {top[3] / 1e9:.2f} | "
                  f"{max(s[2] for s in part) / 1e9:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
