"""Replay the backend's selection on captured activations and measure it against
dense attention: the engine of ``prhs-audit`` and ``prhs-calibrate``.

A captured window (``capture.LayerQK``) becomes a paged KV cache of
``block_size``-token pages; each of its last T queries is one decode row whose
context is every token up to it. The last page of each row is a private copy
holding only that row's tokens, so summaries never see the future.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from prhs_vllm.backend.reuse import ReuseConfig, dilate
from prhs_vllm.ops.ref.quant import QuantizedCentroids, code_bytes, update_quantized_summaries
from prhs_vllm.ops.ref.selection import (
    SelectionParams,
    dropped_mass_upper_bound,
    exact_page_logits,
    mandatory_pages,
    select_pages,
)
from prhs_vllm.ops.ref.summaries import update_page_summaries

__all__ = [
    "PagedWindow",
    "ReuseParams",
    "StepMeasures",
    "page_window",
    "measure",
    "oracle_keep",
    "replay_layer",
]


@dataclass
class PagedWindow:
    """One layer's captured window as paged decode rows.

    query: [T, Hq, D]; key_cache: [P, Hkv, bs, D]; block_table: [T, M] int32;
    seq_lens: [T] int32; summaries: (key_sum, key_min, key_max) [P, Hkv, D];
    true_mass: [T, Hkv, G, M] float64 dense attention mass per page;
    true_logits: [T, Hkv, G, M] float32 exact page log-masses.
    """

    query: torch.Tensor
    key_cache: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    summaries: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    true_mass: torch.Tensor
    true_logits: torch.Tensor
    scale: float
    block_size: int


def _summaries(tokens, slot_ids, num_pages, block_size, bits):
    """Page summaries of the written slots: float32 at once, or quantized one
    page offset at a time (the decode path's re-encoding included)."""
    heads, dim = tokens.shape[1], tokens.shape[2]
    shape = (num_pages, heads, dim)
    if not bits:
        out = (torch.zeros(shape), torch.full(shape, math.inf), torch.full(shape, -math.inf))
        update_page_summaries(tokens[slot_ids], slot_ids, block_size, *out)
        return out
    codes = QuantizedCentroids(
        torch.zeros(num_pages, heads, code_bytes(dim, bits), dtype=torch.uint8), bits
    )
    out = (
        codes,
        torch.full(shape, math.inf, dtype=torch.bfloat16),
        torch.full(shape, -math.inf, dtype=torch.bfloat16),
    )
    offsets = slot_ids % block_size
    for off in range(block_size):
        chosen = slot_ids[offsets == off]
        update_quantized_summaries(tokens[chosen], chosen, block_size, *out)
    return out


def page_window(
    query: torch.Tensor, key: torch.Tensor, scale: float, block_size: int, centroid_bits: int = 0
):
    """Build a PagedWindow.

    Args:
        query: [Hq, T, D] the last T positions' queries; key: [Hkv, L, D].
        centroid_bits: 0 for float32 summaries; 8 or 4 for quantized ones,
            written one token per page at a time as decoding would.
    """
    num_kv_heads, length, head_dim = key.shape
    num_q = query.shape[1]
    shared = length // block_size  # full pages of the window
    num_pages = shared + num_q  # plus one private last page per row
    key_cache = torch.zeros(num_pages, num_kv_heads, block_size, head_dim)
    key_cache[:shared] = (
        key[:, : shared * block_size]
        .reshape(num_kv_heads, shared, block_size, head_dim)
        .transpose(0, 1)
    )
    seq_lens = torch.arange(length - num_q + 1, length + 1, dtype=torch.int32)
    slots = -(-seq_lens.max().item() // block_size)
    table = torch.arange(slots, dtype=torch.int32).repeat(num_q, 1)
    written = []  # slots, in page-offset order
    for row, seq_len in enumerate(seq_lens.tolist()):
        last = (seq_len - 1) // block_size
        if last < shared and seq_len % block_size == 0:
            continue  # ends on a full shared page
        private = shared + row
        start = last * block_size
        part = key[:, start:seq_len]
        key_cache[private, :, : part.shape[1]] = part
        written.append(private * block_size + torch.arange(part.shape[1]))
        table[row, last] = private
    written.append(torch.arange(shared * block_size))
    slot_ids = torch.cat(written)
    tokens = key_cache.transpose(1, 2).reshape(num_pages * block_size, num_kv_heads, head_dim)
    summaries = _summaries(tokens, slot_ids, num_pages, block_size, centroid_bits)
    all_slots = torch.arange(slots).expand(num_q, num_kv_heads, slots)
    q = query.transpose(0, 1).contiguous()
    logits = exact_page_logits(q, key_cache, table, seq_lens, scale, all_slots)
    true_mass = torch.nan_to_num(torch.softmax(logits.double(), dim=-1), nan=0.0)
    return PagedWindow(q, key_cache, table, seq_lens, summaries, true_mass, logits, scale,
                       block_size)  # fmt: skip


@dataclass(frozen=True)
class ReuseParams(ReuseConfig):
    """The backend's reuse knobs (``ReuseConfig``), tau 0.8 unless given."""

    tau: float = 0.8


@dataclass
class StepMeasures:
    """Per (step, KV head) measures, each [T, Hkv]."""

    true_dropped: torch.Tensor
    est_dropped: torch.Tensor
    certified: torch.Tensor
    kept_fraction: torch.Tensor
    recall: torch.Tensor
    reused: torch.Tensor
    keep: torch.Tensor  # [T, Hkv, M]
    oracle_kept_fraction: torch.Tensor | None = None  # at the same true dropped mass


def oracle_keep(win: PagedWindow, params: SelectionParams) -> torch.Tensor:
    """The selection rule with the true page masses as the estimator ([T, Hkv, M])."""
    num_slots = win.true_logits.shape[-1]
    from prhs_vllm.ops.ref.selection import PageLogits, select_from_logits

    exact = win.true_logits
    oracle = replace(params, estimator="centroid", rerank=0.0, delta_control="estimate")
    return select_from_logits(PageLogits(exact, exact, exact), win.seq_lens, oracle).keep[
        ..., :num_slots
    ]


def measure(win: PagedWindow, keep: torch.Tensor, est_kept: torch.Tensor,
            bound_logits: torch.Tensor, reused: torch.Tensor) -> StepMeasures:  # fmt: skip
    """Measures of a keep mask [T, Hkv, M] against dense attention."""
    mass = win.true_mass  # [T, Hkv, G, M]
    true_dropped = (mass * ~keep[:, :, None, :]).sum(-1).mean(-1)
    kept_lse = torch.logsumexp(win.true_logits.masked_fill(~keep[:, :, None, :], -math.inf), dim=-1)
    certified = dropped_mass_upper_bound(bound_logits, keep, kept_lse)
    num_pages = -(-win.seq_lens.long() // win.block_size)
    kept_count = keep.sum(-1)
    group_mass = mass.mean(2)
    rank = group_mass.argsort(-1, descending=True).argsort(-1)
    top = rank < kept_count[..., None]
    recall = (top & keep).sum(-1) / kept_count.clamp(min=1)
    must = mandatory_pages(num_pages, keep.shape[-1], _MUST_PARAMS(win))
    oracle = oracle_count_at(group_mass, must, num_pages, true_dropped)
    return StepMeasures(
        true_dropped=true_dropped.float(),
        est_dropped=(1 - est_kept).clamp(min=0).float(),
        certified=certified.float(),
        kept_fraction=(kept_count / num_pages[:, None]).float(),
        recall=recall.float(),
        reused=reused,
        keep=keep,
        oracle_kept_fraction=(oracle / num_pages[:, None]).float(),
    )


def _MUST_PARAMS(win: PagedWindow) -> SelectionParams:
    """The default sinks and recent window, which the oracle keeps as every selector does."""
    return SelectionParams(
        block_size=win.block_size, scale=win.scale, budget=1.0, delta=0.0,
        sink_tokens=64, local_tokens=256,
    )  # fmt: skip


def oracle_count_at(
    group_mass: torch.Tensor, must: torch.Tensor, num_pages: torch.Tensor, dropped: torch.Tensor
) -> torch.Tensor:
    """Pages the oracle keeps to drop at most ``dropped``: the sinks and the
    recent window, then pages by true mass.

    Args:
        group_mass: [T, Hkv, M] true page masses (group mean); must: [T, M] bool;
        num_pages: [T]; dropped: [T, Hkv] the true dropped mass to match.
    Returns:
        [T, Hkv] float64 page counts.
    """
    num_slots = group_mass.shape[-1]
    valid = (torch.arange(num_slots)[None, :] < num_pages[:, None])[:, None, :]
    cand = valid & ~must[:, None, :]
    key = torch.where(cand, group_mass, torch.full_like(group_mass, -1.0))
    sorted_mass = (group_mass * cand).gather(-1, key.argsort(dim=-1, descending=True))
    total = sorted_mass.sum(-1, keepdim=True)
    after = total - sorted_mass.cumsum(-1)  # dropped after taking the first k + 1
    need = (after > dropped[..., None].double() + 1e-9).sum(-1) + 1
    need = torch.where(total[..., 0] <= dropped.double() + 1e-9, torch.zeros_like(need), need)
    need = torch.minimum(need, cand.sum(-1))
    return (must.sum(-1)[:, None] + need).double()


def replay_layer(
    win: PagedWindow,
    params: SelectionParams,
    reuse: ReuseParams | None = None,
    prev_keep: torch.Tensor | None = None,
) -> StepMeasures:
    """Run the selection for every row of the window and measure it.

    Fresh selections are computed for all rows at once (they depend only on
    the row's context); reuse is then replayed in step order per KV head.
    """
    sel = select_pages(
        win.query, *win.summaries, win.block_table, win.seq_lens, params,
        num_slots=win.block_table.shape[1], key_cache=win.key_cache, prev_keep=prev_keep,
    )  # fmt: skip
    keep = sel.keep.clone()
    est_kept = sel.est_kept_mass.clone()
    bound = sel.bound_logits
    steps, num_kv_heads, num_slots = keep.shape
    reused = torch.zeros(steps, num_kv_heads, dtype=torch.bool)
    if reuse is not None:
        q = win.query.view(steps, num_kv_heads, -1, win.query.shape[-1])
        qn = torch.nn.functional.normalize(q, dim=-1)
        num_pages = -(-win.seq_lens.long() // win.block_size)
        must = mandatory_pages(num_pages, num_slots, params)
        score = torch.softmax(bound, dim=-1).mean(2)  # what ranked the anchor's pages
        anchor = torch.zeros(num_kv_heads, dtype=torch.long)
        age = torch.zeros(num_kv_heads, dtype=torch.long)
        cap = [math.ceil(params.budget * n) for n in num_pages.tolist()]
        for t in range(1, steps):
            sim = (qn[t] * qn[anchor, torch.arange(num_kv_heads)]).sum(-1).amin(-1)
            for h in range(num_kv_heads):
                if sim[h] >= reuse.tau and age[h] < reuse.max_age:
                    a = int(anchor[h])
                    top_m = torch.tensor([max(1, round(reuse.top_m * cap[a]))])
                    grown = dilate(keep[a, h][None, None], score[a, h][None, None], top_m,
                                   reuse.radius)[0, 0]  # fmt: skip
                    keep[t, h] = (grown | must[t]) & (torch.arange(num_slots) < num_pages[t])
                    est_kept[t, h] = float("nan")  # no estimate without scoring
                    reused[t, h] = True
                    age[h] += 1
                else:
                    anchor[h], age[h] = t, 0
    measures = measure(win, keep, est_kept.nan_to_num(0.0), bound, reused)
    # A reused step scores nothing: it has neither an estimate nor a bound.
    measures.est_dropped[reused] = float("nan")
    measures.certified[reused] = float("nan")
    return measures
