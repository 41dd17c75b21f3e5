#!/usr/bin/env bash
# CI check of csrc/ without torch or a GPU: compiles every kernel
# instance (csrc/check/compile_check.cu) for sm_90a and sm_80 with nvcc and
# prints ptxas' registers / spills per kernel. Exits non-zero on a compile
# error, a compiler warning or a register spill, 0 with "skipped" when nvcc is absent.
#   scripts/check-csrc.sh [extra nvcc flags]
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC=${NVCC:-$(command -v nvcc || true)}
if [[ -z "$NVCC" && -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]]; then
  NVCC=${CUDA_HOME:-/usr/local/cuda}/bin/nvcc
fi
if [[ -z "$NVCC" ]]; then
  echo "check-csrc: skipped: nvcc not found"
  exit 0
fi
"$NVCC" --version | tail -1

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# Same defines as torch.utils.cpp_extension, so the check sees what setup.py builds.
flags=(-std=c++17 -O3 --use_fast_math --ftz=false -Xptxas=-warn-spills --resource-usage
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
  -gencode=arch=compute_90a,code=sm_90a -gencode=arch=compute_80,code=sm_80 "$@")
if ! "$NVCC" "${flags[@]}" -c csrc/check/compile_check.cu -o "$out/check.o" > "$out/log" 2>&1; then
  cat "$out/log"
  echo "check-csrc: FAILED (compile error)"
  exit 1
fi
if grep -q "warning #" "$out/log"; then
  grep -A4 "warning #" "$out/log"
  echo "check-csrc: FAILED (compiler warnings)"
  exit 1
fi

# One line per kernel and arch: name, registers, stack, spills.
python3 - "$out/log" <<'PY'
import re, sys

def pretty(mangled):
    """_ZN4prhs13sparse_decode26sparse_decode_split_kernelI13__nv_bfloat16Li128ELi4EEEv...
    -> sparse_decode_split_kernel<bf16, 128, 4>"""
    summary = re.search(
        r"(update_summaries_kernel|write_cache_and_summaries_kernel)I(13__nv_bfloat16|6__half|f)([il])Lb([01])E",
        mangled,
    )
    if summary:
        kernel, key, slot, int8 = summary.groups()
        key = {"13__nv_bfloat16": "bf16", "6__half": "fp16", "f": "fp32"}[key]
        fmt = "int8" if int8 == "1" else "fp32"
        return f"{kernel}<{key}, int{32 if slot == 'i' else 64}, {fmt}>"
    scoring = re.search(r"page_logits_kernelILi(\d+)ELi(\d+)ELi(\d+)E", mangled)
    if scoring:
        bits, dim, gmax = scoring.groups()
        return f"page_logits_kernel<{'fp32' if bits == '0' else 'int8'}, {dim}, {gmax}>"
    kernel = re.search(r"sparse_decode\d+(\w+?_kernel)I", mangled)
    if not kernel:
        return mangled
    dtype = "bf16" if "bfloat16" in mangled else "fp16"
    args = [dtype] + re.findall(r"Li(\d+)E", mangled)
    return f"{kernel.group(1)}<{', '.join(args)}>"


rows, name, arch = [], None, None
for line in open(sys.argv[1]):
    m = re.search(r"Compiling entry function '(\w+)' for '(\w+)'", line)
    if m:
        name, arch = m.groups()
        continue
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m and name:
        stack, st, ld = map(int, m.groups())
        continue
    m = re.search(r"Used (\d+) registers", line)
    if m and name:
        rows.append((arch, pretty(name), int(m.group(1)), stack, st, ld))
        name = None
print(f"{'arch':8} {'kernel':48} {'regs':>4} {'stack':>5} {'spill st':>8} {'spill ld':>8}")
for r in sorted(rows):
    print(f"{r[0]:8} {r[1]:48} {r[2]:4d} {r[3]:5d} {r[4]:8d} {r[5]:8d}")
spills = [r for r in rows if r[4] or r[5]]
if not rows:
    print("check-csrc: FAILED (no ptxas report parsed)")
    sys.exit(1)
if spills:
    print(f"check-csrc: FAILED ({len(spills)} kernels spill registers)")
    sys.exit(1)
print(f"check-csrc: OK ({len(rows)} kernels, no spills)")
PY
