"""One process at a time in a run folder: an exclusive OS lock on `RUN/.posttrain.lock`.

Two `posttrain train` processes writing one folder would both succeed and leave a mix: one run's `config.yaml`
beside the other's checkpoints and `final/`, and both runs' lines interleaved in `metrics.jsonl`. So `train`
takes `hold_run_dir(run_dir)` before it writes anything there, and a second process is refused at once
(`RunDirBusyError`, exit 2) with the holder's pid, host, start time and command, which the holder writes into
the lock file.

The lock is `flock(LOCK_EX)` on that file: the kernel drops it when the holding process ends in any way,
kill -9 and crashes included, so a lock left behind by a dead process never blocks anyone. Such a stale file is
recognised (the lock is free but the file still names its holder) and taken over with a note. A normal exit
removes the file, and the folder too when this process created it and nothing else was written there (a run
refused for a bad data file leaves no empty folder behind).

In a multi-process run only the launcher's rank 0 holds the lock: the other ranks write nothing to the folder.
If rank 0 is refused, it exits and the launcher (torchrun, `accelerate launch`) stops the other ranks. Not
covered: file systems without lock support (an error says so) and Windows (no `fcntl`).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from posttrain.errors import ConfigError, UserError

LOCK_FILE = ".posttrain.lock"


class RunDirBusyError(UserError):
    """Another live process holds the run folder."""


def _env_int(keys: tuple[str, ...], default: int) -> int:
    for key in keys:
        value = os.environ.get(key, "").strip()
        if value.isdigit():
            return int(value)
    return default


def launch_rank() -> int:
    """This process's global rank as the launcher set it (0 when not launched as several processes).

    Read from the environment, before `Accelerator` exists, with the variables accelerate itself reads
    (`accelerate.utils.environment.get_cpu_distributed_information`): torchrun's `RANK` and `WORLD_SIZE`, then
    MPI's. A stray `RANK` without a world of several processes does not count.
    """
    world = _env_int(("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"), 1)
    if world <= 1:
        return 0
    return _env_int(("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"), 0)


def _holder_text(info: dict) -> str:
    if not info:
        return "a process that has not written its details yet"
    text = f"pid {info.get('pid', '?')} on {info.get('host', '?')}"
    if info.get("started"):
        text += f", started {info['started']}"
    if info.get("command"):
        text += f": `{info['command']}`"
    return text


def _read_holder(fd: int) -> dict:
    try:
        raw = os.pread(fd, 65536, 0).decode("utf-8", errors="replace")
        info = json.loads(raw) if raw.strip() else {}
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _acquire(path: Path, run_dir: Path) -> tuple[int, dict]:
    """(locked file descriptor, what the file said before: a dead holder's details, or {})."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # the folder was removed by a holder that created it and wrote nothing
            run_dir.mkdir(parents=True, exist_ok=True)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirBusyError(
                f"{run_dir} is in use by another posttrain process ({_holder_text(holder)}). Two runs in one "
                "folder would mix their checkpoints, metrics and final model, so this one did not start. Wait "
                "for that run to end (or stop it; `--resume` then continues it), or set run.output_dir to "
                "another folder."
            ) from None
        except OSError as err:
            os.close(fd)
            raise ConfigError(
                f"{run_dir}: cannot lock the run folder ({err.strerror}); the file system does not support "
                "locks. Put run.output_dir on a local disk."
            ) from None
        # The previous holder removes the file as it releases it: if that happened between our open and our
        # flock, we hold an orphaned inode that a third process cannot see. Lock the file at `path` instead.
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    stale = _read_holder(fd)
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "",
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
    return fd, stale


def run_dir_problem(run_dir: str | Path) -> str | None:
    """Why `run_dir` could not be made or written by this user (a file in its place or above it, a folder without
    write permission, a read-only disk), found without creating anything; None when nothing says so. The other
    processes of a launch check it before they wait for the first one (`train`): the first refused the folder
    and stopped while the others hung in the process group's rendezvous until torchrun killed them, 44 s later
    (an audit)."""
    run_dir = Path(run_dir).absolute()
    if run_dir.exists() and not run_dir.is_dir():
        return f"run.output_dir {run_dir} exists and is not a folder; choose another run.output_dir"
    nearest = next((p for p in (run_dir, *run_dir.parents) if p.exists()), None)
    if nearest is None:
        return None
    if not nearest.is_dir():
        return f"run.output_dir {run_dir} cannot be created ({nearest} is a file); choose another run.output_dir"
    if not os.access(nearest, os.W_OK | os.X_OK):  # (access(2) says EROFS for a read-only file system too)
        return (f"run.output_dir {run_dir} cannot be {'written' if nearest == run_dir else 'created'} ({nearest} "
                "is not writable: no permission, or a read-only file system); choose another run.output_dir")
    return None


@contextmanager
def hold_run_dir(run_dir: str | Path) -> Iterator[dict]:
    """Hold `run_dir` exclusively for the `with` block (creating the folder if needed).

    Yields the details of a holder that died without releasing the folder (kill -9, a crash), or {}. Raises
    `RunDirBusyError` when a live process holds it.
    """
    run_dir = Path(run_dir)
    if why := run_dir_problem(run_dir):  # the checks every other process of a launch makes (`train`)
        raise ConfigError(why)
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file where a parent folder should be, no permission, a read-only disk
        raise ConfigError(f"run.output_dir {run_dir} cannot be created ({err.strerror}: {err.filename}); choose "
                          "another run.output_dir") from None  # fmt: skip
    path = run_dir / LOCK_FILE
    fd, stale = _acquire(path, run_dir)
    try:
        yield stale
    finally:
        # Unlink before unlocking: a process that opened the file meanwhile then sees it is gone (see _acquire).
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        fcntl.flock(fd, fcntl.LOCK_UN)  # also for any forked child that still shares the descriptor
        os.close(fd)
        if created:
            try:
                run_dir.rmdir()  # only if empty: the run wrote nothing
            except OSError:
                pass


def stale_note(run_dir: str | Path, stale: dict) -> str:
    """The line shown when a run takes over a folder whose previous holder died without releasing it."""
    return f"note: {run_dir} was last held by {_holder_text(stale)}, which ended without releasing it"
