"""`posttrain vllm-serve`: a vLLM generation server for runs with `algorithm.rollout.engine=vllm-server`."""

from __future__ import annotations

import sys

from posttrain.cli.output import fraction, port, positive_int
from posttrain.errors import EXIT_OK


def add_parser(sub) -> None:
    s = sub.add_parser(
        "vllm-serve",
        help="serve rollouts with vLLM for runs with algorithm.rollout.engine=vllm-server (a CUDA machine)",
        description="Holds vLLM's LLM of --model and serves generation and weight pushes over HTTP to training "
        "runs with algorithm.rollout.engine=vllm-server and vllm_server_url set to the address printed "
        "(docs/scale.md). No authentication: keep the default host 127.0.0.1, or a private network.",
    )
    s.add_argument("--model", default="smollm2-135m-instruct",
                   help="the run's model.name: embedded name, local Hugging Face folder or hub id")  # fmt: skip
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    s.add_argument("--port", type=port, default=8000, help="port to listen on (0: a free one)")
    s.add_argument("--gpu-memory-utilization", type=fraction, default=0.9,
                   help="share of the GPU's memory vLLM takes for weights and KV cache")  # fmt: skip
    s.add_argument("--max-model-len", type=positive_int, default=None,
                   help="longest prompt + completion (default: the model's)")  # fmt: skip
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=run, loads_models=True)


def run(args) -> int:
    from posttrain.rollout.vllm_server import serve

    server = serve(args.model, host=args.host, port=args.port, gpu_memory_utilization=args.gpu_memory_utilization,
                   seed=args.seed, max_model_len=args.max_model_len)  # fmt: skip
    print(f"serving {args.model} at {server.url}: train with algorithm.rollout.engine=vllm-server "
          f"algorithm.rollout.vllm_server_url={server.url} (Ctrl-C stops)", file=sys.stderr, flush=True)  # fmt: skip
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass  # the way to stop a server: not an interrupted run
    finally:
        server.close()
    return EXIT_OK
