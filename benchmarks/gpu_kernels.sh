#!/usr/bin/env bash
# On the GPU machine (vLLM 0.26.0 staged): build csrc, run the GPU kernel tests
# against their torch references, and time the ops. Results land in $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/prhs-out}; mkdir -p "$out"
bash benchmarks/gpu_setup.sh 2>&1 | tee "$out/setup.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/gpu tests/test_sparse_decode_indexed.py 2>&1 | tail -25 | tee "$out/gpu_tests.txt"
python3 benchmarks/ops_sparse_decode.py --out "$out/ops_sparse_decode_h100.json" 2>&1 | tail -45 | tee "$out/ops_sparse_decode.txt"
python3 benchmarks/ops_scoring.py --out "$out/ops_scoring_h100.json" 2>&1 | tail -30 | tee "$out/ops_scoring.txt"
python3 benchmarks/ops.py --out "$out/ops_h100.json" 2>&1 | tail -32 | tee "$out/ops.txt"
