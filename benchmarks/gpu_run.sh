#!/usr/bin/env bash
# On the GPU machine (vLLM 0.26.0 staged): the phases named on the command line,
# results in $OUT. Phases: setup, tests, ops, profile, e2e, fallback, graphs.
#   bash benchmarks/gpu_run.sh setup tests ops
set -uo pipefail
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/prhs-out}; mkdir -p "$out"
e2e=(python3 benchmarks/e2e_decode.py --batch 12 --output-len 64)
for phase in "$@"; do
  echo "== $phase $(date +%T)"
  case $phase in
    setup)
      bash benchmarks/gpu_setup.sh 2>&1 | tee "$out/setup.txt"
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt" ;;
    tests)
      python3 -m pytest -q -p no:cacheprovider tests/gpu tests/test_sparse_decode_indexed.py \
        2>&1 | tail -25 | tee "$out/gpu_tests.txt" ;;
    ops)
      python3 benchmarks/ops.py --batches 1 16 32 --contexts 32768 --budgets 16 \
        --out "$out/ops_h100.json" 2>&1 | tail -8 | tee "$out/ops.txt"
      python3 benchmarks/ops.py --batches 16 --contexts 4096 131072 --budgets 8 32 \
        --out "$out/ops_grid_h100.json" 2>&1 | tail -8 | tee "$out/ops_grid.txt" ;;
    profile)
      "${e2e[@]}" --backend prhs --context 32768 --profile "$out/profile_prhs_b12x32k.txt" \
        2>&1 | tail -2 | cut -c1-400 ;;
    e2e)  # 0.95: float32 summaries (19% of the KV bytes) fit 12 x 32K only there
      for b in dense prhs; do
        "${e2e[@]}" --backend $b --context 32768 --gpu-memory-utilization 0.95 \
          --out "$out/e2e_b12x32k.jsonl" 2>&1 | tail -1 \
          | python3 -c "import json,sys; r=json.loads(sys.stdin.read()); r.pop('first_tokens'); print(r)"
      done ;;
    fallback)  # 1900 + 128 tokens < min_context 2048: prhs runs dense throughout
      for b in prhs dense; do
        "${e2e[@]}" --backend $b --context 1900 --output-len 128 --out "$out/e2e_b12x1900.jsonl" \
          2>&1 | tail -1 | cut -c1-200
      done
      python3 - "$out/e2e_b12x1900.jsonl" <<'EOF'
import json, sys
runs = [json.loads(line) for line in open(sys.argv[1])][-2:]
print("fallback: prhs tokens == dense tokens:", runs[0]["first_tokens"] == runs[1]["first_tokens"])
EOF
      ;;
    graphs)  # batch 8: vLLM has full decode graphs for it (12 falls between capture sizes)
      for b in prhs dense; do
        python3 benchmarks/e2e_decode.py --batch 8 --context 1900 --output-len 128 --backend $b \
          --out "$out/e2e_b8x1900.jsonl" 2>&1 | tail -1 | cut -c1-200
      done
      # 2000 + 128 crosses min_context 2048: dense steps on full graphs, then sparse steps
      python3 benchmarks/e2e_decode.py --batch 8 --context 2000 --output-len 128 --backend prhs \
        --out "$out/e2e_b8x2000_crossing.jsonl" 2>&1 | tail -1 | cut -c1-200
      python3 - "$out/e2e_b8x1900.jsonl" "$out/e2e_b8x2000_crossing.jsonl" <<'EOF'
import json, sys
runs = [json.loads(line) for line in open(sys.argv[1])][-2:]
print("b8 fallback: prhs tokens == dense tokens:", runs[0]["first_tokens"] == runs[1]["first_tokens"])
crossing = [json.loads(line) for line in open(sys.argv[2])][-1]
print("b8 crossing: sparse layers per token:", crossing.get("sparse_layers_per_token"))
EOF
      ;;
    *) echo "unknown phase $phase"; exit 2 ;;
  esac
done
