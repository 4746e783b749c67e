"""Offline is fast and quiet wherever posttrain runs, not only under the scripts' HF_HUB_OFFLINE=1: an uncached hub
name fails in seconds with one paragraph when the hub cannot be reached, loading a LoRA/QLoRA model prints no
hub-kernel warning, and a run that does not use DeepSpeed does not import it (where it is installed, its import
prints a "Setting accelerator to CPU" warning into the progress bar)."""

import logging
import os
import socket
import subprocess
import sys
import time

import pytest
from support import free_port

from posttrain.config import ModelConfig, TechniqueConfig
from posttrain.models import hub, load_model, save_model

REAL_REACHABLE = hub.hub_reachable


def _env_without_offline(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    return {**env, "HF_HOME": str(tmp_path / "hf-home"), "OMP_NUM_THREADS": "1", **extra}


def _cli(env, *argv, timeout=180):
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "posttrain.cli", *argv], env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    return proc, time.perf_counter() - started


def test_uncached_hub_name_fails_fast_and_clean_without_hf_hub_offline(tmp_path):
    # The hub endpoint is a closed local port, so the test sees "no hub" whatever this machine's network is.
    env = _env_without_offline(tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{free_port()}")
    name = "posttrain-tests/surely-not-cached"
    proc, seconds = _cli(env, "generate", "--model", name, "--prompt", "hi")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: model {name!r} is not a local folder"), proc.stderr
    assert "cannot be reached from this machine" in lines[0] and f"huggingface-cli download {name}" in lines[0]
    # Python, torch and the CLI start in ~3-5 s on the 2-core test machine; huggingface_hub's retries took ~50 s.
    assert seconds < 20, seconds


def test_loading_a_qlora_adapter_prints_no_kernel_hub_warning(tmp_path, tiny_dir, tiny_tokenizer):
    """peft and bitsandbytes both load (a LoRA adapter loads peft, which imports bitsandbytes, the same way).
    Without HF_HUB_OFFLINE and no hub, as after `. .venv/bin/activate`: bitsandbytes' fetch of its CPU kernel
    fails, and the `kernels` package notes that it skipped its trust check offline; neither is printed."""
    pytest.importorskip("bitsandbytes")
    model = load_model(ModelConfig(name=str(tiny_dir)), TechniqueConfig(name="qlora", r=4))
    save_model(model, tiny_tokenizer, tmp_path / "adapter")
    env = _env_without_offline(tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{free_port()}")
    proc, _ = _cli(env, "generate", "--model", str(tmp_path / "adapter"), "--prompt", "hi", "--max-new-tokens", "2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no "Failed to load CPU gemm_4bit_forward from kernels-community", nothing else


def test_kernel_hub_loggers_are_quiet_after_preparing():
    """The mechanism, on any CPU (bitsandbytes only tries the hub kernel on CPUs with AVX512-BF16)."""
    hub.prepare_hub_libraries()
    for name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
        assert not logging.getLogger(name).isEnabledFor(logging.WARNING), name
    assert logging.getLogger("bitsandbytes").isEnabledFor(logging.WARNING)  # the rest of bitsandbytes still speaks


def test_probe_sets_offline_only_when_the_hub_cannot_be_reached(monkeypatch):
    monkeypatch.setattr(hub, "_probed", {})
    monkeypatch.delitem(sys.modules, "huggingface_hub", raising=False)  # as in a fresh `posttrain` process
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the user's choice is obeyed without probing
    monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: pytest.fail("probed despite HF_HUB_OFFLINE"))
    assert hub.settle_hub_mode() is False and hub._probed == {}

    monkeypatch.delenv("HF_HUB_OFFLINE")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        monkeypatch.setattr(hub, "hub_reachable", REAL_REACHABLE)
        assert hub.settle_hub_mode() is False and "HF_HUB_OFFLINE" not in os.environ  # reachable: unchanged

    monkeypatch.setattr(hub, "_probed", {})
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    assert hub.settle_hub_mode() is True and os.environ["HF_HUB_OFFLINE"] == "1"
    assert "cannot be reached" in hub.offline_reason()


def test_hub_reachable_times_out_and_handles_bad_names():
    started = time.perf_counter()
    assert hub.hub_reachable("https://name-that-does-not-resolve.invalid", timeout=1.0) is False
    assert hub.hub_reachable(f"http://127.0.0.1:{free_port()}", timeout=1.0) is False
    assert time.perf_counter() - started < 3.0


def test_a_run_without_deepspeed_does_not_import_it(tmp_path, tiny_model_dir, sft_file):
    """A LoRA SFT run and its checkpoint, in a fresh interpreter (other tests import DeepSpeed into this one).
    Accelerate's `extract_model_from_parallel` imported DeepSpeed to test for its engine class at every loss and
    save; `models.logprobs.unwrap_parallel` consults the class only once DeepSpeed is imported."""
    pytest.importorskip("deepspeed")
    script = f"""
import sys
from posttrain.algorithms import load_config
from posttrain.train import train
cfg = load_config(None, overrides=["model.name={tiny_model_dir}", "technique.name=lora", "data.train={sft_file}",
                                   "data.max_length=64", "run.max_steps=2", "run.save_every=1", "run.progress=false",
                                   "run.report=false", "run.output_dir={tmp_path / 'run'}"])
train(cfg)
print("deepspeed imported:", "deepspeed" in sys.modules)
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "deepspeed imported: False", proc.stdout + proc.stderr
    assert "real_accelerator" not in proc.stderr
