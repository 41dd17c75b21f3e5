"""Page scoring on CUDA: ``torch.ops.prhs.page_logits`` (csrc/scoring) behind
the signature of ``prhs_vllm.ops.ref.selection.page_logits``.

It serves float32 summaries and int8 centroid codes (bfloat16 boxes) for
head_dim 64, 128 or 256 and up to 8 query heads per KV head, with 16-byte
aligned summary rows; ``unsupported_reason`` names what else it does not
serve (the Triton kernel does: int4 codes, other head sizes and groups).
"""

from __future__ import annotations

import torch

from prhs_vllm.ops.cuda.sparse_decode import _misaligned, _ops
from prhs_vllm.ops.ref.quant import QuantizedCentroids
from prhs_vllm.ops.ref.selection import PageLogits

_HEAD_DIMS = (64, 128, 256)
_MAX_GROUP = 8
_MAX_ITERS = 64
_ALIGN = 16  # bytes: each lane loads 16-byte vectors of every summary array
_QUERY_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def unsupported_reason(query, key_sum, key_min, key_max) -> str | None:
    """Why the csrc op does not serve these tensors, or None when it does."""
    if not query.is_cuda:
        return "CPU tensors"
    if query.dtype not in _QUERY_DTYPES:
        return f"query dtype {query.dtype}"
    head_dim = query.shape[-1]
    if head_dim not in _HEAD_DIMS:
        return f"head_dim {head_dim} (csrc scores {_HEAD_DIMS})"
    num_kv_heads = key_min.shape[1]
    if query.shape[1] % num_kv_heads or query.shape[1] // num_kv_heads > _MAX_GROUP:
        return f"{query.shape[1]} query heads for {num_kv_heads} KV heads"
    if isinstance(key_sum, QuantizedCentroids):
        if key_sum.bits != 8:
            return f"int{key_sum.bits} centroid codes"
        sums, box_dtype = key_sum.codes, torch.bfloat16
    else:
        sums, box_dtype = key_sum, torch.float32
    if key_min.dtype != box_dtype or key_max.dtype != box_dtype:
        return f"boxes of dtype {key_min.dtype} with {sums.dtype} sums"
    if key_max.stride() != key_min.stride():
        return "key_min and key_max strides differ"
    for t in (sums, key_min, key_max):
        if t.dim() != 3 or t.shape[2] != head_dim or t.stride(2) != 1:
            return f"summaries of shape {tuple(t.shape)}, strides {t.stride()}"
        rows = (t.stride(0) * t.element_size(), t.stride(1) * t.element_size())
        if _misaligned(t) or rows[0] % _ALIGN or rows[1] % _ALIGN:
            return "summary rows not 16-byte aligned"
    return None


def page_logits(
    query: torch.Tensor,
    key_sum: torch.Tensor | QuantizedCentroids,
    key_min: torch.Tensor,
    key_max: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    scale: float,
    num_slots: int,
    skip: torch.Tensor | None = None,
    *,
    iters: int = 0,
    check: bool = True,
) -> PageLogits:
    """Per page and query head: centroid estimate and box bounds of the log-mass
    (``ref.selection.page_logits``; same arguments and results).

    Args:
        query: [N, Hq, D] CUDA, bf16 / fp16 / fp32, any strides.
        key_sum: [P, Hkv, D] float32 key sums, or QuantizedCentroids with int8
            codes [P, Hkv, D] uint8.
        key_min, key_max: [P, Hkv, D], float32 with sums, bfloat16 with codes.
        block_table: [N, >=M] int page ids; seq_lens: [N] int (int32: no copy).
        skip: [N, Hkv] bool, (row, head) pairs not to score (-inf, nothing read).
        iters: rounds of pages each block scores, 1..64 (0: chosen from the grid).
        check: False when the caller has just found ``unsupported_reason`` None
            (the dispatch in ``prhs_vllm.ops``: per layer, the host time counts).
    Returns:
        PageLogits (est, upper, lower), each [N, Hkv, G, M] float32 contiguous.
    Raises:
        ValueError: what of the tensors the op does not serve (``unsupported_reason``).
    """
    reason = unsupported_reason(query, key_sum, key_min, key_max) if check else None
    if reason is not None:
        raise ValueError(f"csrc page_logits does not serve {reason}")
    if not 0 <= iters <= _MAX_ITERS:
        raise ValueError(f"iters must be 0..{_MAX_ITERS}, got {iters}")
    num_rows, num_q_heads, _ = query.shape
    num_kv_heads = key_min.shape[1]
    if num_slots > 0 and block_table.shape[1] < num_slots:
        raise ValueError(f"block_table has {block_table.shape[1]} columns for {num_slots} slots")
    shape = (num_rows, num_kv_heads, num_q_heads // num_kv_heads, num_slots)
    est = torch.empty(shape, dtype=torch.float32, device=query.device)
    upper = torch.empty_like(est)
    lower = torch.empty_like(est)
    if est.numel() == 0:
        return PageLogits(est, upper, lower)
    quantized = isinstance(key_sum, QuantizedCentroids)
    _ops().page_logits(
        query,
        key_sum.codes if quantized else key_sum,
        key_min,
        key_max,
        block_table.to(torch.int32),
        seq_lens.to(torch.int32).contiguous(),
        None if skip is None else skip.to(torch.uint8),
        block_size,
        float(scale),
        8 if quantized else 0,
        iters,
        est,
        upper,
        lower,
    )
    return PageLogits(est, upper, lower)
