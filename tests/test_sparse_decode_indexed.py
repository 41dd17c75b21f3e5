"""The indexed sparse decode reference (prhs_vllm.ops.ref.sparse_decode_indexed)
against the keep-mask reference (prhs_vllm.ops.ref.sparse_decode), which
tests/test_ops_ref.py checks against an fp64 oracle.

The input builders here are shared with tests/gpu/test_cuda_sparse_decode.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from tolerances import tol

from prhs_vllm.ops.ref.sparse_decode import sparse_paged_decode
from prhs_vllm.ops.ref.sparse_decode_indexed import compact_keep, sparse_paged_decode_indexed

GARBAGE = 1.0e4  # unwritten slots and unused pages: a leak shows up loudly


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def decode_tol(dtype: torch.dtype):
    """tests/tolerances.py has no float16 row yet; float16 rounds finer than
    bfloat16, so the bfloat16 row bounds it."""
    return tol(torch.bfloat16 if dtype == torch.float16 else dtype)


# --------------------------------------------------------------------------- inputs


def paged_inputs(
    gen,
    lens,
    num_kv_heads,
    group,
    head_dim,
    block_size,
    dtype,
    garbage=GARBAGE,
    fa_layout=False,
    spare_slots=2,
    device="cpu",
):
    """Random decode inputs over a paged cache with randomly permuted pages.

    Page 0 is the null page; unwritten slots and unused pages hold +garbage (K)
    and -garbage (V). Block-table rows have spare_slots slots past their last
    page (pointing at the null page). With fa_layout the caches are the views
    vLLM's FlashAttention backend hands over: [..., :D] and [..., D:] of a
    [P, Hkv, bs, 2D] view of a physical [P, bs, Hkv, 2D] tensor.

    Returns (query [N, Hq, D], key_cache, value_cache [P, Hkv, bs, D],
    block_table [N, M] int32, seq_lens [N] int32), all on `device` (the
    random values drawn there, from a generator seeded by `gen`).
    """
    pages_per_row = [cdiv(n, block_size) for n in lens]
    num_pages = 1 + sum(pages_per_row) + 3
    width = max(pages_per_row) + spare_slots
    table = torch.zeros(len(lens), width, dtype=torch.int32)
    free = torch.randperm(num_pages - 1, generator=gen) + 1
    written = torch.zeros(num_pages, block_size, dtype=torch.bool)
    start = 0
    for i, (n, count) in enumerate(zip(lens, pages_per_row, strict=True)):
        pages = free[start : start + count]
        start += count
        table[i, :count] = pages.to(torch.int32)
        tokens = torch.arange(count * block_size).view(count, block_size) < n
        written[pages] = tokens

    values_gen = torch.Generator(device).manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
    shape = (num_pages, num_kv_heads, block_size, head_dim)
    # A per-page offset makes pages differ in attention mass.
    offset = torch.randn(num_pages, num_kv_heads, 1, head_dim, generator=values_gen, device=device)
    key = torch.randn(shape, generator=values_gen, device=device) + offset
    value = torch.randn(shape, generator=values_gen, device=device)
    unwritten = ~written[:, None, :, None].to(device)
    key = key.masked_fill(unwritten, garbage).to(dtype)
    value = value.masked_fill(unwritten, -garbage).to(dtype)
    if fa_layout:
        physical = torch.cat([key, value], dim=-1).permute(0, 2, 1, 3).contiguous()
        logical = physical.permute(0, 2, 1, 3)  # [P, Hkv, bs, 2D] view
        key, value = logical[..., :head_dim], logical[..., head_dim:]
    query = torch.randn(
        len(lens), num_kv_heads * group, head_dim, generator=values_gen, device=device
    ).to(dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    return query, key, value, table.to(device), seq_lens


def valid_pages(seq_lens, num_kv_heads, num_slots, block_size):
    """[N, Hkv, M] bool: block-table slots that hold context."""
    pages = (seq_lens.long() + block_size - 1) // block_size
    valid = torch.arange(num_slots)[None, :] < pages[:, None]
    return valid[:, None, :].expand(-1, num_kv_heads, -1).clone()


def random_keep(gen, seq_lens, num_kv_heads, num_slots, block_size, fraction=0.4):
    """[N, Hkv, M] bool (on seq_lens' device): a random subset of the valid
    pages, at least one each."""
    valid = valid_pages(seq_lens.cpu(), num_kv_heads, num_slots, block_size)
    keep = valid & (torch.rand(valid.shape, generator=gen) < fraction)
    # One forced page per (row, head), anywhere in its context.
    pages = valid.sum(-1)
    forced = (torch.rand(pages.shape, generator=gen) * pages).long()
    keep.scatter_(-1, forced[..., None], True)
    return keep.to(seq_lens.device)


def trim_slots(kept_slots, num_kept, extra=1, pad=-1):
    """Cuts kept_slots [N, Hkv, M] to K = max(num_kept) + extra columns and
    writes `pad` into every entry from num_kept on."""
    width = min(int(num_kept.max()) + extra, kept_slots.shape[-1])
    trimmed = kept_slots[..., :width].clone()
    past = torch.arange(width, device=num_kept.device) >= num_kept[..., None]
    return trimmed.masked_fill(past, pad)


# --------------------------------------------------------------------------- compact_keep


def test_compact_keep_lists_kept_slots_in_order(gen):
    keep = torch.rand(3, 4, 11, generator=gen) < 0.3
    keep[1, 2] = False  # a (row, head) that keeps nothing
    keep[2, 0] = True  # one that keeps everything
    kept_slots, num_kept = compact_keep(keep)
    assert kept_slots.dtype == torch.int32 and kept_slots.shape == keep.shape
    assert num_kept.dtype == torch.int32 and num_kept.shape == keep.shape[:2]
    for n in range(keep.shape[0]):
        for h in range(keep.shape[1]):
            expect = keep[n, h].nonzero().flatten().tolist()
            count = int(num_kept[n, h])
            assert count == len(expect)
            assert kept_slots[n, h, :count].tolist() == expect
            assert (kept_slots[n, h, count:] == -1).all()


# --------------------------------------------------------------------------- decode

DTYPES = [
    pytest.param(d, id=str(d).removeprefix("torch."))
    for d in (torch.bfloat16, torch.float16, torch.float32)
]
GROUPS = [pytest.param(g, id=f"gqa{g}") for g in (1, 3, 4, 8)]
HEAD_DIMS = [pytest.param(d, id=f"d{d}") for d in (64, 128, 256)]
BLOCK_SIZES = [pytest.param(b, id=f"bs{b}") for b in (16, 32)]
LENS = [1, 17, 100, 161, 333]  # no multiple of 16 or 32


def assert_decode_close(out, lse, ref_out, ref_lse, dtype):
    t = decode_tol(dtype)
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref_out.float(), **t.close())
    torch.testing.assert_close(lse, ref_lse, atol=t.lse_atol, rtol=0)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("group", GROUPS)
def test_indexed_equals_keep_mask_reference(gen, group, head_dim, dtype, block_size):
    query, key, value, table, seq_lens = paged_inputs(
        gen, LENS, 2, group, head_dim, block_size, dtype
    )
    keep = random_keep(gen, seq_lens, 2, table.shape[1], block_size)
    kept_slots, num_kept = compact_keep(keep)
    scale = head_dim**-0.5

    out, lse = sparse_paged_decode_indexed(
        query, key, value, table, seq_lens, kept_slots, num_kept, scale
    )
    ref_out, ref_lse = sparse_paged_decode(query, key, value, table, seq_lens, keep, scale)
    assert_decode_close(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("pad", [pytest.param(-1, id="pad-1"), pytest.param(0, id="pad0")])
def test_trimmed_slot_lists_ignore_padding(gen, pad):
    """K < M; entries past num_kept are ignored whatever they hold."""
    dtype, block_size = torch.bfloat16, 16
    query, key, value, table, seq_lens = paged_inputs(gen, LENS, 2, 4, 64, block_size, dtype)
    keep = random_keep(gen, seq_lens, 2, table.shape[1], block_size, fraction=0.2)
    kept_slots, num_kept = compact_keep(keep)
    trimmed = trim_slots(kept_slots, num_kept, extra=2, pad=pad)
    assert trimmed.shape[-1] < table.shape[1]

    out, lse = sparse_paged_decode_indexed(
        query, key, value, table, seq_lens, trimmed, num_kept, 0.125
    )
    ref_out, ref_lse = sparse_paged_decode(query, key, value, table, seq_lens, keep, 0.125)
    assert_decode_close(out, lse, ref_out, ref_lse, dtype)


def test_pages_past_seq_len_are_invisible(gen):
    """Kept slots past a row's last page (null page, garbage) change nothing."""
    dtype, block_size = torch.float32, 16
    query, key, value, table, seq_lens = paged_inputs(gen, LENS, 2, 3, 64, block_size, dtype)
    keep = random_keep(gen, seq_lens, 2, table.shape[1], block_size)
    with_tail = keep.clone()
    with_tail[..., -1] = True  # a spare slot: always past the context
    out, lse = sparse_paged_decode_indexed(
        query, key, value, table, seq_lens, *compact_keep(with_tail), 0.125
    )
    ref_out, ref_lse = sparse_paged_decode(query, key, value, table, seq_lens, keep, 0.125)
    assert_decode_close(out, lse, ref_out, ref_lse, dtype)


def test_nothing_kept_gives_zero_and_minus_inf(gen):
    dtype, block_size, group = torch.float32, 16, 2
    query, key, value, table, seq_lens = paged_inputs(gen, LENS, 2, group, 64, block_size, dtype)
    keep = random_keep(gen, seq_lens, 2, table.shape[1], block_size)
    kept_slots, num_kept = compact_keep(keep)
    num_kept[1, 0] = 0
    out, lse = sparse_paged_decode_indexed(
        query, key, value, table, seq_lens, kept_slots, num_kept, 0.125
    )
    assert (out[1, :group] == 0).all() and (lse[1, :group] == -math.inf).all()
    ref_out, ref_lse = sparse_paged_decode(query, key, value, table, seq_lens, keep, 0.125)
    assert_decode_close(
        out[1, group:], lse[1, group:], ref_out[1, group:], ref_lse[1, group:], dtype
    )
    rows = [0, 2, 3, 4]
    assert_decode_close(out[rows], lse[rows], ref_out[rows], ref_lse[rows], dtype)


def test_nan_in_unwritten_slots_does_not_leak(gen):
    dtype, block_size = torch.bfloat16, 32
    args = (LENS, 2, 4, 128, block_size, dtype)
    seed = int(torch.randint(2**31, (1,), generator=gen))
    finite = paged_inputs(torch.Generator().manual_seed(seed), *args)
    poisoned = paged_inputs(torch.Generator().manual_seed(seed), *args, garbage=math.nan)
    keep = random_keep(gen, finite[4], 2, finite[3].shape[1], block_size)
    keep[..., -1] = True  # and a kept slot past the context
    slots = compact_keep(keep)
    out, lse = sparse_paged_decode_indexed(*poisoned, *slots, 0.1)
    ref_out, ref_lse = sparse_paged_decode_indexed(*finite, *slots, 0.1)
    assert out.isfinite().all()
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


def test_flash_attention_cache_view_and_out_argument(gen):
    dtype, block_size, head_dim = torch.bfloat16, 16, 128
    args = (LENS, 2, 4, head_dim, block_size, dtype)
    seed = int(torch.randint(2**31, (1,), generator=gen))
    plain = paged_inputs(torch.Generator().manual_seed(seed), *args)
    strided = paged_inputs(torch.Generator().manual_seed(seed), *args, fa_layout=True)
    assert not strided[1].is_contiguous() and strided[1].stride(2) == 2 * 2 * head_dim
    slots = compact_keep(random_keep(gen, plain[4], 2, plain[3].shape[1], block_size))

    out = torch.full_like(plain[0], math.nan)
    result, lse = sparse_paged_decode_indexed(*strided, *slots, 0.1, out=out)
    ref_out, ref_lse = sparse_paged_decode_indexed(*plain, *slots, 0.1)
    assert result is out
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
