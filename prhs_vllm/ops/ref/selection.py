"""Pre-hoc page selection: bound each page's attention mass from its summary,
keep sinks and the recent window, then the best blocks until the kept mass
reaches 1 - delta (estimated, or certified) or the budget cap binds.

Selection is shared by the query heads of a GQA group (one set per KV head).
Dropped mass is the group mean of the query heads' dropped attention weight.

Per page, three log-masses bracket the true log(sum over tokens of exp(s q.k)):
- lower (Jensen): log n + s q.centroid -- the "centroid" estimate;
- upper (mean-constrained box): with lo/hi the min/max of s q.k over the
  page's min/max box and m = s q.centroid, the n token logits lie in [lo, hi]
  with mean m, so their exp-sum is at most n (p e^hi + (1-p) e^lo),
  p = (m - lo) / (hi - lo) (exp is convex: the extremes maximize it). It is
  never above Quest's n e^hi and never below the truth.
An optional exact rerank scores a shortlist of pages from the keys
themselves, so their three log-masses coincide.
"""

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from prhs_vllm.ops.ref.quant import QuantizedCentroids, decode_centroids

ESTIMATORS = ("centroid", "quest", "bound", "hybrid")
DELTA_CONTROLS = ("estimate", "certified")
OVER_BUDGET = ("dense", "cap")


@dataclass(frozen=True)
class SelectionParams:
    """Host-side knobs of one layer's selection (see prhs_vllm.config.PrhsConfig).

    block_pages: pages per logical block, uniform (int) or per KV head (tuple).
    estimator: what ranks pages: "centroid" (lower), "quest" (Quest's box
        bound), "bound" (the mean-constrained upper bound) or "hybrid" (per
        page the larger of the centroid's and the bound's normalized mass).
    delta_control: "estimate" stops when the estimated kept mass reaches
        1 - delta; "certified" when the certified dropped-mass bound is <= delta.
    rerank: shortlist ceil(rerank * cap) pages by the estimator and score them
        exactly from the keys (0 = off; needs a ``rescore`` function).
    window_start: PSAW; optional pages wholly before window_start * context are
        not candidates (sinks excepted).
    frozen_fraction: ETF; optional pages wholly before frozen_fraction *
        context keep the previous layer's decision instead of being scored.
    exact_centroid: False for quantized centroids: certified bounds then use
        the box alone (Quest), which does not depend on the centroid.
    over_budget: what a (row, KV head) does when the budget cap binds before
        the stop rule is met: "cap" keeps the capped selection (its dropped
        mass may exceed delta); "dense" keeps every page instead (exact).
    dropped_weight: alpha of the delta rule's dropped-mass estimate: a page
        left out counts exp(centroid log-mass + alpha (bound - centroid))
        against the kept pages' centroid mass (``dropped_page_weights``);
        0 counts the centroid alone.
    """

    block_size: int
    scale: float
    budget: float
    delta: float
    sink_tokens: int
    local_tokens: int
    block_pages: int | tuple[int, ...] = 1
    estimator: str = "hybrid"
    delta_control: str = "estimate"
    rerank: float = 0.0
    window_start: float = 0.0
    frozen_fraction: float = 0.0
    exact_centroid: bool = True
    over_budget: str = "cap"
    dropped_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator {self.estimator!r} not in {ESTIMATORS}")
        if self.delta_control not in DELTA_CONTROLS:
            raise ValueError(f"delta_control {self.delta_control!r} not in {DELTA_CONTROLS}")
        if self.over_budget not in OVER_BUDGET:
            raise ValueError(f"over_budget {self.over_budget!r} not in {OVER_BUDGET}")
        if not 0.0 <= self.dropped_weight <= 1.0:
            raise ValueError(f"dropped_weight {self.dropped_weight} not in [0, 1]")


class PageLogits(NamedTuple):
    """Page log-masses, each [N, Hkv, G, M] float32, -inf on empty page slots.

    est: log n + s q.centroid (Jensen: never above the truth).
    upper: log n + s max over the min/max box of q.k (Quest's bound).
    lower: log n + s min over the box of q.k.
    """

    est: torch.Tensor
    upper: torch.Tensor
    lower: torch.Tensor


@dataclass
class Selection:
    """Result of ``select_pages`` for N sparse rows over M page slots.

    keep: [N, Hkv, M] bool, page slot j of block_table[r] is read for KV head h.
    est_kept_mass: [N, Hkv] float32, 1 - the delta rule's estimate of the
        dropped mass (group mean; 1 where every page is kept).
    over_budget: [N, Hkv] bool, the budget cap bound before the stop rule was
        met (``params.over_budget`` "dense": those keep every page).
    num_pages: [N] int64, pages that hold context for each row.
    bound_logits: [N, Hkv, G, M] float32 certified upper log-masses per page
        (exact on reranked pages), for ``dropped_mass_upper_bound``; None from
        ``select_compact`` (it returns their dropped log-sum-exp instead).
    kept_slots, num_kept: ``compact_keep(keep)`` ([N, Hkv, M] int32 slots
        ascending then -1; [N, Hkv] int32), from ``select_compact`` only.
    dropped_est_lse: [N, Hkv, G] float32 log-sum-exp over the dropped pages of
        the delta rule's raised log-masses (``raised_logits``; -inf when none):
        with the sparse attention's exact kept log-sum-exp it estimates the
        dropped mass after the fact (``posthoc_dropped``).
    """

    keep: torch.Tensor
    est_kept_mass: torch.Tensor
    num_pages: torch.Tensor
    bound_logits: torch.Tensor | None
    over_budget: torch.Tensor | None = None
    kept_slots: torch.Tensor | None = None
    num_kept: torch.Tensor | None = None
    dropped_est_lse: torch.Tensor | None = None


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
) -> PageLogits:
    """Per page and query head: centroid estimate and box bounds of the log-mass.

    log-mass(page) = log(sum over the page's tokens of exp(scale * q.k)).

    Args:
        query: [N, Hq, D]; Hq a multiple of Hkv.
        key_sum, key_min, key_max: [P, Hkv, D] float32 page summaries; or
            key_sum a QuantizedCentroids and key_min / key_max bfloat16 boxes.
        block_table: [N, >=M] int page ids; seq_lens: [N] int.
    Returns:
        PageLogits (est, upper, lower), each [N, Hkv, G, M] float32.
    """
    num_rows, num_q_heads, head_dim = query.shape
    num_kv_heads = key_min.shape[1]
    group = num_q_heads // num_kv_heads
    q = query.to(torch.float32).view(num_rows, num_kv_heads, group, head_dim)
    counts = page_token_counts(seq_lens, num_slots, block_size)
    log_n = torch.where(
        counts > 0,
        counts.to(torch.float32).log(),
        torch.full_like(counts, -math.inf, dtype=torch.float32),
    )[:, None, None, :]
    kmin = _gather_page_summaries(key_min, block_table, num_slots).to(torch.float32)
    kmax = _gather_page_summaries(key_max, block_table, num_slots).to(torch.float32)
    if isinstance(key_sum, QuantizedCentroids):
        codes = _gather_page_summaries(key_sum.codes, block_table, num_slots)
        centroid = decode_centroids(codes, kmin, kmax, key_sum.bits)
    else:
        centroid = _gather_page_summaries(key_sum, block_table, num_slots) / counts.clamp(min=1)[
            :, None, :, None
        ].to(torch.float32)
    est = scale * torch.einsum("nhgd,nhmd->nhgm", q, centroid) + log_n
    qe = q[:, :, :, None, :]
    at_min, at_max = qe * kmin[:, :, None], qe * kmax[:, :, None]
    upper = scale * torch.maximum(at_min, at_max).sum(-1) + log_n
    lower = scale * torch.minimum(at_min, at_max).sum(-1) + log_n
    empty = (counts == 0)[:, None, None, :]
    return PageLogits(
        est.masked_fill(empty, -math.inf),
        upper.masked_fill(empty, -math.inf),
        lower.masked_fill(empty, -math.inf),
    )


def mean_constrained_bound(logits: PageLogits) -> torch.Tensor:
    """Certified upper log-mass per page from the box and the centroid.

    log n + log(p e^hi + (1 - p) e^lo) with p = (m - lo) / (hi - lo), all in
    the log domain (log n cancels in p). Where hi - lo is tiny the page's keys
    are (nearly) equal and the Quest bound itself is used.

    Args:
        logits: PageLogits, each [..., M].
    Returns:
        [..., M] float32, between est and upper; -inf on empty slots.
    """
    est, upper, lower = logits
    width = upper - lower
    live = torch.isfinite(upper) & (width > 1e-4)
    safe_width = torch.where(live, width, torch.ones_like(width))
    # Rounding can put the centroid a hair outside the box: clamp p into [0, 1].
    p = ((est - lower) / safe_width).clamp(0.0, 1.0)
    # log(p e^hi + (1-p) e^lo) = hi + log(p + (1-p) e^-(hi-lo))
    tight = upper + torch.log(p + (1.0 - p) * torch.exp(-safe_width))
    return torch.where(live, torch.minimum(tight, upper), upper)


def exact_page_logits(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    slots: torch.Tensor,
) -> torch.Tensor:
    """Exact log-mass of chosen page slots, computed from the cached keys.

    Args:
        query: [N, Hq, D]; key_cache: [P, Hkv, bs, D] (any strides).
        block_table: [N, >=M] int; seq_lens: [N] int.
        slots: [N, Hkv, S] long page slots per (row, KV head); -1 for none.
    Returns:
        [N, Hkv, G, S] float32 log(sum over the page's tokens of exp(scale q.k));
        -inf for slots past the context or -1.
    """
    num_rows, num_q_heads, head_dim = query.shape
    num_kv_heads, block_size = key_cache.shape[1], key_cache.shape[2]
    group = num_q_heads // num_kv_heads
    safe = slots.clamp(min=0)
    pages = block_table.to(torch.long).gather(1, safe.flatten(1)).view_as(safe)
    heads = torch.arange(num_kv_heads, device=query.device)[None, :, None].expand_as(pages)
    keys = key_cache[pages, heads].to(torch.float32)  # [N, Hkv, S, bs, D]
    q = query.to(torch.float32).view(num_rows, num_kv_heads, group, head_dim)
    logits = scale * torch.einsum("nhgd,nhstd->nhgst", q, keys)
    pos = safe[..., None] * block_size + torch.arange(block_size, device=query.device)
    live = (pos < seq_lens.to(torch.long)[:, None, None, None]) & (slots >= 0)[..., None]
    logits = logits.masked_fill(~live[:, :, None], -math.inf)
    return torch.logsumexp(logits, dim=-1)


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


def pages_before(seq_lens: torch.Tensor, fraction: float, num_slots: int, block_size: int):
    """[N, M] bool: page slots wholly before floor(fraction * L) tokens."""
    limit = torch.floor(seq_lens.to(torch.float64) * fraction).to(torch.long)
    ends = (torch.arange(num_slots, device=seq_lens.device) + 1) * block_size
    return ends[None, :] <= limit[:, None]


Rescore = Callable[[torch.Tensor], torch.Tensor]
"""slots [N, Hkv, S] long -> exact log-masses [N, Hkv, G, S] (``exact_page_logits``)."""


def select_pages(
    query: torch.Tensor,
    key_sum: torch.Tensor,
    key_min: torch.Tensor,
    key_max: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    params: SelectionParams,
    num_slots: int | None = None,
    key_cache: torch.Tensor | None = None,
    prev_keep: torch.Tensor | None = None,
) -> Selection:
    """Choose the pages each (row, KV head) reads in a sparse decode step.

    Args:
        query: [N, Hq, D] decode queries (one per row).
        key_sum, key_min, key_max: [P, Hkv, D] float32 page summaries.
        block_table: [N, >=M] int page ids; seq_lens: [N] int context lengths.
        params: selection knobs.
        num_slots: M, at least the largest page count of the rows (a host
            int, so no device sync); None derives it from seq_lens.
        key_cache: [P, Hkv, bs, D], needed when params.rerank > 0.
        prev_keep: [N, Hkv, M] bool, the previous layer's selection (ETF).
    Returns:
        Selection with keep [N, Hkv, M].
    """
    bs = params.block_size
    num_pages = -(-seq_lens.to(torch.long) // bs)
    if num_slots is None:
        num_slots = int(num_pages.max().item()) if num_pages.numel() else 0
    logits = page_logits(
        query, key_sum, key_min, key_max, block_table, seq_lens, bs, params.scale, num_slots
    )
    rescore = key_rescorer(query, key_cache, block_table, seq_lens, params)
    return select_from_logits(logits, seq_lens, params, rescore=rescore, prev_keep=prev_keep)


def key_rescorer(query, key_cache, block_table, seq_lens, params: SelectionParams):
    """The ``rescore`` function of ``select_from_logits`` (None when rerank is off).

    Raises:
        ValueError: rerank is on and there is no key cache.
    """
    if params.rerank <= 0:
        return None
    if key_cache is None:
        raise ValueError("params.rerank > 0 needs the key cache")

    def rescore(slots: torch.Tensor) -> torch.Tensor:
        return exact_page_logits(query, key_cache, block_table, seq_lens, params.scale, slots)

    return rescore


def group_page_mass(logits: torch.Tensor) -> torch.Tensor:
    """Estimated attention mass per page, averaged over a GQA group.

    Args:
        logits: [N, Hkv, G, M] log-masses (-inf on empty slots).
    Returns:
        [N, Hkv, M] float32: softmax over pages per query head, mean over G.
    """
    return torch.nan_to_num(torch.softmax(logits, dim=-1).mean(dim=2), nan=0.0)


def rank_mass(
    logits: PageLogits,
    estimator: str,
    est_mass: torch.Tensor | None = None,
    tight: torch.Tensor | None = None,
) -> torch.Tensor:
    """[N, Hkv, M] group-mean page masses that rank pages for ``estimator``.

    "hybrid" takes, per page, the larger of the centroid's and the bound's
    normalized masses: a page either estimator ranks high stays in the race
    (the bound catches isolated spikes, the centroid broad mass).
    ``est_mass`` (``group_page_mass(logits.est)``) and ``tight``
    (``mean_constrained_bound(logits)``) pass in what the caller already has.
    """
    if estimator == "quest":
        return group_page_mass(logits.upper)
    if estimator in ("centroid", "hybrid") and est_mass is None:
        est_mass = group_page_mass(logits.est)
    if estimator == "centroid":
        return est_mass
    bound_mass = group_page_mass(mean_constrained_bound(logits) if tight is None else tight)
    return bound_mass if estimator == "bound" else torch.maximum(est_mass, bound_mass)


def rank_logits(logits: PageLogits, estimator: str) -> torch.Tensor:
    """The [N, Hkv, G, M] log-masses that rank pages for ``estimator``."""
    if estimator == "centroid":
        return logits.est
    if estimator == "quest":
        return logits.upper
    return mean_constrained_bound(logits)


def _with_exact(logits: PageLogits, slots: torch.Tensor, exact: torch.Tensor) -> PageLogits:
    """Replace the three log-masses of ``slots`` [N, Hkv, S] (-1: none) by
    ``exact`` [N, Hkv, G, S]."""
    num_slots = logits.est.shape[-1]
    # -1 goes to a spare column that is cut off again, so it never collides.
    index = torch.where(slots >= 0, slots, num_slots)[:, :, None, :].expand_as(exact)

    def put(x: torch.Tensor) -> torch.Tensor:
        wide = torch.nn.functional.pad(x, (0, 1))
        return wide.scatter(-1, index, exact)[..., :num_slots]

    return PageLogits(put(logits.est), put(logits.upper), put(logits.lower))


def select_from_logits(
    logits: PageLogits,
    seq_lens: torch.Tensor,
    params: SelectionParams,
    rescore: Rescore | None = None,
    prev_keep: torch.Tensor | None = None,
) -> Selection:
    """The selection rule of ``select_pages``, given the page log-masses.

    Args:
        logits: PageLogits from ``page_logits`` (or a kernel with its signature).
        seq_lens: [N] int.
        rescore: exact log-masses of page slots (``params.rerank > 0``).
        prev_keep: [N, Hkv, M] bool, the previous layer's keep (ETF).
    Returns:
        Selection with keep [N, Hkv, M]. Device ops only (no host sync).
    """
    num_slots = logits.est.shape[-1]
    device = logits.est.device
    num_pages = -(-seq_lens.to(torch.long) // params.block_size)
    num_rows, num_kv_heads = logits.est.shape[:2]
    shape = (num_rows, num_kv_heads, num_slots)

    must = mandatory_pages(num_pages, num_slots, params)[:, None, :].expand(shape)
    valid = (torch.arange(num_slots, device=device)[None, :] < num_pages[:, None])[
        :, None, :
    ].expand(shape)
    candidate = valid & ~must
    if params.window_start > 0:  # PSAW
        early = pages_before(seq_lens, params.window_start, num_slots, params.block_size)
        candidate = candidate & ~early[:, None, :]
    fixed = must
    if prev_keep is not None and params.frozen_fraction > 0:  # ETF
        frozen = pages_before(seq_lens, params.frozen_fraction, num_slots, params.block_size)
        frozen = candidate & frozen[:, None, :]
        fixed = must | (frozen & prev_keep[..., :num_slots])
        candidate = candidate & ~frozen
    cap = torch.ceil(params.budget * num_pages.to(torch.float64)).to(torch.long)[:, None]

    if params.rerank > 0 and rescore is not None:
        # Mandatory pages are scored exactly too: they are read anyway, and their
        # upper bounds would otherwise swamp the kept-mass estimate.
        most_must = -(-params.sink_tokens // params.block_size) + max(
            1, -(-params.local_tokens // params.block_size)
        )
        shortlist = min(num_slots, math.ceil(params.rerank * params.budget * num_slots) + most_must)
        score = rank_mass(logits, params.estimator)
        score = torch.where(candidate, score, torch.full_like(score, -1.0))
        score = torch.where(must, torch.full_like(score, 2.0), score)
        top = torch.topk(score, shortlist, dim=-1)
        slots = torch.where(top.values >= 0, top.indices, torch.full_like(top.indices, -1))
        logits = _with_exact(logits, slots, rescore(slots))
        # -1 goes to a spare column: a repeated index 0 would race with a listed slot 0.
        spare = torch.where(slots >= 0, slots, num_slots)
        listed = torch.zeros((*shape[:2], num_slots + 1), dtype=torch.bool, device=device)
        listed = listed.scatter(-1, spare, True)[..., :num_slots]
        candidate = candidate & listed

    # The delta rule counts kept pages by their centroid (Jensen: a lower
    # bound) and dropped pages by log-masses raised toward their upper bound
    # (``dropped_page_weights``): the centroid alone misses the spikes of
    # dropped pages (SmolLM2 at 4K: 72% of selections within delta), the
    # bound alone is loose by e^10 and more on real keys.
    tight = None
    if params.exact_centroid or params.estimator in ("bound", "hybrid") or params.dropped_weight:
        tight = mean_constrained_bound(logits)
    upper = tight if params.exact_centroid else logits.upper
    stop_mass = group_page_mass(logits.est)
    raised = raised_logits(logits, params.dropped_weight, tight)
    weights = _raised_weights(logits.est, raised)
    mass = rank_mass(logits, params.estimator, stop_mass, tight)
    keep = fixed
    over = torch.zeros(shape[:2], dtype=torch.bool, device=device)
    open_weight = (weights * (valid & ~fixed)).sum(-1, keepdim=True)
    for bp, heads in _block_sizes(params.block_pages, num_kv_heads, device):
        taken, capped = _take_blocks(
            mass, weights, open_weight, candidate, fixed, cap, bp, params,
            lower=logits.est, upper=upper,
        )  # fmt: skip
        keep = keep | (taken if heads is None else taken & heads[None, :, None])
        over = over | (capped if heads is None else capped & heads[None, :])
    if params.rerank > 0 and rescore is not None and params.delta_control == "estimate":
        # The shortlist (rerank x the budget) bounds the fill like the cap does:
        # pages left off it cannot be taken, so a selection that ends above
        # delta with such pages left counts as over the budget too.
        short = (weights * (valid & ~fixed & ~keep)).sum(-1) > params.delta
        over = over | (short & (valid & ~fixed & ~candidate & ~keep).any(-1))
    if params.over_budget == "dense":
        keep = torch.where(over[..., None], valid, keep)
    dropped = valid & ~keep
    return Selection(
        keep=keep,
        est_kept_mass=1.0 - (weights * dropped).sum(-1).clamp(max=1.0),
        num_pages=num_pages,
        bound_logits=upper,
        over_budget=over,
        dropped_est_lse=torch.logsumexp(
            raised.masked_fill(~dropped[:, :, None, :], -math.inf), dim=-1
        ),
    )


def raised_logits(
    logits: PageLogits, weight: float, tight: torch.Tensor | None = None
) -> torch.Tensor:
    """[N, Hkv, G, M] est + weight (bound - est): each page's log-mass moved
    ``weight`` of the way from the centroid's (a lower bound) toward the
    mean-constrained upper bound; -inf on empty slots. ``tight``:
    ``mean_constrained_bound(logits)`` if the caller has it."""
    if weight == 0:
        return logits.est
    if tight is None:
        tight = mean_constrained_bound(logits)
    live = torch.isfinite(logits.est)
    gap = torch.where(live, tight - logits.est, torch.zeros_like(tight))
    return logits.est + weight * gap


def dropped_page_weights(
    logits: PageLogits, weight: float, tight: torch.Tensor | None = None
) -> torch.Tensor:
    """What each page counts for when the delta rule leaves it out.

    Per query head, the raised log-mass (``raised_logits``) over the sum of
    every page's centroid mass, capped at 1, then the group mean. The sum of
    these over the dropped pages, D / Z with Z the all-centroid total, is at
    least the dropped fraction D / (K + D) whenever the kept pages' true mass
    K is at least their centroid mass (Jensen) -- a conservative estimate of
    what the raised masses say is dropped. weight 0: the centroid's normalized
    mass (``group_page_mass(logits.est)``).

    Returns:
        [N, Hkv, M] float32, 0 on empty slots.
    """
    return _raised_weights(logits.est, raised_logits(logits, weight, tight))


def _raised_weights(est: torch.Tensor, raised: torch.Tensor) -> torch.Tensor:
    """``dropped_page_weights`` from the centroid and raised log-masses, each
    [N, Hkv, G, M]."""
    log_z = torch.logsumexp(est, dim=-1, keepdim=True)
    share = (raised - log_z).clamp(max=0.0)
    return torch.nan_to_num(torch.exp(share), nan=0.0).mean(dim=2)


@functools.lru_cache(maxsize=64)
def _block_sizes(block_pages, num_kv_heads: int, device):
    """[(pages per block, [Hkv] bool mask of its heads, or None for all heads)].

    Every size runs over all heads and is masked after: index tensors built
    from host lists would need a host-to-device copy, which CUDA graphs forbid.
    Cached per layout, so the masks are built once, not on every step.
    """
    if isinstance(block_pages, int):
        return [(block_pages, None)]
    if len(block_pages) != num_kv_heads:
        raise ValueError(f"{len(block_pages)} block sizes for {num_kv_heads} KV heads")
    if len(set(block_pages)) == 1:
        return [(block_pages[0], None)]
    groups = []
    for bp in sorted(set(block_pages)):
        mask = torch.zeros(num_kv_heads, dtype=torch.bool, device=device)
        for h, b in enumerate(block_pages):
            if b == bp:
                mask[h] = True
        groups.append((bp, mask))
    return groups


def _blocks(x: torch.Tensor, bp: int) -> torch.Tensor:
    """[..., M] -> [..., ceil(M / bp)] sums over aligned blocks of bp slots."""
    num_slots = x.shape[-1]
    num_blocks = -(-num_slots // bp)
    pad = num_blocks * bp - num_slots
    return torch.nn.functional.pad(x, (0, pad)).view(*x.shape[:-1], num_blocks, bp).sum(-1)


def _take_blocks(mass, weights, open_weight, candidate, fixed, cap, bp, params, lower, upper):
    """Best candidate blocks of ``bp`` pages per (row, head), in order, while they
    fit under ``cap`` and the stop rule still asks for more.

    mass (ranks blocks), weights (``dropped_page_weights``), candidate, fixed:
    [N, H, M]; open_weight: [N, H, 1] the weights of every page not fixed;
    cap: [N, 1]; lower, upper: [N, H, G, M].
    Returns ([N, H, M] bool candidate pages of the taken blocks, [N, H] bool
    the cap stopped the fill while the stop rule asked for more).
    """
    num_slots = mass.shape[-1]
    block_mass = _blocks(mass * candidate, bp)
    block_count = _blocks(candidate.to(torch.long), bp)
    eligible = block_count > 0
    order_key = torch.where(eligible, block_mass, torch.full_like(block_mass, -1.0))
    order = torch.sort(order_key, dim=-1, descending=True, stable=True).indices
    sorted_weight = _blocks(weights * candidate, bp).gather(-1, order)
    sorted_count = block_count.gather(-1, order)
    sorted_eligible = eligible.gather(-1, order)
    pages_through = fixed.sum(-1, keepdim=True) + torch.cumsum(sorted_count, -1)
    fits = pages_through <= cap[:, None]
    wanted = sorted_eligible
    if params.delta > 0 and params.delta_control == "estimate":
        # Estimated dropped mass before each block: what is not fixed, less
        # the blocks taken before it.
        taken_before = torch.cumsum(sorted_weight, -1) - sorted_weight
        wanted = wanted & (open_weight - taken_before > params.delta)
    elif params.delta > 0:
        bound = _certified_bound_before(candidate, fixed, lower, upper, bp, order)
        wanted = wanted & (bound > params.delta)
    take = wanted & fits
    capped = (wanted & ~fits).any(-1)
    keep_block = torch.zeros_like(take).scatter(-1, order, take)
    # expand + reshape, not repeat_interleave: the latter syncs with the host on CUDA.
    keep_pages = keep_block[..., None].expand(*keep_block.shape, bp).flatten(-2)
    return keep_pages[..., :num_slots] & candidate, capped


def _certified_bound_before(candidate, fixed, lower, upper, bp, order) -> torch.Tensor:
    """[N, H, B]: the certified dropped-mass bound (group mean) before taking
    each block in ``order``: D_ub / (K_lb + D_ub) with K_lb the Jensen lower
    masses of what is kept and D_ub the upper masses of everything else."""
    ref = upper.amax(-1, keepdim=True).clamp(min=-1e30)
    lo = torch.exp(lower - ref)  # [N, H, G, M], 0 on empty slots
    up = torch.exp(upper - ref)
    fixed_g = fixed[:, :, None, :]
    cand_g = candidate[:, :, None, :]
    kept_lb = (lo * fixed_g).sum(-1, keepdim=True)
    dropped_ub = (up * ~fixed_g).sum(-1, keepdim=True)
    order_g = order[:, :, None, :].expand(*lo.shape[:3], order.shape[-1])
    block_lo = _blocks(lo * cand_g, bp).gather(-1, order_g)
    block_up = _blocks(up * cand_g, bp).gather(-1, order_g)
    k = kept_lb + torch.cumsum(block_lo, -1) - block_lo
    d = (dropped_ub - torch.cumsum(block_up, -1) + block_up).clamp(min=0)
    frac = torch.where(d > 0, d / (k + d), torch.zeros_like(d))
    return torch.nan_to_num(frac, nan=1.0).mean(2)


def dropped_mass_upper_bound(
    bound_logits: torch.Tensor, keep: torch.Tensor, kept_lse: torch.Tensor
) -> torch.Tensor:
    """Certified upper bound on the attention mass left out, per (row, KV head).

    With K = exact sum of exp(logits) over kept tokens (from the sparse
    attention's log-sum-exp) and D <= D_ub = sum over dropped pages of their
    upper bound, the true dropped mass D / (K + D) <= D_ub / (K + D_ub).

    Args:
        bound_logits: [N, Hkv, G, M] upper log-masses (``Selection.bound_logits``).
        keep: [N, Hkv, M] bool.
        kept_lse: [N, Hkv, G] float32 log-sum-exp of scaled logits over kept tokens.
    Returns:
        [N, Hkv] float32, the mean over the group's query heads (dropped mass
        is the group mean of the heads' dropped attention weight).
    """
    return certified_fraction(dropped_bound_lse(bound_logits, keep), kept_lse)


def dropped_bound_lse(bound_logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """[N, Hkv, G] log-sum-exp of ``bound_logits`` [N, Hkv, G, M] over the pages
    that ``keep`` [N, Hkv, M] drops (-inf when it drops none)."""
    return torch.logsumexp(bound_logits.masked_fill(keep[:, :, None, :], -math.inf), dim=-1)


def certified_fraction(log_dropped: torch.Tensor, kept_lse: torch.Tensor) -> torch.Tensor:
    """[N, Hkv] D_ub / (K + D_ub), group mean, from log D_ub and log K, each [N, Hkv, G]."""
    return torch.sigmoid(log_dropped - kept_lse).mean(dim=-1)
