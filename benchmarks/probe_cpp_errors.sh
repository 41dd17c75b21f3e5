#!/usr/bin/env bash
# On the GPU machine: does a TORCH_CHECK thrown inside prhs_vllm._C come back
# to Python as a RuntimeError (tests/gpu/test_cuda_sparse_decode.py,
# test_cpp_checks_raise_runtime_error, xfail since session 5)? Builds the
# extension once per toolchain variant into its own folder and calls the ops
# with bad arguments in a child process; prints each variant's outcome.
#   bash benchmarks/probe_cpp_errors.sh
set -u
echo "CC=${CC:-} CXX=${CXX:-}"
for c in gcc "${CC:-}"; do [ -n "$c" ] && command -v "$c" >/dev/null && echo "$c: $("$c" --version | head -1)"; done
python3 -c "import torch; print('torch', torch.__version__, 'cxx11 abi', torch._C._GLIBCXX_USE_CXX11_ABI)"

probe='
import glob, sys, torch
torch.ops.load_library(glob.glob(sys.argv[1] + "/prhs_vllm/_C*.so")[0])
def case(name, fn):
    try:
        fn()
    except RuntimeError as exc:
        print("  ", name, "RuntimeError:", str(exc).splitlines()[0][:90], flush=True)
    else:
        print("  ", name, "no error", flush=True)
case("aten", lambda: torch.ones(2, 3) @ torch.ones(2, 3))
case("plan", lambda: torch.ops.prhs.sparse_paged_decode_plan(1, 4, 2, 96, 16, 1, torch.bfloat16, 0))
key = torch.zeros(4, 2, 64, device="cuda")
sums = [torch.zeros(8, 2, 64, device="cuda") for _ in range(3)]
case("update", lambda: torch.ops.prhs.update_page_summaries(key, key[:, 0, 0], 16, *sums))
'
variant() {  # name, then env assignments for the build
  local name=$1; shift
  local dir=/tmp/probe-$name
  rm -rf "$dir"; mkdir -p "$dir"
  if ! env "$@" python3 setup.py -q build_ext --build-lib "$dir" --build-temp "$dir/tmp" \
      > "$dir/build.log" 2>&1; then
    echo "$name: build failed"; grep -m3 -i error "$dir/build.log"; return
  fi
  echo "$name:"
  python3 -X faulthandler -c "$probe" "$dir" > "$dir/run.log" 2>&1
  echo "   rc=$?"; grep -v "^  File\|^    " "$dir/run.log" | head -6
}
variant default
variant static-libstdcxx LDFLAGS="-static-libstdc++ -static-libgcc"
variant system-gcc CC=gcc CXX=g++
