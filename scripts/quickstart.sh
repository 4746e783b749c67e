#!/usr/bin/env bash
# The main job: set up .venv if needed, then fine-tune the embedded SmolLM2-135M-Instruct with LoRA on the
# built-in structured-output task and print held-out scores before and after. Offline; about 10 minutes on 2 CPU cores.
# Extra arguments go to `posttrain quickstart` (e.g. --fresh, --steps 20).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/posttrain quickstart "$@"
