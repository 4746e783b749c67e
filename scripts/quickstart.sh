#!/usr/bin/env bash
# The main job: set up .venv if needed, then fine-tune the embedded SmolLM2-135M-Instruct with LoRA on the
# built-in structured-output task and print held-out scores before and after. Offline; 3.2-5.6 min of work measured
# on 2 CPU cores (fp32 GEMM 107-380 GFLOP/s), 4.2-7.0 min with the set-up (README "Quickstart", benchmarks/README.md).
# Extra arguments go to `posttrain quickstart` (e.g. --fresh, --steps 20).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/posttrain quickstart "$@"
