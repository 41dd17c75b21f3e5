"""Ops used by the backend, dispatched by device.

Each op has a pure-torch reference in ``ref/`` (the test oracle and the CPU
path). On CUDA tensors the Triton kernels (``triton/``: summaries, scoring)
and the CUDA sparse decode kernel (``cuda/``, built from csrc/) take over when
present. ``PRHS_OPS=reference`` forces the references everywhere (A/B checks).
"""

from __future__ import annotations

import functools
import os

import torch

from prhs_vllm.ops.ref import (
    Selection,
    SelectionParams,
    dropped_mass_upper_bound,
    select_pages,
    sparse_paged_decode,
    update_page_summaries,
)
from prhs_vllm.ops.ref.selection import select_from_logits
from prhs_vllm.ops.ref.sparse_decode_indexed import compact_keep, sparse_paged_decode_indexed

__all__ = [
    "Selection",
    "SelectionParams",
    "cuda_kernels_ready",
    "dropped_mass_upper_bound",
    "kernel_report",
    "select",
    "sparse_decode",
    "update_summaries",
]

OPS_ENV = "PRHS_OPS"


@functools.lru_cache(maxsize=1)
def _triton_ready() -> bool:
    if os.environ.get(OPS_ENV) == "reference":
        return False
    from prhs_vllm.ops import triton as triton_ops

    return triton_ops.is_available()


@functools.lru_cache(maxsize=1)
def _cuda_ready() -> bool:
    if os.environ.get(OPS_ENV) == "reference":
        return False
    from prhs_vllm.ops.cuda import sparse_decode as cuda_ops

    return cuda_ops.is_available()


def cuda_kernels_ready() -> bool:
    """Whether the csrc sparse decode kernel serves CUDA tensors here."""
    return _cuda_ready()


def kernel_report() -> str:
    """Which implementation each op uses on CUDA tensors (for the startup log)."""
    scoring = "triton" if _triton_ready() else "torch reference"
    attention = "cuda (csrc)" if _cuda_ready() else "torch reference"
    return f"summaries/scoring: {scoring}; sparse attention: {attention}"


def update_summaries(key, slot_mapping, block_size, key_sum, key_min, key_max) -> None:
    """``ref.update_page_summaries`` (same arguments), on the fastest backend."""
    if key.is_cuda and _triton_ready():
        from prhs_vllm.ops.triton import update_page_summaries as triton_update

        triton_update(key, slot_mapping, block_size, key_sum, key_min, key_max)
    else:
        update_page_summaries(key, slot_mapping, block_size, key_sum, key_min, key_max)


def select(
    query, key_sum, key_min, key_max, block_table, seq_lens, params: SelectionParams, num_slots
) -> Selection:
    """``ref.select_pages`` (same arguments), scoring on the fastest backend."""
    if query.is_cuda and _triton_ready():
        from prhs_vllm.ops.triton import page_logits

        est, bound = page_logits(
            query,
            key_sum,
            key_min,
            key_max,
            block_table,
            seq_lens,
            params.block_size,
            params.scale,
            num_slots,
        )
        return select_from_logits(est, bound, seq_lens, params)
    return select_pages(query, key_sum, key_min, key_max, block_table, seq_lens, params, num_slots)


def sparse_decode(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    keep: torch.Tensor,
    scale: float,
    workspace: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``ref.sparse_paged_decode`` (same arguments and results).

    On CUDA the kept pages are compacted on the device (no host sync) and read
    by the csrc kernel, or by the indexed reference when it is not built.
    ``workspace`` (CUDA kernel only) is its split-K scratch, for graph capture.
    """
    if not query.is_cuda:
        return sparse_paged_decode(
            query, key_cache, value_cache, block_table, seq_lens, keep, scale
        )
    kept_slots, num_kept = compact_keep(keep)
    table = block_table.to(torch.int32)  # vLLM's is int32 already: no copy
    lens = seq_lens.to(torch.int32)
    if _cuda_ready():
        from prhs_vllm.ops.cuda.sparse_decode import (
            sparse_paged_decode_indexed as cuda_decode,
        )

        return cuda_decode(
            query, key_cache, value_cache, table, lens, kept_slots, num_kept, scale,
            workspace=workspace,
        )  # fmt: skip
    return sparse_paged_decode_indexed(
        query, key_cache, value_cache, table, lens, kept_slots, num_kept, scale
    )
