"""Triton page scoring: ``page_logits`` (same contract as
``prhs_vllm.ops.ref.selection.page_logits``) and ``group_page_mass``, the
group-mean softmax that ``select_pages`` ranks pages by.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from prhs_vllm.ops.ref.quant import QuantizedCentroids, code_bytes
from prhs_vllm.ops.ref.selection import PageLogits


@triton.jit
def _page_logits_kernel(
    q_ptr,
    sum_ptr,
    min_ptr,
    max_ptr,
    table_ptr,
    len_ptr,
    est_ptr,
    upper_ptr,
    lower_ptr,
    skip_ptr,
    stride_qn,
    stride_qh,
    stride_qd,
    stride_sp,
    stride_sh,
    stride_sd,
    stride_cp,
    stride_ch,
    stride_tn,
    stride_tm,
    stride_on,
    stride_oh,
    stride_og,
    stride_kn,
    stride_kh,
    num_slots,
    head_dim,
    block_size,
    scale,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_SKIP: tl.constexpr,
    CODE_BITS: tl.constexpr,
):
    """Grid (N, cdiv(M, BLOCK_M), Hkv): BLOCK_M page slots of row n, KV head h.

    Each page summary is read once and scored against all GROUP query heads.
    CODE_BITS 0: sum_ptr is the float32 key sum; 8 or 4: it holds the
    centroid codes (strides stride_cp, stride_ch; bytes contiguous).
    With HAS_SKIP, a (row, head) whose skip flag is set reads nothing and
    gets -inf (its selection is reused from an earlier step).
    """
    n = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    h = tl.program_id(2).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    in_row = j < num_slots
    seq_len = tl.load(len_ptr + n).to(tl.int32)
    count = tl.minimum(tl.maximum(seq_len - j * block_size, 0), block_size)
    live = in_row & (count > 0)
    # A tile wholly past the context (the step graphs score a whole context
    # bucket) reads nothing and only writes -inf.
    dead_tile = tl.program_id(1) * BLOCK_M * block_size >= seq_len
    # Slots past the context hold no page id worth reading (null or stale pages).
    page = tl.load(table_ptr + n * stride_tn + j * stride_tm, mask=live, other=0).to(tl.int64)
    d_ok = d < head_dim
    n_tok = count.to(tl.float32)
    log_n = tl.log(tl.maximum(n_tok, 1.0))
    neg_inf = tl.full([BLOCK_M], float("-inf"), tl.float32)
    out = n * stride_on + h * stride_oh + j
    dead = dead_tile
    if HAS_SKIP:  # a skipped (row, head) reads nothing either
        dead = dead | (tl.load(skip_ptr + n * stride_kn + h * stride_kh).to(tl.int32) != 0)
    if dead:
        for g in tl.static_range(GROUP):
            dst = out + g * stride_og
            tl.store(est_ptr + dst, neg_inf, mask=in_row)
            tl.store(upper_ptr + dst, neg_inf, mask=in_row)
            tl.store(lower_ptr + dst, neg_inf, mask=in_row)
    else:
        tile_mask = live[:, None] & d_ok[None, :]
        src = page[:, None] * stride_sp + h * stride_sh + d[None, :] * stride_sd
        k_min = tl.load(min_ptr + src, mask=tile_mask, other=0.0).to(tl.float32)
        k_max = tl.load(max_ptr + src, mask=tile_mask, other=0.0).to(tl.float32)
        if CODE_BITS == 0:  # float32 running sum
            k_sum = tl.load(sum_ptr + src, mask=tile_mask, other=0.0)
            est_scale = scale / tl.maximum(n_tok, 1.0)
        else:  # quantized centroid: codes in the page's own box (ref.quant)
            code_src = page[:, None] * stride_cp + h * stride_ch + (d * CODE_BITS // 8)[None, :]
            code = tl.load(sum_ptr + code_src, mask=tile_mask, other=0).to(tl.int32)
            if CODE_BITS == 4:
                code = (code >> ((d % 2) * 4)[None, :]) & 0xF
            levels: tl.constexpr = (1 << CODE_BITS) - 1
            k_sum = k_min + code.to(tl.float32) / levels * (k_max - k_min)
            est_scale = scale + tl.zeros([BLOCK_M], tl.float32)
        for g in tl.static_range(GROUP):
            q = tl.load(
                q_ptr + n * stride_qn + (h * GROUP + g) * stride_qh + d * stride_qd,
                mask=d_ok,
                other=0.0,
            ).to(tl.float32)
            est = tl.sum(k_sum * q[None, :], axis=1) * est_scale + log_n
            at_min = q[None, :] * k_min
            at_max = q[None, :] * k_max
            upper = scale * tl.sum(tl.maximum(at_min, at_max), axis=1) + log_n
            lower = scale * tl.sum(tl.minimum(at_min, at_max), axis=1) + log_n
            dst = out + g * stride_og
            tl.store(est_ptr + dst, tl.where(live, est, neg_inf), mask=in_row)
            tl.store(upper_ptr + dst, tl.where(live, upper, neg_inf), mask=in_row)
            tl.store(lower_ptr + dst, tl.where(live, lower, neg_inf), mask=in_row)


def _page_logits_config(head_dim: int) -> tuple[int, int]:
    """(BLOCK_M, num_warps): ~2K float32 per summary tile keeps three tiles in
    registers (an H100 sweep: docs/results.md)."""
    return max(8, 2048 // triton.next_power_of_2(head_dim)), 4


def page_logits(
    query: torch.Tensor,
    key_sum: torch.Tensor,
    key_min: torch.Tensor,
    key_max: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    scale: float,
    num_slots: int,
    skip: torch.Tensor | None = None,
) -> PageLogits:
    """Per page and query head: centroid estimate and box bounds of the log-mass.

    est = scale * q.(sum / n) + log n, upper = scale * sum_d max(q_d min_d, q_d max_d)
    + log n, lower = the same with min, with n = clamp(L - j * block_size, 0,
    block_size) tokens in slot j.

    Args:
        query: [N, Hq, D] (any float dtype, any strides); Hq a multiple of Hkv.
        key_sum, key_min, key_max: [P, Hkv, D] float32 page summaries, same strides;
            or key_sum a QuantizedCentroids and key_min / key_max bfloat16 boxes.
        block_table: [N, >=M] int page ids; seq_lens: [N] int.
        block_size: tokens per page; scale: softmax scale; num_slots: M.
        skip: [N, Hkv] bool, (row, head) pairs not to score (their outputs are -inf).
    Returns:
        PageLogits (est, upper, lower), each [N, Hkv, G, M] float32 contiguous;
        -inf on empty page slots.
    """
    block_m, num_warps = _page_logits_config(query.shape[2])
    return _page_logits(
        query,
        key_sum,
        key_min,
        key_max,
        block_table,
        seq_lens,
        block_size,
        scale,
        num_slots,
        skip=skip,
        block_m=block_m,
        num_warps=num_warps,
    )


def _page_logits(
    query,
    key_sum,
    key_min,
    key_max,
    block_table,
    seq_lens,
    block_size,
    scale,
    num_slots,
    skip=None,
    *,
    block_m: int,
    num_warps: int,
):
    """``page_logits`` with explicit launch parameters (tests and benchmark sweeps)."""
    num_rows, num_q_heads, head_dim = query.shape
    num_kv_heads = key_min.shape[1]
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads for {num_kv_heads} KV heads")
    group = num_q_heads // num_kv_heads
    if key_min.shape[2] != head_dim:
        raise ValueError(f"summaries have head_dim {key_min.shape[2]}, query {head_dim}")
    if isinstance(key_sum, QuantizedCentroids):
        bits, codes = key_sum.bits, key_sum.codes
        if codes.shape[2] != code_bytes(head_dim, bits) or codes.stride(2) != 1:
            raise ValueError(f"codes must be [P, Hkv, {code_bytes(head_dim, bits)}] uint8")
        sums, code_strides = codes, codes.stride()[:2]
    else:
        bits, sums, code_strides = 0, key_sum, (0, 0)
        if key_sum.stride() != key_min.stride():
            raise ValueError("key_sum, key_min and key_max must share strides")
    if key_max.stride() != key_min.stride():
        raise ValueError("key_sum, key_min and key_max must share strides")
    if num_slots > 0 and block_table.shape[1] < num_slots:
        raise ValueError(f"block_table has {block_table.shape[1]} columns for {num_slots} slots")
    shape = (num_rows, num_kv_heads, group, num_slots)
    est = torch.empty(shape, dtype=torch.float32, device=query.device)
    upper = torch.empty(shape, dtype=torch.float32, device=query.device)
    lower = torch.empty(shape, dtype=torch.float32, device=query.device)
    if est.numel() == 0:
        return PageLogits(est, upper, lower)
    grid = (num_rows, triton.cdiv(num_slots, block_m), num_kv_heads)
    if skip is not None:
        skip = skip.to(torch.uint8)  # bool pointers are not loadable everywhere
    _page_logits_kernel[grid](
        query,
        sums,
        key_min,
        key_max,
        block_table,
        seq_lens,
        est,
        upper,
        lower,
        est if skip is None else skip,  # any pointer when unused
        *query.stride(),
        *key_min.stride(),
        *code_strides,
        *block_table.stride(),
        *est.stride()[:3],
        *((0, 0) if skip is None else skip.stride()),
        num_slots,
        head_dim,
        block_size,
        float(scale),
        GROUP=group,
        BLOCK_M=block_m,
        BLOCK_D=triton.next_power_of_2(head_dim),
        HAS_SKIP=skip is not None,
        CODE_BITS=bits,
        num_warps=num_warps,
    )
    return PageLogits(est, upper, lower)


@triton.jit
def _mass_partials_kernel(
    x_ptr,
    max_ptr,
    sum_ptr,
    stride_xn,
    stride_xh,
    stride_xg,
    stride_xm,
    num_kv_heads,
    num_slots,
    num_chunks,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Grid (N * Hkv, C): max and sum of exp(x - max) of each query head over one chunk.

    Partials are [N * Hkv, BLOCK_G, C] float32.
    """
    pid = tl.program_id(0)
    c = tl.program_id(1)
    n = (pid // num_kv_heads).to(tl.int64)
    h = (pid % num_kv_heads).to(tl.int64)
    g = tl.arange(0, BLOCK_G)
    j = c * BLOCK_M + tl.arange(0, BLOCK_M)
    mask = (g < GROUP)[:, None] & (j < num_slots)[None, :]
    src = n * stride_xn + h * stride_xh + g[:, None] * stride_xg + j[None, :] * stride_xm
    x = tl.load(x_ptr + src, mask=mask, other=float("-inf"))
    chunk_max = tl.max(x, axis=1)
    # An all -inf chunk is shifted by 0 so that its sum is 0, not nan.
    shift = tl.where(chunk_max == float("-inf"), 0.0, chunk_max)
    chunk_sum = tl.sum(tl.exp(x - shift[:, None]), axis=1)
    dst = (pid.to(tl.int64) * BLOCK_G + g) * num_chunks + c
    tl.store(max_ptr + dst, chunk_max)
    tl.store(sum_ptr + dst, chunk_sum)


@triton.jit
def _mass_normalize_kernel(
    x_ptr,
    max_ptr,
    sum_ptr,
    out_ptr,
    stride_xn,
    stride_xh,
    stride_xg,
    stride_xm,
    stride_on,
    stride_oh,
    num_kv_heads,
    num_slots,
    num_chunks,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Grid (N * Hkv, C): combine the partials of every chunk, normalize one chunk,
    average over the group."""
    pid = tl.program_id(0)
    c = tl.program_id(1)
    n = (pid // num_kv_heads).to(tl.int64)
    h = (pid % num_kv_heads).to(tl.int64)
    g = tl.arange(0, BLOCK_G)
    g_ok = g < GROUP
    cc = tl.arange(0, BLOCK_C)
    part = (pid.to(tl.int64) * BLOCK_G + g[:, None]) * num_chunks + cc[None, :]
    part_mask = g_ok[:, None] & (cc < num_chunks)[None, :]
    part_max = tl.load(max_ptr + part, mask=part_mask, other=float("-inf"))
    part_sum = tl.load(sum_ptr + part, mask=part_mask, other=0.0)
    row_max = tl.max(part_max, axis=1)
    # An all -inf row has row_max = -inf: its sum and masses are nan, as torch.softmax.
    row_sum = tl.sum(part_sum * tl.exp(part_max - row_max[:, None]), axis=1)

    j = c * BLOCK_M + tl.arange(0, BLOCK_M)
    mask = g_ok[:, None] & (j < num_slots)[None, :]
    src = n * stride_xn + h * stride_xh + g[:, None] * stride_xg + j[None, :] * stride_xm
    x = tl.load(x_ptr + src, mask=mask, other=float("-inf"))
    p = tl.exp(x - row_max[:, None]) / row_sum[:, None]
    mass = tl.sum(tl.where(g_ok[:, None], p, 0.0), axis=0) / GROUP
    tl.store(out_ptr + n * stride_on + h * stride_oh + j, mass, mask=j < num_slots)


def group_page_mass(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over page slots per query head, averaged over the GQA group.

    Same values as ``torch.softmax(logits, -1).mean(2)`` (nan for a row that is
    all -inf, as torch gives). Two launches over chunks of page slots, so that
    a single long row still spreads over many programs.

    Args:
        logits: [N, Hkv, G, M] float32 page log-masses (``page_logits`` fields).
    Returns:
        [N, Hkv, M] float32 contiguous.
    """
    block_g = triton.next_power_of_2(max(logits.shape[2], 1))
    block_m = min(max(triton.next_power_of_2(logits.shape[3]), 16), max(16, 2048 // block_g))
    return _group_page_mass(logits, block_m=block_m, num_warps=4)


def _group_page_mass(logits: torch.Tensor, *, block_m: int, num_warps: int) -> torch.Tensor:
    """``group_page_mass`` with explicit launch parameters (tests and benchmark sweeps)."""
    if logits.dtype != torch.float32 or logits.dim() != 4:
        raise ValueError(f"expected float32 [N, Hkv, G, M], got {logits.dtype} {logits.shape}")
    num_rows, num_kv_heads, group, num_slots = logits.shape
    device = logits.device
    out = torch.empty((num_rows, num_kv_heads, num_slots), dtype=torch.float32, device=device)
    if out.numel() == 0:
        return out
    if group == 0:
        return out.fill_(float("nan"))
    block_g = triton.next_power_of_2(group)
    num_chunks = triton.cdiv(num_slots, block_m)
    part_max = torch.empty(
        (num_rows * num_kv_heads, block_g, num_chunks), dtype=torch.float32, device=device
    )
    part_sum = torch.empty_like(part_max)
    grid = (num_rows * num_kv_heads, num_chunks)
    meta = {"GROUP": group, "BLOCK_G": block_g, "BLOCK_M": block_m, "num_warps": num_warps}
    _mass_partials_kernel[grid](
        logits, part_max, part_sum, *logits.stride(), num_kv_heads, num_slots, num_chunks, **meta
    )
    _mass_normalize_kernel[grid](
        logits,
        part_max,
        part_sum,
        out,
        *logits.stride(),
        *out.stride()[:2],
        num_kv_heads,
        num_slots,
        num_chunks,
        BLOCK_C=triton.next_power_of_2(num_chunks),
        **meta,
    )
    return out
