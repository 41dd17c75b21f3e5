"""Fixtures of the GPU tests.

``csrc_extension``: the tests of the CUDA kernels (prhs_vllm._C, built from csrc/) use it.
Without a CUDA GPU they skip (CPU CI); on a machine with one, a missing or
unloadable extension fails them instead of skipping, so a GPU run cannot pass
without testing the kernels.
"""

from __future__ import annotations

import pytest
import torch

BUILD_COMMAND = "python setup.py build_ext --inplace"


@pytest.fixture(scope="session")
def csrc_extension() -> None:
    """Skip without a CUDA GPU; with one, fail unless prhs_vllm._C loads."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from prhs_vllm.ops.cuda.sparse_decode import _load_error

    error = _load_error()
    if error is not None:
        pytest.fail(
            f"prhs_vllm._C (the csrc kernels) is not built or does not load: {error}. "
            f"This machine has a CUDA GPU, so the kernel tests must run: build it in the "
            f"checkout with `{BUILD_COMMAND}` (nvcc and CUDA torch needed; or "
            "`pip install --no-build-isolation -e .`)",
            pytrace=False,
        )
