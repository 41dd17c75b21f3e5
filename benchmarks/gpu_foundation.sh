#!/usr/bin/env bash
# On the GPU machine (vLLM 0.26.0 staged, see ../shared/gpu/README.md): install
# prhs-vllm, then compare greedy outputs of dense and prhs on SmolLM2-135M
# (short prompts + 4K-token pass keys) and on a LLaMA-3-8B shape with dummy
# weights. Results land in $OUT (copy them to benchmarks/results/).
set -uo pipefail
export VLLM_USE_FLASHINFER_SAMPLER=0 PRHS_STATS_FLUSH_S=0 PYTHONUNBUFFERED=1
out=${OUT:-/tmp/prhs-out}; mkdir -p "$out"
bash benchmarks/gpu_setup.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import prhs_vllm.models as m; print(m.prepare_smollm2('/tmp/smollm2'))" 2>&1 | tail -1
run() { local name=$1; shift; python3 benchmarks/greedy_tokens.py --enforce-eager --out "$out/$name.json" "$@" > "$out/$name.log" 2>&1 || { echo "FAILED $name"; tail -30 "$out/$name.log"; }; }
run smol_dense --model /tmp/smollm2 --backend dense --passkey 4000
run smol_prhs_full --model /tmp/smollm2 --backend prhs --config configs/full-budget.yaml --passkey 4000
run smol_prhs_default --model /tmp/smollm2 --backend prhs --config configs/default.yaml --passkey 4000
run l8_dense --model llama3-8b-dummy --backend dense
run l8_prhs_full --model llama3-8b-dummy --backend prhs --config configs/full-budget.yaml
for pair in "smol_dense smol_prhs_full" "smol_dense smol_prhs_default" "l8_dense l8_prhs_full"; do
  set -- $pair; echo "== $1 vs $2"; python3 benchmarks/compare_greedy.py "$out/$1.json" "$out/$2.json"
done 2>&1 | tee "$out/compare.txt"
