"""CUDA C++ ops (csrc/, built into prhs_vllm._C by setup.py). Importing this
package never loads the extension; the ops load it on first use."""

from prhs_vllm.ops.cuda.sparse_decode import (
    alloc_workspace,
    is_available,
    sparse_paged_decode_indexed,
    split_plan,
    workspace_size,
)

__all__ = [
    "alloc_workspace",
    "is_available",
    "sparse_paged_decode_indexed",
    "split_plan",
    "workspace_size",
]
