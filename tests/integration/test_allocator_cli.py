"""`posttrain train` re-executes itself under the malloc `POSTTRAIN_MALLOC` picks, and says which one it runs
under: read from the process's own memory map, so the line is true whatever the loader did."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.cli import allocator
from posttrain.config import dump_config


def _train(make_cfg, tmp_path, name, **env_extra):
    cfg = make_cfg(name, **{"run.max_steps": 1})
    cfg_file = tmp_path / f"{name}.yaml"
    dump_config(cfg, cfg_file)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **env_extra}
    env.pop("LD_PRELOAD", None)
    done = subprocess.run([sys.executable, "-m", "posttrain.cli", "train", str(cfg_file)], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    said = [line for line in done.stderr.splitlines() if line.startswith("memory allocator: ")]
    assert len(said) == 1, done.stderr[-3000:]
    loss = [json.loads(line)["loss"] for line in (Path(cfg.run.output_dir) / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]  # fmt: skip
    return said[0].split()[2], loss


@pytest.mark.skipif(not sys.platform.startswith("linux") or allocator.find_library("tcmalloc") is None,
                    reason="tcmalloc is not installed here (apt-get install libtcmalloc-minimal4)")  # fmt: skip
def test_train_runs_under_tcmalloc_by_default_and_under_glibc_when_asked(make_cfg, tmp_path):
    default, loss_default = _train(make_cfg, tmp_path, "auto")
    system, loss_system = _train(make_cfg, tmp_path, "system", POSTTRAIN_MALLOC="system")
    assert (default, system) == ("tcmalloc", "system")
    assert loss_default == loss_system  # the allocator places tensors; it computes nothing


def test_a_bad_value_is_refused_in_one_line(make_cfg, tmp_path):
    cfg = make_cfg("bad")
    cfg_file = tmp_path / "bad.yaml"
    dump_config(cfg, cfg_file)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "POSTTRAIN_MALLOC": "fast"}
    done = subprocess.run([sys.executable, "-m", "posttrain.cli", "train", str(cfg_file)], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: environment variable POSTTRAIN_MALLOC='fast' is not one of auto, tcmalloc, jemalloc, system: set it "
        "to auto (tcmalloc or jemalloc where installed), a library by name, or system (glibc's malloc)"
    ]
    assert not Path(cfg.run.output_dir).exists()
