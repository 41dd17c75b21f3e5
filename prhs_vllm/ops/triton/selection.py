"""Triton selection: ``select_compact`` (same contract as
``prhs_vllm.ops.ref.compact_selection.select_compact``) in one launch per
block size -- group masses, top-k under the budget cap, top-p under the delta
rule, the keep mask, the compacted slot list and the dropped-estimate
log-sum-exp, with no sort.

One program owns one (row, KV head) and holds its page slots in registers as
an [NB, BP] tile (BP pages per block, lanes padded to a power of 2). The
reference takes blocks in order of rank mass (ties: lower block first) while
the pages through the block fit under the cap and the estimated dropped mass
before it (the weights of every page not fixed, less those taken) is above
delta: a prefix of the ranked order. The kernel finds the prefix by bisection
over the float32 bit patterns of the block masses (non-negative, so the
patterns sort as the values): the smallest t with every block above t inside
the cap and the weight of the blocks above t below open weight - delta.
Blocks above t are taken; blocks exactly at t are then taken in index order
by a prefix sum, with the rules applied block by block, as the reference does.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from prhs_vllm.ops.ref.compact_selection import require_supported
from prhs_vllm.ops.ref.selection import (
    ESTIMATORS,
    PageLogits,
    Selection,
    SelectionParams,
    _block_sizes,
)

_KEY_MAX = tl.constexpr(0x7F800001)  # bits of +inf, plus one: above every block key


@triton.jit
def _group_mass(x, valid, GROUP: tl.constexpr):
    """exp(x - max) / sum over the tile, divided by GROUP; 0 where the tile is all -inf."""
    m = tl.max(tl.max(tl.where(valid, x, float("-inf")), axis=1), axis=0)
    shift = tl.where(m == float("-inf"), 0.0, m)
    p = tl.where(valid, tl.exp(x - shift), 0.0)
    total = tl.sum(tl.sum(p, axis=1), axis=0)
    return tl.where(total > 0, p / tl.where(total > 0, total, 1.0), 0.0) / GROUP


@triton.jit
def _tight_bound(est, upper, lower):
    """``ref.mean_constrained_bound`` elementwise."""
    width = upper - lower
    live = (upper > float("-inf")) & (upper < float("inf")) & (width > 1e-4)
    safe = tl.where(live, width, 1.0)
    p = tl.minimum(tl.maximum((est - lower) / safe, 0.0), 1.0)
    tight = upper + tl.log(p + (1.0 - p) * tl.exp(-safe))
    return tl.where(live, tl.minimum(tight, upper), upper)


@triton.jit
def _centroid_and_dropped(est, tight, valid, alpha, GROUP: tl.constexpr, RAISE: tl.constexpr):
    """One query head's (``_group_mass(est)``, ``ref.dropped_page_weights``
    term), sharing the tile's max and sum: the centroid's normalized mass, and
    exp(min(0, raised log-mass - log of the tile's centroid total)), each / GROUP."""
    x = tl.where(valid, est, float("-inf"))
    m = tl.max(tl.max(x, axis=1), axis=0)
    shift = tl.where(m == float("-inf"), 0.0, m)
    p = tl.where(valid, tl.exp(x - shift), 0.0)
    total = tl.sum(tl.sum(p, axis=1), axis=0)
    centroid = tl.where(total > 0, p / tl.where(total > 0, total, 1.0), 0.0) / GROUP
    log_z = shift + tl.log(tl.where(total > 0, total, 1.0))
    raised = est
    if RAISE:
        raised = est + alpha * tl.where(est > float("-inf"), tight - est, 0.0)
    share = tl.minimum(raised - log_z, 0.0)
    dropped = tl.where(total > 0, tl.where(valid, tl.exp(share), 0.0), 0.0) / GROUP
    return centroid, dropped


@triton.jit
def _select_kernel(
    est_ptr,
    upper_ptr,
    lower_ptr,
    len_ptr,
    frac_ptr,
    prev_ptr,
    heads_ptr,
    keep_ptr,
    slots_ptr,
    count_ptr,
    kept_mass_ptr,
    over_ptr,
    bound_lse_ptr,
    stride_ln,
    stride_lh,
    stride_lg,
    stride_lm,
    stride_pn,
    stride_ph,
    stride_pm,
    num_kv_heads,
    num_slots,
    block_size,
    sink_pages,
    local_pages,
    delta,
    alpha,
    GROUP: tl.constexpr,
    BP: tl.constexpr,
    BP_POW2: tl.constexpr,
    NB: tl.constexpr,
    ESTIMATOR: tl.constexpr,
    USE_DELTA: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    HAS_PREV: tl.constexpr,
    HAS_HEADS: tl.constexpr,
    WITH_BOUND: tl.constexpr,
    RAISE: tl.constexpr,
    DENSE_OVER: tl.constexpr,
):
    """Grid (N, heads of this block size). Outputs are contiguous: keep [N, Hkv, M]
    uint8, slots [N, Hkv, M] int32, count, kept_mass and over [N, Hkv], bound_lse
    [N, Hkv, GROUP] (the dropped estimate's). RAISE: alpha > 0; DENSE_OVER: a
    capped (row, head) keeps every page."""
    n = tl.program_id(0).to(tl.int64)
    if HAS_HEADS:
        h = tl.load(heads_ptr + tl.program_id(1)).to(tl.int64)
    else:
        h = tl.program_id(1).to(tl.int64)
    blk = tl.arange(0, NB)
    lane = tl.arange(0, BP_POW2)[None, :]
    slot = blk[:, None] * BP + lane  # [NB, BP_POW2]; lanes >= BP are padding
    in_row = (lane < BP) & (slot < num_slots)

    seq_len = tl.load(len_ptr + n).to(tl.int32)
    num_pages = (seq_len + block_size - 1) // block_size
    valid = in_row & (slot < num_pages)
    must = valid & ((slot < sink_pages) | (slot >= num_pages - local_pages))
    candidate = valid & ~must
    budget = tl.load(frac_ptr)  # float64: the cap is ceil(budget * pages) as in torch
    if USE_WINDOW:  # PSAW
        limit = tl.floor(seq_len.to(tl.float64) * tl.load(frac_ptr + 1)).to(tl.int32)
        candidate = candidate & ((slot + 1) * block_size > limit)
    fixed = must
    if HAS_PREV:  # ETF
        limit = tl.floor(seq_len.to(tl.float64) * tl.load(frac_ptr + 2)).to(tl.int32)
        frozen = candidate & ((slot + 1) * block_size <= limit)
        prev = tl.load(
            prev_ptr + n * stride_pn + h * stride_ph + slot * stride_pm, mask=in_row, other=0
        )
        fixed = fixed | (frozen & (prev != 0))
        candidate = candidate & ~frozen
    cap = tl.ceil(budget * num_pages.to(tl.float64)).to(tl.int32)

    base = n * stride_ln + h * stride_lh + slot * stride_lm
    stop = tl.zeros([NB, BP_POW2], tl.float32)  # dropped-page weights
    centroid = tl.zeros([NB, BP_POW2], tl.float32)
    rank = tl.zeros([NB, BP_POW2], tl.float32)
    for g in tl.static_range(GROUP):
        est = tl.load(est_ptr + base + g * stride_lg, mask=in_row, other=float("-inf"))
        upper = est
        lower = est
        if ESTIMATOR >= 1 or RAISE:
            upper = tl.load(upper_ptr + base + g * stride_lg, mask=in_row, other=float("-inf"))
        if ESTIMATOR >= 2 or RAISE:
            lower = tl.load(lower_ptr + base + g * stride_lg, mask=in_row, other=float("-inf"))
        tight = est
        if ESTIMATOR >= 2 or RAISE:
            tight = _tight_bound(est, upper, lower)
        head_centroid, head_dropped = _centroid_and_dropped(est, tight, in_row, alpha, GROUP, RAISE)
        stop += head_dropped
        centroid += head_centroid
        if ESTIMATOR == 1:  # quest
            rank += _group_mass(upper, in_row, GROUP)
        elif ESTIMATOR >= 2:  # bound, hybrid
            rank += _group_mass(tight, in_row, GROUP)
    if ESTIMATOR == 0:
        rank = centroid
    elif ESTIMATOR == 3:
        rank = tl.maximum(centroid, rank)

    # Blocks: rank mass, candidate pages and estimated mass of their candidates.
    block_rank = tl.sum(tl.where(candidate, rank, 0.0), axis=1)
    block_pages = tl.sum(candidate.to(tl.int32), axis=1)
    block_stop = tl.sum(tl.where(candidate, stop, 0.0), axis=1)
    eligible = block_pages > 0
    # Masses are >= 0, so their bit patterns order as the values; 0 = not eligible.
    key = tl.where(eligible, block_rank.to(tl.int32, bitcast=True) + 1, 0)
    room = cap - tl.sum(tl.sum(fixed.to(tl.int32), axis=1), axis=0)
    # Take blocks while the estimated dropped mass (the weights of every page
    # not fixed, less those taken) is above delta.
    open_weight = tl.sum(tl.sum(tl.where(valid & ~fixed, stop, 0.0), axis=1), axis=0)
    limit_mass = open_weight - delta

    # Smallest t whose blocks above t all fit: within the cap, and (delta rule)
    # with their estimated mass below 1 - delta. Bisection, 31 rounds of one
    # block-wide reduction (wider searches were slower: docs/results.md).
    lo = tl.zeros([], tl.int32)
    hi = tl.full([], _KEY_MAX, tl.int32)
    for _ in range(31):
        mid = lo + (hi - lo) // 2
        above = key > mid
        ok = tl.sum(tl.where(above, block_pages, 0), axis=0) <= room
        if USE_DELTA:
            ok = ok & (tl.sum(tl.where(above, block_stop, 0.0), axis=0) < limit_mass)
        hi = tl.where(ok, mid, hi)
        lo = tl.where(ok, lo, mid + 1)
    above = key > hi
    taken_pages = tl.sum(tl.where(above, block_pages, 0), axis=0)
    taken_mass = tl.sum(tl.where(above, block_stop, 0.0), axis=0)
    # Blocks tied at hi, in index order: the reference's rules, block by block.
    tied = (key == hi) & eligible
    pages_through = taken_pages + tl.cumsum(tl.where(tied, block_pages, 0), axis=0)
    take = above | (tied & (pages_through <= room))
    if USE_DELTA:
        tied_mass = tl.where(tied, block_stop, 0.0)
        mass_before = taken_mass + tl.cumsum(tied_mass, axis=0) - tied_mass
        take = above | (tied & (pages_through <= room) & (mass_before < limit_mass))

    # The cap stopped the fill while the stop rule asked for more: a block is
    # left out and (delta rule) the estimate after the taken blocks is above delta.
    left = tl.sum(tl.where(eligible & ~take, 1, 0), axis=0) > 0
    if USE_DELTA:
        taken_weight = tl.sum(tl.where(take, block_stop, 0.0), axis=0)
        left = left & (taken_weight < limit_mass)
    keep = fixed | (candidate & take[:, None])
    if DENSE_OVER:
        keep = tl.where(left, valid, keep)
    row_head = n * num_kv_heads + h
    tl.store(over_ptr + row_head, left.to(tl.uint8))
    out = row_head * num_slots + slot
    keep_i = keep.to(tl.int32)
    tl.store(keep_ptr + out, keep_i.to(tl.uint8), mask=in_row)
    kept = tl.sum(tl.sum(keep_i, axis=1), axis=0)
    tl.store(count_ptr + row_head, kept)
    dropped_weight = tl.sum(tl.sum(tl.where(valid & ~keep, stop, 0.0), axis=1), axis=0)
    tl.store(kept_mass_ptr + row_head, 1.0 - tl.minimum(dropped_weight, 1.0))
    # Compaction: kept slots ascending (block-major order is slot order), then -1.
    per_block = tl.sum(keep_i, axis=1)
    pos = (tl.cumsum(per_block, axis=0) - per_block)[:, None] + tl.cumsum(keep_i, axis=1) - 1
    tl.store(slots_ptr + row_head * num_slots + pos, slot, mask=keep)
    tl.store(slots_ptr + out, tl.full([NB, BP_POW2], -1, tl.int32), mask=in_row & (slot >= kept))

    if WITH_BOUND:  # log-sum-exp of the raised log-masses over the dropped pages
        _store_dropped_estimate(
            est_ptr, upper_ptr, lower_ptr, bound_lse_ptr, base, stride_lg, in_row, keep,
            row_head, alpha, GROUP, RAISE,
        )  # fmt: skip


@triton.jit
def _store_dropped_estimate(
    est_ptr, upper_ptr, lower_ptr, bound_lse_ptr, base, stride_lg, in_row, keep, row_head,
    alpha, GROUP: tl.constexpr, RAISE: tl.constexpr,
):  # fmt: skip
    """bound_lse[row_head, g] = log-sum-exp over the dropped slots of the
    raised log-masses (``ref.raised_logits``)."""
    for g in tl.static_range(GROUP):
        x = tl.load(est_ptr + base + g * stride_lg, mask=in_row, other=float("-inf"))
        if RAISE:
            upper = tl.load(upper_ptr + base + g * stride_lg, mask=in_row, other=float("-inf"))
            lower = tl.load(lower_ptr + base + g * stride_lg, mask=in_row, other=float("-inf"))
            x = x + alpha * tl.where(x > float("-inf"), _tight_bound(x, upper, lower) - x, 0.0)
        dropped = tl.where(in_row & ~keep, x, float("-inf"))
        m = tl.max(tl.max(dropped, axis=1), axis=0)
        shift = tl.where(m == float("-inf"), 0.0, m)
        total = tl.sum(tl.sum(tl.exp(dropped - shift), axis=1), axis=0)
        tl.store(bound_lse_ptr + row_head * GROUP + g, shift + tl.log(total))


@functools.lru_cache(maxsize=64)
def _fractions(budget: float, window_start: float, frozen_fraction: float, device) -> torch.Tensor:
    """[3] float64 on the device: the cap and the window limits round as in torch.
    Built at the first (eager) call of a layer, never during graph capture."""
    return torch.tensor([budget, window_start, frozen_fraction], dtype=torch.float64, device=device)


@functools.lru_cache(maxsize=64)
def _head_groups(block_pages, num_kv_heads: int, device):
    """[(pages per block, [Hg] int32 head ids or None for every head)]."""
    groups = []
    for bp, mask in _block_sizes(block_pages, num_kv_heads, device):
        heads = None if mask is None else mask.nonzero().squeeze(1).to(torch.int32)
        groups.append((bp, heads))
    return groups


def _launch_config(num_slots: int, bp: int) -> tuple[int, int]:
    """(NB, num_warps): the row's slots in registers, ~8 per thread per tile
    (H100, 12 rows x 2048 / 2560 slots, tiles of 2048 / 4096: 8 per thread took
    25% / 17% less time than 16; docs/results.md)."""
    nb = triton.next_power_of_2(max(1, -(-num_slots // bp)))
    return nb, min(16, max(4, nb * triton.next_power_of_2(bp) // 256))


def select_compact(
    logits: PageLogits,
    seq_lens: torch.Tensor,
    params: SelectionParams,
    prev_keep: torch.Tensor | None = None,
    with_bound: bool = True,
) -> Selection:
    """Keep mask, kept-slot lists, estimated kept mass and dropped bound in one
    launch per block size; same contract as ``ref.compact_selection.select_compact``.

    Args:
        logits: PageLogits, each [N, Hkv, G, M] float32, same strides.
        seq_lens: [N] int context lengths.
        params: selection knobs (not rerank, not the certified stop rule).
        prev_keep: [N, Hkv, >=M] bool, the previous layer's keep (ETF).
        with_bound: compute dropped_est_lse (a second pass over the logits).
    Returns:
        Selection: keep [N, Hkv, M] bool, est_kept_mass [N, Hkv] float32,
        over_budget [N, Hkv] bool, num_pages [N] int64, kept_slots [N, Hkv, M]
        int32 (ascending, then -1), num_kept [N, Hkv] int32, dropped_est_lse
        [N, Hkv, G] float32 (None without with_bound).
    """
    require_supported(params)
    est, upper, lower = logits
    if not (est.stride() == upper.stride() == lower.stride()):
        raise ValueError("est, upper and lower must share strides")
    num_rows, num_kv_heads, group, num_slots = est.shape
    device = est.device
    keep = torch.empty((num_rows, num_kv_heads, num_slots), dtype=torch.uint8, device=device)
    kept_slots = torch.empty(keep.shape, dtype=torch.int32, device=device)
    num_kept = torch.empty((num_rows, num_kv_heads), dtype=torch.int32, device=device)
    kept_mass = torch.empty((num_rows, num_kv_heads), dtype=torch.float32, device=device)
    over = torch.zeros((num_rows, num_kv_heads), dtype=torch.uint8, device=device)
    bound_lse = (
        torch.empty((num_rows, num_kv_heads, group), dtype=torch.float32, device=device)
        if with_bound
        else None
    )
    num_pages = -(-seq_lens.to(torch.long) // params.block_size)
    if num_rows and num_kv_heads and num_slots == 0:
        num_kept.zero_()
        kept_mass.fill_(1.0)
        if bound_lse is not None:
            bound_lse.fill_(float("-inf"))
    elif keep.numel():
        fractions = _fractions(params.budget, params.window_start, params.frozen_fraction, device)
        etf = prev_keep is not None and params.frozen_fraction > 0
        prev = prev_keep.view(torch.uint8) if etf else keep
        for bp, heads in _head_groups(params.block_pages, num_kv_heads, device):
            nb, warps = _launch_config(num_slots, bp)
            grid = (num_rows, num_kv_heads if heads is None else heads.numel())
            _select_kernel[grid](
                est, upper, lower, seq_lens, fractions, prev,
                keep if heads is None else heads,  # any pointer when unused
                keep, kept_slots, num_kept, kept_mass, over,
                keep if bound_lse is None else bound_lse,  # any pointer when unused
                *est.stride(), *prev.stride(),
                num_kv_heads, num_slots, params.block_size,
                -(-params.sink_tokens // params.block_size),
                max(1, -(-params.local_tokens // params.block_size)),
                float(params.delta),
                float(params.dropped_weight),
                GROUP=group, BP=bp, BP_POW2=triton.next_power_of_2(bp), NB=nb,
                ESTIMATOR=ESTIMATORS.index(params.estimator),
                USE_DELTA=params.delta > 0,
                USE_WINDOW=params.window_start > 0,
                HAS_PREV=etf,
                HAS_HEADS=heads is not None,
                WITH_BOUND=with_bound,
                RAISE=params.dropped_weight > 0,
                DENSE_OVER=params.over_budget == "dense",
                num_warps=warps,
            )  # fmt: skip
    return Selection(
        keep=keep.view(torch.bool),
        est_kept_mass=kept_mass,
        num_pages=num_pages,
        bound_logits=None,
        over_budget=over.view(torch.bool),
        kept_slots=kept_slots,
        num_kept=num_kept,
        dropped_est_lse=bound_lse,
    )
