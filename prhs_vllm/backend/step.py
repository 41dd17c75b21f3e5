"""One layer's sparse decode step -- select pages, attend over them, measure --
run eagerly or replayed from a CUDA graph.

Launched op by op, the step costs ~100 kernel launches a layer, several times
the GPU time (H100, batch 8 x 32K: 3.8 ms of host time against 0.47 ms on the
GPU per layer, docs/results.md).
`StepGraphs` captures the step once per (rows, page slots) bucket and replays
it from static buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prhs_vllm import metrics, ops
from prhs_vllm.backend.reuse import ReuseConfig, ReuseState
from prhs_vllm.ops import SelectionParams, dropped_mass_upper_bound
from prhs_vllm.ops.ref import exact_page_logits
from prhs_vllm.ops.ref.selection import certified_fraction, group_page_mass, mandatory_pages

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
SLOT_QUANTUM = 512  # page slots per context bucket (8K tokens at 16-token pages)


@dataclass
class StepResult:
    """out: [N, Hq, D]; keep: [N, Hkv, M] bool; keep_counts: [N, Hkv] int pages kept;
    num_pages: [N]; est_kept_mass, certified_dropped, true_dropped: [N, Hkv]
    float32 (certified only with the certified stop rule or in audit mode and
    with metrics, true only in audit mode); est_dropped: [N, Hkv] float32 the
    dropped mass estimated after the attention (``posthoc_dropped``; None
    without metrics); over_budget: [N, Hkv] bool the budget cap bound before
    the stop rule was met;
    reused: [N, Hkv] bool or None; row_stats: [N, K] float64
    ``metrics.layer_row_stats`` (None without metrics); stats_recorded: the
    step graph has already added row_stats into the process's device counters
    (``metrics.StepStats.add_device_totals``): the caller only counts rows."""

    out: torch.Tensor
    keep: torch.Tensor
    keep_counts: torch.Tensor
    num_pages: torch.Tensor
    est_kept_mass: torch.Tensor
    certified_dropped: torch.Tensor | None
    true_dropped: torch.Tensor | None = None
    est_dropped: torch.Tensor | None = None
    over_budget: torch.Tensor | None = None
    reused: torch.Tensor | None = None
    row_stats: torch.Tensor | None = None
    stats_recorded: bool = False

    def rows(self, n: int) -> StepResult:
        """The first n rows (graph buckets are padded)."""

        def cut(x):
            return x[:n] if isinstance(x, torch.Tensor) else x

        return StepResult(*(cut(getattr(self, f)) for f in self.__dataclass_fields__))


def true_dropped_mass(query, key_cache, block_table, seq_lens, keep, scale) -> torch.Tensor:
    """Audit: [N, Hkv] float32 true dropped mass (group mean) of ``keep`` [N, Hkv, M],
    from exact page log-masses over every page slot (dense work)."""
    num_rows, num_kv_heads, num_slots = keep.shape
    slots = torch.arange(num_slots, device=keep.device).expand(num_rows, num_kv_heads, -1)
    logits = exact_page_logits(query, key_cache, block_table, seq_lens, scale, slots)
    weights = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)
    return (weights * ~keep[:, :, None, :]).sum(-1).mean(-1)


def sparse_step(
    query: torch.Tensor,
    summaries,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    params: SelectionParams,
    num_slots: int,
    with_metrics: bool,
    workspace: torch.Tensor | None = None,
    prev_keep: torch.Tensor | None = None,
    audit: bool = False,
    reuse: tuple[ReuseState, ReuseConfig] | None = None,
) -> StepResult:
    """Select pages and attend over them for N decode rows of one layer.

    Args:
        query: [N, Hq, D]; key_cache, value_cache: [P, Hkv, bs, D] views.
        summaries: PageSummaries of the layer.
        block_table: [N, >=num_slots] int32; seq_lens: [N] int32.
        num_slots: page slots scored (>= the longest row's page count).
        prev_keep: [N, Hkv, num_slots] bool, the previous sparse layer's keep (ETF).
        audit: also compute the true dropped mass (dense work).
        reuse: the layer's reuse state and knobs (time axis), or None.
    """
    reused = None  # [N, Hkv] bool with reuse: selections taken from an earlier step
    if reuse is not None:
        state, reuse_cfg = reuse
        block_size = key_cache.shape[2]
        slot, valid = state.lookup(block_table, seq_lens, block_size)
        reused = state.decide(query, slot, valid, reuse_cfg)
    selection = ops.select(
        query,
        summaries.key_sum,
        summaries.key_min,
        summaries.key_max,
        block_table,
        seq_lens,
        params,
        num_slots,
        key_cache=key_cache,
        prev_keep=prev_keep,
        skip=reused,
        with_bound=with_metrics,
    )
    keep, est_kept = selection.keep, selection.est_kept_mass
    compact = None
    if selection.kept_slots is not None:  # fused selection (never with reuse)
        compact = (selection.kept_slots, selection.num_kept)
    if reuse is not None:
        keep, est_kept = _apply_reuse(
            state, reuse_cfg, query, block_table, seq_lens, params, selection, slot, reused
        )
    out, lse = ops.sparse_decode(
        query,
        key_cache,
        value_cache,
        block_table,
        seq_lens,
        keep,
        params.scale,
        workspace=workspace,
        compact=compact,
    )
    certified = est_dropped = None
    if with_metrics:
        num_rows, num_kv_heads = keep.shape[:2]
        kept_lse = lse.view(num_rows, num_kv_heads, -1)
        # The attention's exact kept mass against the raised estimate of what
        # was dropped: tracks the true dropped mass more closely than the
        # selection's own estimate (whose kept side is the centroid's).
        est_dropped = certified_fraction(selection.dropped_est_lse, kept_lse)
        if selection.bound_logits is not None and (audit or params.delta_control == "certified"):
            # Reads ~1 on real keys unless pages are scored exactly (rerank):
            # computed only where the stop rule or an audit asks for it.
            certified = dropped_mass_upper_bound(selection.bound_logits, keep, kept_lse)
    true = None
    if audit:
        true = true_dropped_mass(query, key_cache, block_table, seq_lens, keep, params.scale)
    # The fused selection counted the kept pages already (no reduction over M).
    counts = compact[1] if compact is not None and reuse is None else keep.sum(-1)
    row_stats = None
    if with_metrics:
        row_stats = metrics.layer_row_stats(
            counts, selection.num_pages, est_dropped, certified, true, params.delta, reused,
            selection.over_budget, params.over_budget == "dense",
        )  # fmt: skip
    return StepResult(
        out, keep, counts, selection.num_pages, est_kept, certified, true, est_dropped,
        selection.over_budget, reused, row_stats,
    )  # fmt: skip


def _apply_reuse(state, cfg, query, block_table, seq_lens, params, selection, slot, reused):
    """Swap in the stored selections where reused; store this step's state.

    Returns (keep [N, Hkv, M], estimated kept mass [N, Hkv])."""
    fresh = selection.keep
    num_slots = fresh.shape[-1]
    must = mandatory_pages(selection.num_pages, num_slots, params)
    live = torch.arange(num_slots, device=fresh.device)[None, :] < selection.num_pages[:, None]
    stored = (state.stored_keep(slot, num_slots) | must[:, None, :]) & live[:, None, :]
    keep = torch.where(reused[..., None], stored, fresh)
    score = group_page_mass(selection.bound_logits)
    cap = torch.ceil(params.budget * selection.num_pages.to(torch.float64)).to(torch.long)
    state.store(
        query, block_table, seq_lens, params.block_size, slot, reused, fresh, score, cap, cfg
    )
    est = torch.where(reused, (score * keep).sum(-1), selection.est_kept_mass)
    return keep, est


def add_row_stats(totals: torch.Tensor, row_stats: torch.Tensor, weight: torch.Tensor) -> None:
    """totals [K] += weight [N] @ row_stats [N, K] (float64): one launch, where
    a product and a sum took three. Padded rows weigh 0."""
    totals.addmv_(row_stats.t(), weight)


def _fit(keep: torch.Tensor | None, slots: int) -> torch.Tensor | None:
    """[N, H, M'] -> [N, H, slots]: cut, or pad with False."""
    if keep is None or keep.shape[-1] == slots:
        return keep
    if keep.shape[-1] > slots:
        return keep[..., :slots]
    return torch.nn.functional.pad(keep, (0, slots - keep.shape[-1]))


def _bucket(value: int, buckets: tuple[int, ...]) -> int | None:
    return next((b for b in buckets if b >= value), None)


class _RowInputs:
    """Static seq_lens [rows] and block_table [rows, slots] of one bucket,
    shared by every layer's graph: the layers of a step attend for the same
    rows, so the step's first sparse layer copies them in and the others only
    replay (two copies a step, not two a layer)."""

    def __init__(self, rows: int, slots: int, table_dtype, device) -> None:
        self.seq_lens = torch.ones(rows, dtype=torch.int32, device=device)
        self.block_table = torch.zeros((rows, slots), dtype=table_dtype, device=device)
        self.row_weight = torch.zeros(rows, dtype=torch.float64, device=device)  # 1: a real row
        self.step: object | None = None  # the step whose rows they hold
        self._totals: torch.Tensor | None = None

    def totals(self) -> torch.Tensor:
        """[K] float64 device counters that the graphs of this bucket add their
        real rows' ``metrics.layer_row_stats`` into (registered with the
        process's stats at creation), instead of a reduction and an add
        launched per layer."""
        if self._totals is None:
            fields = metrics.num_device_fields()
            self._totals = torch.zeros(fields, dtype=torch.float64, device=self.seq_lens.device)
            metrics.process_stats().add_device_totals(self._totals)
        return self._totals

    def stage(self, block_table, seq_lens, step: object | None) -> None:
        """Copy a step's rows in (padded rows: one token of page 0), unless
        they are `step`'s and already here. step None: always copy."""
        if step is not None and step is self.step:
            return
        num_rows, slots = seq_lens.shape[0], self.block_table.shape[1]
        self.seq_lens[:num_rows].copy_(seq_lens)
        self.block_table[:num_rows].copy_(block_table[:, :slots])
        self.row_weight[:num_rows].fill_(1)
        if num_rows < self.seq_lens.shape[0]:
            self.seq_lens[num_rows:].fill_(1)
            self.block_table[num_rows:].zero_()
            self.row_weight[num_rows:].zero_()
        self.step = step


class _Graph:
    """Static inputs, the captured graph and its static outputs for one bucket."""

    def __init__(
        self, rows: int, slots: int, query: torch.Tensor, inputs: _RowInputs, kv_heads: int,
        etf: bool,
    ) -> None:  # fmt: skip
        device = query.device
        self.query = torch.zeros((rows, *query.shape[1:]), dtype=query.dtype, device=device)
        self.prev_keep = (
            torch.zeros((rows, kv_heads, slots), dtype=torch.bool, device=device) if etf else None
        )
        self.inputs = inputs  # seq_lens and block_table, shared by the layers
        self.graph = torch.cuda.CUDAGraph()
        self.result: StepResult | None = None


class StepGraphs:
    """CUDA graphs of one layer's sparse step, keyed by (row, slot) buckets.

    Padded rows attend to one token of page 0 and are never read back. A graph
    holds the addresses of the layer's summaries and KV cache: if either is
    re-allocated (the KV cache is sized twice at start-up), the graphs are
    dropped and captured again.
    """

    # One memory pool for every layer (layers replay one at a time), per device.
    # A MemPool object holds a reference to its pool: with a bare handle, once
    # every graph in the pool was dropped (buckets re-captured after the KV
    # cache moved) while a tensor from it lived on (a returned result, a
    # cuBLAS workspace made during capture), the next capture into the handle
    # failed torch's assertion that the pool is live.
    _pools: dict[torch.device, torch.cuda.MemPool] = {}
    _workspaces: dict[tuple, torch.Tensor] = {}
    _row_inputs: dict[tuple, _RowInputs] = {}  # (device, rows, slots, table dtype)

    def __init__(self) -> None:
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._owner: tuple | None = None

    def run(
        self,
        query: torch.Tensor,
        summaries,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        params: SelectionParams,
        max_pages: int,
        with_metrics: bool,
        prev_keep: torch.Tensor | None = None,
        reuse: tuple[ReuseState, ReuseConfig] | None = None,
        step: object | None = None,
    ) -> StepResult:
        """Same arguments and result as ``sparse_step`` (num_slots = max_pages).

        step: an object standing for this step's rows (the same one for every
        layer of a step, a new one each step), or None. Layers that pass the
        same step share one copy of block_table and seq_lens into the graphs'
        inputs."""
        num_rows = query.shape[0]
        rows = _bucket(num_rows, ROW_BUCKETS)
        slots = min(-(-max_pages // SLOT_QUANTUM) * SLOT_QUANTUM, block_table.shape[1])
        no_prev = params.frozen_fraction > 0 and prev_keep is None
        if rows is None or no_prev or torch.cuda.is_current_stream_capturing():
            return sparse_step(
                query, summaries, key_cache, value_cache, block_table, seq_lens,
                params, max_pages, with_metrics, prev_keep=_fit(prev_keep, max_pages),
                reuse=reuse,
            )  # fmt: skip
        owner = (
            summaries.key_min.data_ptr(), key_cache.data_ptr(), params, with_metrics,
            None if reuse is None else (reuse[0].page.data_ptr(), reuse[1]),
        )  # fmt: skip
        if owner != self._owner:
            self._graphs.clear()
            self._owner = owner
        entry = self._graphs.get((rows, slots))
        fresh = entry is None
        if fresh:
            entry = _Graph(
                rows, slots, query, self._inputs(rows, slots, block_table.dtype, query.device),
                key_cache.shape[1], params.frozen_fraction > 0,
            )  # fmt: skip
        entry.query[:num_rows].copy_(query)
        entry.inputs.stage(block_table, seq_lens, step)
        if entry.prev_keep is not None:
            entry.prev_keep.zero_()
            if prev_keep is not None:
                entry.prev_keep[:num_rows].copy_(_fit(prev_keep, slots))
        if fresh:
            self._capture(
                entry, summaries, key_cache, value_cache, params, slots, with_metrics, reuse
            )
            self._graphs[(rows, slots)] = entry
        entry.graph.replay()
        result = entry.result.rows(num_rows)
        result.stats_recorded = with_metrics
        return result

    def _capture(
        self, entry, summaries, key_cache, value_cache, params, slots, with_metrics, reuse
    ):
        workspace = self.shared_workspace(entry.query, key_cache, slots)
        inputs = entry.inputs

        def step(count: bool) -> StepResult:
            result = sparse_step(
                entry.query, summaries, key_cache, value_cache, inputs.block_table,
                inputs.seq_lens, params, slots, with_metrics, workspace,
                prev_keep=entry.prev_keep, reuse=reuse,
            )  # fmt: skip
            if count and with_metrics:
                add_row_stats(inputs.totals(), result.row_stats, inputs.row_weight)
            return result

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            warm = step(count=False)  # compiles Triton kernels, warms the allocator
            if with_metrics:  # and cuBLAS (the add is a gemv): no lazy set-up in capture
                scratch = torch.zeros_like(warm.row_stats[0])
                add_row_stats(scratch, warm.row_stats, inputs.row_weight)
        torch.cuda.current_stream().wait_stream(side)
        if with_metrics:
            inputs.totals()  # allocated outside the graph's memory pool
        device = entry.query.device
        if device not in StepGraphs._pools:
            with torch.cuda.device(device):
                StepGraphs._pools[device] = torch.cuda.MemPool()
        with torch.cuda.graph(entry.graph, pool=StepGraphs._pools[device].id):
            entry.result = step(count=True)

    @classmethod
    def _inputs(cls, rows: int, slots: int, table_dtype, device) -> _RowInputs:
        key = (device, rows, slots, table_dtype)
        if key not in cls._row_inputs:
            cls._row_inputs[key] = _RowInputs(rows, slots, table_dtype, device)
        return cls._row_inputs[key]

    @classmethod
    def shared_workspace(cls, query, key_cache, slots) -> torch.Tensor | None:
        """Split-K workspace per (rows, slots) shape, shared by the layers (they
        run in turn): the step graphs' buckets, and vLLM's full graphs."""
        if not ops.cuda_kernels_ready():
            return None
        from prhs_vllm.ops.cuda import sparse_decode as cuda_ops

        rows, num_q_heads, head_dim = query.shape
        key = (query.device, rows, slots, num_q_heads, key_cache.shape[1], head_dim)
        if key not in cls._workspaces:
            cls._workspaces[key] = cuda_ops.alloc_workspace(
                rows, num_q_heads, key_cache.shape[1], head_dim, key_cache.shape[2], slots,
                query.dtype, query.device,
            )  # fmt: skip
        return cls._workspaces[key]
