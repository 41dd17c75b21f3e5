"""Triton version of ``prhs_vllm.ops.ref.summaries.update_page_summaries``.

Two launches on one stream, no host sync: the first resets every page whose
offset 0 is written in this call, the second folds the keys in with atomics
(several tokens of one call may land on the same page).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elements of one program's [BLOCK_H, BLOCK_D] tile.
_TILE = 1024


@triton.jit
def _reset_fresh_pages_kernel(
    slot_ptr,
    sum_ptr,
    min_ptr,
    max_ptr,
    stride_sp,
    stride_sh,
    stride_sd,
    num_heads,
    head_dim,
    block_size,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (T', cdiv(H, BLOCK_H)): token t resets its page if it sits at offset 0."""
    t = tl.program_id(0)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    # The slot is tested as a [BLOCK_H] vector: the triton 3.9 interpreter mistypes
    # a scalar comparison broadcast into a mask.
    slot = tl.zeros([BLOCK_H], tl.int64) + tl.load(slot_ptr + t).to(tl.int64)
    fresh = (h < num_heads) & (slot >= 0) & (slot % block_size == 0)
    mask = fresh[:, None] & (d < head_dim)[None, :]
    page = tl.where(fresh, slot // block_size, 0)
    dst = page[:, None] * stride_sp + h[:, None] * stride_sh + d[None, :] * stride_sd
    tl.store(sum_ptr + dst, tl.zeros([BLOCK_H, BLOCK_D], tl.float32), mask=mask)
    tl.store(min_ptr + dst, tl.full([BLOCK_H, BLOCK_D], float("inf"), tl.float32), mask=mask)
    tl.store(max_ptr + dst, tl.full([BLOCK_H, BLOCK_D], float("-inf"), tl.float32), mask=mask)


@triton.jit
def _accumulate_kernel(
    key_ptr,
    slot_ptr,
    sum_ptr,
    min_ptr,
    max_ptr,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_sp,
    stride_sh,
    stride_sd,
    num_heads,
    head_dim,
    block_size,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (T', cdiv(H, BLOCK_H)): fold key row t into its page's sum / min / max."""
    t = tl.program_id(0)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    slot = tl.zeros([BLOCK_H], tl.int64) + tl.load(slot_ptr + t).to(tl.int64)
    valid = (h < num_heads) & (slot >= 0)
    mask = valid[:, None] & (d < head_dim)[None, :]
    src = t.to(tl.int64) * stride_kt + h[:, None] * stride_kh + d[None, :] * stride_kd
    k = tl.load(key_ptr + src, mask=mask, other=0.0).to(tl.float32)
    page = tl.where(valid, slot // block_size, 0)
    dst = page[:, None] * stride_sp + h[:, None] * stride_sh + d[None, :] * stride_sd
    # Triton lowers float atomic_min/max to signed/unsigned integer atomics split on
    # the sign bit, which is exact for non-NaN float32 (+-inf included).
    tl.atomic_add(sum_ptr + dst, k, mask=mask, sem="relaxed")
    tl.atomic_min(min_ptr + dst, k, mask=mask, sem="relaxed")
    tl.atomic_max(max_ptr + dst, k, mask=mask, sem="relaxed")


def _tile(num_heads: int, head_dim: int) -> tuple[int, int]:
    block_d = triton.next_power_of_2(head_dim)
    block_h = min(triton.next_power_of_2(num_heads), max(1, _TILE // block_d))
    return block_h, block_d


def update_page_summaries(
    key: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_size: int,
    key_sum: torch.Tensor,
    key_min: torch.Tensor,
    key_max: torch.Tensor,
) -> None:
    """Fold newly written keys into the summaries of their pages, in place.

    Same contract as the torch reference: a page whose offset 0 is written in
    this call is reset first; slot -1 and key rows past ``len(slot_mapping)``
    are ignored. The float32 sums are accumulated in an unspecified order.

    Args:
        key: [T, H, D] keys of this step (any float dtype, any strides).
        slot_mapping: [T'] int, T' <= T, slot = page * block_size + offset; -1 = padding.
        block_size: tokens per page.
        key_sum, key_min, key_max: [P, H, D] float32 page summaries, same strides,
            on the device of ``key``.
    """
    num_slots = slot_mapping.shape[0]
    if num_slots == 0:
        return
    num_heads, head_dim = key.shape[1], key.shape[2]
    if key.shape[0] < num_slots:
        raise ValueError(f"key has {key.shape[0]} rows for {num_slots} slots")
    for s in (key_sum, key_min, key_max):
        if s.dtype != torch.float32 or s.shape[1:] != (num_heads, head_dim):
            raise ValueError(f"summary must be float32 [P, {num_heads}, {head_dim}]")
        if s.stride() != key_sum.stride():
            raise ValueError("key_sum, key_min and key_max must share strides")
    slot_mapping = slot_mapping.contiguous()
    block_h, block_d = _tile(num_heads, head_dim)
    grid = (num_slots, triton.cdiv(num_heads, block_h))
    strides = (*key_sum.stride(),)
    _reset_fresh_pages_kernel[grid](
        slot_mapping,
        key_sum,
        key_min,
        key_max,
        *strides,
        num_heads,
        head_dim,
        block_size,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
    )
    _accumulate_kernel[grid](
        key,
        slot_mapping,
        key_sum,
        key_min,
        key_max,
        *key.stride(),
        *strides,
        num_heads,
        head_dim,
        block_size,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
    )
