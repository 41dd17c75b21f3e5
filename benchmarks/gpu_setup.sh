#!/usr/bin/env bash
# On the GPU machine, after vLLM is staged (../shared/gpu/README.md): build the
# CUDA extension in place and register prhs-vllm as a vLLM plugin without a
# network (pip cannot fetch build dependencies there). Optional wheels carried
# in .whl/ (e.g. pytest) are installed too.
set -euo pipefail
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-extra .whl/*.whl
  site=$(python3 -c 'import site; print(site.getsitepackages()[0])')
  echo /tmp/site-extra > "$site/zz-prhs-extra.pth"
fi
# The image's CC (/opt/gcc/bin/gcc, a wrapper over its own gcc runtime) builds an
# extension whose C++ exceptions (TORCH_CHECK) kill the process instead of
# raising RuntimeError; the system gcc does not (benchmarks/probe_cpp_errors.sh).
if [ -x /usr/bin/gcc ] && [ -x /usr/bin/g++ ]; then export CC=/usr/bin/gcc CXX=/usr/bin/g++; fi
python3 setup.py -q build_ext --inplace 2>&1 | grep -v -i warning | tail -5 || true
site=$(python3 -c 'import site; print(site.getsitepackages()[0])')
echo "$PWD" > "$site/prhs-vllm-src.pth"
di="$site/prhs_vllm-0.1.0.dist-info"; mkdir -p "$di"
printf 'Metadata-Version: 2.1\nName: prhs-vllm\nVersion: 0.1.0\n' > "$di/METADATA"
printf '[vllm.general_plugins]\nprhs = prhs_vllm.plugin:register\n' > "$di/entry_points.txt"
python3 -c "from prhs_vllm import ops; print('prhs ops:', ops.kernel_report())"
