#!/usr/bin/env bash
# On the GPU machine (vLLM 0.26.0 staged): the phases named on the command line,
# results in $OUT. Phases: setup, tests, ops, ops-int8, ab-attention, ab-attention-parts, ab-ops, ab-e2e, bucket-rows, sweep,
# sweep-scoring, sweep-search, sweep-splits, profile,
# e2e, e2e-16, e2e-int8, fallback, fallback-ab, fallback-cpu, fallback-stacks, fallback-bisect,
# graphs, e2e-full:dense|full|piecewise, e2e-full-compare, full-graph-memory.
#   bash benchmarks/gpu_run.sh setup tests ops
set -uo pipefail
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/prhs-out}; mkdir -p "$out"
# Decode timed from cached prefixes (see e2e_decode.py): tighter than the
# difference of two 15 s prefills that sessions 1-4 reported.
e2e=(python3 benchmarks/e2e_decode.py --batch 12 --output-len 64 --cached-prefix)
# The attention alone at 32K, both budgets (ab-attention, bucket-rows).
attn=(benchmarks/ops_sparse_decode.py --contexts 32768 --budgets 16 8 --no-dense --replays 50)
# A base tree built next to this one (ab-attention, ab-ops, ab-e2e): make it here first,
# and carry it (ignored by git):
#   git archive BASE csrc prhs_vllm setup.py pyproject.toml README.md > ab_base_tree.tar
base=/tmp/ab-base
build_base() {
  [ -f "$base/.built" ] && return 0
  rm -rf "$base"; mkdir -p "$base"
  tar -xf ab_base_tree.tar -C "$base" && cp -r benchmarks "$base/"
  # The system gcc, as gpu_setup.sh builds (C++ exceptions must raise).
  (cd "$base" && CC=/usr/bin/gcc CXX=/usr/bin/g++ python3 setup.py -q build_ext --inplace \
    > "$out/ab_base_build.txt" 2>&1) && touch "$base/.built"
}
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
    ops-int8)  # int8 centroid codes in bf16 boxes (640 B a page-head, float32: 1536 B)
      python3 benchmarks/ops.py --batches 1 16 32 --contexts 32768 --budgets 16 \
        --centroid-dtype int8 --out "$out/ops_int8_h100.json" 2>&1 | tail -6 | tee "$out/ops_int8.txt" ;;
    sweep-splits)  # the attention kernel's split-K factor: each count asked, and the plan's (0)
      python3 benchmarks/ops_sparse_decode.py --batches 12 16 --contexts 32768 --budgets 16 8 \
        --splits 0 1 2 3 4 5 6 8 11 16 --no-dense --out "$out/ops_sparse_decode_splits.json" \
        2>&1 | tee "$out/ops_sparse_decode_splits.txt"
      python3 benchmarks/ops_sparse_decode.py --batches 12 16 --contexts 32768 --budgets 16 \
        --splits 0 4 5 6 11 --pad-slots --no-dense \
        --out "$out/ops_sparse_decode_splits_padded.json" 2>&1 | tee "$out/ops_sparse_decode_splits_padded.txt" ;;
    ab-attention)  # this tree's attention kernel against a base tree's, interleaved, same machine
      build_base
      for run in 1 2; do
        (cd "$base" && python3 "${attn[@]}" --batches 12 16 32 --out "$out/attn_before_run$run.json" \
          2>&1 | grep prhs_sparse)
        python3 "${attn[@]}" --batches 12 16 32 --out "$out/attn_after_run$run.json" 2>&1 \
          | grep prhs_sparse
      done ;;
    ab-attention-parts)  # what ab-attention's difference is made of: each tree's kernel
      # times (profiler), both trees timed with the host's graph launch (the timing before
      # session 13), this tree without programmatic dependent launch
      build_base
      (cd "$base" && python3 "${attn[@]}" --batches 16 --kernel-times \
        --out "$out/attn_before_kernel_times.json" 2>&1 | grep -A1 prhs_sparse)
      python3 "${attn[@]}" --batches 16 --kernel-times --out "$out/attn_after_kernel_times.json" \
        2>&1 | grep -A1 prhs_sparse
      (cd "$base" && python3 "${attn[@]}" --batches 12 16 32 --time-host-launch \
        --out "$out/attn_before_host_launch.json" 2>&1 | grep prhs_sparse)
      python3 "${attn[@]}" --batches 12 16 32 --time-host-launch \
        --out "$out/attn_after_host_launch.json" 2>&1 | grep prhs_sparse
      PRHS_SPARSE_DECODE_PDL=0 python3 "${attn[@]}" --batches 12 16 32 \
        --out "$out/attn_after_no_pdl.json" 2>&1 | grep prhs_sparse ;;
    ab-ops)  # the whole sparse step of one layer (ops.py: scoring, selection, attention) at
      # 16 x 32K and 1/16, the base tree's against this tree's, interleaved, per run in $AB_RUNS
      build_base
      for run in ${AB_RUNS:-1 2}; do
        for dtype in int8 float32; do
          whole=(benchmarks/ops.py --batches 16 --contexts 32768 --budgets 16 --centroid-dtype $dtype)
          (cd "$base" && PYTHONPATH="$base" python3 "${whole[@]}" \
            --out "$out/whole_step_before_${dtype}_run$run.json" 2>&1 | tail -2)
          python3 "${whole[@]}" --out "$out/whole_step_after_${dtype}_run$run.json" 2>&1 | tail -2
        done
      done ;;
    ab-e2e)  # 12 x 32K end to end, int8 at 1/16, in-process: the base tree's prhs against
      # this tree's, interleaved on one machine, once per run in $AB_RUNS (default "1 2";
      # PYTHONPATH puts the base's prhs_vllm before the one gpu_setup.sh registered)
      build_base
      for run in ${AB_RUNS:-1 2}; do
        (cd "$base" && PYTHONPATH="$base" "${e2e[@]}" --backend prhs \
          --config "$OLDPWD/configs/int8.yaml" --set budget=0.0625 --context 32768 \
          --gpu-memory-utilization 0.95 --in-process --repeats 3 \
          --out "$out/e2e_ab_before.jsonl" 2>&1 | grep '^{' | cut -c1-240)
        "${e2e[@]}" --backend prhs --config configs/int8.yaml --set budget=0.0625 \
          --context 32768 --gpu-memory-utilization 0.95 --in-process --repeats 3 \
          --out "$out/e2e_ab_after.jsonl" 2>&1 | grep '^{' | cut -c1-240
      done ;;
    bucket-rows)  # 12 rows alone against 12 active rows in the step graphs' 16-row bucket
      # (the bucket's plan, and the 12-row plan's split count forced); not yet run
      for pad in "" --pad-slots; do
        python3 "${attn[@]}" --batches 12 $pad --out "$out/rows12${pad:+_padded}.json" 2>&1 \
          | grep prhs_sparse
        python3 "${attn[@]}" --batches 16 --active-rows 12 --splits 0 5 6 $pad \
          --out "$out/bucket16_active12${pad:+_padded}.json" 2>&1 | grep prhs_sparse
      done ;;
    sweep-search)  # selection's threshold search: bisection (31 rounds) against 4- to 16-ary
      # (16, 11, 8 rounds) at the engine's shapes, int8 logits; not yet run
      timeout 420 python3 benchmarks/kernel_sweep.py --batch 12 16 --kernels selection \
        --shapes 32832:2560 32832:2053 --search 2 4 8 16 --warps 4 8 16 \
        --centroid-dtypes int8 --out "$out/kernel_sweep_search.jsonl" > /dev/null 2>&1
      wc -l "$out/kernel_sweep_search.jsonl" ;;
    sweep-scoring)  # scoring alone, both summary formats, live context vs the 2560-slot bucket
      timeout 300 python3 benchmarks/kernel_sweep.py --batch 12 --kernels scoring --shapes 32832:2560 \
        --centroid-dtypes float32 int8 --out "$out/kernel_sweep_scoring.jsonl" > /dev/null 2>&1
      wc -l "$out/kernel_sweep_scoring.jsonl" ;;
    profile)  # decode steps only (cached prefixes); util 0.95 as in e2e
      "${e2e[@]}" --backend prhs --context 32768 --gpu-memory-utilization 0.95 \
        --profile "$out/profile_prhs_b12x32k.txt" 2>&1 | grep '^{' | cut -c1-400
      head -1 "$out/profile_prhs_b12x32k.txt"; sed -n 2p "$out/profile_prhs_b12x32k.txt" ;;
    e2e)  # 0.95: float32 summaries (19% of the KV bytes) fit 12 x 32K only there
      for b in dense prhs; do
        "${e2e[@]}" --backend $b --context 32768 --gpu-memory-utilization 0.95 \
          --out "$out/e2e_b12x32k.jsonl" 2>&1 | grep '^{' \
          | python3 -c "import json,sys; r=json.loads(sys.stdin.read()); r.pop('first_tokens'); print(r)"
      done ;;
    e2e-16)  # the issue's shape, a 1/16 budget (default: 1/8); dense: the e2e phase's
      "${e2e[@]}" --backend prhs --context 32768 --gpu-memory-utilization 0.95 \
        --config configs/budget16.yaml --out "$out/e2e_b12x32k.jsonl" 2>&1 \
        | grep '^{' | python3 -c "import json,sys; r=json.loads(sys.stdin.read()); r.pop('first_tokens'); print(r)" ;;
    sweep)
      timeout 420 python3 benchmarks/kernel_sweep.py --batch 12 --warps 4 8 16 \
        --out "$out/kernel_sweep.jsonl" > /dev/null 2>&1; wc -l "$out/kernel_sweep.jsonl" ;;
    e2e-int8)  # int8 centroids (7.8% of the KV bytes): 12 x 32K fits at util 0.90
      for b in dense "prhs --config configs/int8.yaml"; do
        # shellcheck disable=SC2086
        "${e2e[@]}" --backend $b --context 32768 \
          --out "$out/e2e_b12x32k_int8.jsonl" 2>&1 | grep '^{' \
          | python3 -c "import json,sys; r=json.loads(sys.stdin.read()); r.pop('first_tokens'); print(r)"
      done ;;
    fallback-stacks)  # the fallback in-process, with the engine's Python stack sampled
      for b in dense prhs; do
        "${e2e[@]}" --backend $b --context 1900 --output-len 128 --in-process \
          --sample-stacks "$out/stacks_${b}_b12x1900.txt" --out "$out/e2e_b12x1900_inproc.jsonl" \
          2>&1 | grep '^{' | cut -c1-200
        head -1 "$out/stacks_${b}_b12x1900.txt"
      done ;;
    fallback-bisect)  # what of prhs costs in the fallback: no summary layers, no metrics
      all_dense="dense_layers=[$(seq -s, 0 31)]"
      for args in "--backend dense" "--backend prhs --set $all_dense" "--backend prhs --set metrics=false" \
                  "--backend prhs"; do
        # shellcheck disable=SC2086
        "${e2e[@]}" $args --context 1900 --output-len 128 --out "$out/e2e_b12x1900_bisect.jsonl" \
          2>&1 | grep '^{' | cut -c1-120
      done
      python3 -c "import json,sys; [print(r['backend'], r['overrides'], r['decode_tok_per_s']) for r in map(json.loads, open(sys.argv[1]))]" \
        "$out/e2e_b12x1900_bisect.jsonl" ;;
    fallback-ab)  # the fallback as prhs, dense, prhs, dense: 5 timed runs each (medians)
      for b in prhs dense prhs dense; do
        "${e2e[@]}" --backend $b --context 1900 --output-len 128 --repeats 5 \
          --out "$out/e2e_b12x1900_ab.jsonl" 2>&1 | grep '^{' | cut -c1-160
      done
      python3 -c "import json,sys; [print(r['backend'], r['decode_tok_per_s'], r['decode_tok_per_s_runs']) for r in map(json.loads, open(sys.argv[1]))]" \
        "$out/e2e_b12x1900_ab.jsonl" ;;
    fallback-cpu)  # in-process: the engine thread's CPU time per decode step, dense vs prhs
      for b in dense prhs; do
        "${e2e[@]}" --backend $b --context 1900 --output-len 128 --repeats 5 --in-process \
          --out "$out/e2e_b12x1900_cpu.jsonl" 2>&1 | grep '^{' | cut -c1-80
      done
      python3 -c "import json,sys; [print(r['backend'], r['decode_tok_per_s'], r['host_cpu_ms_per_step'], r['host_cpu_ms_per_step_runs']) for r in map(json.loads, open(sys.argv[1]))]" \
        "$out/e2e_b12x1900_cpu.jsonl" ;;
    fallback)  # 1900 + 128 tokens < min_context 2048: prhs runs dense throughout
      for b in prhs dense; do
        "${e2e[@]}" --backend $b --context 1900 --output-len 128 --out "$out/e2e_b12x1900.jsonl" \
          2>&1 | grep '^{' | cut -c1-200
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
          --out "$out/e2e_b8x1900.jsonl" 2>&1 | grep '^{' | cut -c1-200
      done
      # 2000 + 128 crosses min_context 2048: dense steps on full graphs, then sparse steps
      python3 benchmarks/e2e_decode.py --batch 8 --context 2000 --output-len 128 --backend prhs \
        --out "$out/e2e_b8x2000_crossing.jsonl" 2>&1 | grep '^{' | cut -c1-200
      python3 - "$out/e2e_b8x1900.jsonl" "$out/e2e_b8x2000_crossing.jsonl" <<'EOF'
import json, sys
runs = [json.loads(line) for line in open(sys.argv[1])][-2:]
print("b8 fallback: prhs tokens == dense tokens:", runs[0]["first_tokens"] == runs[1]["first_tokens"])
crossing = [json.loads(line) for line in open(sys.argv[2])][-1]
print("b8 crossing: sparse layers per token:", crossing.get("sparse_layers_per_token"))
EOF
      ;;
    e2e-full:*)  # e2e-full:dense|full|piecewise, 12 x 32K in-process, int8 centroids at 1/16,
      # max_num_seqs 16 so that vLLM captures a full decode graph the 12 rows fit (E2E_SEQS
      # overrides; E2E_EXTRA adds e2e_decode.py arguments, e.g. "--batch 4"):
      # full = vLLM's full graphs hold the sparse step (full_graph_max_rows 64),
      # piecewise = the sparse step between piecewise graphs (0, the default)
      int8=(--backend prhs --config configs/int8.yaml --set budget=0.0625)
      case ${phase#e2e-full:} in
        dense) args=(--backend dense) ;;
        full) args=("${int8[@]}" --set full_graph_max_rows=64) ;;
        piecewise) args=("${int8[@]}" --set full_graph_max_rows=0) ;;
        *) echo "unknown run ${phase#e2e-full:}"; exit 2 ;;
      esac
      read -ra extra <<< "${E2E_EXTRA:-}"  # e.g. E2E_EXTRA="--batch 4"
      "${e2e[@]}" "${args[@]}" --context 32768 --gpu-memory-utilization 0.95 --in-process \
        --repeats 3 --max-num-seqs "${E2E_SEQS:-16}" "${extra[@]}" \
        --out "$out/e2e_full_graphs.jsonl" 2>&1 | grep '^{' | cut -c1-300 ;;
    full-graph-memory)  # what full_graph_max_rows costs in memory with vLLM's default-size
      # graph set (max_num_seqs $E2E_SEQS, default 256) and a long context ($CTX, default
      # 130048): 1 row, full_graph_max_rows 0 then $FULL_ROWS (default 8). Prints device
      # memory after start-up, the KV pool, vLLM's graph-capture lines and tok/s
      # (median of $E2E_REPEATS runs, default 3).
      for rows in 0 "${FULL_ROWS:-8}"; do
        "${e2e[@]}" --batch 1 --output-len 32 --backend prhs --config configs/int8.yaml \
          --set budget=0.0625 --set full_graph_max_rows="$rows" --context "${CTX:-130048}" \
          --gpu-memory-utilization 0.95 --in-process --repeats "${E2E_REPEATS:-3}" \
          --max-num-seqs "${E2E_SEQS:-256}" --out "$out/e2e_graph_memory.jsonl" \
          > "$out/graph_memory_rows$rows.log" 2>&1
        grep -iE "graph capturing|cuda graph|KV cache" "$out/graph_memory_rows$rows.log" | cut -c1-200
      done
      python3 - "$out/e2e_graph_memory.jsonl" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(r["overrides"], "used GiB", r.get("device_used_gib_after_init"), "KV tokens",
          r.get("kv_cache_tokens"), "tok/s", r["decode_tok_per_s"])
EOF
      ;;
    e2e-full-compare)  # the e2e-full runs: tok/s, and whether greedy tokens equal the first run's
      python3 - "$out/e2e_full_graphs.jsonl" <<'EOF'
import json, sys
runs = [json.loads(line) for line in open(sys.argv[1])]
for r in runs:
    same = r["first_tokens"] == runs[0]["first_tokens"]
    print(r["backend"], r.get("overrides"), r["batch"], r.get("max_num_seqs"), r["decode_tok_per_s"],
          r.get("decode_tok_per_s_runs"), r.get("host_cpu_ms_per_step"),
          "tokens == first run's:", same)
EOF
      ;;
    *) echo "unknown phase $phase"; exit 2 ;;
  esac
done
