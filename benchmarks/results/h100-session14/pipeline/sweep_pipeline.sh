#!/usr/bin/env bash
# As session 14 ran it, on a tree of 02e41d1 (one cp.async ring, kStages)
# with tokens_per_thread.patch (next to this file) applied, from that tree's
# root: the sparse attention kernel rebuilt with other kStages x
# kTokensPerThread (csrc/sparse_decode/sparse_decode_kernel.cuh) and timed
# against the tree's own (3 x 4), interleaved, $RUNS rounds. Each
# configuration is a copy of the tree under /tmp/pipeline-S-T, built in
# parallel. Later trees pick between two rings: ops_sparse_decode.py --stages.
#   git archive 02e41d1 | tar -x -C T && cd T && patch -p1 < .../tokens_per_thread.patch
#   CONFIGS="6:2 8:2 4:4 5:2" RUNS="1 2" OUT=/tmp/out bash .../sweep_pipeline.sh
set -uo pipefail
out=${OUT:-/tmp/prhs-out}; mkdir -p "$out"
kernel=csrc/sparse_decode/sparse_decode_kernel.cuh
attn=(benchmarks/ops_sparse_decode.py --contexts 32768 --budgets 16 8 --no-dense --replays 50
  --batches 12 16 32)
here=$(pwd)
if ! ls prhs_vllm/_C*.so > /dev/null 2>&1; then
  CC=/usr/bin/gcc CXX=/usr/bin/g++ python3 setup.py -q build_ext --inplace \
    > "$out/pipeline_build_this.txt" 2>&1 &
fi
for config in ${CONFIGS:-6:2 8:2 4:4}; do
  stages=${config%:*} tokens=${config#*:} dir=/tmp/pipeline-${config/:/-}
  rm -rf "$dir"; mkdir -p "$dir"
  cp -r csrc prhs_vllm benchmarks setup.py pyproject.toml README.md "$dir/"
  rm -f "$dir"/prhs_vllm/_C*.so
  sed -i "s/^constexpr int kStages = [0-9]*;/constexpr int kStages = $stages;/;
          s/^constexpr int kTokensPerThread = [0-9]*;/constexpr int kTokensPerThread = $tokens;/" \
    "$dir/$kernel"
  grep -E "^constexpr int (kStages|kTokensPerThread)" "$dir/$kernel" | tr '\n' ' '; echo "<- $config"
  (cd "$dir" && CC=/usr/bin/gcc CXX=/usr/bin/g++ python3 setup.py -q build_ext --inplace \
    > "$out/pipeline_build_${config/:/-}.txt" 2>&1 || echo "build $config FAILED") &
done
wait
for run in ${RUNS:-1 2}; do
  echo "this tree (kStages 3, kTokensPerThread 4) run $run"
  python3 "${attn[@]}" --out "$out/attn_pipeline_3-4_run$run.json" 2>&1 | grep prhs_sparse
  for config in ${CONFIGS:-6:2 8:2 4:4}; do
    echo "$config run $run"
    (cd "/tmp/pipeline-${config/:/-}" && python3 "${attn[@]}" \
      --out "$out/attn_pipeline_${config/:/-}_run$run.json" 2>&1 | grep prhs_sparse)
  done
done
cd "$here"
