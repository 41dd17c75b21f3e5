"""Sparse paged decode on CUDA: ``torch.ops.prhs.sparse_paged_decode``
(csrc/sparse_decode) behind the signature of
``prhs_vllm.ops.ref.sparse_decode_indexed.sparse_paged_decode_indexed``.

The op allocates nothing: besides ``out`` and ``lse`` it takes a split-K
workspace. For CUDA graphs, size one with ``alloc_workspace`` for the largest
batch before capture and pass it on every call.
"""

from __future__ import annotations

import functools
import importlib

import torch

_BUILD_HINT = (
    "build it on a machine with nvcc and CUDA torch: `python setup.py build_ext --inplace` "
    "or `pip install --no-build-isolation -e .`"
)


@functools.cache
def _load_error() -> str | None:
    """None once prhs_vllm._C is loaded (it registers torch.ops.prhs), else why not."""
    try:
        importlib.import_module("prhs_vllm._C")
    except ImportError as exc:
        return str(exc)
    # The op mutates its arguments and returns nothing: tracing needs no shapes.
    torch.library.register_fake("prhs::sparse_paged_decode")(lambda *args: None)
    return None


def is_available() -> bool:
    """A CUDA device is visible and the extension prhs_vllm._C loads."""
    return torch.cuda.is_available() and _load_error() is None


def _ops():
    error = _load_error()
    if error is not None:
        raise RuntimeError(f"prhs CUDA kernels are not available ({error}); {_BUILD_HINT}")
    return torch.ops.prhs


def _device_index(device: torch.device | str | int) -> int:
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    return device.index if device.index is not None else torch.cuda.current_device()


def workspace_size(
    max_num_rows: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    max_kept: int,
    dtype: torch.dtype,
    device: torch.device | str | int,
) -> int:
    """Workspace bytes enough for any batch of 1..max_num_rows rows of this
    shape (max_kept: K, the width of kept_slots)."""
    return _ops().sparse_paged_decode_workspace_size(
        max_num_rows,
        num_q_heads,
        num_kv_heads,
        head_dim,
        block_size,
        max_kept,
        dtype,
        _device_index(device),
    )


def alloc_workspace(
    max_num_rows: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    max_kept: int,
    dtype: torch.dtype,
    device: torch.device | str | int,
) -> torch.Tensor:
    """A uint8 workspace of workspace_size(...) bytes on `device`."""
    size = workspace_size(
        max_num_rows, num_q_heads, num_kv_heads, head_dim, block_size, max_kept, dtype, device
    )
    index = _device_index(device)
    return torch.empty(size, dtype=torch.uint8, device=torch.device("cuda", index))


def split_plan(
    num_rows: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    max_kept: int,
    dtype: torch.dtype,
    device: torch.device | str | int,
) -> dict[str, int]:
    """How one call is cut up: query heads per CTA, CTAs per KV head group,
    split-K factor and workspace bytes."""
    group_max, head_chunks, splits, nbytes = _ops().sparse_paged_decode_plan(
        num_rows,
        num_q_heads,
        num_kv_heads,
        head_dim,
        block_size,
        max_kept,
        dtype,
        _device_index(device),
    )
    return {
        "heads_per_cta": group_max,
        "head_chunks": head_chunks,
        "num_splits": splits,
        "workspace_bytes": nbytes,
    }


_workspaces: dict[torch.device, torch.Tensor] = {}


def _shared_workspace(query, key_cache, kept_slots) -> torch.Tensor:
    """A per-device workspace, grown on demand outside graph capture."""
    num_rows, num_q_heads, head_dim = query.shape
    need = split_plan(
        num_rows,
        num_q_heads,
        key_cache.shape[1],
        head_dim,
        key_cache.shape[2],
        kept_slots.shape[-1],
        query.dtype,
        query.device,
    )["workspace_bytes"]
    workspace = _workspaces.get(query.device)
    if workspace is None or workspace.numel() < need:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "sparse_paged_decode needs a larger workspace during CUDA graph capture: "
                "pass workspace=alloc_workspace(max_num_rows, ...) allocated before capture"
            )
        workspace = torch.empty(need, dtype=torch.uint8, device=query.device)
        _workspaces[query.device] = workspace
    return workspace


def sparse_paged_decode_indexed(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    kept_slots: torch.Tensor,
    num_kept: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    *,
    lse: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CUDA version of the reference of the same name (same arguments, same
    results up to float32 summation order).

    Args:
        query: [N, Hq, D] bf16/fp16, D in {64, 128, 256}, last dim contiguous.
        key_cache, value_cache: [P, Hkv, bs, D], query's dtype, bs a multiple
            of 16; any strides (equal for both) with a contiguous last dim.
        block_table: [N, M] int32 (contiguous rows).
        seq_lens: [N] int32.
        kept_slots: [N, Hkv, K] int32 contiguous, ascending, -1 padded. The
            split-K factor depends on K, so K is best the real upper bound of
            num_kept (e.g. the page budget), not M.
        num_kept: [N, Hkv] int32 contiguous.
        scale: softmax scale.
        out: optional [N, Hq, D] output (query's dtype, last dim contiguous).
        lse: optional [N, Hq] float32 output.
        workspace: optional uint8 tensor from alloc_workspace; without one a
            per-device workspace is used (and grown outside graph capture).
    Returns:
        (out [N, Hq, D], lse [N, Hq] float32; 0 and -inf where nothing is visible).
    """
    ops = _ops()
    num_rows, num_q_heads, head_dim = query.shape
    if out is None:
        out = torch.empty((num_rows, num_q_heads, head_dim), dtype=query.dtype, device=query.device)
    if lse is None:
        lse = torch.empty((num_rows, num_q_heads), dtype=torch.float32, device=query.device)
    if workspace is None:
        workspace = _shared_workspace(query, key_cache, kept_slots)
    ops.sparse_paged_decode(
        query,
        key_cache,
        value_cache,
        block_table,
        seq_lens,
        kept_slots,
        num_kept,
        float(scale),
        out,
        lse,
        workspace,
    )
    return out, lse
