#!/usr/bin/env bash
# On 647adbe with the patch beside this script applied (git apply benchmarks/results/h100-session15/split-major/split_major_and_tail_balance.patch);
# run from the repository root on the GPU machine, without vLLM.
# Experiment: split-major block order (PRHS_SPARSE_DECODE_SPLIT_MAJOR=1), alone and with
# tail-balanced splits (PRHS_SPARSE_DECODE_BALANCE=<static %>), vs the row-major static grid.
set -uo pipefail
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/prhs-out}; mkdir -p "$out"
CC=/usr/bin/gcc CXX=/usr/bin/g++ python3 setup.py -q build_ext --inplace > $out/build.txt 2>&1; echo built $?
echo "-- tests, split-major, balance 0"
PRHS_SPARSE_DECODE_SPLIT_MAJOR=1 PRHS_SPARSE_DECODE_BALANCE=0 timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/gpu/test_cuda_sparse_decode.py 2>&1 | tail -2
echo "-- tests, split-major"
PRHS_SPARSE_DECODE_SPLIT_MAJOR=1 timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/gpu/test_cuda_sparse_decode.py 2>&1 | tail -2
attn=(benchmarks/ops_sparse_decode.py --contexts 32768 --budgets 16 8 --no-dense --replays 50 --batches 12 16 32)
for run in 1 2; do
  dir=$( [ $run = 1 ] && echo $out || echo /tmp )
  echo "-- row-major static run $run"; python3 "${attn[@]}" --out $dir/rowmajor_run$run.json 2>&1 | grep prhs_sparse
  echo "-- split-major static run $run"; PRHS_SPARSE_DECODE_SPLIT_MAJOR=1 python3 "${attn[@]}" --out $dir/splitmajor_run$run.json 2>&1 | grep prhs_sparse
  for pct in 0 75; do
    echo "-- split-major balance $pct run $run"; PRHS_SPARSE_DECODE_SPLIT_MAJOR=1 PRHS_SPARSE_DECODE_BALANCE=$pct python3 "${attn[@]}" --out $dir/splitmajor_tail${pct}_run$run.json 2>&1 | grep prhs_sparse
  done
done
