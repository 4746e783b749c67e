"""Which `malloc` the model-loading commands run under: tcmalloc where the system has it, glibc's otherwise.

Why: PyTorch on CPU takes every tensor from the C allocator. A training step frees and reallocates gigabytes of
activations and gradients of many sizes, and glibc's `malloc` keeps the freed blocks resident and fragmented: the
same SFT LoRA step on the embedded 135M model peaks at 4.3-5.2 GB of RSS under glibc (its high-water mark varies
by ~1 GB between runs of the same code) against 2.9 GB of live tensors. tcmalloc (gperftools) and jemalloc reuse
the blocks by size class: 2.94 and 2.99 GB, at glibc's step time or better (benchmarks/README.md, "Memory: the
allocator"). Asking glibc to return large blocks instead (`MALLOC_MMAP_THRESHOLD_`) reaches 3.2 GB but makes every
step ~60% slower (a page fault for every 4 KB of every new tensor). Intel's PyTorch CPU tuning guide gives the same
advice (preload tcmalloc or jemalloc); `torch.backends.xeon.run_cpu --enable-tcmalloc` is torch's own launcher for it.

A library can only replace `malloc` before the process starts (`LD_PRELOAD`), so `posttrain` commands that load a
model re-execute themselves once, before torch is imported, with the library preloaded. The choice is the
environment variable ``POSTTRAIN_MALLOC``:

    auto      (default) tcmalloc, else jemalloc, else glibc's: whichever the system has
    tcmalloc  tcmalloc or an error saying how to install it
    jemalloc  jemalloc or an error saying how to install it
    system    glibc's malloc: no re-execution

Debian/Ubuntu: ``apt-get install libtcmalloc-minimal4`` (or ``libjemalloc2``). Nothing here changes results:
the allocator decides where tensors live, not what is computed. Python API users (`posttrain.train.train`) pick
the allocator when they start Python: ``LD_PRELOAD=libtcmalloc_minimal.so.4 python my_script.py``.
Only Linux: elsewhere every value but an unknown one means the system's allocator.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from collections.abc import Callable, Mapping, Sequence

from posttrain.errors import UserError

VARIABLE = "POSTTRAIN_MALLOC"
MARKER = "POSTTRAIN_MALLOC_REEXEC"
"""Set in the re-executed process: it never re-executes again, whatever the loader did with ``LD_PRELOAD``."""

LIBRARIES = {"tcmalloc": ("tcmalloc_minimal", "tcmalloc"), "jemalloc": ("jemalloc",)}
"""Each allocator's library names as `ctypes.util.find_library` takes them, preferred first."""

INSTALL = {"tcmalloc": "libtcmalloc-minimal4", "jemalloc": "libjemalloc2"}
CHOICES = ("auto", "tcmalloc", "jemalloc", "system")


def find_library(name: str) -> str | None:
    """The soname of allocator `name` (`LIBRARIES`) the dynamic loader can find, or None."""
    for stem in LIBRARIES[name]:
        found = ctypes.util.find_library(stem)
        if found:
            return found
    return None


def choose(env: Mapping[str, str], find: Callable[[str], str | None] = find_library,
           platform: str = sys.platform) -> str | None:  # fmt: skip
    """The library to preload for this process's environment `env`, or None to keep the running allocator.

    Raises `UserError` for a value not in `CHOICES`, or for an allocator asked by name that is not installed.
    """
    choice = env.get(VARIABLE, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise UserError(
            f"environment variable {VARIABLE}={env[VARIABLE]!r} is not one of {', '.join(CHOICES)}: set it to "
            f"auto (tcmalloc or jemalloc where installed), a library by name, or system (glibc's malloc)"
        )
    if choice == "system" or env.get(MARKER) or not platform.startswith("linux"):
        return None
    if any(name in env.get("LD_PRELOAD", "") for name in LIBRARIES):
        return None  # the user preloaded one already
    for name in ("tcmalloc", "jemalloc") if choice == "auto" else (choice,):
        found = find(name)
        if found:
            return found
    if choice != "auto":
        raise UserError(
            f"{VARIABLE}={choice} but no {choice} library was found on this machine: install it (Debian/Ubuntu: "
            f"apt-get install {INSTALL[choice]}), or set {VARIABLE}=auto or system"
        )
    return None


def reexec_with(library: str, argv: Sequence[str]) -> None:
    """Replace this process (same pid, same open files) by `python -m posttrain.cli ARGV` with `library` preloaded."""
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(p for p in (library, env.get("LD_PRELOAD", "")) if p)
    env[MARKER] = library
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "posttrain.cli", *argv], env)


def running() -> str:
    """The allocator this process really runs under, read from its memory map: tcmalloc, jemalloc or system."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return "system"
    return next((name for name in LIBRARIES if f"lib{name}" in maps), "system")
