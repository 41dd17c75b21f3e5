"""Triton versions of the scoring ops, same signatures as the torch references.

``update_page_summaries`` (``ref.summaries``), ``update_quantized_summaries``
(``ref.quant``), ``page_logits`` (``ref.selection``), ``group_page_mass``
(``torch.softmax(x, -1).mean(2)`` of ``select_pages``) and ``select_compact``
(``ref.compact_selection``).
Importing this package does not import triton; the ops load on first access.
Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors (slowly) -- the
variable must be set before the op modules are first imported, since triton
decides interpreted vs compiled when a kernel is defined.
"""

from __future__ import annotations

import importlib
import os

__all__ = [
    "group_page_mass",
    "is_available",
    "page_logits",
    "select_compact",
    "update_page_summaries",
    "update_quantized_summaries",
]

_OPS = {
    "update_page_summaries": "prhs_vllm.ops.triton.summaries",
    "update_quantized_summaries": "prhs_vllm.ops.triton.quant_summaries",
    "page_logits": "prhs_vllm.ops.triton.scoring",
    "group_page_mass": "prhs_vllm.ops.triton.scoring",
    "select_compact": "prhs_vllm.ops.triton.selection",
}


def is_available() -> bool:
    """Triton is importable and kernels can run: a CUDA device, or TRITON_INTERPRET=1."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    import torch

    return torch.cuda.is_available()


def __getattr__(name: str):
    if name in _OPS:
        return getattr(importlib.import_module(_OPS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
