"""One process per run folder: a second `posttrain train` into a folder in use is refused (exit 2, naming the
holder), the first goes on untouched, and a holder killed with SIGKILL leaves nothing that blocks `--resume`."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import free_port

from posttrain.config import dump_config
from posttrain.trainer.checkpoint import latest_checkpoint
from posttrain.trainer.metrics import read_metrics
from posttrain.trainer.runlock import LOCK_FILE, RunDirBusyError, hold_run_dir, launch_rank

WORKER = Path(__file__).with_name("ddp_worker.py")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _steps(run_dir):
    return [r["step"] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "loss" in r]


def test_hold_run_dir_is_exclusive_and_cleans_up(tmp_path):
    run = tmp_path / "new" / "run"
    with hold_run_dir(run) as stale:
        assert stale == {}
        holder = json.loads((run / LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid()
        # flock locks belong to an open file: a second open, even in this process, is refused.
        with pytest.raises(RunDirBusyError, match=f"pid {os.getpid()} on {holder['host']}"):
            with hold_run_dir(run):
                pass
        assert (run / LOCK_FILE).is_file()  # the refused attempt did not disturb the holder
    assert not run.exists()  # created here and nothing written: removed again

    run.mkdir(parents=True)
    (run / LOCK_FILE).write_text(json.dumps({"pid": 999999, "host": "elsewhere"}))  # a holder killed earlier
    with hold_run_dir(run) as stale:
        assert stale == {"pid": 999999, "host": "elsewhere"}
        assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert run.is_dir() and not (run / LOCK_FILE).exists()  # a folder that existed before stays


def test_launch_rank_reads_the_launchers_variables(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert launch_rank() == 0
    monkeypatch.setenv("RANK", "3")
    assert launch_rank() == 0  # a RANK without a world of several processes is not a launch
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert launch_rank() == 3
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    assert launch_rank() == 1


def test_second_process_refused_first_unaffected_then_kill_9_and_resume(make_cfg, tmp_path):
    # Far more steps than the test lasts: the first run is still training when the others start, then killed.
    overrides = {"run.max_steps": 100_000, "run.save_every": 20, "data.max_length": 48, "optim.lr": 1e-3}
    cfg = make_cfg("shared", **overrides)
    run_dir = Path(cfg.run.output_dir)
    cfg_file = tmp_path / "shared.yaml"
    dump_config(cfg, cfg_file)
    cmd = [sys.executable, "-m", "posttrain.cli", "train", str(cfg_file)]
    log = tmp_path / "first.stderr"
    with log.open("wb") as err:  # a file, not a pipe nobody reads while it runs
        first = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and latest_checkpoint(run_dir) is None:
            assert first.poll() is None, log.read_text()
            time.sleep(0.01)
        config_before = (run_dir / "config.yaml").read_bytes()

        for extra in ([], ["--resume"]):
            second = subprocess.run(cmd + extra, env=ENV, capture_output=True, text=True, timeout=120)
            assert second.returncode == 2, second.stderr
            assert f"is in use by another posttrain process (pid {first.pid} on " in second.stderr
            assert "Traceback" not in second.stderr

        assert first.poll() is None  # still training
        assert (run_dir / "config.yaml").read_bytes() == config_before
        steps = _steps(run_dir)
        assert steps == list(range(1, len(steps) + 1))  # one run's metrics, in order, none twice

        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    # The kernel dropped the lock with the process; the file naming it is left behind and taken over.
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == first.pid
    reached = int(latest_checkpoint(run_dir).name.removeprefix("step-"))
    resumed = subprocess.run(
        cmd + [f"run.max_steps={reached + 2}", "--resume"], env=ENV, capture_output=True, text=True, timeout=120
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"was last held by pid {first.pid} on " in resumed.stderr and "ended without releasing it" in resumed.stderr
    assert f"resuming {run_dir} from step-{reached:06d}" in resumed.stdout
    assert _steps(run_dir) == list(range(1, reached + 3))
    assert (run_dir / "final").is_dir() and not (run_dir / LOCK_FILE).exists()


def test_multi_process_launch_refused_without_hanging(make_cfg, tmp_path):
    """Rank 0 is refused; the launcher stops rank 1 instead of leaving it waiting for its peer."""
    cfg = make_cfg("ddp-busy", **{"run.max_steps": 2})
    cfg_file = tmp_path / "ddp.yaml"
    dump_config(cfg, cfg_file)
    run_dir = Path(cfg.run.output_dir)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(WORKER), str(cfg_file), str(tmp_path)]  # fmt: skip
    with hold_run_dir(run_dir):
        started = time.time()
        proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=180)
        assert proc.returncode != 0
        assert f"is in use by another posttrain process (pid {os.getpid()} on " in proc.stderr
        assert time.time() - started < 120
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]  # nothing written by either rank


def test_every_process_refuses_a_run_folder_it_cannot_make_before_the_rendezvous(make_cfg, tmp_path, monkeypatch):
    """Under torchrun the first process refused a read-only run.output_dir and stopped, while the others, which
    skip the lock, waited in the process group's rendezvous until torchrun killed them 44 s later (an audit). They
    check the folder first now, without creating anything."""
    import os

    import posttrain.train
    from posttrain.errors import ConfigError
    from posttrain.trainer.runlock import run_dir_problem

    afile = tmp_path / "afile"
    afile.write_text("x")
    assert "is a file" in run_dir_problem(afile / "run") and "is not a folder" in run_dir_problem(afile)
    assert run_dir_problem(tmp_path / "new" / "run") is None
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as on a read-only file system
    assert "not writable: no permission, or a read-only file system" in run_dir_problem(tmp_path / "new" / "run")
    monkeypatch.undo()
    monkeypatch.setattr(posttrain.train, "launch_rank", lambda: 1)
    monkeypatch.setattr(posttrain.train, "_train", lambda *a, **k: pytest.fail("went on to the rendezvous"))
    with pytest.raises(ConfigError, match="cannot be created"):
        posttrain.train.train(make_cfg(**{"run.output_dir": str(afile / "run")}))
