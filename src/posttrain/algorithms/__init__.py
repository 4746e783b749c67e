"""Training methods, one module each, and the run config they make up.

A method is one module here that defines `Config` (its `algorithm:` section, a subclass of
`config.AlgorithmSection` with `name` fixed) and `ALGORITHM` (its `base.Algorithm`: data preparation, batch
source, loss). This package finds them by looking (`ALGORITHMS`), so adding a method is adding its module: the
run config's `algorithm` union (`RunConfig`), the CLI's choices and `--help-config` all derive from what is found
here. `load_config` and `config_from_dict` read and validate a run config against that union.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Annotated, Union

from pydantic import Field

from posttrain.algorithms.base import Algorithm
from posttrain.config import RunBase, load_run_config, validate_config
from posttrain.errors import ConfigError

_NOT_METHODS = {"base", "common"}  # shared modules of the package, not methods


def _discover() -> dict[str, Algorithm]:
    """Every module of this package that defines an `ALGORITHM`, by method name (sorted)."""
    found: dict[str, Algorithm] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name in _NOT_METHODS:
            continue
        algorithm = getattr(importlib.import_module(f"{__name__}.{info.name}"), "ALGORITHM", None)
        if isinstance(algorithm, Algorithm):
            found[algorithm.name] = algorithm
    return dict(sorted(found.items()))


ALGORITHMS: dict[str, Algorithm] = _discover()
_SECTIONS = tuple(a.config for a in ALGORITHMS.values())


class RunConfig(RunBase):
    """Everything one training run needs; the YAML file mirrors it section by section. `algorithm` is the chosen
    method's own section, told apart by its `name` (default: `sft`)."""

    algorithm: Annotated[Union[_SECTIONS], Field(discriminator="name")] = Field(  # noqa: UP007 - a runtime tuple
        default_factory=lambda: ALGORITHMS[RunBase.default_method].config()
    )
    """The training method and its settings: `name` picks the method (sft, reward, dpo, grpo, ppo, ...)."""


def get_algorithm(name: str) -> Algorithm:
    """The `Algorithm` of method `name`."""
    if name not in ALGORITHMS:
        raise ConfigError(f"algorithm.name: unknown method {name!r}; choose one of {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]


def config_from_dict(data: dict, *, source: str = "config") -> RunConfig:
    """Validate a nested dict into a `RunConfig`, raising `ConfigError` with every problem found."""
    return validate_config(RunConfig, data, source=source)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run file (or start from defaults when `path` is None) and apply dotted overrides."""
    if isinstance(overrides, str):  # it was read a character at a time: "override 'r' is not of the form ..."
        raise ConfigError(f"overrides is a list of 'dotted.key=value' strings, not one string: "
                          f"load_config(path, [{overrides!r}])")  # fmt: skip
    return load_run_config(RunConfig, path, overrides)
