"""Pre-hoc page selection: estimate each page's attention mass from its summary,
keep sinks and the recent window, then the most massive blocks until the
estimated kept mass reaches 1 - delta or the budget cap binds.

Selection is shared by the query heads of a GQA group (one set per KV head):
the group's estimated masses are averaged.
"""

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SelectionParams:
    """Host-side knobs of one selection call (see prhs_vllm.config.PrhsConfig)."""

    block_size: int
    scale: float
    budget: float
    delta: float
    sink_tokens: int
    local_tokens: int
    block_pages: int = 1
    estimator: str = "centroid"


@dataclass
class Selection:
    """Result of ``select_pages`` for N sparse rows over M page slots.

    keep: [N, Hkv, M] bool, page slot j of block_table[r] is read for KV head h.
    est_kept_mass: [N, Hkv] float32, estimated attention mass kept (group mean).
    num_pages: [N] int64, pages that hold context for each row.
    bound_logits: [N, Hkv, G, M] float32 Quest log-mass bounds, for the
        certified dropped-mass bound once the kept mass is known exactly.
    """

    keep: torch.Tensor
    est_kept_mass: torch.Tensor
    num_pages: torch.Tensor
    bound_logits: torch.Tensor


def page_token_counts(seq_lens: torch.Tensor, num_slots: int, block_size: int) -> torch.Tensor:
    """Tokens held by each page slot of each row.

    Args:
        seq_lens: [N] int context lengths.
    Returns:
        [N, M] int64, min(block_size, max(0, L - j * block_size)).
    """
    starts = torch.arange(num_slots, device=seq_lens.device) * block_size
    return (seq_lens.to(torch.long)[:, None] - starts[None, :]).clamp(0, block_size)


def _gather_page_summaries(
    summary: torch.Tensor, block_table: torch.Tensor, num_slots: int
) -> torch.Tensor:
    """[P, Hkv, D] summary -> [N, Hkv, M, D] for the first M page slots of each row."""
    pages = block_table[:, :num_slots].to(torch.long)
    return summary[pages].permute(0, 2, 1, 3)


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per page and query head: centroid estimate and Quest upper bound of log-mass.

    log-mass(page) = log(sum over the page's tokens of exp(scale * q.k)).
    The estimate uses n * exp(scale * q.centroid); the bound uses
    n * exp(scale * max over the min/max box of q.k), which is never below the
    true value.

    Args:
        query: [N, Hq, D]; Hq a multiple of Hkv.
        key_sum, key_min, key_max: [P, Hkv, D] float32 page summaries.
        block_table: [N, >=M] int page ids; seq_lens: [N] int.
    Returns:
        (est, bound), each [N, Hkv, G, M] float32; -inf on empty page slots.
    """
    num_rows, num_q_heads, head_dim = query.shape
    num_kv_heads = key_sum.shape[1]
    group = num_q_heads // num_kv_heads
    q = query.to(torch.float32).view(num_rows, num_kv_heads, group, head_dim)
    counts = page_token_counts(seq_lens, num_slots, block_size)
    log_n = torch.where(
        counts > 0,
        counts.to(torch.float32).log(),
        torch.full_like(counts, -math.inf, dtype=torch.float32),
    )[:, None, None, :]
    centroid = _gather_page_summaries(key_sum, block_table, num_slots) / counts.clamp(min=1)[
        :, None, :, None
    ].to(torch.float32)
    kmin = _gather_page_summaries(key_min, block_table, num_slots)
    kmax = _gather_page_summaries(key_max, block_table, num_slots)
    est = scale * torch.einsum("nhgd,nhmd->nhgm", q, centroid) + log_n
    qe = q[:, :, :, None, :]
    box = torch.maximum(qe * kmin[:, :, None], qe * kmax[:, :, None]).sum(-1)
    bound = scale * box + log_n
    empty = counts == 0
    est = est.masked_fill(empty[:, None, None, :], -math.inf)
    bound = bound.masked_fill(empty[:, None, None, :], -math.inf)
    return est, bound


def mandatory_pages(num_pages: torch.Tensor, num_slots: int, p: SelectionParams) -> torch.Tensor:
    """Sink pages and recent-window pages (the page being written always included).

    Args:
        num_pages: [N] int64.
    Returns:
        [N, M] bool.
    """
    j = torch.arange(num_slots, device=num_pages.device)[None, :]
    sink_pages = -(-p.sink_tokens // p.block_size)
    local_pages = max(1, -(-p.local_tokens // p.block_size))
    valid = j < num_pages[:, None]
    return valid & ((j < sink_pages) | (j >= num_pages[:, None] - local_pages))


def select_pages(
    query: torch.Tensor,
    key_sum: torch.Tensor,
    key_min: torch.Tensor,
    key_max: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    params: SelectionParams,
    num_slots: int | None = None,
) -> Selection:
    """Choose the pages each (row, KV head) reads in a sparse decode step.

    Args:
        query: [N, Hq, D] decode queries (one per row).
        key_sum, key_min, key_max: [P, Hkv, D] float32 page summaries.
        block_table: [N, >=M] int page ids; seq_lens: [N] int context lengths.
        params: selection knobs.
        num_slots: M, at least the largest page count of the rows (a host
            int, so no device sync); None derives it from seq_lens.
    Returns:
        Selection with keep [N, Hkv, M].
    """
    bs = params.block_size
    num_pages = -(-seq_lens.to(torch.long) // bs)
    if num_slots is None:
        num_slots = int(num_pages.max().item()) if num_pages.numel() else 0
    est, bound = page_logits(
        query, key_sum, key_min, key_max, block_table, seq_lens, bs, params.scale, num_slots
    )
    return select_from_logits(est, bound, seq_lens, params)


def group_page_mass(logits: torch.Tensor) -> torch.Tensor:
    """Estimated attention mass per page, averaged over a GQA group.

    Args:
        logits: [N, Hkv, G, M] log-masses (-inf on empty slots).
    Returns:
        [N, Hkv, M] float32: softmax over pages per query head, mean over G.
    """
    return torch.nan_to_num(torch.softmax(logits, dim=-1).mean(dim=2), nan=0.0)


def select_from_logits(
    est: torch.Tensor, bound: torch.Tensor, seq_lens: torch.Tensor, params: SelectionParams
) -> Selection:
    """The selection rule of ``select_pages``, given the page log-masses.

    Args:
        est, bound: [N, Hkv, G, M] from ``page_logits`` (or a kernel with its
            signature); seq_lens: [N] int.
    Returns:
        Selection with keep [N, Hkv, M]. Device ops only (no host sync).
    """
    num_slots = est.shape[-1]
    num_pages = -(-seq_lens.to(torch.long) // params.block_size)
    mass = group_page_mass(bound if params.estimator == "quest" else est)
    num_rows, num_kv_heads, _ = mass.shape

    must = mandatory_pages(num_pages, num_slots, params)[:, None, :].expand_as(mass)
    valid = (torch.arange(num_slots, device=mass.device)[None, :] < num_pages[:, None])[
        :, None, :
    ].expand_as(mass)
    optional = valid & ~must

    # Pool optional pages into logical blocks of block_pages pages.
    bp = params.block_pages
    num_blocks = -(-num_slots // bp)
    pad = num_blocks * bp - num_slots
    block_mass = (
        torch.nn.functional.pad(mass * optional, (0, pad))
        .view(num_rows, num_kv_heads, num_blocks, bp)
        .sum(-1)
    )
    block_count = (
        torch.nn.functional.pad(optional.to(torch.long), (0, pad))
        .view(num_rows, num_kv_heads, num_blocks, bp)
        .sum(-1)
    )
    eligible = block_count > 0
    order_key = torch.where(eligible, block_mass, torch.full_like(block_mass, -1.0))
    order = torch.sort(order_key, dim=-1, descending=True, stable=True).indices
    sorted_mass = block_mass.gather(-1, order)
    sorted_count = block_count.gather(-1, order)
    sorted_eligible = eligible.gather(-1, order)

    must_mass = (mass * must).sum(-1, keepdim=True)
    must_count = must.sum(-1, keepdim=True)
    cap = torch.ceil(params.budget * num_pages.to(torch.float64)).to(torch.long)[:, None, None]
    mass_before = must_mass + torch.cumsum(sorted_mass, -1) - sorted_mass
    pages_through = must_count + torch.cumsum(sorted_count, -1)
    take = sorted_eligible & (pages_through <= cap)
    if params.delta > 0:
        take &= mass_before < 1.0 - params.delta
    keep_block = torch.zeros_like(take).scatter(-1, order, take)
    # expand + reshape, not repeat_interleave: the latter syncs with the host on CUDA.
    keep_pages = keep_block[..., None].expand(*keep_block.shape, bp).flatten(-2)
    keep_opt = keep_pages[..., :num_slots] & optional
    keep = must | keep_opt
    return Selection(
        keep=keep, est_kept_mass=(mass * keep).sum(-1), num_pages=num_pages, bound_logits=bound
    )


def dropped_mass_upper_bound(
    bound_logits: torch.Tensor, keep: torch.Tensor, kept_lse: torch.Tensor
) -> torch.Tensor:
    """Certified upper bound on the attention mass left out, per (row, KV head).

    With K = exact sum of exp(logits) over kept tokens (from the sparse
    attention's log-sum-exp) and D <= D_ub = sum over dropped pages of their
    Quest bound, the true dropped mass D / (K + D) <= D_ub / (K + D_ub).

    Args:
        bound_logits: [N, Hkv, G, M] Quest log-mass bounds (``page_logits``).
        keep: [N, Hkv, M] bool.
        kept_lse: [N, Hkv, G] float32 log-sum-exp of scaled logits over kept tokens.
    Returns:
        [N, Hkv] float32, the maximum over the group's query heads.
    """
    dropped = bound_logits.masked_fill(keep[:, :, None, :], -math.inf)
    log_d = torch.logsumexp(dropped, dim=-1)
    frac = torch.sigmoid(log_d - kept_lse)  # D_ub / (K + D_ub)
    return frac.amax(dim=-1)
