"""Sandbox: right pass counts, and runaway programs (loop, memory, fork bomb, network) stopped cleanly."""

import os
import socket
import time
from pathlib import Path

import pytest

from posttrain.rewards.sandbox import Limits, extract_code, run_code, run_many, split_tests

FAST = Limits(timeout_s=1.5, memory_mb=512, max_processes=16)


def _sandbox_processes() -> list[int]:
    """Live processes whose command line names a sandbox folder (zombies are gone already)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"posttrain-sandbox-" in cmdline and state != "Z":
            pids.append(int(entry))
    return pids


def _wait_no_sandbox_processes(timeout: float = 3.0) -> list[int]:
    # The kernel tears a PID namespace down asynchronously: give it a moment.
    deadline = time.monotonic() + timeout
    while (left := _sandbox_processes()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def test_passing_failing_and_partial():
    code = "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
    r = run_code(code, "assert fib(10) == 55\nassert fib(1) == 1\nassert fib(2) == 2", limits=FAST)
    assert (r.passed, r.total, r.timed_out, r.returncode) == (2, 3, False, 0)
    assert r.fraction == pytest.approx(2 / 3)
    assert "AssertionError" in r.output


def test_syntax_error_and_exception_fail_every_test():
    r = run_code("def f(:\n  pass", ["assert True", "assert True"], limits=FAST)
    assert (r.passed, r.total) == (0, 2) and "SyntaxError" in r.output
    r = run_code("raise SystemExit(0)", ["assert True"], limits=FAST)
    assert r.passed == 0


def test_main_block_does_not_run_and_stdin_is_empty():
    code = "def f():\n    return 1\nif __name__ == '__main__':\n    input()\n"
    assert run_code(code, ["assert f() == 1"], limits=FAST).passed == 1


def test_infinite_loop_times_out_quickly_and_keeps_earlier_results():
    start = time.monotonic()
    r = run_code(
        "def hang():\n    while True:\n        pass\n",
        ["assert 1 == 1", "hang()", "assert True"],
        limits=FAST,
    )
    elapsed = time.monotonic() - start
    assert r.timed_out and r.returncode is None
    assert (r.passed, r.total) == (1, 3)  # the result written before the hang survives
    assert elapsed < FAST.timeout_s + 1.0
    assert _wait_no_sandbox_processes() == []


def test_memory_hog_is_stopped():
    hog = "blocks = []\nwhile True:\n    blocks.append(bytearray(50 * 1024 * 1024))\n"
    r = run_code(hog, ["assert True"], limits=Limits(timeout_s=5, memory_mb=256))
    assert r.passed == 0 and not r.timed_out and "MemoryError" in r.output


def test_fork_count_is_limited():
    # Forks until refused; children sleep so they stay counted. A limit must stop it well short of 200.
    code = (
        "import os, time\nn = 0\nwhile n < 200:\n    try:\n        pid = os.fork()\n"
        "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(30)\n        os._exit(0)\n"
        "    n += 1\n"
    )
    r = run_code(code, ["assert 0 < n < 200, n"], limits=Limits(timeout_s=5, max_processes=8))
    assert r.passed == 1, r.output
    assert _wait_no_sandbox_processes() == []  # the sleepers die with the run


def test_fork_bomb_is_contained_and_leaves_no_processes():
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    start = time.monotonic()
    r = run_code(bomb, ["assert True"], limits=Limits(timeout_s=1.5, max_processes=16))
    assert r.timed_out and time.monotonic() - start < 4.0
    assert _wait_no_sandbox_processes() == []


def test_detached_child_does_not_outlive_the_run():
    code = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n"
    r = run_code(code, ["assert True"], limits=FAST)
    if r.isolation != "namespaces":
        pytest.skip("no PID namespace here: a child that leaves the process group can escape")
    assert r.passed == 1
    assert _wait_no_sandbox_processes() == []


@pytest.mark.parametrize("namespaces", [True, False])
def test_network_call_fails(namespaces):
    # A server the test itself can reach: without the guard, the sandboxed program would connect.
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        code = (
            f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=1).close()\n"
            "    connected = True\nexcept OSError:\n    connected = False\n"
        )
        r = run_code(code, ["assert not connected"], limits=Limits(timeout_s=5, namespaces=namespaces))
    assert r.passed == 1, r.output
    assert r.isolation in ("namespaces", "preamble")
    if not namespaces:
        assert r.isolation == "preamble"


def test_temporary_folder_is_removed():
    code = "import os\nwhere = os.getcwd()\nopen('scratch.txt', 'w').write('x')\n"
    r = run_code(code + "print('CWD=' + where)\n", ["assert os.path.exists('scratch.txt')"], limits=FAST)
    assert r.passed == 1
    cwd = next(line[4:] for line in r.output.splitlines() if line.startswith("CWD="))
    assert "posttrain-sandbox-" in cwd and not os.path.exists(cwd)


def test_environment_is_minimal_and_isolated_mode():
    code = "import os, sys\nenv = dict(os.environ)\nflags = sys.flags.isolated\n"
    r = run_code(code, ["assert 'PYTHONPATH' not in env and 'VIRTUAL_ENV' not in env", "assert flags == 1"],
                 limits=FAST)  # fmt: skip
    assert r.passed == 2, r.output


def test_batch_runs_concurrently():
    start = time.monotonic()
    codes = [f"import time\ntime.sleep(0.5)\nx = {i}" for i in range(8)]
    results = run_many(codes, ["assert x == 3"] * 8, limits=FAST, workers=8)
    assert [r.passed for r in results] == [int(i == 3) for i in range(8)]
    assert time.monotonic() - start < 8 * 0.5  # sequential would take at least 4 s
    with pytest.raises(ValueError, match="2 programs but 1 test sets"):
        run_many(["a", "b"], ["assert 1"])


def test_extract_code_and_split_tests():
    text = "draft:\n```python\nx = 1\n```\nfinal:\n```py\nx = 2\n```\n"
    assert extract_code(text) == "x = 2\n"
    assert split_tests("import math\nassert math.pi > 3\nassert 1") == [
        "import math\nassert math.pi > 3",
        "assert 1",
    ]
    assert split_tests("x = 1") == ["x = 1"]


def test_forged_result_lines_get_no_credit():
    """Reward hacking: a program that writes "passed" lines, in the old results.txt format, with a made-up
    nonce, and into every descriptor it holds (the results pipe among them), still fails its failing tests."""
    code = (
        "import os\n"
        "fake = b'1\\n' * 8 + b''.join(b'%d 1\\n' % i for i in range(8)) + b''.join(b'%032x %d 1\\n' % (7, i) for i in range(8))\n"
        "with open('results.txt', 'ab') as f:\n"
        "    f.write(fake)\n"
        "for fd in range(3, 256):\n"
        "    try:\n"
        "        os.write(fd, fake)\n"
        "    except OSError:\n"
        "        pass\n"
        "def check():\n"
        "    with open('results.txt', 'ab') as f:\n"  # called by the tests: forges between results too
        "        f.write(fake)\n"
        "    return False\n"
    )
    r = run_code(
        code, ["assert check()", "assert check()", "assert not check()", "assert check()"], limits=FAST
    )
    assert (r.passed, r.total) == (1, 4), r.output  # only the test that really passes


def test_patched_builtins_do_not_turn_failures_into_passes():
    code = (
        "import builtins, os\n"
        "_compile = builtins.compile\n"
        "builtins.compile = lambda src, name, mode, *a, **k: _compile('pass', name, mode)\n"
        "builtins.exec = lambda *a, **k: None\n"
        "os.write = lambda fd, data: len(data)\n"
    )
    r = run_code(code, ["assert False", "assert 1 == 2", "x = 1\nassert x == 1"], limits=FAST)
    assert (r.passed, r.total) == (1, 3), r.output


def test_nonce_is_not_on_disk_in_the_environment_or_on_a_command_line(monkeypatch):
    """The parent's nonce (fixed here so the program can look for it) is nowhere the program can read it."""
    import posttrain.rewards.sandbox as sandbox

    nonce = "5eed" * 8
    monkeypatch.setattr(sandbox.secrets, "token_hex", lambda n: nonce)
    code = (
        "import os\n"
        "places = {'environ': repr(dict(os.environ))}\n"
        "for pid in os.listdir('/proc'):\n"
        "    try:\n"
        "        places[pid] = open(f'/proc/{pid}/cmdline', 'rb').read().decode(errors='replace')\n"
        "    except (OSError, ValueError):\n"
        "        pass\n"
        "for root, _, files in os.walk('.'):\n"
        "    for name in files:\n"
        "        places[name] = open(os.path.join(root, name), 'rb').read().decode(errors='replace')\n"
        "found = sorted(k for k, v in places.items() if '" + nonce + "' in v)\n"
        "left = sorted(os.listdir('.'))\n"
    )
    r = run_code(code, ["assert found == [], found", "assert 'job.json' not in left and 'config.json' not in left"],
                 limits=FAST)  # fmt: skip
    assert (r.passed, r.total) == (2, 2), r.output
    # Control: a line carrying the right nonce does count (so the checks above are what stop forgeries).
    forged = (
        "import os\nfor fd in range(3, 256):\n    try:\n        os.write(fd, b'"
        + nonce
        + " 0 1\\n')\n    except OSError:\n        pass\n"
    )
    assert run_code(forged, ["assert False"], limits=FAST).passed == 1


def test_a_usage_example_after_the_solution_and_a_trailing_loop_of_asserts():
    """A right solution followed by a fenced usage example ran the example alone and scored 0; the statements
    after a string's last assert were dropped, so `return 0` passed a test that looped over the asserts."""
    solution = "```python\ndef sq(x):\n    return x * x\n```\nExample:\n```python\nprint(sq(4))\n```"
    assert extract_code(solution) == "def sq(x):\n    return x * x\n"
    tests = "assert sq(0) == 0\nfor i in range(5):\n    assert sq(i) == i * i"
    assert split_tests(tests) == ["assert sq(0) == 0", "for i in range(5):\n    assert sq(i) == i * i"]
    right = run_code(extract_code(solution), tests, limits=FAST)
    wrong = run_code("def sq(x):\n    return 0\n", tests, limits=FAST)
    assert (right.passed, right.total) == (2, 2) and (wrong.passed, wrong.total) == (1, 2)
