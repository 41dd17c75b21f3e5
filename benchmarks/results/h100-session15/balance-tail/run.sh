#!/usr/bin/env bash
# On 647adbe with the patch beside this script applied (git apply benchmarks/results/h100-session15/balance-tail/tail_balance_experiment.patch);
# run from the repository root on the GPU machine, without vLLM.
# Experiment: tail-balanced splits (PRHS_SPARSE_DECODE_BALANCE=<static %>) vs static (unset).
set -uo pipefail
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/prhs-out}; mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
CC=/usr/bin/gcc CXX=/usr/bin/g++ python3 setup.py -q build_ext --inplace > $out/build.txt 2>&1; echo built $?
for pct in 0 75; do
  echo "-- tests, balance $pct"
  PRHS_SPARSE_DECODE_BALANCE=$pct timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/gpu/test_cuda_sparse_decode.py 2>&1 | tail -3
done
attn=(benchmarks/ops_sparse_decode.py --contexts 32768 --budgets 16 8 --no-dense --replays 50 --batches 12 16 32)
for run in 1 2; do
  echo "-- static run $run"; python3 "${attn[@]}" --out $( [ $run = 1 ] && echo $out || echo /tmp )/static_run$run.json 2>&1 | grep prhs_sparse
  for pct in 0 50 75 90; do
    echo "-- balance $pct run $run"; PRHS_SPARSE_DECODE_BALANCE=$pct python3 "${attn[@]}" --out $( [ $run = 1 ] && echo $out || echo /tmp )/tail${pct}_run$run.json 2>&1 | grep prhs_sparse
  done
done
