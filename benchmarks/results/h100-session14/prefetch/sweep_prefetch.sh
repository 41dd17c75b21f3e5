#!/usr/bin/env bash
# From a tree's root on the GPU machine: the sparse attention kernel with its
# K/V lines asked of L2 kPrefetchChunks stages ahead
# (csrc/sparse_decode/sparse_decode_kernel.cuh), each count of $COUNTS in a
# copy of the tree under /tmp/prefetch-N (built in parallel), timed against
# the tree's own build, interleaved, $RUNS rounds.
#   COUNTS="2 4" RUNS="1 2" OUT=/tmp/out bash .../sweep_prefetch.sh
set -uo pipefail
out=${OUT:-/tmp/prhs-out}; mkdir -p "$out"
kernel=csrc/sparse_decode/sparse_decode_kernel.cuh
attn=(benchmarks/ops_sparse_decode.py --contexts 32768 --budgets 16 8 --no-dense --replays 50
  --batches 12 16 32)
build() { CC=/usr/bin/gcc CXX=/usr/bin/g++ python3 setup.py -q build_ext --inplace > "$1" 2>&1; }
ls prhs_vllm/_C*.so > /dev/null 2>&1 || build "$out/prefetch_build_this.txt" &
for n in ${COUNTS:-2 4}; do
  dir=/tmp/prefetch-$n
  rm -rf "$dir"; mkdir -p "$dir"
  cp -r csrc prhs_vllm benchmarks setup.py pyproject.toml README.md "$dir/"
  rm -f "$dir"/prhs_vllm/_C*.so
  sed -i "s/^constexpr int kPrefetchChunks = [0-9]*;/constexpr int kPrefetchChunks = $n;/" \
    "$dir/$kernel"
  grep "^constexpr int kPrefetchChunks" "$dir/$kernel"
  (cd "$dir" && build "$out/prefetch_build_$n.txt" || echo "build $n FAILED") &
done
wait
grep "^constexpr int kPrefetchChunks" "$kernel"
for run in ${RUNS:-1 2}; do
  echo "this tree run $run"
  python3 "${attn[@]}" --out "$out/attn_prefetch_this_run$run.json" 2>&1 | grep prhs_sparse
  for n in ${COUNTS:-2 4}; do
    echo "prefetch $n run $run"
    (cd "/tmp/prefetch-$n" && python3 "${attn[@]}" --out "$out/attn_prefetch_${n}_run$run.json" \
      2>&1 | grep prhs_sparse)
  done
done
