"""Ops used by the backend, dispatched by device.

Each op has a pure-torch reference in ``ref/`` (the test oracle and the CPU
path). On CUDA tensors the csrc kernels (``cuda/``: update and scoring of float32
and int8 summaries, sparse decode) and the Triton kernels (``triton/``:
selection, int4 summaries, and what csrc serves where it is not built) take
over when present.
``PRHS_OPS=reference`` forces the references everywhere (A/B checks).
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
from prhs_vllm.ops.ref.compact_selection import unsupported_reason
from prhs_vllm.ops.ref.quant import QuantizedCentroids, update_quantized_summaries
from prhs_vllm.ops.ref.selection import key_rescorer, select_from_logits
from prhs_vllm.ops.ref.sparse_decode_indexed import compact_keep, sparse_paged_decode_indexed

__all__ = [
    "Selection",
    "SelectionParams",
    "cuda_kernels_ready",
    "dropped_mass_upper_bound",
    "kernel_report",
    "page_logits",
    "select",
    "sparse_decode",
    "cache_writer",
    "summary_updater",
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
    """Whether the csrc kernels (sparse decode, summary update) serve CUDA tensors here."""
    return _cuda_ready()


def kernel_report() -> str:
    """Which implementation each op uses on CUDA tensors (for the startup log)."""
    triton = "triton" if _triton_ready() else "torch reference"
    cuda = "cuda (csrc)" if _cuda_ready() else None
    scoring = f"{cuda} (int4: {triton})" if cuda and _triton_ready() else triton
    return (
        f"summaries: {cuda or triton} (int4: {triton}); scoring: {scoring}; "
        f"selection: {triton}; sparse attention: {cuda or 'torch reference'}"
    )


def update_summaries(key, slot_mapping, block_size, key_sum, key_min, key_max) -> None:
    """``ref.update_page_summaries`` (same arguments), on the fastest backend;
    ``key_sum`` may be QuantizedCentroids (``ref.quant.update_quantized_summaries``,
    bfloat16 boxes). On CUDA the csrc kernel (float32, int8) or Triton's (int4)
    relies on vLLM writing each page's new slots as one contiguous run in order
    (the reference does not)."""
    quantized = isinstance(key_sum, QuantizedCentroids)
    if _csrc_updates(key, key_sum):
        from prhs_vllm.ops.cuda.summaries import update_page_summaries as cuda_update

        cuda_update(key, slot_mapping, block_size, key_sum, key_min, key_max)
    elif key.is_cuda and _triton_ready():
        if quantized:
            from prhs_vllm.ops.triton import update_quantized_summaries as triton_update
        else:
            from prhs_vllm.ops.triton import update_page_summaries as triton_update

        triton_update(key, slot_mapping, block_size, key_sum, key_min, key_max)
    elif quantized:
        update_quantized_summaries(key, slot_mapping, block_size, key_sum, key_min, key_max)
    else:
        update_page_summaries(key, slot_mapping, block_size, key_sum, key_min, key_max)


def summary_updater(key, slot_mapping, block_size, key_sum, key_min, key_max):
    """``update_summaries`` with block_size and the summaries bound, for one
    layer's cache writes: update(key, slot_mapping) -> None. On the csrc path
    the fixed arguments are checked once, here (``key`` and ``slot_mapping``
    are a first step's), so a call costs little more than the launch."""
    if _csrc_updates(key, key_sum):
        from prhs_vllm.ops.cuda.summaries import bind_update

        return bind_update(key, slot_mapping, block_size, key_sum, key_min, key_max)
    return lambda key, slot_mapping: update_summaries(
        key, slot_mapping, block_size, key_sum, key_min, key_max
    )


def cache_writer(key, value, key_cache, value_cache, slot_mapping, key_sum, key_min, key_max):
    """One layer's KV cache write and summary update as one launch, bound
    (``cuda.summaries.bind_cache_write``): write(key, value, slot_mapping) -> None.

    None where that op does not serve these tensors (no csrc kernels, CPU
    tensors, int4 centroids, a cache dtype other than the rows'): the
    caller then writes the cache its own way and uses ``summary_updater``.
    Arguments as in ``ref.write_cache_and_summaries`` (a first step's rows).
    """
    if not (_csrc_updates(key, key_sum) and key.dtype == value.dtype == key_cache.dtype):
        return None
    from prhs_vllm.ops.cuda.summaries import bind_cache_write

    return bind_cache_write(
        key, value, key_cache, value_cache, slot_mapping, key_sum, key_min, key_max
    )


def _csrc_updates(key, key_sum) -> bool:
    # One C++ launch for float32 sums and int8 centroids on CUDA: per layer and
    # step, the host cost is the point (a Triton launch costs ~100 us of Python
    # per call on the H100; int8 decode steps were host-bound on it).
    int4 = isinstance(key_sum, QuantizedCentroids) and key_sum.bits != 8
    return key.is_cuda and not int4 and _cuda_ready()


def select(
    query,
    key_sum,
    key_min,
    key_max,
    block_table,
    seq_lens,
    params: SelectionParams,
    num_slots,
    key_cache=None,
    prev_keep=None,
    skip=None,
    with_bound=True,
) -> Selection:
    """``ref.select_pages`` (same arguments), scoring on the fastest backend.

    On the Triton path, selection without rerank, the certified stop rule or
    ``skip`` runs fused (``select_compact``): the result then carries the
    compacted slot lists and the dropped-bound log-sum-exp, not bound_logits.

    ``skip`` [N, Hkv] bool marks (row, head) pairs whose selection is reused:
    the Triton scorer reads nothing for them (their logits are -inf); the
    reference scores them anyway. Either way their result is not used.

    ``with_bound=False`` lets the fused path skip the dropped-bound
    log-sum-exp (only the metrics read it)."""
    if query.is_cuda and _triton_ready():
        logits = page_logits(
            query,
            key_sum,
            key_min,
            key_max,
            block_table,
            seq_lens,
            params.block_size,
            params.scale,
            num_slots,
            skip=skip,
        )
        if skip is None and unsupported_reason(params) is None:
            from prhs_vllm.ops.triton import select_compact

            return select_compact(
                logits, seq_lens, params, prev_keep=prev_keep, with_bound=with_bound
            )
        rescore = key_rescorer(query, key_cache, block_table, seq_lens, params)
        return select_from_logits(logits, seq_lens, params, rescore=rescore, prev_keep=prev_keep)
    return select_pages(
        query, key_sum, key_min, key_max, block_table, seq_lens, params, num_slots,
        key_cache=key_cache, prev_keep=prev_keep,
    )  # fmt: skip


def page_logits(query, key_sum, key_min, key_max, *args, **kwargs):
    """``ref.page_logits`` on CUDA: the csrc kernel where it serves the
    summaries (float32, or int8 codes; see ``cuda.scoring``), else Triton's."""
    if _cuda_ready():
        from prhs_vllm.ops.cuda import scoring

        if scoring.unsupported_reason(query, key_sum, key_min, key_max) is None:
            return scoring.page_logits(
                query, key_sum, key_min, key_max, *args, check=False, **kwargs
            )
    from prhs_vllm.ops.triton import page_logits

    return page_logits(query, key_sum, key_min, key_max, *args, **kwargs)


def sparse_decode(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    keep: torch.Tensor,
    scale: float,
    workspace: torch.Tensor | None = None,
    compact: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``ref.sparse_paged_decode`` (same arguments and results).

    On CUDA the kept pages are compacted on the device (no host sync) and read
    by the csrc kernel, or by the indexed reference when it is not built.
    ``workspace`` (CUDA kernel only) is its split-K scratch, for graph capture.
    ``compact``: ``compact_keep(keep)`` when the selection already made it.
    """
    if not query.is_cuda:
        return sparse_paged_decode(
            query, key_cache, value_cache, block_table, seq_lens, keep, scale
        )
    kept_slots, num_kept = compact_keep(keep) if compact is None else compact
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
