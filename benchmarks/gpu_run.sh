#!/usr/bin/env bash
# On the GPU machine (vLLM 0.26.0 staged): the phases named on the command line,
# results in $OUT. Phases: setup, tests, greedy, ops, attention, sweep-splits,
# read-floor, cache-write, profile, e2e-profiles, e2e-full:dense|full|piecewise, e2e-full-compare,
# full-graph-memory, fallback-cpu, graphs, ab-attention, ab-ops, ab-e2e.
# benchmarks/README.md says which phase made which result.
#   bash benchmarks/gpu_run.sh setup tests ops
set -uo pipefail
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/prhs-out}; mkdir -p "$out"
# Decode timed from cached prefixes (see e2e_decode.py).
e2e=(python3 benchmarks/e2e_decode.py --batch 12 --output-len 64 --cached-prefix)
# prhs as measured end to end: int8 centroids at a 1/16 budget.
int8=(--backend prhs --config configs/fixed-budget.yaml)
# The attention alone at 32K, both budgets (attention, ab-attention).
attn=(benchmarks/ops_sparse_decode.py --contexts 32768 --budgets 16 8 --no-dense --replays 50)
# A base tree built next to this one (ab-attention, ab-ops, ab-e2e): make it here first,
# and carry it (ignored by git):
#   git archive BASE csrc prhs_vllm setup.py pyproject.toml README.md > ab_base_tree.tar
base=/tmp/ab-base
build_base() {
  [ -f "$base/.built" ] && return 0
  rm -rf "$base"; mkdir -p "$base"
  tar -xf ab_base_tree.tar -C "$base" && cp -r benchmarks "$base/"
  # The system gcc, as setup builds (C++ exceptions must raise).
  (cd "$base" && CC=/usr/bin/gcc CXX=/usr/bin/g++ python3 setup.py -q build_ext --inplace \
    > "$out/ab_base_build.txt" 2>&1) && touch "$base/.built"
}
for phase in "$@"; do
  echo "== $phase $(date +%T)"
  case $phase in
    setup)  # build the CUDA extension in place and register prhs-vllm as a vLLM plugin
      # without a network (pip cannot fetch build dependencies there); wheels carried in
      # .whl/ (e.g. pytest) are installed too. The image's CC (/opt/gcc/bin/gcc, a wrapper
      # over its own gcc runtime) builds an extension whose C++ exceptions kill the process
      # instead of raising RuntimeError: build with the system gcc.
      (
        set -e
        if ls .whl/*.whl >/dev/null 2>&1; then
          python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-extra .whl/*.whl
          site=$(python3 -c 'import site; print(site.getsitepackages()[0])')
          echo /tmp/site-extra > "$site/zz-prhs-extra.pth"
        fi
        if [ -x /usr/bin/gcc ] && [ -x /usr/bin/g++ ]; then export CC=/usr/bin/gcc CXX=/usr/bin/g++; fi
        python3 setup.py -q build_ext --inplace 2>&1 | grep -v -i warning | tail -5 || true
        site=$(python3 -c 'import site; print(site.getsitepackages()[0])')
        echo "$PWD" > "$site/prhs-vllm-src.pth"
        di="$site/prhs_vllm-0.1.0.dist-info"; mkdir -p "$di"
        printf 'Metadata-Version: 2.1\nName: prhs-vllm\nVersion: 0.1.0\n' > "$di/METADATA"
        printf '[vllm.general_plugins]\nprhs = prhs_vllm.plugin:register\n' > "$di/entry_points.txt"
        python3 -c "from prhs_vllm import ops; print('prhs ops:', ops.kernel_report())"
      ) 2>&1 | tee "$out/setup.txt"
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt" ;;
    tests)
      python3 -m pytest -q -p no:cacheprovider tests/gpu tests/test_sparse_decode_indexed.py \
        2>&1 | tail -25 | tee "$out/gpu_tests.txt" ;;
    greedy)  # greedy tokens, dense against prhs: SmolLM2-135M (short prompts and 4K pass
      # keys) and a LLaMA-3-8B shape with dummy weights
      python3 -c "import prhs_vllm.models as m; print(m.prepare_smollm2('/tmp/smollm2'))" 2>&1 | tail -1
      greedy() {
        local name=$1; shift
        VLLM_USE_FLASHINFER_SAMPLER=0 PRHS_STATS_FLUSH_S=0 python3 benchmarks/greedy_tokens.py \
          --enforce-eager --out "$out/$name.json" "$@" \
          > "$out/$name.log" 2>&1 || { echo "FAILED $name"; tail -30 "$out/$name.log"; }
      }
      greedy smol_dense --model /tmp/smollm2 --backend dense --passkey 4000
      greedy smol_prhs_full --model /tmp/smollm2 --backend prhs --config configs/full-budget.yaml --passkey 4000
      greedy smol_prhs_default --model /tmp/smollm2 --backend prhs --config configs/default.yaml --passkey 4000
      greedy l8_dense --model llama3-8b-dummy --backend dense
      greedy l8_prhs_full --model llama3-8b-dummy --backend prhs --config configs/full-budget.yaml
      for pair in "smol_dense smol_prhs_full" "smol_dense smol_prhs_default" "l8_dense l8_prhs_full"; do
        read -r a b <<< "$pair"; echo "== $a vs $b"
        python3 benchmarks/compare_greedy.py "$out/$a.json" "$out/$b.json"
      done 2>&1 | tee "$out/compare_greedy.txt" ;;
    ops)  # the whole sparse step of one layer at 16 x 32K and 1/16, both summary formats
      for dtype in int8 float32; do
        python3 benchmarks/ops.py --batches 16 --contexts 32768 --budgets 16 --centroid-dtype $dtype \
          --out "$out/whole_step_$dtype.json" 2>&1 | tail -2
      done ;;
    attention)  # the sparse attention alone at 12 / 16 / 32 x 32K, the plan's splits and ring
      python3 "${attn[@]}" --batches 12 16 32 --out "$out/ops_sparse_decode.json" 2>&1 \
        | grep prhs_sparse ;;
    sweep-splits)  # the attention kernel's split-K factor: each count asked, and the plan's (0)
      python3 benchmarks/ops_sparse_decode.py --batches 12 16 --contexts 32768 --budgets 16 8 \
        --splits 0 1 2 3 4 5 6 8 11 16 --no-dense --out "$out/ops_sparse_decode_splits.json" \
        2>&1 | tee "$out/ops_sparse_decode_splits.txt" ;;
    read-floor)  # a plain read / copy of N bytes in the attention benchmark's timing
      python3 benchmarks/read_floor.py --mb 33.5 67.1 100.7 134.2 201.3 268.4 536.9 2147 \
        --out "$out/read_floor_h100.json" ;;
    cache-write)  # one layer's KV cache write: vLLM's against prhs's fused and unfused
      python3 benchmarks/cache_write.py --tokens 12 8192 --out "$out/cache_write.jsonl" ;;
    profile)  # torch profiler over decode steps only (cached prefixes), in-process
      "${e2e[@]}" "${int8[@]}" --context 32768 --gpu-memory-utilization 0.95 --in-process \
        --profile "$out/profile_prhs_b12x32k.txt" 2>&1 | grep '^{' | cut -c1-400
      head -1 "$out/profile_prhs_b12x32k.txt"; sed -n 2p "$out/profile_prhs_b12x32k.txt" ;;
    e2e-full:*)  # e2e-full:dense|full|piecewise, 12 x 32K in-process, int8 centroids at 1/16,
      # max_num_seqs 16 so that vLLM captures a full decode graph the 12 rows fit (E2E_SEQS
      # overrides; E2E_EXTRA adds e2e_decode.py arguments, e.g. "--batch 4"):
      # full = vLLM's full graphs hold the sparse step (full_graph_max_rows 64),
      # piecewise = the sparse step between piecewise graphs (0, the default)
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
    e2e-profiles)  # the two profiles against dense, 12 x 32K in-process, 2 runs each
      # (benchmarks/results/2026-12-h100-profiles)
      for cfg in dense configs/fixed-budget.yaml configs/default.yaml; do
        if [ $cfg = dense ]; then args=(--backend dense); else args=(--backend prhs --config $cfg); fi
        "${e2e[@]}" "${args[@]}" --context 32768 --gpu-memory-utilization 0.95 --in-process \
          --repeats 2 --out "$out/e2e_profiles_b12x32k.jsonl" 2>&1 | grep '^{' | cut -c1-300
      done ;;
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
    full-graph-memory)  # what full_graph_max_rows costs in memory with vLLM's default-size
      # graph set (max_num_seqs $E2E_SEQS, default 256) and a long context ($CTX, default
      # 130048): 1 row, full_graph_max_rows 0 then $FULL_ROWS (default 8). Prints device
      # memory after start-up, the KV pool, vLLM's graph-capture lines and tok/s
      # (median of $E2E_REPEATS runs, default 3).
      for rows in 0 "${FULL_ROWS:-8}"; do
        "${e2e[@]}" --batch 1 --output-len 32 "${int8[@]}" --set full_graph_max_rows="$rows" \
          --context "${CTX:-130048}" --gpu-memory-utilization 0.95 --in-process \
          --repeats "${E2E_REPEATS:-3}" --max-num-seqs "${E2E_SEQS:-256}" \
          --out "$out/e2e_graph_memory.jsonl" > "$out/graph_memory_rows$rows.log" 2>&1
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
    fallback-cpu)  # the dense fallback (1900 + 128 tokens < min_context 2048) in-process:
      # tok/s and the engine thread's CPU time per decode step, dense vs prhs
      for b in dense prhs; do
        "${e2e[@]}" --backend $b --context 1900 --output-len 128 --repeats 5 --in-process \
          --out "$out/e2e_b12x1900_cpu.jsonl" 2>&1 | grep '^{' | cut -c1-80
      done
      python3 - "$out/e2e_b12x1900_cpu.jsonl" <<'EOF'
import json, sys
runs = [json.loads(line) for line in open(sys.argv[1])][-2:]
for r in runs:
    print(r["backend"], r["decode_tok_per_s"], r["host_cpu_ms_per_step"], r["host_cpu_ms_per_step_runs"])
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
    ab-attention)  # this tree's attention kernel against a base tree's, interleaved, same machine
      build_base
      for run in 1 2; do
        (cd "$base" && python3 "${attn[@]}" --batches 12 16 32 --out "$out/attn_before_run$run.json" \
          2>&1 | grep prhs_sparse)
        python3 "${attn[@]}" --batches 12 16 32 --out "$out/attn_after_run$run.json" 2>&1 \
          | grep prhs_sparse
      done ;;
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
      # PYTHONPATH puts the base's prhs_vllm before the one setup registered)
      build_base
      for run in ${AB_RUNS:-1 2}; do
        (cd "$base" && PYTHONPATH="$base" "${e2e[@]}" --backend prhs \
          --config "$OLDPWD/configs/fixed-budget.yaml" --context 32768 \
          --gpu-memory-utilization 0.95 --in-process --repeats 3 \
          --out "$out/e2e_ab_before.jsonl" 2>&1 | grep '^{' | cut -c1-240)
        "${e2e[@]}" "${int8[@]}" --context 32768 --gpu-memory-utilization 0.95 --in-process \
          --repeats 3 --out "$out/e2e_ab_after.jsonl" 2>&1 | grep '^{' | cut -c1-240
      done ;;
    *) echo "unknown phase $phase"; exit 2 ;;
  esac
done
