#!/usr/bin/env bash
# The GPU checks of issue 16, prepared for a session that has a CUDA GPU; never run yet (no GPU has been lent to
# this project). Budget: under 10 minutes on one GPU. Writes everything to $OUT (default runs/gpu_check/) and a
# summary to $OUT/results.md; paste its figures into benchmarks/README.md with the GPU named.
#   bash benchmarks/gpu_check.sh                  # in an environment with posttrain, torch+CUDA (vllm optional)
# Each check runs on its own and records PASS/FAIL/SKIP, so one failure does not hide the others.
set -u
OUT=${OUT:-runs/gpu_check}
PY=${PY:-python}
mkdir -p "$OUT/data"
RES="$OUT/results.md"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
: > "$OUT/status.txt"

check() {  # check NAME TIMEOUT_S COMMAND...: run it, log its output, record the status
  local name=$1 limit=$2; shift 2
  echo "==> $name"
  if timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; then echo "$name PASS" >> "$OUT/status.txt"
  else echo "$name FAIL (exit $?; see $OUT/$name.log)" >> "$OUT/status.txt"; tail -5 "$OUT/$name.log"; fi
}

"$PY" - <<'PY' > "$OUT/device.txt" 2>&1
import torch, transformers, accelerate, peft
print("gpu:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NONE")
print("gpus:", torch.cuda.device_count(), "bf16:", torch.cuda.is_available() and torch.cuda.is_bf16_supported())
print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__,
      "accelerate", accelerate.__version__, "peft", peft.__version__)
try:
    import vllm; print("vllm", vllm.__version__)
except ImportError:
    print("vllm not installed")
PY
cat "$OUT/device.txt"
grep -q "gpu: NONE" "$OUT/device.txt" && { echo "no CUDA GPU: nothing to check"; exit 1; }

# ---- data: built-in tasks, small
posttrain data make structured --n 64 --out "$OUT/data/sft.jsonl"
posttrain data make arithmetic --kind preference --n 64 --out "$OUT/data/pairs.jsonl"
posttrain data make arithmetic --kind prompts --n 64 --out "$OUT/data/prompts.jsonl" --max-ops 1 --max-value 10

COMMON=(run.progress=false run.report=false)
# ---- 1. the CUDA/bf16 training path on the embedded model (model.dtype bf16: fp32 master weights + autocast)
check sft_bf16 120 posttrain train configs/sft_lora.yaml data.train="$OUT/data/sft.jsonl" model.dtype=bfloat16 \
  run.max_steps=5 run.output_dir="$OUT/sft_bf16" "${COMMON[@]}"
check dpo_bf16 120 posttrain train configs/dpo_lora.yaml data.train="$OUT/data/pairs.jsonl" model.dtype=bfloat16 \
  run.max_steps=5 run.output_dir="$OUT/dpo_bf16" "${COMMON[@]}"
GRPO=(configs/grpo_lora.yaml data.train="$OUT/data/prompts.jsonl" model.dtype=bfloat16 run.max_steps=4
      algorithm.rollout.batch_size=16 optim.batch_size=16 algorithm.rollout.max_new_tokens=48 "${COMMON[@]}")
check grpo_hf_bf16 180 posttrain train "${GRPO[@]}" run.output_dir="$OUT/grpo_hf"

# ---- 2. the vLLM engine (colocated, sleep/wake), if installed: same run, compare rewards and the log-prob gap
if grep -q "^vllm " "$OUT/device.txt"; then
  check grpo_vllm 240 posttrain train "${GRPO[@]}" run.output_dir="$OUT/grpo_vllm" algorithm.rollout.engine=vllm
  check grpo_vllm_awake 240 posttrain train "${GRPO[@]}" run.output_dir="$OUT/grpo_vllm_awake" \
    algorithm.rollout.engine=vllm algorithm.rollout.vllm_sleep=false
  # server mode, on the same GPU here (a second GPU in real use): the server takes 30% of its memory; the run pushes
  # merged LoRA weights every step over HTTP and corrects the sampler gap with truncated importance sampling
  PORT=${PORT:-8765}
  posttrain vllm-serve --model smollm2-135m-instruct --port "$PORT" --gpu-memory-utilization 0.3 \
    > "$OUT/vllm_server.log" 2>&1 &
  SERVER=$!
  check grpo_vllm_server 300 posttrain train "${GRPO[@]}" run.output_dir="$OUT/grpo_vllm_server" \
    algorithm.rollout.engine=vllm-server algorithm.rollout.vllm_server_url="http://127.0.0.1:$PORT" \
    algorithm.rollout.vllm_server_timeout=180 algorithm.rollout.tis_cap=2
  kill "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null
else
  echo "grpo_vllm SKIP (vllm not installed)" >> "$OUT/status.txt"
fi

# ---- 3. FSDP2 with 2 processes: NCCL refuses two ranks on one GPU, so on one GPU this runs the CPU/gloo path the
#         tests run; with 2+ GPUs it shards on the GPUs (full fine-tuning, bf16)
NPROC=2
check fsdp2_sft 180 torchrun --standalone --nproc_per_node $NPROC -m posttrain.cli train configs/sft_full.yaml \
  data.train="$OUT/data/sft.jsonl" run.sharding=fsdp2 run.max_steps=3 optim.batch_size=8 optim.micro_batch_size=2 \
  run.output_dir="$OUT/fsdp2_sft" "${COMMON[@]}"

# ---- 4. measured peak memory against the estimator (peak_cuda_gb is logged each step on a GPU)
"$PY" - "$OUT" <<'PY' > "$RES"
import json, subprocess, sys
from pathlib import Path
out = Path(sys.argv[1])
print("# GPU check\n")
print("```\n" + (out / "device.txt").read_text() + "```\n")
print("```\n" + (out / "status.txt").read_text() + "```\n")
rows = {"sft_bf16": ("sft", "lora"), "dpo_bf16": ("dpo", "lora"), "grpo_hf": ("grpo", "lora"),
        "grpo_vllm": ("grpo", "lora"), "grpo_vllm_awake": ("grpo", "lora"), "grpo_vllm_server": ("grpo", "lora")}
print("| run | steps | last loss | peak_cuda_gb (measured) | estimate peak GB | logp gap max | tis capped max | "
      "reward mean |")
print("|---|---|---|---|---|---|---|---|")
for run, (method, technique) in rows.items():
    path = out / run / "metrics.jsonl"
    if not path.exists():
        continue
    m = [json.loads(x) for x in path.read_text().splitlines() if '"loss"' in x]
    engine = "vllm" if "vllm" in run else "hf"
    peak = None  # server mode: the trainer's own memory only (the server is another process): no estimate row
    if not run.endswith("server"):
        est = subprocess.run(["posttrain", "estimate", "--model", "135m", "--method", method, "--technique",
                              technique, "--precision", "bf16-mixed", "--rollout-engine", engine, "--json"],
                             capture_output=True, text=True)
        try:
            peak = json.loads(est.stdout).get("peak_memory_gb")
        except json.JSONDecodeError:
            pass
    gap = max((r.get("logp_gap_sampler_trainer", 0) for r in m), default=None)
    capped = max((r["tis_capped_fraction"] for r in m if "tis_capped_fraction" in r), default=None)
    reward = [round(r["reward/total_mean"], 3) for r in m if "reward/total_mean" in r]
    print(f"| {run} | {len(m)} | {m[-1]['loss']:.4f} | {max(r.get('peak_cuda_gb', 0) for r in m):.2f} | {peak} | "
          f"{gap} | {capped} | {reward} |")
PY
cat "$RES"
