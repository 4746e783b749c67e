"""Training methods. Each is one module exposing an `Algorithm`: a batch-source factory plus a loss function.

The registry maps `algorithm.name` in a run config to that module; the trainer's one loop runs any of them.
"""

from __future__ import annotations

import importlib

# name -> module path; imported on use so that `import posttrain` stays light.
ALGORITHMS: dict[str, str] = {
    name: f"posttrain.algorithms.{name}" for name in ("sft", "reward", "dpo", "grpo", "ppo")
}


def get_algorithm(name: str):
    """The `ALGORITHM` object of the module registered under `name`."""
    if name not in ALGORITHMS:
        from posttrain.errors import ConfigError

        raise ConfigError(f"algorithm.name: unknown method {name!r}; choose one of {sorted(ALGORITHMS)}")
    return importlib.import_module(ALGORITHMS[name]).ALGORITHM
