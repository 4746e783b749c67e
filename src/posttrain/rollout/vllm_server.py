"""vLLM in server mode: a separate generation process (`posttrain vllm-serve`) that a run samples from over HTTP
(`algorithm.rollout.engine=vllm-server`), e.g. vLLM on its own GPU while training uses the others.

The server (`GenerationServer`) holds a `vllm_engine.Backend`: `ColocatedVLLM` (vLLM's `LLM` in the server
process) when started by `serve`, a fake in the tests. It answers these calls, the backend's, one at a time (a
`vllm.LLM` is not thread-safe; `/health` answers while a generation runs):

    GET  /health              -> {"status": "ok", "model": NAME, "pushes": weight pushes received}
    POST /generate            JSON {prompt_ids, n, max_new_tokens, temperature, top_p, stop, stop_token_ids, seed}
                              -> {"samples": [[token ids, log-probs], ...]}: n per prompt, contiguous
    POST /load_weights        safetensors bytes of {Hugging Face name: tensor} -> {"tensors": count}
    POST /reset_prefix_cache  -> {}

A bad request is answered 400, a failure in the backend 500, both with {"error": message}. Log-probs travel as JSON
numbers, which hold a float32 exactly; weights as safetensors (bit for bit).

The trainer's side (`ServerBackend`) implements the same `Backend` interface over HTTP, so the engine of a
server-mode run is `VLLMEngine` itself with `sleep=False` (the server keeps its GPU): the same weight sync as
colocated (push when an optimizer step changed a trainable weight, merged LoRA weights computed beside the model,
prefix cache reset after each push), the same `Rollout`. With several training processes (DDP) each one pushes
its (identical) weights and samples its share of the prompts; the server runs the calls one after another.

Weights travel as safetensors bytes over HTTP, in requests of at most `CHUNK_BYTES`: simple and exact, but every
push is a copy through host memory and a socket (LoRA pushes only the adapted layers; full fine-tuning every
trainable weight as training holds it, float32 under mixed precision). A GPU deployment that needs it faster can
replace `ServerBackend.load_weights` alone by a NCCL broadcast from the trainer's GPU to the server's (as TRL's
`trl vllm-serve` does); nothing else changes.

No authentication: whoever reaches the port can replace the weights. The server binds 127.0.0.1 unless told
otherwise; bind another address only on a private network.

What is tested where: the server, the client and a GRPO run through them on CPU, the server holding the fake
backend of the colocated tests (tests/integration/test_vllm_server.py); `serve` with vLLM itself is designed for,
not yet run on a GPU (docs/scale.md).
"""

from __future__ import annotations

import json
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import safetensors.torch

from posttrain.config import vllm_available
from posttrain.errors import UserError
from posttrain.models.loading import resolve_model
from posttrain.rollout.vllm_engine import Backend, ColocatedVLLM, VLLMEngine, Weights

CHUNK_BYTES = 1 << 30
"""The most weight bytes in one `/load_weights` request (a larger tensor goes alone): bounds the memory a push
takes on both sides to about twice this, whatever the model's size."""


class GenerationServerError(UserError):
    """The generation server could not be reached, or failed on a call: the message names it and the call."""


class BadRequest(ValueError):
    """A request the server cannot read (answered 400)."""


# ---------------------------------------------------------------------------------------------------------------
# The server.

_GENERATE_FIELDS = ("prompt_ids", "n", "max_new_tokens", "temperature", "top_p", "stop", "stop_token_ids", "seed")


class GenerationServer:
    """A `Backend` served over HTTP (module docstring). `port=0` takes a free port; `url` says which. The port is
    bound here: an address that cannot be listened on (a port in use, a host not of this machine) is a
    `UserError` naming it. `backend` may be set after (`serve` binds before vLLM loads)."""

    def __init__(self, backend: Backend | None, *, host: str = "127.0.0.1", port: int = 8000, model: str = ""
                 ) -> None:  # fmt: skip
        self.backend, self.model = backend, model
        self.pushes = 0
        self.lock = threading.Lock()  # one backend call at a time
        try:
            self.httpd = _HTTPServer((host, port), self)
        except OSError as err:
            why = err.strerror or str(err)
            raise UserError(f"cannot listen on {host}:{port}: {why} (another server on that port? give another "
                            "--port, or --port 0 for a free one; --host must be an address of this machine)"
                            ) from None  # fmt: skip
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> GenerationServer:
        """Serve from a background thread (tests, notebooks); `close` stops it."""
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="generation-server", daemon=True)
        self.thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until interrupted (`posttrain vllm-serve`)."""
        self.httpd.serve_forever()

    def close(self) -> None:
        """Stop serving and free the port (twice is harmless)."""
        if self.thread is not None:
            self.httpd.shutdown()  # returns once serve_forever has stopped
            self.thread.join()
            self.thread = None
        self.httpd.server_close()

    # ---- the calls (`ROUTES`), each given the request body
    def health(self, body: bytes) -> dict:
        return {"status": "ok", "model": self.model, "pushes": self.pushes}

    def generate(self, body: bytes) -> dict:
        request = _json(body)
        missing = [k for k in _GENERATE_FIELDS if k not in request]
        if missing:
            raise BadRequest(f"/generate needs the fields {', '.join(missing)}")
        with self.lock:
            samples = self.backend.sample(request["prompt_ids"], **{k: request[k] for k in _GENERATE_FIELDS[1:]})
        return {"samples": [[list(ids), list(logps)] for ids, logps in samples]}

    def load_weights(self, body: bytes) -> dict:
        try:
            weights = list(safetensors.torch.load(body).items())
        except Exception as err:  # safetensors raises its own error types for a malformed buffer
            raise BadRequest(f"/load_weights needs safetensors bytes: {err}") from None
        with self.lock:
            self.backend.load_weights(weights)
            self.pushes += 1
        return {"tensors": len(weights)}

    def reset_prefix_cache(self, body: bytes) -> dict:
        with self.lock:
            self.backend.reset_prefix_cache()
        return {}


ROUTES: dict[tuple[str, str], Callable[[GenerationServer, bytes], dict]] = {
    ("GET", "/health"): GenerationServer.health,
    ("POST", "/generate"): GenerationServer.generate,
    ("POST", "/load_weights"): GenerationServer.load_weights,
    ("POST", "/reset_prefix_cache"): GenerationServer.reset_prefix_cache,
}


def _json(body: bytes) -> dict:
    try:
        request = json.loads(body)
    except ValueError as err:
        raise BadRequest(f"the request body is not JSON: {err}") from None
    if not isinstance(request, dict):
        raise BadRequest("the request body must be a JSON object")
    return request


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a request still running does not keep the process alive after close()

    def __init__(self, address: tuple[str, int], app: GenerationServer) -> None:
        self.app = app
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._route("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._route("POST")

    def _route(self, method: str) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        call = ROUTES.get((method, self.path))
        if call is None:
            known = ", ".join(f"{m} {p}" for m, p in ROUTES)
            return self._reply(404, {"error": f"no {method} {self.path}; this server answers {known}"})
        try:
            status, doc = 200, call(self.server.app, body)
        except BadRequest as err:
            status, doc = 400, {"error": str(err)}
        except Exception as err:  # the backend's failure goes to the client, and its traceback to the server's log
            traceback.print_exc()
            status, doc = 500, {"error": f"{type(err).__name__}: {err}"}
        self._reply(status, doc)

    def _reply(self, status: int, doc: dict) -> None:
        data = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:
        pass  # one line per request would drown the server's log; failures print their traceback (`_route`)


def serve(model: str, *, host: str = "127.0.0.1", port: int = 8000, gpu_memory_utilization: float = 0.9,
          seed: int = 0, max_model_len: int | None = None) -> GenerationServer:  # fmt: skip
    """A server holding vLLM's `LLM` of `model` (a name `model.name` accepts: embedded, local folder, hub id),
    not yet serving (`serve_forever`). Needs vllm, so a CUDA machine with `pip install "posttrain[vllm]"`."""
    if not vllm_available():
        raise UserError(
            "posttrain vllm-serve needs the vllm package, which is not installed here; on the CUDA machine that "
            "will generate, `pip install \"posttrain[vllm]\"` (vLLM pins its own torch: docs/scale.md)"
        )
    resolved = resolve_model(model)
    if resolved.gguf_file is not None:
        raise UserError(
            f"posttrain vllm-serve: {model!r} is a GGUF file; serve the Hugging Face folder the training run loads "
            "(posttrain converts a GGUF into one: the `model.name` of the run's config.yaml points at it)"
        )
    # The port first: one that cannot be listened on is refused before vLLM loads the model (minutes), not after.
    server = GenerationServer(None, host=host, port=port, model=model)
    try:
        server.backend = ColocatedVLLM(resolved.path, gpu_memory_utilization=gpu_memory_utilization, sleep=False,
                                       seed=seed, max_model_len=max_model_len)  # fmt: skip
    except BaseException:
        server.close()
        raise
    return server


# ---------------------------------------------------------------------------------------------------------------
# The client: the trainer's side.


class ServerBackend:
    """The `Backend` interface over HTTP to a `GenerationServer` at `url`. Waits up to `wait_s` seconds for the
    server to answer `/health` (it may still be loading its model), then raises `GenerationServerError`."""

    def __init__(self, url: str, *, wait_s: float = 300.0, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.url, self.chunk_bytes = url.rstrip("/"), chunk_bytes
        # No proxy: the server is on this machine or its network, and an http_proxy set for package downloads
        # would otherwise receive the weights.
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self.info = self._wait_until_up(wait_s)

    def _wait_until_up(self, wait_s: float) -> dict:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return self._call("GET", "/health", timeout=max(0.1, min(10.0, wait_s)))
            except _Unreachable as err:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise GenerationServerError(
                        f"no generation server answered at {self.url} (algorithm.rollout.vllm_server_url) within "
                        f"{wait_s:g} s (algorithm.rollout.vllm_server_timeout): {err.reason}. Start it first, on "
                        "the machine that generates: `posttrain vllm-serve --model MODEL --port PORT` with the "
                        "run's model.name, and set vllm_server_url to the address it prints (docs/scale.md); or "
                        "set algorithm.rollout.engine=hf"
                    ) from None
                time.sleep(min(1.0, left))

    def _call(self, method: str, path: str, body: bytes | None = None, *, content_type: str = "application/json",
              timeout: float | None = None) -> dict:  # fmt: skip
        request = urllib.request.Request(self.url + path, data=body, method=method,
                                         headers={"Content-Type": content_type})  # fmt: skip
        try:
            # timeout None for the calls of a run: a generation takes as long as it takes
            with self.opener.open(request, timeout=timeout) as response:
                data = response.read()
        except urllib.error.HTTPError as err:
            raise GenerationServerError(
                f"the generation server at {self.url} failed on {method} {path} (HTTP {err.code}): "
                f"{_error_text(err)}"
            ) from None
        except (urllib.error.URLError, OSError) as err:
            raise _Unreachable(self.url, method, path, getattr(err, "reason", err)) from None
        try:
            doc = json.loads(data)
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            raise GenerationServerError(
                f"{self.url} answered {method} {path} with something other than posttrain's generation server "
                f"would ({data[:80]!r}): is it `posttrain vllm-serve`? (vLLM's own `vllm serve` does not take the "
                "weight pushes a training run makes)"
            )
        return doc

    def load_weights(self, weights: Weights) -> None:
        for chunk in _chunks(weights, self.chunk_bytes):
            body = safetensors.torch.save({name: t.detach().to("cpu").contiguous() for name, t in chunk})
            self._call("POST", "/load_weights", body, content_type="application/octet-stream")

    def reset_prefix_cache(self) -> None:
        self._call("POST", "/reset_prefix_cache", b"{}")

    def sample(self, prompt_ids, *, n, max_new_tokens, temperature, top_p, stop, stop_token_ids, seed, row_ids=None):
        request = {"prompt_ids": prompt_ids, "n": n, "max_new_tokens": max_new_tokens, "temperature": temperature,
                   "top_p": top_p, "stop": stop, "stop_token_ids": stop_token_ids, "seed": seed}  # fmt: skip
        samples = self._call("POST", "/generate", json.dumps(request).encode())["samples"]
        return [(ids, logps) for ids, logps in samples]

    def sleep(self) -> None:
        raise NotImplementedError("a generation server keeps its GPU between rollouts: build VLLMEngine(sleep=False)")

    def wake_up(self, tags: list[str]) -> None:
        raise NotImplementedError("a generation server keeps its GPU between rollouts: build VLLMEngine(sleep=False)")


class _Unreachable(GenerationServerError):
    def __init__(self, url: str, method: str, path: str, reason) -> None:
        self.reason = reason
        super().__init__(
            f"lost the generation server at {url} ({method} {path}): {reason}. Is `posttrain vllm-serve` still "
            "running there? Restart it and resume the run with `posttrain train RUN.yaml --resume`"
        )


def _error_text(err: urllib.error.HTTPError) -> str:
    try:
        return json.loads(err.read())["error"]
    except (ValueError, KeyError, TypeError):
        return err.reason


def _chunks(weights: Weights, limit: int) -> Iterator[Weights]:
    """`weights` in order, in groups of at most `limit` bytes (a larger tensor alone).

    >>> import torch
    >>> [[n for n, _ in c] for c in _chunks([("a", torch.zeros(2)), ("b", torch.zeros(2)), ("c", torch.zeros(9))], 16)]
    [['a', 'b'], ['c']]
    """
    chunk, size = [], 0
    for name, t in weights:
        nbytes = t.numel() * t.element_size()
        if chunk and size + nbytes > limit:
            yield chunk
            chunk, size = [], 0
        chunk.append((name, t))
        size += nbytes
    if chunk:
        yield chunk


def server_engine(cfg) -> VLLMEngine:
    """The engine of a run with `algorithm.rollout.engine=vllm-server`: `VLLMEngine` over a `ServerBackend`,
    connected now (so an unreachable server stops the run before its first rollout)."""
    rc = cfg.algorithm.rollout
    client = ServerBackend(rc.vllm_server_url, wait_s=rc.vllm_server_timeout)
    return VLLMEngine(lambda model: client, sleep=False)
