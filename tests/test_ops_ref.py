"""The reference ops (prhs_vllm.ops.ref) against independent fp64 oracles.

The oracles here rebuild each row's contiguous K/V from the paged cache through
the block table, one page at a time, and do the math in float64 loops.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from tolerances import tol

from prhs_vllm.ops.ref import (
    SelectionParams,
    dropped_mass_upper_bound,
    page_logits,
    select_pages,
    sparse_paged_decode,
    update_page_summaries,
)
from prhs_vllm.ops.ref.selection import rank_logits

NULL_PAGE = 0
GARBAGE = 1.0e4  # fills the null page and unwritten slots: leaks show up loudly


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tensors here are tiny: intra-op threads only add wake-up latency (3x slower
    on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------- inputs


def random_block_table(gen, seq_lens, block_size, num_pages, width=None):
    """Disjoint random pages (never the null page 0) per row, zero-padded.

    Returns (block_table [N, width] int32, pages_of_row list[list[int]]).
    """
    need = [cdiv(n, block_size) for n in seq_lens]
    assert sum(need) <= num_pages - 1, "not enough pages"
    free = (torch.randperm(num_pages - 1, generator=gen) + 1).tolist()
    width = width or max(need)
    table = torch.full((len(seq_lens), width), NULL_PAGE, dtype=torch.int32)
    rows = []
    for i, n in enumerate(need):
        pages, free = free[:n], free[n:]
        table[i, :n] = torch.tensor(pages, dtype=torch.int32)
        rows.append(pages)
    return table, rows


def random_paged_kv(gen, seq_lens, num_kv_heads, head_dim, block_size, dtype, spare_pages=3):
    """Random K/V cache [P, Hkv, bs, D] holding the rows' contexts; the null page,
    unused pages and the tails of last pages hold GARBAGE."""
    num_pages = 1 + sum(cdiv(n, block_size) for n in seq_lens) + spare_pages
    shape = (num_pages, num_kv_heads, block_size, head_dim)
    key_cache = torch.full(shape, GARBAGE, dtype=dtype)
    value_cache = torch.full(shape, -GARBAGE, dtype=dtype)
    table, rows = random_block_table(gen, seq_lens, block_size, num_pages)
    for n, pages in zip(seq_lens, rows, strict=True):
        for j, page in enumerate(pages):
            count = min(block_size, n - j * block_size)
            # A per-page offset makes pages differ in attention mass.
            offset = torch.randn(num_kv_heads, 1, head_dim, generator=gen)
            key_cache[page, :, :count] = (
                torch.randn(num_kv_heads, count, head_dim, generator=gen) + offset
            ).to(dtype)
            value_cache[page, :, :count] = torch.randn(
                num_kv_heads, count, head_dim, generator=gen
            ).to(dtype)
    return key_cache, value_cache, table


# --------------------------------------------------------------------------- oracles


def contiguous_context(cache, pages_row, seq_len, block_size):
    """[L, H, D] float64: a row's tokens in order, gathered page by page."""
    parts = []
    for j in range(cdiv(seq_len, block_size)):
        count = min(block_size, seq_len - j * block_size)
        page = int(pages_row[j])
        parts.append(cache[page, :, :count].transpose(0, 1).to(torch.float64))
    return torch.cat(parts)


def oracle_decode(query, key_cache, value_cache, block_table, seq_lens, scale, keep=None):
    """Loop-based fp64 decode attention, optionally over the kept pages only.

    Returns (out [N, Hq, D], lse [N, Hq], weights: list of [Hq, L] per row), all fp64.
    """
    num_rows, num_q_heads, head_dim = query.shape
    num_kv_heads, block_size = key_cache.shape[1], key_cache.shape[2]
    group = num_q_heads // num_kv_heads
    out = torch.zeros(num_rows, num_q_heads, head_dim, dtype=torch.float64)
    lse = torch.zeros(num_rows, num_q_heads, dtype=torch.float64)
    weights = []
    for n in range(num_rows):
        length = int(seq_lens[n])
        keys = contiguous_context(key_cache, block_table[n], length, block_size)
        values = contiguous_context(value_cache, block_table[n], length, block_size)
        page_of_token = torch.arange(length) // block_size
        row_weights = torch.zeros(num_q_heads, length, dtype=torch.float64)
        for hq in range(num_q_heads):
            h = hq // group
            logits = scale * (keys[:, h] @ query[n, hq].to(torch.float64))
            if keep is not None:
                logits = logits.masked_fill(~keep[n, h, page_of_token], -math.inf)
            lse[n, hq] = torch.logsumexp(logits, 0)
            w = torch.exp(logits - lse[n, hq])
            out[n, hq] = w @ values[:, h]
            row_weights[hq] = w
        weights.append(row_weights)
    return out, lse, weights


def oracle_summaries(key_cache, block_table, seq_lens):
    """fp64 sum / min / max of the written keys of every page in use.

    Returns {page: (sum [H, D], min [H, D], max [H, D])}.
    """
    block_size = key_cache.shape[2]
    result = {}
    for n in range(len(seq_lens)):
        length = int(seq_lens[n])
        for j in range(cdiv(length, block_size)):
            count = min(block_size, length - j * block_size)
            page = int(block_table[n, j])
            keys = key_cache[page, :, :count].to(torch.float64)  # [H, count, D]
            result[page] = (keys.sum(1), keys.amin(1), keys.amax(1))
    return result


def summaries_of(key_cache, block_table, seq_lens):
    """float32 summary tensors built from the oracle (for select_pages inputs)."""
    num_pages, num_kv_heads, _, head_dim = key_cache.shape
    key_sum = torch.full((num_pages, num_kv_heads, head_dim), GARBAGE)
    key_min = torch.full_like(key_sum, GARBAGE)
    key_max = torch.full_like(key_sum, -GARBAGE)
    for page, (s, lo, hi) in oracle_summaries(key_cache, block_table, seq_lens).items():
        key_sum[page], key_min[page], key_max[page] = s.float(), lo.float(), hi.float()
    return key_sum, key_min, key_max


# --------------------------------------------------------------------------- update_page_summaries


class SummaryOracle:
    """Tracks, per page, the keys written since the page's last offset-0 write."""

    def __init__(self):
        self.keys: dict[int, list[torch.Tensor]] = {}

    def write(self, key, slot_mapping, block_size):
        """Mirror one update_page_summaries call (same arguments)."""
        fresh = set()
        for slot in slot_mapping.tolist():
            if slot >= 0 and slot % block_size == 0:
                fresh.add(slot // block_size)
        for page in fresh:
            self.keys[page] = []
        for t, slot in enumerate(slot_mapping.tolist()):
            if slot >= 0:
                self.keys.setdefault(slot // block_size, []).append(key[t].to(torch.float64))

    def check(self, key_sum, key_min, key_max, dtype):
        t = tol(dtype)
        for page in range(key_sum.shape[0]):
            keys = self.keys.get(page)
            if not keys:
                assert torch.all(key_sum[page] == 0), f"page {page} was never written"
                assert torch.all(key_min[page] == math.inf), f"page {page}"
                assert torch.all(key_max[page] == -math.inf), f"page {page}"
                continue
            stacked = torch.stack(keys)
            torch.testing.assert_close(
                key_sum[page].double(),
                stacked.sum(0),
                atol=t.sum_atol,
                rtol=0,
                msg=lambda m, page=page: f"key_sum of page {page}: {m}",
            )
            # min / max of float32 copies of the keys are exact.
            assert torch.equal(key_min[page].double(), stacked.amin(0)), f"key_min of page {page}"
            assert torch.equal(key_max[page].double(), stacked.amax(0)), f"key_max of page {page}"


def empty_summaries(num_pages, num_kv_heads, head_dim):
    shape = (num_pages, num_kv_heads, head_dim)
    return (
        torch.zeros(shape),
        torch.full(shape, math.inf),
        torch.full(shape, -math.inf),
    )


def slots_for(pages, start, count, block_size):
    """Slot ids of tokens start .. start+count-1 of a request on ``pages``."""
    pos = torch.arange(start, start + count)
    return torch.tensor(pages)[pos // block_size] * block_size + pos % block_size


SUMMARY_DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


@pytest.mark.parametrize("dtype", SUMMARY_DTYPES)
def test_summaries_several_requests_permuted_pages(gen, dtype):
    block_size, num_kv_heads, head_dim, num_pages = 16, 2, 32, 40
    lens = [5, 16, 47, 90]  # partial page, exact page, several pages
    table, rows = random_block_table(gen, lens, block_size, num_pages)
    key = torch.randn(sum(lens), num_kv_heads, head_dim, generator=gen).to(dtype)
    slots = torch.cat([slots_for(p, 0, n, block_size) for p, n in zip(rows, lens, strict=True)])
    # Shuffle the token order within the batch: the op must not assume sorted slots
    # beyond "offset 0 is in the same call or an earlier one".
    order = torch.randperm(len(slots), generator=gen)
    key, slots = key[order], slots[order]

    summaries = empty_summaries(num_pages, num_kv_heads, head_dim)
    update_page_summaries(key, slots, block_size, *summaries)

    oracle = SummaryOracle()
    oracle.write(key, slots, block_size)
    oracle.check(*summaries, dtype)
    assert NULL_PAGE not in oracle.keys


@pytest.mark.parametrize("dtype", SUMMARY_DTYPES)
def test_summaries_recycled_page_forgets_old_occupant(gen, dtype):
    block_size, num_kv_heads, head_dim, num_pages = 16, 2, 32, 12
    summaries = empty_summaries(num_pages, num_kv_heads, head_dim)
    oracle = SummaryOracle()

    old_pages = [7, 3, 9]
    key_a = torch.randn(40, num_kv_heads, head_dim, generator=gen).to(dtype)
    slots_a = slots_for(old_pages, 0, 40, block_size)
    update_page_summaries(key_a, slots_a, block_size, *summaries)
    oracle.write(key_a, slots_a, block_size)

    # Request A is freed; B reuses page 3 (fully written by A) and page 9 (partly
    # written by A), writing fewer tokens than A did, in a later call.
    new_pages = [3, 9]
    key_b = (torch.randn(20, num_kv_heads, head_dim, generator=gen) * 0.1).to(dtype)
    slots_b = slots_for(new_pages, 0, 20, block_size)
    update_page_summaries(key_b, slots_b, block_size, *summaries)
    oracle.write(key_b, slots_b, block_size)

    oracle.check(*summaries, dtype)
    # Directly: page 3 holds exactly B's first 16 keys, nothing of A.
    expected = key_b[:16].float()
    torch.testing.assert_close(summaries[0][3], expected.sum(0), atol=tol(dtype).sum_atol, rtol=0)
    assert torch.equal(summaries[1][3], expected.amin(0))
    assert torch.equal(summaries[2][3], expected.amax(0))


@pytest.mark.parametrize("dtype", SUMMARY_DTYPES)
def test_summaries_ignore_padding_slots_and_extra_key_rows(gen, dtype):
    block_size, num_kv_heads, head_dim, num_pages = 16, 2, 32, 10
    pages = [4, 2]
    real = 21
    key = torch.randn(real + 7, num_kv_heads, head_dim, generator=gen).to(dtype)
    slots = slots_for(pages, 0, real, block_size)
    # Interleave -1 padding slots; their key rows hold huge values.
    pad_at = torch.tensor([0, 5, 13])
    slot_mapping = torch.full((real + len(pad_at),), -1, dtype=torch.long)
    is_real = torch.ones(len(slot_mapping), dtype=torch.bool)
    is_real[pad_at] = False
    slot_mapping[is_real] = slots
    key[: len(slot_mapping)][~is_real] = torch.tensor(GARBAGE, dtype=dtype)
    # Rows past len(slot_mapping) (4 of them) are padding too.
    key[len(slot_mapping) :] = torch.tensor(-GARBAGE, dtype=dtype)

    summaries = empty_summaries(num_pages, num_kv_heads, head_dim)
    update_page_summaries(key, slot_mapping, block_size, *summaries)

    oracle = SummaryOracle()
    oracle.write(key[: len(slot_mapping)], slot_mapping, block_size)
    oracle.check(*summaries, dtype)
    assert summaries[2][pages].abs().max() < GARBAGE / 10


@pytest.mark.parametrize("dtype", SUMMARY_DTYPES)
@pytest.mark.parametrize(
    "chunks",
    [
        pytest.param([1] * 37, id="one-token-per-call"),
        pytest.param([10, 6, 21], id="chunk-ends-on-page-boundary"),
        pytest.param([3, 30, 4], id="chunks-straddle-pages"),
    ],
)
def test_summaries_chunked_writes_equal_single_write(gen, dtype, chunks):
    block_size, num_kv_heads, head_dim, num_pages = 16, 2, 32, 8
    pages = [5, 1, 6]
    total = sum(chunks)
    key = torch.randn(total, num_kv_heads, head_dim, generator=gen).to(dtype)
    slots = slots_for(pages, 0, total, block_size)

    once = empty_summaries(num_pages, num_kv_heads, head_dim)
    update_page_summaries(key, slots, block_size, *once)

    chunked = empty_summaries(num_pages, num_kv_heads, head_dim)
    start = 0
    for n in chunks:
        update_page_summaries(
            key[start : start + n], slots[start : start + n], block_size, *chunked
        )
        start += n

    for a, b, name in zip(once, chunked, ("key_sum", "key_min", "key_max"), strict=True):
        torch.testing.assert_close(
            b, a, atol=tol(dtype).sum_atol, rtol=0, msg=lambda m, name=name: f"{name}: {m}"
        )
    oracle = SummaryOracle()
    oracle.write(key, slots, block_size)
    oracle.check(*chunked, dtype)


# --------------------------------------------------------------------------- sparse_paged_decode

DECODE_DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float32, id="fp32")]
GROUPS = [pytest.param(g, id=f"gqa{g}") for g in (1, 3, 4)]
HEAD_DIMS = [pytest.param(d, id=f"d{d}") for d in (32, 64)]
DECODE_LENS = [1, 15, 17, 100, 161]  # no multiple of the block size (16)
BLOCK_SIZE = 16


def decode_inputs(gen, group, head_dim, dtype, lens=DECODE_LENS, num_kv_heads=2):
    key_cache, value_cache, table = random_paged_kv(
        gen, lens, num_kv_heads, head_dim, BLOCK_SIZE, dtype
    )
    query = torch.randn(len(lens), num_kv_heads * group, head_dim, generator=gen).to(dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    return query, key_cache, value_cache, table, seq_lens


def valid_pages(seq_lens, num_kv_heads, num_slots, block_size=BLOCK_SIZE):
    """[N, Hkv, M] bool, page slots holding context."""
    pages = (seq_lens.long() + block_size - 1) // block_size
    valid = torch.arange(num_slots)[None, :] < pages[:, None]
    return valid[:, None, :].expand(-1, num_kv_heads, -1).clone()


@pytest.mark.parametrize("dtype", DECODE_DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("group", GROUPS)
def test_sparse_decode_keep_all_equals_dense(gen, group, head_dim, dtype):
    query, key_cache, value_cache, table, seq_lens = decode_inputs(gen, group, head_dim, dtype)
    scale = head_dim**-0.5
    keep = valid_pages(seq_lens, key_cache.shape[1], table.shape[1])

    out, lse = sparse_paged_decode(query, key_cache, value_cache, table, seq_lens, keep, scale)
    ref_out, ref_lse, _ = oracle_decode(query, key_cache, value_cache, table, seq_lens, scale)

    t = tol(dtype)
    assert out.dtype == dtype and out.shape == query.shape
    assert lse.dtype == torch.float32 and lse.shape == query.shape[:2]
    torch.testing.assert_close(out.double(), ref_out, **t.close())
    torch.testing.assert_close(lse.double(), ref_lse, atol=t.lse_atol, rtol=0)


@pytest.mark.parametrize("dtype", DECODE_DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("group", GROUPS)
def test_sparse_decode_random_keep_equals_restricted_oracle(gen, group, head_dim, dtype):
    query, key_cache, value_cache, table, seq_lens = decode_inputs(gen, group, head_dim, dtype)
    scale = head_dim**-0.5
    num_kv_heads = key_cache.shape[1]
    valid = valid_pages(seq_lens, num_kv_heads, table.shape[1])
    keep = valid & (torch.rand(valid.shape, generator=gen) < 0.4)
    # At least one page per (row, head); invalid slots set in keep must be ignored
    # only where the caller says so, so keep them False here.
    last = ((seq_lens.long() + BLOCK_SIZE - 1) // BLOCK_SIZE - 1)[:, None].expand(-1, num_kv_heads)
    no_page = ~keep.any(-1)
    keep[no_page.nonzero(as_tuple=True) + (last[no_page],)] = True
    assert (keep.sum(-1) < valid.sum(-1)).any(), "the mask should drop something"

    out, lse = sparse_paged_decode(query, key_cache, value_cache, table, seq_lens, keep, scale)
    ref_out, ref_lse, _ = oracle_decode(
        query, key_cache, value_cache, table, seq_lens, scale, keep=keep
    )
    dense_out, _, _ = oracle_decode(query, key_cache, value_cache, table, seq_lens, scale)

    t = tol(dtype)
    torch.testing.assert_close(out.double(), ref_out, **t.close())
    torch.testing.assert_close(lse.double(), ref_lse, atol=t.lse_atol, rtol=0)
    # The restriction matters: the result is not the dense one.
    assert not torch.allclose(out.double(), dense_out, **t.close())


def test_sparse_decode_keep_per_kv_head(gen):
    """KV heads of one row may keep different pages; query heads follow their group."""
    dtype, group, head_dim = torch.float32, 2, 32
    query, key_cache, value_cache, table, seq_lens = decode_inputs(
        gen, group, head_dim, dtype, lens=[80], num_kv_heads=3
    )
    keep = torch.zeros(1, 3, table.shape[1], dtype=torch.bool)
    keep[0, 0, [0]] = True
    keep[0, 1, [1, 4]] = True
    keep[0, 2, :] = True
    scale = head_dim**-0.5
    out, lse = sparse_paged_decode(query, key_cache, value_cache, table, seq_lens, keep, scale)
    ref_out, ref_lse, _ = oracle_decode(query, key_cache, value_cache, table, seq_lens, scale, keep)
    torch.testing.assert_close(out.double(), ref_out, **tol(dtype).close())
    torch.testing.assert_close(lse.double(), ref_lse, atol=tol(dtype).lse_atol, rtol=0)


# --------------------------------------------------------------------------- select_pages

SELECT_BS = 16
SELECT_LENS = [1, 16, 17, 130, 333, 700]


def selection_inputs(gen, group=3, head_dim=32, num_kv_heads=2, lens=SELECT_LENS, peaky=True):
    key_cache, _, table = random_paged_kv(
        gen, lens, num_kv_heads, head_dim, SELECT_BS, torch.float32
    )
    num_q = num_kv_heads * group
    query = torch.randn(len(lens), num_q, head_dim, generator=gen)
    if peaky:  # a spread of query norms: flat and concentrated attention
        query = query * torch.empty(len(lens), num_q, 1).uniform_(0.3, 3.0, generator=gen)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    summaries = summaries_of(key_cache, table, lens)
    return query, key_cache, table, seq_lens, summaries


def estimated_masses(query, summaries, table, seq_lens, params, ranking=True):
    """Recomputed [N, Hkv, M] page masses (group mean), fp64: those that rank
    pages (the estimator's), or those the delta rule sums (the centroid's)."""
    num_slots = table.shape[1]
    logits = page_logits(
        query, *summaries, table, seq_lens, params.block_size, params.scale, num_slots
    )
    if ranking and params.estimator == "hybrid":
        return torch.maximum(
            torch.softmax(logits.est.double(), dim=-1).mean(dim=2),
            torch.softmax(rank_logits(logits, "bound").double(), dim=-1).mean(dim=2),
        )
    chosen = rank_logits(logits, params.estimator) if ranking else logits.est
    return torch.softmax(chosen.double(), dim=-1).mean(dim=2)


def mandatory_mask(seq_lens, num_slots, params):
    """Sink pages and the last max(1, ceil(local / bs)) pages, per row: [N, M]."""
    rows = []
    for length in seq_lens.tolist():
        num_pages = cdiv(length, params.block_size)
        sink = cdiv(params.sink_tokens, params.block_size)
        local = max(1, cdiv(params.local_tokens, params.block_size))
        row = [j < num_pages and (j < sink or j >= num_pages - local) for j in range(num_slots)]
        rows.append(row)
    return torch.tensor(rows, dtype=torch.bool)


SINK_LOCAL = [
    pytest.param((0, 0), id="no-sink-no-local"),
    pytest.param((16, 48), id="sink16-local48"),
    pytest.param((40, 100), id="sink40-local100"),
]


@pytest.mark.parametrize("estimator", ["centroid", "quest", "bound", "hybrid"])
@pytest.mark.parametrize("block_pages", [1, 2, 4], ids=lambda b: f"bp{b}")
@pytest.mark.parametrize("sink_local", SINK_LOCAL)
@pytest.mark.parametrize("delta", [0.0, 0.05, 0.3], ids=lambda d: f"delta{d:g}")
@pytest.mark.parametrize("budget", [0.1, 0.25, 0.5, 1.0], ids=lambda b: f"budget{b:g}")
def test_select_pages_properties(gen, budget, delta, sink_local, block_pages, estimator):
    query, _, table, seq_lens, summaries = selection_inputs(gen)
    sink_tokens, local_tokens = sink_local
    params = SelectionParams(
        block_size=SELECT_BS,
        scale=32**-0.5,
        budget=budget,
        delta=delta,
        sink_tokens=sink_tokens,
        local_tokens=local_tokens,
        block_pages=block_pages,
        estimator=estimator,
    )
    sel = select_pages(query, *summaries, table, seq_lens, params)
    keep = sel.keep
    num_rows, num_kv_heads, num_slots = keep.shape
    num_pages = [cdiv(n, SELECT_BS) for n in seq_lens.tolist()]
    assert num_slots == max(num_pages)
    assert sel.num_pages.tolist() == num_pages

    valid = valid_pages(seq_lens, num_kv_heads, num_slots, SELECT_BS)
    must = mandatory_mask(seq_lens, num_slots, params)[:, None, :].expand_as(keep)
    optional = valid & ~must
    mass = estimated_masses(query, summaries, table, seq_lens, params)
    stop_mass = estimated_masses(query, summaries, table, seq_lens, params, ranking=False)
    t = tol(torch.float32)

    # Mandatory pages kept; nothing beyond the context.
    assert keep[must].all(), "a sink / local page was dropped"
    assert not keep[~valid].any(), "a page past the context was kept"
    # The recomputed estimate (centroid masses, whatever ranks) agrees with the op's.
    torch.testing.assert_close(
        sel.est_kept_mass.double(), (stop_mass * keep).sum(-1), atol=1e-5, rtol=0
    )

    # Kept count under the cap (sinks and the local window may exceed it).
    cap = torch.tensor([math.ceil(Fraction(budget) * p) for p in num_pages])[:, None]
    kept = keep.sum(-1)
    must_count = must.sum(-1)
    over = kept > torch.maximum(cap, must_count)
    assert not over.any(), f"over the cap at (row, head) {over.nonzero().tolist()}"

    # Aligned blocks of block_pages pages, over optional pages only.
    num_blocks = cdiv(num_slots, block_pages)
    pad = num_blocks * block_pages - num_slots

    def blocks(x):
        return torch.nn.functional.pad(x, (0, pad)).view(num_rows, num_kv_heads, num_blocks, -1)

    opt_count = blocks(optional.long()).sum(-1)
    kept_opt_count = blocks((keep & optional).long()).sum(-1)
    score = blocks(mass * optional).sum(-1)
    split = (kept_opt_count > 0) & (kept_opt_count < opt_count)
    assert not split.any(), f"blocks kept in part at {split.nonzero().tolist()}"
    kept_block = kept_opt_count > 0
    dropped_block = (opt_count > 0) & ~kept_block

    # The kept optional blocks are those of highest estimated mass (ties allowed).
    min_kept = torch.where(kept_block, score, math.inf).amin(-1)
    max_dropped = torch.where(dropped_block, score, -math.inf).amax(-1)
    wrong = min_kept < max_dropped - t.mass_atol
    assert not wrong.any(), (
        f"a dropped block out-masses a kept one at {wrong.nonzero().tolist()}: "
        f"kept {min_kept[wrong].tolist()} dropped {max_dropped[wrong].tolist()}"
    )

    # Cap not binding (every dropped block would still fit): the estimated kept
    # mass reached 1 - delta.
    fits = torch.where(dropped_block, kept[..., None] + opt_count <= cap[..., None], True)
    free = fits.all(-1)
    short = free & (sel.est_kept_mass < 1 - delta - t.mass_atol)
    assert not short.any(), (
        f"kept mass < 1 - delta without the cap binding at {short.nonzero().tolist()}"
    )
    if budget == 1.0:
        assert free.all(), "the cap cannot bind at budget 1"
    if delta == 0:
        # Filling up to the cap: the best dropped block was dropped for not fitting.
        best = torch.where(dropped_block, score, -math.inf).argmax(-1, keepdim=True)
        best_fits = kept + opt_count.gather(-1, best).squeeze(-1) <= cap
        bad = dropped_block.any(-1) & best_fits
        assert not bad.any(), f"stopped below the cap with delta 0 at {bad.nonzero().tolist()}"


@pytest.mark.parametrize("estimator", ["centroid", "quest", "bound", "hybrid"])
@pytest.mark.parametrize("block_pages", [1, 2, 4], ids=lambda b: f"bp{b}")
def test_select_pages_full_budget_keeps_everything(gen, block_pages, estimator):
    query, _, table, seq_lens, summaries = selection_inputs(gen)
    params = SelectionParams(
        block_size=SELECT_BS,
        scale=32**-0.5,
        budget=1.0,
        delta=0.0,
        sink_tokens=0,
        local_tokens=0,
        block_pages=block_pages,
        estimator=estimator,
    )
    sel = select_pages(query, *summaries, table, seq_lens, params)
    valid = valid_pages(seq_lens, sel.keep.shape[1], sel.keep.shape[2], SELECT_BS)
    assert torch.equal(sel.keep, valid)
    torch.testing.assert_close(
        sel.est_kept_mass, torch.ones_like(sel.est_kept_mass), atol=1e-5, rtol=0
    )


def test_select_pages_delta_stops_early_on_concentrated_attention(gen):
    """budget 1 never binds, so delta alone decides: concentrated attention keeps
    few pages, yet at least 1 - delta of the estimated mass."""
    delta = 0.2
    query, _, table, seq_lens, summaries = selection_inputs(gen, lens=[333, 700, 512])
    query = query * 6.0  # sharpen
    params = SelectionParams(
        block_size=SELECT_BS,
        scale=32**-0.5,
        budget=1.0,
        delta=delta,
        sink_tokens=0,
        local_tokens=0,
    )
    sel = select_pages(query, *summaries, table, seq_lens, params)
    valid = valid_pages(seq_lens, sel.keep.shape[1], sel.keep.shape[2], SELECT_BS)
    assert (sel.keep.sum(-1) < valid.sum(-1)).all(), "delta should have stopped the fill"
    assert (sel.est_kept_mass >= 1 - delta - tol(torch.float32).mass_atol).all()


# --------------------------------------------------------------------------- certified bound


def true_dropped_mass(weights, keep, seq_lens, block_size, group):
    """[N, Hkv] fp64: mean over the group of the dense attention mass on dropped pages."""
    num_rows, num_kv_heads = keep.shape[:2]
    result = torch.zeros(num_rows, num_kv_heads, dtype=torch.float64)
    for n in range(num_rows):
        page_of_token = torch.arange(int(seq_lens[n])) // block_size
        for h in range(num_kv_heads):
            dropped = ~keep[n, h, page_of_token]
            w = weights[n][h * group : (h + 1) * group]
            result[n, h] = (w * dropped).sum(-1).mean()
    return result


def adversarial_cache(gen, kind, key_cache, table, seq_lens, query, block_size):
    """Make a 'kind' of hard case in place."""
    if kind == "large-norm-keys":
        key_cache.mul_(8.0)
    elif kind == "spike-token":
        # One token per row whose key is aligned with the row's first query head
        # and large: its page's centroid barely moves, its mass dominates.
        for n, length in enumerate(seq_lens.tolist()):
            pos = int(torch.randint(0, length, (1,), generator=gen))
            page = int(table[n, pos // block_size])
            for h in range(key_cache.shape[1]):
                q = query[n, h * (query.shape[1] // key_cache.shape[1])]
                key_cache[page, h, pos % block_size] = 6.0 * q / q.norm() * q.shape[0] ** 0.5
    elif kind == "uniform-pages":
        # All keys of a page equal: the Quest box is a point, so the bound is exact.
        for n, length in enumerate(seq_lens.tolist()):
            for j in range(cdiv(length, block_size)):
                page = int(table[n, j])
                key_cache[page] = key_cache[page, :, :1].clone()
    elif kind == "gaussian":
        pass
    else:
        raise ValueError(kind)


@pytest.mark.parametrize("seed", range(6), ids=lambda s: f"seed{s}")
@pytest.mark.parametrize("keep_from", ["select_pages", "random-mask"])
@pytest.mark.parametrize("kind", ["gaussian", "large-norm-keys", "spike-token", "uniform-pages"])
def test_dropped_mass_upper_bound_is_certified(gen, kind, keep_from, seed):
    group, head_dim, num_kv_heads = 2, 32, 2
    lens = [45, 200, 417]
    key_cache, value_cache, table = random_paged_kv(
        gen, lens, num_kv_heads, head_dim, BLOCK_SIZE, torch.float32
    )
    query = torch.randn(len(lens), num_kv_heads * group, head_dim, generator=gen)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    adversarial_cache(gen, kind, key_cache, table, seq_lens, query, BLOCK_SIZE)
    summaries = summaries_of(key_cache, table, lens)
    scale = head_dim**-0.5
    params = SelectionParams(
        block_size=BLOCK_SIZE,
        scale=scale,
        budget=0.3,
        delta=0.05,
        sink_tokens=16,
        local_tokens=16,
    )
    sel = select_pages(query, *summaries, table, seq_lens, params)
    keep = sel.keep
    if keep_from == "random-mask":
        valid = valid_pages(seq_lens, num_kv_heads, keep.shape[2])
        keep = valid & (torch.rand(valid.shape, generator=gen) < 0.5)
        keep[:, :, 0] = True
    _, lse = sparse_paged_decode(query, key_cache, value_cache, table, seq_lens, keep, scale)
    bound = dropped_mass_upper_bound(sel.bound_logits, keep, lse.view(len(lens), num_kv_heads, -1))

    _, _, weights = oracle_decode(query, key_cache, value_cache, table, seq_lens, scale)
    true = true_dropped_mass(weights, keep, seq_lens, BLOCK_SIZE, group)
    assert true.max() > 1e-3, "nothing dropped: the case tests nothing"
    slack = tol(torch.float32).bound_rtol
    violations = bound.double() < true * (1 - slack)
    assert not violations.any(), (
        f"bound below the true dropped mass at {violations.nonzero().tolist()}: "
        f"bound {bound[violations].tolist()} true {true[violations].tolist()}"
    )
    assert (bound <= 1).all() and (bound >= 0).all()
    if kind == "uniform-pages":  # the bound is tight
        torch.testing.assert_close(bound.double(), true, rtol=slack, atol=1e-6)


@pytest.mark.parametrize("block_pages", [1, 4], ids=lambda b: f"bp{b}")
def test_dropped_mass_upper_bound_zero_when_nothing_dropped(gen, block_pages):
    query, key_cache, value_cache, table, seq_lens = decode_inputs(gen, 2, 32, torch.float32)
    summaries = summaries_of(key_cache, table, seq_lens.tolist())
    scale = 32**-0.5
    params = SelectionParams(
        block_size=BLOCK_SIZE,
        scale=scale,
        budget=1.0,
        delta=0.0,
        sink_tokens=0,
        local_tokens=0,
        block_pages=block_pages,
    )
    sel = select_pages(query, *summaries, table, seq_lens, params)
    _, lse = sparse_paged_decode(query, key_cache, value_cache, table, seq_lens, sel.keep, scale)
    bound = dropped_mass_upper_bound(
        sel.bound_logits, sel.keep, lse.view(len(seq_lens), key_cache.shape[1], -1)
    )
    assert torch.equal(bound, torch.zeros_like(bound))
