"""Run generated Python against tests in a separate, limited process; the engine of the ``code_exec`` reward.

`run_code(code, tests)` writes the program and its tests to a fresh temporary folder, starts
``python -I`` (isolated mode: no user site, no ``PYTHON*`` variables, script folder not on ``sys.path``)
there with a minimal environment and stdin from ``/dev/null``, and returns how many tests passed. `run_many`
does the same for a batch with a small thread pool (each thread only waits on its subprocess).

What it guards against (accidents of generated code, on Linux):

- **time**: a wall-clock limit; on expiry the whole process group is killed (SIGKILL), plus RLIMIT_CPU as a
  backstop;
- **memory**: RLIMIT_AS (address space), so a runaway allocation raises MemoryError;
- **processes**: RLIMIT_NPROC, set relative to the processes the accounted user already has (the limit
  counts every process of that user, not just ours). Root ignores RLIMIT_NPROC, so under root the real uid
  is switched to ``nobody`` and the capabilities that lift the limit are dropped;
- **network**: fresh network and PID namespaces (a user namespace too when not root) when the kernel
  allows; the network namespace has only a loopback that is down, and when the program's first process
  exits the kernel kills whatever it left in the PID namespace. Without namespaces, a preamble replaces
  ``socket.socket`` in the child: that stops ordinary library calls, not a determined program;
- **files**: the working folder is deleted afterwards; RLIMIT_FSIZE caps any one file written;
- **forged results**: results come back through a pipe, never a file the program could write to, and each
  line carries a random per-run nonce that only the parent and the runner know (the job file holding it is
  deleted before the program starts); lines without it count for nothing (see `_child`).

What it is NOT: a security boundary. The program runs with the caller's file permissions (under root, with
root's), can read and write anything they can, and without namespaces can reach the network through
``ctypes`` or a subprocess. It shares an interpreter with the test runner, so it can find the nonce in memory,
or return objects that equal anything (``__eq__`` always true) and pass ``assert f(x) == y``. Use containers
or gVisor for hostile code, and tests that check types when rewards are at stake.
"""

from __future__ import annotations

import ast
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

CHILD = str(Path(__file__).with_name("_child.py"))
NOBODY = 65534
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)


@dataclass(frozen=True)
class Limits:
    """Per-program limits: wall clock, address space, extra processes, largest file written.

    `namespaces=False` skips the network/PID namespaces (the socket preamble then blocks the network).
    """

    timeout_s: float = 5.0
    memory_mb: int = 1024
    max_processes: int = 32
    max_file_mb: int = 16
    namespaces: bool = True  # False: skip namespaces, block the network with the preamble only (for tests)


@dataclass(frozen=True)
class ExecResult:
    """What one run gave: tests passed of total, whether it timed out, the exit code and the output's tail."""

    passed: int
    total: int
    timed_out: bool
    returncode: int | None
    output: str
    isolation: str  # "namespaces" or "preamble": how the network was blocked

    @property
    def fraction(self) -> float:
        """Passed / total (0.0 for no tests)."""
        return self.passed / self.total if self.total else 0.0


def extract_code(text: str) -> str:
    """The program in a completion: the last ```python (or ```py) fenced block that defines a function or a
    class, else the last such block, else the last fenced block of any language, else the whole text. The last,
    because models often draft before the final answer; one that defines something, because a usage example often
    follows the solution (```python\\nprint(sq(4))```, run alone: a NameError, so a right solution scored 0).

    >>> extract_code("Here:\\n```python\\ndef f():\\n    return 1\\n```\\nDone.")
    'def f():\\n    return 1\\n'
    >>> extract_code("```python\\ndef sq(x):\\n    return x*x\\n```\\nExample:\\n```python\\nprint(sq(4))\\n```")
    'def sq(x):\\n    return x*x\\n'
    >>> extract_code("```\\nx = 1\\n```"), extract_code("x = 2")
    ('x = 1\\n', 'x = 2')
    """
    blocks = _FENCE.findall(text)
    python = [body for lang, body in blocks if lang.lower() in ("python", "py", "python3")]
    if python:
        defining = [body for body in python if _defines(body)]
        return (defining or python)[-1]
    return blocks[-1][1] if blocks else text


def _defines(code: str) -> bool:
    """Whether `code` defines a function or a class at its top level (a solution, not a usage example)."""
    try:
        body = ast.parse(code).body
    except SyntaxError:
        return False
    return any(isinstance(s, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) for s in body)


def split_tests(tests: str | list[str]) -> list[str]:
    """Tests as a list of snippets, each counted once. A list is taken as is. In a string, each top-level
    ``assert`` is one test, together with the statements since the previous assert (setup such as
    ``x = f(3)``); the statements after the last assert are one more test (a loop of asserts: dropped, a program
    returning 0 passed ``assert sq(0) == 0`` and so every test). A string that does not parse, or has no assert,
    is one test.

    >>> split_tests("assert f(1) == 2\\ny = f(2)\\nassert y == 3")
    ['assert f(1) == 2', 'y = f(2)\\nassert y == 3']
    >>> split_tests("assert f(0) == 0\\nfor i in range(3):\\n    assert f(i) == i * i")
    ['assert f(0) == 0', 'for i in range(3):\\n    assert f(i) == i * i']
    >>> split_tests(["assert True", "assert f(0) == 1"])
    ['assert True', 'assert f(0) == 1']
    >>> split_tests("assert (")
    ['assert (']
    """
    if not isinstance(tests, str):
        return [str(t) for t in tests]
    try:
        body = ast.parse(tests).body
    except SyntaxError:
        return [tests]
    out, start = [], None
    lines = tests.splitlines(keepends=True)
    for stmt in body:
        start = stmt.lineno if start is None else start
        if isinstance(stmt, ast.Assert):
            out.append("".join(lines[start - 1 : stmt.end_lineno]).strip("\n"))
            start = None
    if out and start is not None:  # statements after the last assert: a test when they check something
        rest = "".join(lines[start - 1 :]).strip("\n")
        if _checks(ast.parse(rest)):
            out.append(rest)
    return out or [tests]


def _checks(tree: ast.AST) -> bool:
    """Whether code can fail a program: an assert, a raise, or a call other than print's (a check(f), a loop of
    asserts); a trailing ``print("All tests passed")`` is no test (it passed every program)."""
    return any(isinstance(n, ast.Assert | ast.Raise) or (isinstance(n, ast.Call) and not (
        isinstance(n.func, ast.Name) and n.func.id == "print")) for n in ast.walk(tree))  # fmt: skip


def tests_problem(tests) -> str | None:
    """Why `tests` (a row's column for `code_exec`) cannot tell a right program from a wrong one, or None: null,
    not text, Python that does not parse, code that checks nothing (no assert, raise or call: ``""``, ``x = 1``
    passed every program), or ``unittest.main()`` (it looks for the tests in a module the sandbox does not run,
    and exits).

    >>> tests_problem("assert f(1) == 2"), tests_problem(""), tests_problem(None)
    (None, 'checks nothing (no assert, raise or call): every program that runs would pass', 'is null')
    """
    if tests is None:
        return "is null"
    snippets = [tests] if isinstance(tests, str) else tests if isinstance(tests, list) else None
    if snippets is None or not all(isinstance(t, str) for t in snippets):
        return f"must be a string or a list of strings, got {type(tests).__name__}"
    for t in snippets:
        try:
            tree = ast.parse(t)
        except SyntaxError as e:
            return f"does not parse as Python ({e.msg}, line {e.lineno}): every program would fail"
        nodes = list(ast.walk(tree))
        if not _checks(tree):
            return "checks nothing (no assert, raise or call): every program that runs would pass"
        if any(isinstance(n, ast.Attribute) and n.attr == "main" and isinstance(n.value, ast.Name)
               and n.value.id == "unittest" for n in nodes):  # fmt: skip
            return ("calls unittest.main(), which looks for the tests in a module the sandbox does not run and then "
                    "exits: write the tests as asserts (or HumanEval's check(candidate) with an entry_point column)")
    return None


def uncalled_check(tests) -> bool:
    """Whether a test string defines ``check`` and never calls it (HumanEval's layout: ``def check(candidate):``
    holding the asserts, called by the harness as ``check(entry_point)``), so running it tests nothing.

    >>> uncalled_check("def check(candidate):\\n    assert candidate(1) == 2\\n"), uncalled_check("assert f(1) == 2")
    (True, False)
    >>> uncalled_check("def check(candidate):\\n    assert candidate(1) == 2\\ncheck(f)\\n")
    False
    """
    if not isinstance(tests, str):
        return False
    try:
        body = ast.parse(tests).body
    except SyntaxError:
        return False
    defines = any(isinstance(s, ast.FunctionDef) and s.name == "check" for s in body)
    calls = any(isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "check"
                for s in body if not isinstance(s, ast.FunctionDef) for n in ast.walk(s))  # fmt: skip
    return defines and not calls


def with_check_call(tests, entry_point) -> str | list:
    """`tests` with ``check(entry_point)`` appended where they define ``check`` and never call it (`uncalled_check`)
    and a function name is given; else as they are.

    >>> with_check_call("def check(candidate):\\n    assert candidate(1) == 2", "inc").splitlines()[-1]
    'check(inc)'
    """
    if isinstance(entry_point, str) and entry_point.isidentifier() and uncalled_check(tests):
        return f"{tests.rstrip()}\n\ncheck({entry_point})\n"
    return tests


def _count_tasks(uid: int) -> int:
    """Processes and threads whose real uid is `uid` (what RLIMIT_NPROC counts), from /proc."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue  # exited while we looked
        if int(fields.get("Uid", "-1").split()[0]) == uid:
            total += int(fields.get("Threads", "1"))
    return total


def _config(limits: Limits) -> dict:
    mb = 1024 * 1024
    accounted = NOBODY if os.geteuid() == 0 else os.getuid()
    # +2: the launcher and the program itself.
    nproc = _count_tasks(accounted) + limits.max_processes + 2
    rlimits = {
        "RLIMIT_AS": limits.memory_mb * mb,
        "RLIMIT_CPU": int(limits.timeout_s) + 2,  # backstop only: the wall clock decides
        "RLIMIT_FSIZE": limits.max_file_mb * mb,
        "RLIMIT_CORE": 0,
        "RLIMIT_NPROC": nproc,
    }
    return {"rlimits": rlimits, "nobody": NOBODY, "isolate": limits.namespaces}


def _wait_no_reap(pid: int, deadline: float, tick=lambda: None) -> bool:
    """Wait until `pid` exits without reaping it (so its process-group id cannot be reused before we kill
    the group), calling `tick` between polls; False on timeout."""
    pause = 0.001
    while True:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if info is not None:
            return True
        if time.monotonic() >= deadline:
            return False
        tick()
        time.sleep(pause)
        pause = min(pause * 2, 0.02)


class _Pipe:
    """The reading end of the results pipe, drained without ever blocking (a program may leave a process
    holding the writing end open), keeping at most `cap` bytes."""

    def __init__(self, fd: int, cap: int = 1 << 20):
        self.fd, self.cap, self.data = fd, cap, bytearray()
        os.set_blocking(fd, False)

    def drain(self) -> None:
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                return
            if not chunk:
                return
            self.data += chunk[: max(0, self.cap - len(self.data))]


def run_code(code: str, tests: str | list[str], *, limits: Limits = Limits()) -> ExecResult:
    """Run `code`, then each test in its namespace, in a limited child process (module docstring).

    >>> r = run_code("def add(a, b):\\n    return a + b", ["assert add(1, 2) == 3", "assert add(1, 1) == 3"])
    >>> r.passed, r.total, r.fraction, r.timed_out
    (1, 2, 0.5, False)
    """
    snippets = split_tests(tests)
    nonce = secrets.token_hex(16)  # marks the runner's result lines (module docstring, "forged results")
    workdir = tempfile.mkdtemp(prefix="posttrain-sandbox-")
    read_fd, write_fd = os.pipe()
    results = _Pipe(read_fd)
    try:
        os.chmod(workdir, 0o755)
        Path(workdir, "job.json").write_text(json.dumps({"code": code, "tests": snippets, "nonce": nonce}))
        Path(workdir, "config.json").write_text(json.dumps(_config(limits)))
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
        with open(os.path.join(workdir, "output.txt"), "wb") as out:
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-I", CHILD, "launch", workdir, str(write_fd)],
                    cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True, close_fds=True, pass_fds=(write_fd,),
                )  # fmt: skip
            finally:
                os.close(write_fd)  # the child holds its own copy
            # Drained while waiting: a full pipe would block the runner and read as a timeout.
            deadline = time.monotonic() + limits.timeout_s
            timed_out = not _wait_no_reap(proc.pid, deadline, results.drain)
            try:
                # The whole group, also after a normal exit: anything the program left running dies here.
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            returncode = proc.wait()
        results.drain()
        passed, isolation = parse_results(results.data.decode(errors="replace"), nonce, len(snippets))
        output = _read(workdir, "output.txt")[-2000:]
    finally:
        os.close(read_fd)
        shutil.rmtree(workdir, ignore_errors=True)
    return ExecResult(passed, len(snippets), timed_out, None if timed_out else returncode, output, isolation)


def parse_results(text: str, nonce: str, total: int) -> tuple[int, str]:
    """(tests passed, isolation) from the runner's lines; a line without `nonce` counts for nothing, and only
    the first line for each test index in range counts.

    >>> parse_results("n isolation namespaces\\nn 0 1\\n1\\nx 1 1\\nn 1 0\\nn 1 1\\nn 7 1\\n", "n", 2)
    (1, 'namespaces')
    """
    outcome: dict[int, bool] = {}
    isolation = ""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 3 or parts[0] != nonce:
            continue
        if parts[1] == "isolation":
            isolation = isolation or parts[2]
        elif parts[1].isdigit() and int(parts[1]) < total and parts[2] in ("0", "1"):
            outcome.setdefault(int(parts[1]), parts[2] == "1")
    return sum(outcome.values()), isolation or "preamble"


def _read(workdir: str, name: str) -> str:
    try:
        return Path(workdir, name).read_text(errors="replace")
    except OSError:
        return ""


def run_many(
    codes: list[str], tests: list[str | list[str]], *, limits: Limits = Limits(), workers: int | None = None
) -> list[ExecResult]:
    """`run_code` for each (code, tests) pair, `workers` at a time (default: the CPU count, at most 8).

    >>> [r.passed for r in run_many(["x = 1", "x = 2"], ["assert x == 1", "assert x == 1"])]
    [1, 0]
    """
    if len(codes) != len(tests):
        raise ValueError(f"{len(codes)} programs but {len(tests)} test sets")
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda ct: run_code(ct[0], ct[1], limits=limits), zip(codes, tests)))
