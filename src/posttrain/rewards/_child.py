"""The sandboxed side of `posttrain.rewards.sandbox`: run as a script, never imported for its functions.

Two modes, one process each:

- ``launch DIR FD``: applies the limits in ``DIR/config.json`` to itself (resource limits, namespaces, the
  process-accounting user), then forks once and execs ``run`` in the child. The fork matters: after
  ``unshare(CLONE_NEWPID)`` only the *next* child lives in the new PID namespace, as its init (pid 1), and
  when init exits the kernel kills everything left in the namespace, so nothing the program started can
  outlive it. The exec matters: capability bounding-set changes take effect only at exec.
- ``run DIR ISOLATION FD``: reads ``DIR/job.json`` into memory and deletes it, then executes the program and
  each test in the same namespace, writing one line per test to the pipe ``FD`` (whose reading end only the
  parent holds) as it goes, so a test that hangs still leaves the earlier results behind.

Results cannot be forged by ordinary code (reward hacking, which RL finds). They never touch the disk: an
older layout kept them in ``results.txt`` in the program's own working folder, where a program could append
"passed" lines of its own. Every line also starts with a random nonce that the parent generated and checks:
``NONCE isolation <how>`` first, then ``NONCE <i> 1`` (test i passed) or ``NONCE <i> 0``. The nonce travels
only in ``job.json``, which is deleted (as ``config.json`` is by ``launch``) before the program starts, and never
in the environment or on a command line, so a program that writes to the pipe still cannot make a line count.
The functions the runner needs after the program ran (``compile``, ``exec``, ``os.write``) are bound before it
runs, so patching ``builtins`` or ``os`` cannot turn a failing test into a pass. A program that digs the
nonce out of the interpreter's memory (frames, ``gc``) can still forge lines: this stops accidents and cheap
tricks, not a determined adversary (see `posttrain.rewards.sandbox`).

Only the standard library is imported here, before any limit is set, so the limits cannot break start-up.
"""

from __future__ import annotations

import json
import os
import sys

# Linux constants (include/uapi/linux/sched.h, prctl.h, capability.h).
CLONE_NEWUSER, CLONE_NEWNET, CLONE_NEWPID = 0x10000000, 0x40000000, 0x20000000
PR_SET_PDEATHSIG, PR_CAPBSET_DROP = 1, 24
# Dropped from the bounding set when launched by root: SYS_RESOURCE and SYS_ADMIN let a process ignore
# RLIMIT_NPROC (kernel/fork.c); the others are simply never needed by a test program.
DROP_CAPS = (
    12,
    16,
    19,
    21,
    22,
    24,
    25,
)  # NET_ADMIN, SYS_MODULE, SYS_PTRACE, SYS_ADMIN, SYS_BOOT, SYS_RESOURCE, SYS_TIME
NOBODY = 65534

NETWORK_PREAMBLE = """
import socket as _s, _socket as _ss
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in the posttrain sandbox")
class _NoSocket(_s.socket):
    def __init__(self, *args, **kwargs):
        _no_network()
for _m in (_s, _ss):
    _m.socket = _NoSocket
for _name in ("create_connection", "getaddrinfo", "socketpair", "fromfd", "create_server"):
    if hasattr(_s, _name):
        setattr(_s, _name, _no_network)
del _m, _name
"""


def _isolate(cfg: dict) -> str:
    """Enter fresh network and PID namespaces if the kernel lets us; returns how the network is blocked."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    root = os.geteuid() == 0
    # Root may create namespaces directly. Anyone else needs a user namespace around them; we map our own
    # uid/gid to themselves so files in the working folder keep their owner.
    flags = CLONE_NEWNET | CLONE_NEWPID | (0 if root else CLONE_NEWUSER)
    uid, gid = os.getuid(), os.getgid()
    isolation = "namespaces" if libc.unshare(flags) == 0 else "preamble"
    if isolation == "namespaces" and not root:
        try:
            for name, text in (
                ("setgroups", "deny"),
                ("uid_map", f"{uid} {uid} 1"),
                ("gid_map", f"{gid} {gid} 1"),
            ):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
        except OSError:
            pass  # unmapped ids only make file owners show as "nobody"; the isolation still holds
    if root:
        # RLIMIT_NPROC never applies to real uid 0 (kernel/fork.c), so the real uid becomes `nobody`:
        # processes are then counted against nobody's limit. The effective uid stays 0 so the interpreter,
        # which may live under a private home, can still be read.
        for cap in DROP_CAPS:
            libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
        try:
            os.setresuid(cfg.get("nobody", NOBODY), 0, 0)
        except OSError:
            pass
    return isolation


def launch(workdir: str, fd: str) -> int:
    import resource

    with open(os.path.join(workdir, "config.json")) as f:
        cfg = json.load(f)
    os.unlink(os.path.join(workdir, "config.json"))
    for name, value in cfg["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (value, value))
    isolation = _isolate(cfg) if cfg.get("isolate", True) else "preamble"
    try:
        pid = os.fork()
    except OSError:
        return 3
    if pid == 0:
        try:
            import ctypes
            import signal

            # If the launcher dies (killed on timeout), so does init, and with it the whole namespace.
            ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            os.execv(sys.executable, [sys.executable, "-I", __file__, "run", workdir, isolation, fd])
        finally:
            os._exit(4)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) % 256


def run(workdir: str, isolation: str, fd: int) -> int:
    import traceback

    if isolation != "namespaces":
        exec(NETWORK_PREAMBLE, {})
    job_file = os.path.join(workdir, "job.json")
    with open(job_file) as f:
        job = json.load(f)
    os.unlink(job_file)  # the nonce in it must not be readable by the program
    code, tests, nonce = job["code"], job["tests"], job["nonce"]
    del job
    # Bound now: the program may replace builtins.compile/exec or os.write before the tests run.
    _compile, _exec, _write = compile, exec, os.write
    os.set_inheritable(fd, False)  # programs the solution execs do not get the results pipe

    def record(line: str) -> None:
        try:
            _write(fd, f"{nonce} {line}\n".encode())
        except OSError:
            pass

    record(f"isolation {isolation}")
    # "solution", not "__main__": an `if __name__ == "__main__":` block would usually read stdin or run a demo.
    namespace = {"__name__": "solution", "__builtins__": __builtins__}
    try:
        _exec(_compile(code, "solution.py", "exec"), namespace)
    except BaseException:  # SystemExit and KeyboardInterrupt too: the program failed, every test fails
        traceback.print_exc()
        return 1
    for i, test in enumerate(tests):
        try:
            _exec(_compile(test, f"test_{i}", "exec"), namespace)
            ok = True
        except BaseException:
            traceback.print_exc(limit=-2)
            ok = False
        record(f"{i} {int(ok)}")
    return 0


if __name__ == "__main__":
    mode, directory = sys.argv[1], sys.argv[2]
    code = (
        launch(directory, sys.argv[3]) if mode == "launch" else run(directory, sys.argv[3], int(sys.argv[4]))
    )
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip atexit handlers the program may have registered
