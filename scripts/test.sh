#!/usr/bin/env bash
# The test suite: set up .venv if needed, lint, then pytest (unit, integration, doctests; slow tests use the
# embedded model). Offline. Extra arguments go to pytest (e.g. -m "not slow", -k resume).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check src tests benchmarks
# The import contract (pyproject.toml [tool.importlinter]): the package's layers, estimate/advise without torch,
# posttrain.testing for tests only. An import that breaks a layer (or makes a cycle across them) fails here.
.venv/bin/lint-imports --no-cache
exec .venv/bin/python -m pytest "$@"
