"""Build hook: the package is pure Python, plus the CUDA extension prhs_vllm._C
(csrc/) when CUDA torch and nvcc are present at build time. A build also copies
the repository's configs/*.yaml into the package as prhs_vllm/configs/, so an
installed wheel finds them by name (``"config": "default"``); an editable
install reads configs/ in the checkout instead (prhs_vllm.config._configs_dir).

    python setup.py build_ext --inplace            # the extension, in the tree
    pip install --no-build-isolation -e .          # the same, installed (needs torch)
    PRHS_BUILD_CUDA=0 pip install -e .             # pure Python

An isolated build (plain `pip install .`) sees no torch and installs pure
Python. Targets (TORCH_CUDA_ARCH_LIST is not used): sm_90a SASS for Hopper,
sm_80 SASS for Ampere / Ada, and compute_80 PTX that newer GPUs JIT-compile.
"""

import os
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent
SOURCES = [
    "csrc/torch_bindings.cpp",
    "csrc/sparse_decode/sparse_decode_launcher.cu",
    "csrc/summaries/update_summaries_launcher.cu",
    "csrc/scoring/page_logits_launcher.cu",
]
ARCH_FLAGS = [
    "-gencode=arch=compute_90a,code=sm_90a",
    "-gencode=arch=compute_80,code=[sm_80,compute_80]",
]


class BuildPyWithConfigs(build_py):
    """build_py that also copies configs/*.yaml into the built package's configs/."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:  # the package is the checkout: configs/ is read in place
            return
        sources = sorted((ROOT / "configs").glob("*.yaml"))
        if not sources:
            raise FileNotFoundError(f"no configs/*.yaml under {ROOT}: the wheel needs them")
        target = Path(self.build_lib) / "prhs_vllm" / "configs"
        self.mkpath(str(target))
        for src in sources:
            self.copy_file(str(src), str(target / src.name))


def _skip(reason: str) -> dict:
    print(f"prhs-vllm: building without CUDA kernels ({reason})", file=sys.stderr)
    return {}


def _cxx_std(torch_version: str) -> str:
    """C++17 as asked for the kernels; torch >= 2.13 headers refuse anything
    below C++20 (the kernels compile as either)."""
    major, minor = (int(part) for part in torch_version.split(".")[:2])
    return "c++20" if (major, minor) >= (2, 13) else "c++17"


def cuda_extension() -> dict:
    """setup() keywords adding prhs_vllm._C, or {} when it cannot be built."""
    if os.environ.get("PRHS_BUILD_CUDA", "1") == "0":
        return _skip("PRHS_BUILD_CUDA=0")
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return _skip("torch is not importable here")
    if torch.version.cuda is None:
        return _skip("torch has no CUDA")
    if CUDA_HOME is None or not (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        return _skip("nvcc not found (set CUDA_HOME)")

    std = f"-std={_cxx_std(torch.__version__)}"
    extension = CUDAExtension(
        name="prhs_vllm._C",
        sources=SOURCES,
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={
            "cxx": ["-O3", std],
            # Fast math, but denormals kept: a page's min/max box must contain
            # denormal keys (the int8 boxes match the Triton kernel bit for bit).
            "nvcc": ["-O3", std, "--use_fast_math", "--ftz=false", *ARCH_FLAGS],
        },
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}


def setup_kwargs() -> dict:
    kwargs = cuda_extension()
    kwargs["cmdclass"] = {**kwargs.get("cmdclass", {}), "build_py": BuildPyWithConfigs}
    return kwargs


setup(**setup_kwargs())
