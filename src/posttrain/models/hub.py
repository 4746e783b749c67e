"""Offline by default when the Hugging Face hub cannot be reached, and no hub-kernel noise.

Without `HF_HUB_OFFLINE`, huggingface_hub (2.x, `utils/_http.py: http_backoff`) retries every failed request
five times with exponential backoff (1 + 2 + 4 + 8 + 8 s), logging each retry, and transformers asks for several
files: on a machine without network an uncached hub name took ~50 s and ten lines of noise before the clean
error, and even a cached one waited on the network. huggingface_hub reads `HF_HUB_OFFLINE` once, when it is
first imported, so `settle_hub_mode` decides before that: when the user has not set the variable, it tries a
TCP connection to the hub endpoint (`HF_ENDPOINT`, or its proxy), and if none opens within a couple of seconds
it sets `HF_HUB_OFFLINE=1` for this process and its children. With a network nothing changes; a user's own
`HF_HUB_OFFLINE` (0 or 1) is always obeyed.

`quiet_kernel_hub` silences one message: importing bitsandbytes (0.50) on a CPU with AVX512-BF16, which peft
does whenever it loads, tries to fetch an optional CPU kernel from the hub (`kernels-community/quantization-
bitsandbytes`, through the `kernels` package) and logs a warning when it cannot. That kernel only serves the
repacked 4-bit layout that posttrain switches off (`adapters.use_portable_4bit_kernel`), so the failure does not
matter to us. It sets the level of the two named loggers that print it, nothing else.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
import warnings
from urllib.parse import urlsplit

DEFAULT_ENDPOINT = "https://huggingface.co"
PROBE_TIMEOUT_S = 2.0

_probed: dict[str, bool] = {}  # "offline": the probe's verdict, once per process (it set HF_HUB_OFFLINE if so)


def _true(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def hub_offline() -> bool:
    """Whether this process treats the hub as offline (`HF_HUB_OFFLINE` read now, not at import time)."""
    return _true(os.environ.get("HF_HUB_OFFLINE")) or _true(os.environ.get("TRANSFORMERS_OFFLINE"))


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "").strip() or DEFAULT_ENDPOINT


def _proxy_for(url: str) -> str | None:
    """The proxy URL requests would use for `url` (`HTTPS_PROXY`, `ALL_PROXY`, ... and `NO_PROXY`)."""
    import urllib.request

    host = urlsplit(url).hostname or ""
    if urllib.request.proxy_bypass_environment(host):
        return None
    proxies = urllib.request.getproxies_environment()
    return proxies.get(urlsplit(url).scheme) or proxies.get("all")


def hub_reachable(endpoint: str | None = None, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub endpoint (or to the proxy it would go through) opens within
    `timeout` seconds, name lookup included (run in a thread: `getaddrinfo` has no timeout of its own)."""
    url = endpoint or hub_endpoint()
    target = urlsplit(_proxy_for(url) or url)
    host = target.hostname
    if not host:
        return False
    port = target.port or (443 if target.scheme == "https" else 80)
    result: list[bool] = []

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    probe = threading.Thread(target=connect, daemon=True)  # a lookup that hangs is left behind, not waited for
    probe.start()
    probe.join(timeout)
    return bool(result and result[0])


def settle_hub_mode() -> bool:
    """Whether the hub is offline for this process, deciding it if nobody has; returns True when offline.

    The user's `HF_HUB_OFFLINE` wins; otherwise the hub is probed once (`hub_reachable`) and, when it cannot be
    reached, `HF_HUB_OFFLINE=1` is set, which huggingface_hub and transformers honour if they have not been
    imported yet (the CLI calls this first thing; `resolve_model` calls it before any hub name is used).
    """
    if _probed.get("offline"):
        return True
    if any(os.environ.get(k, "").strip() for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return hub_offline()
    if "offline" in _probed or "huggingface_hub" in sys.modules:
        return False  # reachable; or too late to switch the library, which then handles the network itself
    _probed["offline"] = not hub_reachable()
    if _probed["offline"]:
        os.environ["HF_HUB_OFFLINE"] = "1"
    return _probed["offline"]


def offline_reason() -> str:
    """Why the hub is offline, for error messages: the user's setting or the failed probe."""
    if _probed.get("offline"):
        return f"the Hugging Face hub ({hub_endpoint()}) cannot be reached from this machine"
    return "HF_HUB_OFFLINE=1 (offline)"


def quiet_kernel_hub() -> None:
    """Silence bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" warning and the
    `kernels` package's messages about that fetch (module docstring); call before bitsandbytes is imported."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    logging.getLogger("kernels").setLevel(logging.ERROR)


def prepare_hub_libraries() -> None:
    """What every entry point that loads a model calls before it imports transformers, peft or bitsandbytes:
    settle offline mode, and silence the hub-kernel warning. Cheap after the first call."""
    settle_hub_mode()
    quiet_kernel_hub()


@contextlib.contextmanager
def quiet_loading():
    """While posttrain loads a model: no per-tensor "Loading weights" bar from transformers, and not the
    deprecation notice transformers gives when peft reads `is_gradient_checkpointing` (neither is the user's
    doing, and the Python API prints them where the CLI, which silences libraries, does not). The caller's own
    settings come back afterwards: a bar the caller had enabled is enabled again, and other warnings pass.
    Used as a decorator of the functions that load models; it settles the hub first (`prepare_hub_libraries`)."""
    prepare_hub_libraries()
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()
