#!/usr/bin/env bash
# The GPU checks of issue 16, prepared for a session that has a CUDA GPU; not run on a GPU yet. Budget: all checks
# in under 10 minutes on one H200 (a task's 15 minutes of device time include the machine's start). Writes
# everything under $OUT (default runs/gpu_check/) and the results table to $OUT/results.md; put its figures in
# benchmarks/README.md with the GPU named.
#   bash benchmarks/gpu_check.sh                    # where posttrain and torch+CUDA are installed (vllm optional)
#   GPU_CHECK_CPU=1 bash benchmarks/gpu_check.sh    # a dry run on the CPU, tiny model: checks the script only
#
# Checks, in order, each with its expected time on one H200 (estimated from the model's size and the steps, not yet
# measured) and the limit it runs under (`timeout -k 10`; a check that would pass the overall deadline gets only the
# time left). Every run trains the embedded SmolLM2-135M-Instruct on built-in data:
#   device       versions and GPUs                                                          ~10 s   limit  60 s
#   data         3 small built-in datasets, made in one process                             ~10 s   limit  60 s
#   bf16         the CUDA/bf16 path (bf16 mixed precision) in one process, one CUDA start: sft_bf16 (LoRA, 4
#                steps), sft_full_bf16 (full fine-tuning, 4: the tied embeddings' gradient hand-over, the output
#                layer's row blocks, the SFT rows' shared prefix), dpo_bf16 (4), grpo_hf (3, of 16 completions <= 32
#                tokens), grpo_hf_merged (the same, sampled from merged LoRA weights); peak memory of each
#                                                                                            ~95 s   limit 200 s
#   vllm         grpo_vllm: the same GRPO run, vLLM colocated, asleep between rollouts   ~120 s   limit 240 s
#   fsdp2        torchrun, 2 processes: fsdp2_sft (full fine-tuning, 3 steps) and fsdp2_ppo (full, value head sharded
#                too, 2 steps), one launch. NCCL cannot put two processes on one GPU, so with one GPU this runs on
#                the CPU over gloo (the real model, where the tests use a tiny one); with 2+ GPUs on GPUs 0-1 over
#                NCCL. With one GPU the vLLM server loads meanwhile (started before this check)     ~90 s   limit 180 s
#   vllm_server  grpo_vllm_server: the same GRPO run through `posttrain vllm-serve` (25% of GPU 0), truncated
#                importance sampling at cap 2; waits for the server to answer                   ~60 s   limit 180 s
#   table        $OUT/results.md: status, steps, seconds, last loss, measured peak memory against `posttrain
#                estimate`'s figure for the same settings, sampler/trainer log-prob gap, rewards; then the verdicts
#                grpo_vllm against grpo_hf: reward curve within 3 standard errors at each step, log-prob gap
#                under 0.05 per token at every step (gpu_check.py: engine_comparison)          ~5 s   limit  45 s
# Expected in all: ~6.5 minutes. Overall deadline: DEADLINE_S (default 540 s) from the start; a check that would get
# under 20 s is skipped, and the table of what finished is printed whatever happened (an exit, a kill, Ctrl-C).
# Without vllm the two vLLM checks are skipped (SKIP in the table).
set -u
OUT=${OUT:-runs/gpu_check}
PY=${PY:-python}
DEADLINE_S=${DEADLINE_S:-540}
SLOW=${SLOW:-1}  # multiplies every check's limit (a slower machine; a dry run on a busy CPU: with DEADLINE_S)
PORT=${PORT:-8765}
CHECK="$PY benchmarks/gpu_check.py"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 GPU_CHECK_VLLM_URL="http://127.0.0.1:$PORT"
mkdir -p "$OUT"
: > "$OUT/status.txt"
SERVER=""

finish() {  # the table of whatever finished, and the server stopped: on every exit
  trap - EXIT INT TERM
  [ -n "$SERVER" ] && { kill -- -"$SERVER" 2>/dev/null || kill "$SERVER" 2>/dev/null; }
  if ! timeout 45 $CHECK table "$OUT"; then echo "results table failed; the checks' status:"; cat "$OUT/status.txt"; fi
  echo "total: $SECONDS s (deadline $DEADLINE_S s)"
}
trap finish EXIT
trap 'exit 130' INT TERM

step() {  # step NAME LIMIT_S COMMAND...: run under min(LIMIT_S, time left); log; record a status the table shows
  local name=$1 limit=$(($2 * SLOW)); shift 2
  local left=$((DEADLINE_S - SECONDS - 15))  # 15 s kept for the table
  if [ "$left" -lt 20 ]; then echo "$name SKIP (overall deadline reached)" >> "$OUT/status.txt"; return 1; fi
  [ "$left" -lt "$limit" ] && limit=$left
  echo "==> $name (limit ${limit}s, at ${SECONDS}s)"
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    echo "$name TIMEOUT after ${limit}s (see $OUT/$name.log)" >> "$OUT/status.txt"
  elif [ $rc -ne 0 ]; then echo "$name FAIL (exit $rc; see $OUT/$name.log)" >> "$OUT/status.txt"; fi
  tail -3 "$OUT/$name.log"
  return $rc
}

step device 60 $CHECK device "$OUT" || exit 1
cat "$OUT/device.txt"
CPU=${GPU_CHECK_CPU:-0}
if grep -q "gpu: NONE" "$OUT/device.txt" && [ "$CPU" != 1 ]; then
  echo "no CUDA GPU (GPU_CHECK_CPU=1 for a dry run)"; exit 1
fi
step data 60 $CHECK data "$OUT" || exit 1
HAS_VLLM=0; grep -q "^vllm [0-9]" "$OUT/device.txt" && HAS_VLLM=1

NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
start_server() {  # setsid: its own process group, so that `finish` stops vLLM's engine process with it
  setsid "$PY" -m posttrain.cli vllm-serve --model smollm2-135m-instruct --port "$PORT" --gpu-memory-utilization 0.25 \
    > "$OUT/vllm_server.log" 2>&1 &
  SERVER=$!
}
fsdp2() {
  if [ "$NGPU" -ge 2 ] && [ "$CPU" != 1 ]; then local where=(env CUDA_VISIBLE_DEVICES=0,1)
  else local where=(env CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=4)  # gloo on the CPU: NCCL refuses 2 ranks on 1 GPU
  fi
  step fsdp2 180 "${where[@]}" "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/gpu_check.py \
    train "$OUT" fsdp2_sft fsdp2_ppo $([ "$CPU" = 1 ] && echo --cpu)
}

step bf16 200 $CHECK train "$OUT" sft_bf16 sft_full_bf16 dpo_bf16 grpo_hf grpo_hf_merged
if [ "$HAS_VLLM" != 1 ]; then
  echo "grpo_vllm SKIP (vllm not installed)" >> "$OUT/status.txt"
  echo "grpo_vllm_server SKIP (vllm not installed)" >> "$OUT/status.txt"
  fsdp2
  exit 0
fi
step vllm 240 $CHECK train "$OUT" grpo_vllm
# vLLM measures the GPU's free memory while it starts and stops if another process frees some meanwhile, so the
# server starts once the colocated run has ended. On one GPU it loads while FSDP2 runs on the CPU (nothing moves on
# the GPU); with two, FSDP2 runs on the GPUs first. The server takes 25% of GPU 0 (its own GPU in real use).
if [ "$NGPU" -ge 2 ]; then fsdp2; start_server; else start_server; fsdp2; fi
step vllm_server 180 $CHECK train "$OUT" grpo_vllm_server  # waits for the server (vllm_server_timeout)
exit 0
