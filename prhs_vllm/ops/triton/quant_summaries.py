"""Triton version of ``prhs_vllm.ops.ref.quant.update_quantized_summaries``.

One launch, no sort, no host sync (CUDA-graph safe). Grid (T', head tiles):
the program of slot index t works only if t starts a run of slots on one page
(t == 0 or page(t - 1) != page(t), slot >= 0). It folds the run's keys
(at most ``block_size``) into float32 sum / min / max, decodes the page's old
centroid and box unless the run starts at offset 0, merges them as the
reference does, rounds the box outward to bfloat16 and encodes the centroid
again. The channels are processed as an even and an odd half, so the two
4-bit codes of one byte come out of one program.

Every float32 operation is the reference's, in its order, with IEEE division
(``div_rn``) and no mul-add fusion (``enable_fp_fusion=False``): against the
torch reference on CPU (interpreter) the result is bit-identical; on CUDA (it sums with
atomics, in another order, and divides by a scalar through its reciprocal)
codes may differ by one level.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from prhs_vllm.ops.ref.quant import QuantizedCentroids, code_bytes
from prhs_vllm.ops.triton.summaries import _tile


@triton.jit
def _outward_bf16_bits(x, ROUND_UP: tl.constexpr):
    """[..] float32 -> int32 holding the bf16 pattern of x rounded down (up).

    The same as the reference's round-to-nearest then one ulp outward when the
    rounded value moved inward: drop the low 16 bits (toward zero), then step the
    magnitude one ulp when bits were dropped and toward zero is inward (negative x
    rounded down, positive x rounded up). Covers +-0, subnormals, +-inf and
    finite values beyond the bf16 range (rounded to +-inf or +-max).
    """
    bits = x.to(tl.int32, bitcast=True)
    top = (bits >> 16) & 0xFFFF
    dropped = (bits & 0xFFFF) != 0
    if ROUND_UP:
        away = bits >= 0
    else:
        away = bits < 0
    return top + tl.where(dropped & away, 1, 0)


@triton.jit
def _bf16_bits_to_float(b):
    """int32 holding a bf16 pattern in its low 16 bits (any upper bits) -> float32."""
    return ((b & 0xFFFF) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _round_half_even(y):
    """torch.round for y >= 0: nearest integer, ties to even. Exact: y - floor(y)
    is representable for the y in [0, 255] it is used on."""
    f = tl.floor(y)
    d = y - f
    odd = (f.to(tl.int32) & 1) == 1
    up = (d > 0.5) | ((d == 0.5) & odd)
    return f.to(tl.int32) + tl.where(up, 1, 0)


@triton.jit
def _merge_encode(
    old_code, old_lo_bits, old_hi_bits, s, mn, mx, old_n, has_old, count, LEVELS: tl.constexpr
):
    """One half tile: (code int32, lo bf16 bits, hi bf16 bits), the reference's
    arithmetic in its order."""
    old_lo = _bf16_bits_to_float(old_lo_bits)
    old_hi = _bf16_bits_to_float(old_hi_bits)
    old_c = old_lo + tl.math.div_rn(old_code.to(tl.float32), LEVELS) * (old_hi - old_lo)
    old_c = tl.where(has_old, old_c, 0.0)
    lo = tl.where(has_old, tl.minimum(old_lo, mn), mn)
    hi = tl.where(has_old, tl.maximum(old_hi, mx), mx)
    centroid = tl.math.div_rn(old_c * tl.where(has_old, old_n, 0.0) + s, count)
    lo_bits = _outward_bf16_bits(lo, False)
    hi_bits = _outward_bf16_bits(hi, True)
    lo_b = _bf16_bits_to_float(lo_bits)
    width = _bf16_bits_to_float(hi_bits) - lo_b
    frac = tl.math.div_rn(centroid - lo_b, tl.maximum(width, 1e-30))
    frac = tl.where(width > 0, frac, 0.0)
    code = _round_half_even(tl.minimum(tl.maximum(frac, 0.0), 1.0) * LEVELS)
    return code, lo_bits, hi_bits


@triton.jit
def _update_quantized_kernel(
    key_ptr,
    slot_ptr,
    code_ptr,
    min_ptr,
    max_ptr,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_cp,
    stride_ch,
    stride_cb,
    stride_bp,
    stride_bh,
    stride_bd,
    num_slots,
    num_heads,
    head_dim,
    block_size,
    BITS: tl.constexpr,
    LEVELS: tl.constexpr,
    BLOCK_RUN: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HALF_D: tl.constexpr,
):
    """Grid (T', cdiv(H, BLOCK_H)): slot index t folds the run of slots it starts.

    The tile is [BLOCK_H, HALF_D] channel pairs: A = even channels, B = odd ones.
    """
    t = tl.program_id(0)
    # Run length: how many slots from t on share t's page (0 unless t starts a run).
    # Slots and pages are kept as vectors: the triton 3.9 interpreter mistypes a
    # scalar comparison broadcast into a mask.
    r = tl.arange(0, BLOCK_RUN)
    idx = t + r
    slot = tl.load(slot_ptr + idx, mask=idx < num_slots, other=-1).to(tl.int64)
    page = tl.where(slot >= 0, slot // block_size, -1)
    prev = tl.load(slot_ptr + (t - 1 + r * 0), mask=(r * 0 + t) > 0, other=-1).to(tl.int64)
    prev_page = tl.where(prev >= 0, prev // block_size, -1)
    first_slot = tl.max(tl.where(r == 0, slot, -1), axis=0)
    first_page = tl.max(tl.where(r == 0, page, -1), axis=0)
    start = (page >= 0) & (prev_page != first_page)
    same = (page == first_page) & (r < block_size) & start
    n = tl.min(tl.where(same, BLOCK_RUN, r), axis=0)
    if n > 0:
        h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        j = tl.arange(0, HALF_D)
        da = 2 * j
        db = 2 * j + 1
        mask_a = (h < num_heads)[:, None] & (da < head_dim)[None, :]
        mask_b = (h < num_heads)[:, None] & (db < head_dim)[None, :]
        key_a = key_ptr + h[:, None] * stride_kh + da[None, :] * stride_kd
        key_b = key_ptr + h[:, None] * stride_kh + db[None, :] * stride_kd
        sum_a = tl.zeros([BLOCK_H, HALF_D], tl.float32)
        sum_b = tl.zeros([BLOCK_H, HALF_D], tl.float32)
        min_a = tl.full([BLOCK_H, HALF_D], float("inf"), tl.float32)
        min_b = tl.full([BLOCK_H, HALF_D], float("inf"), tl.float32)
        max_a = tl.full([BLOCK_H, HALF_D], float("-inf"), tl.float32)
        max_b = tl.full([BLOCK_H, HALF_D], float("-inf"), tl.float32)
        for i in range(0, n):
            row = (t + i).to(tl.int64) * stride_kt
            ka = tl.load(key_a + row, mask=mask_a, other=0.0).to(tl.float32)
            kb = tl.load(key_b + row, mask=mask_b, other=0.0).to(tl.float32)
            sum_a += ka
            sum_b += kb
            min_a = tl.minimum(min_a, ka)
            min_b = tl.minimum(min_b, kb)
            max_a = tl.maximum(max_a, ka)
            max_b = tl.maximum(max_b, kb)

        # Tokens already in the page: the offset of its first new slot (0: reset).
        offset = first_slot % block_size
        has_old = (tl.zeros([BLOCK_H, HALF_D], tl.int64) + offset) > 0
        old_n = offset.to(tl.float32)
        count = old_n + n.to(tl.float32)
        pg = first_page
        box = pg * stride_bp + h[:, None] * stride_bh
        box_a = box + da[None, :] * stride_bd
        box_b = box + db[None, :] * stride_bd
        old_mask_a = mask_a & has_old
        old_mask_b = mask_b & has_old
        lo_a = tl.load(min_ptr + box_a, mask=old_mask_a, other=0).to(tl.int32)
        lo_b = tl.load(min_ptr + box_b, mask=old_mask_b, other=0).to(tl.int32)
        hi_a = tl.load(max_ptr + box_a, mask=old_mask_a, other=0).to(tl.int32)
        hi_b = tl.load(max_ptr + box_b, mask=old_mask_b, other=0).to(tl.int32)
        codes = code_ptr + pg * stride_cp + h[:, None] * stride_ch
        if BITS == 8:
            code_a = codes + da[None, :] * stride_cb
            code_b = codes + db[None, :] * stride_cb
            old_a = tl.load(code_a, mask=old_mask_a, other=0).to(tl.int32)
            old_b = tl.load(code_b, mask=old_mask_b, other=0).to(tl.int32)
        else:
            code_a = codes + j[None, :] * stride_cb
            byte = tl.load(code_a, mask=old_mask_a, other=0).to(tl.int32)
            old_a = byte & 0xF
            old_b = (byte >> 4) & 0xF

        new_a, lo_a, hi_a = _merge_encode(
            old_a, lo_a, hi_a, sum_a, min_a, max_a, old_n, has_old, count, LEVELS
        )
        new_b, lo_b, hi_b = _merge_encode(
            old_b, lo_b, hi_b, sum_b, min_b, max_b, old_n, has_old, count, LEVELS
        )
        tl.store(min_ptr + box_a, lo_a.to(tl.int16), mask=mask_a)
        tl.store(min_ptr + box_b, lo_b.to(tl.int16), mask=mask_b)
        tl.store(max_ptr + box_a, hi_a.to(tl.int16), mask=mask_a)
        tl.store(max_ptr + box_b, hi_b.to(tl.int16), mask=mask_b)
        if BITS == 8:
            tl.store(code_a, new_a.to(tl.uint8), mask=mask_a)
            tl.store(code_b, new_b.to(tl.uint8), mask=mask_b)
        else:
            tl.store(code_a, (new_a | (new_b << 4)).to(tl.uint8), mask=mask_a)


def update_quantized_summaries(
    key: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_size: int,
    centroids: QuantizedCentroids,
    key_min: torch.Tensor,
    key_max: torch.Tensor,
) -> None:
    """Fold newly written keys into quantized summaries, in place.

    Same contract as the torch reference (``ref.quant``): a page whose offset 0 is
    written in this call is reset (a new occupant), otherwise its old token count is
    the offset of its first new slot; slot -1 and key rows past ``len(slot_mapping)``
    are ignored.

    Assumes what vLLM guarantees: the slots of one page in one call form one
    contiguous run of ``slot_mapping`` in increasing offset order (each request's
    new tokens are written contiguously, in order; -1 padding may sit anywhere
    between runs). A page split over several runs is not merged (the runs race);
    the reference handles any order and stays the general oracle.

    Args:
        key: [T, H, D] keys of this step (any float dtype, any strides).
        slot_mapping: [T'] int, T' <= T, slot = page * block_size + offset; -1 = padding.
        block_size: tokens per page.
        centroids: codes [P, H, D * bits / 8] uint8 (int4: two codes a byte, the low
            nibble holds the even channel), bits 8 or 4.
        key_min, key_max: [P, H, D] bfloat16 boxes (+-inf marks an empty page), same
            strides, on the device of ``key``.
    """
    num_slots = slot_mapping.shape[0]
    if num_slots == 0:
        return
    num_heads, head_dim = key.shape[1], key.shape[2]
    codes, bits = centroids.codes, centroids.bits
    if key.shape[0] < num_slots:
        raise ValueError(f"key has {key.shape[0]} rows for {num_slots} slots")
    if bits not in (4, 8) or head_dim * bits % 8:
        raise ValueError(f"{bits}-bit codes of head_dim {head_dim} are not supported")
    for s in (key_min, key_max):
        if s.dtype != torch.bfloat16 or s.shape[1:] != (num_heads, head_dim):
            raise ValueError(f"box must be bfloat16 [P, {num_heads}, {head_dim}]")
    if key_max.stride() != key_min.stride() or key_max.shape != key_min.shape:
        raise ValueError("key_min and key_max must share shape and strides")
    want = (key_min.shape[0], num_heads, code_bytes(head_dim, bits))
    if codes.dtype != torch.uint8 or codes.shape != want:
        raise ValueError(f"codes must be uint8 {list(want)}")
    slot_mapping = slot_mapping.contiguous()
    block_h, block_d = _tile(num_heads, head_dim)
    grid = (num_slots, triton.cdiv(num_heads, block_h))
    # The boxes are read and written as raw bf16 bit patterns.
    box_min, box_max = key_min.view(torch.int16), key_max.view(torch.int16)
    _update_quantized_kernel[grid](
        key,
        slot_mapping,
        codes,
        box_min,
        box_max,
        *key.stride(),
        *codes.stride(),
        *key_min.stride(),
        num_slots,
        num_heads,
        head_dim,
        block_size,
        BITS=bits,
        LEVELS=(1 << bits) - 1,
        BLOCK_RUN=triton.next_power_of_2(block_size),
        BLOCK_H=block_h,
        HALF_D=max(1, block_d // 2),
        enable_fp_fusion=False,
    )
