#!/usr/bin/env bash
# From a tree's root on the GPU machine: the sparse attention kernel rebuilt
# with other values of one of its constants (`constexpr int $CONSTANT = N;` in
# csrc/sparse_decode/sparse_decode_kernel.cuh), each value of $VALUES in a copy
# of the tree under /tmp/sweep-$CONSTANT-N (built in parallel), timed with the
# plan's own choices against the tree's own build, interleaved, $RUNS rounds.
#   CONSTANT=kDeepStages VALUES="5 6" RUNS="1 2" OUT=/tmp/out bash benchmarks/sweep_constant.sh
set -uo pipefail
out=${OUT:-/tmp/prhs-out}; mkdir -p "$out"
kernel=csrc/sparse_decode/sparse_decode_kernel.cuh
name=${CONSTANT:?set CONSTANT to a constexpr int of $kernel}
grep -q "^constexpr int $name = [0-9]*;" "$kernel" || { echo "no constexpr int $name in $kernel"; exit 2; }
attn=(benchmarks/ops_sparse_decode.py --contexts 32768 --budgets 16 8 --no-dense --replays 50
  --batches 12 16 32)
build() { CC=/usr/bin/gcc CXX=/usr/bin/g++ python3 setup.py -q build_ext --inplace > "$1" 2>&1; }
ls prhs_vllm/_C*.so > /dev/null 2>&1 || build "$out/build_this.txt" &
for value in ${VALUES:?set VALUES}; do
  dir=/tmp/sweep-$name-$value
  rm -rf "$dir"; mkdir -p "$dir"
  cp -r csrc prhs_vllm benchmarks setup.py pyproject.toml README.md "$dir/"
  rm -f "$dir"/prhs_vllm/_C*.so
  sed -i "s/^constexpr int $name = [0-9]*;/constexpr int $name = $value;/" "$dir/$kernel"
  (cd "$dir" && build "$out/build_${name}_$value.txt" || echo "build $name = $value FAILED") &
done
wait
grep "^constexpr int $name" "$kernel"
for run in ${RUNS:-1 2}; do
  echo "this tree, run $run"
  python3 "${attn[@]}" --out "$out/attn_${name}_this_run$run.json" 2>&1 | grep prhs_sparse
  for value in $VALUES; do
    echo "$name = $value, run $run"
    (cd "/tmp/sweep-$name-$value" && python3 "${attn[@]}" \
      --out "$out/attn_${name}_${value}_run$run.json" 2>&1 | grep prhs_sparse)
  done
done
