"""One layer's sparse decode step -- select pages, attend over them, measure --
run eagerly or replayed from a CUDA graph.

Launched op by op, the step costs ~100 kernel launches a layer, several times
the GPU time (H100, batch 8 x 32K: 3.8 ms of host time against 0.47 ms on the
GPU per layer, benchmarks/results/h100-kernels/profile_decode_b8x32k.txt).
`StepGraphs` captures the step once per (rows, page slots) bucket and replays
it from static buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prhs_vllm import ops
from prhs_vllm.ops import SelectionParams, dropped_mass_upper_bound

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
SLOT_QUANTUM = 512  # page slots per context bucket (8K tokens at 16-token pages)


@dataclass
class StepResult:
    """out: [N, Hq, D]; keep_counts: [N, Hkv] pages kept; num_pages: [N];
    est_kept_mass, certified_dropped: [N, Hkv] float32 (None without metrics)."""

    out: torch.Tensor
    keep_counts: torch.Tensor
    num_pages: torch.Tensor
    est_kept_mass: torch.Tensor
    certified_dropped: torch.Tensor | None


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
) -> StepResult:
    """Select pages and attend over them for N decode rows of one layer.

    Args:
        query: [N, Hq, D]; key_cache, value_cache: [P, Hkv, bs, D] views.
        summaries: PageSummaries of the layer.
        block_table: [N, >=num_slots] int32; seq_lens: [N] int32.
        num_slots: page slots scored (>= the longest row's page count).
    """
    selection = ops.select(
        query,
        summaries.key_sum,
        summaries.key_min,
        summaries.key_max,
        block_table,
        seq_lens,
        params,
        num_slots,
    )
    out, lse = ops.sparse_decode(
        query,
        key_cache,
        value_cache,
        block_table,
        seq_lens,
        selection.keep,
        params.scale,
        workspace=workspace,
    )
    certified = None
    if with_metrics:
        num_rows, num_kv_heads = selection.keep.shape[:2]
        certified = dropped_mass_upper_bound(
            selection.bound_logits, selection.keep, lse.view(num_rows, num_kv_heads, -1)
        )
    return StepResult(
        out, selection.keep.sum(-1), selection.num_pages, selection.est_kept_mass, certified
    )


def _bucket(value: int, buckets: tuple[int, ...]) -> int | None:
    return next((b for b in buckets if b >= value), None)


class _Graph:
    """Static inputs, the captured graph and its static outputs for one bucket."""

    def __init__(self, rows: int, slots: int, query: torch.Tensor, table_dtype) -> None:
        device = query.device
        self.query = torch.zeros((rows, *query.shape[1:]), dtype=query.dtype, device=device)
        self.seq_lens = torch.ones(rows, dtype=torch.int32, device=device)
        self.block_table = torch.zeros((rows, slots), dtype=table_dtype, device=device)
        self.graph = torch.cuda.CUDAGraph()
        self.result: StepResult | None = None


class StepGraphs:
    """CUDA graphs of one layer's sparse step, keyed by (row, slot) buckets.

    Padded rows attend to one token of page 0 and are never read back. A graph
    holds the addresses of the layer's summaries and KV cache: if either is
    re-allocated (the KV cache is sized twice at start-up), the graphs are
    dropped and captured again.
    """

    _pool = None  # one memory pool for every layer: layers replay one at a time
    _workspaces: dict[tuple, torch.Tensor] = {}

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
    ) -> StepResult:
        """Same arguments and result as ``sparse_step`` (num_slots = max_pages)."""
        num_rows = query.shape[0]
        rows = _bucket(num_rows, ROW_BUCKETS)
        slots = min(-(-max_pages // SLOT_QUANTUM) * SLOT_QUANTUM, block_table.shape[1])
        if rows is None or torch.cuda.is_current_stream_capturing():
            return sparse_step(
                query, summaries, key_cache, value_cache, block_table, seq_lens,
                params, max_pages, with_metrics,
            )  # fmt: skip
        owner = (summaries.key_sum.data_ptr(), key_cache.data_ptr(), params, with_metrics)
        if owner != self._owner:
            self._graphs.clear()
            self._owner = owner
        entry = self._graphs.get((rows, slots))
        fresh = entry is None
        if fresh:
            entry = _Graph(rows, slots, query, block_table.dtype)
        entry.query[:num_rows].copy_(query)
        entry.seq_lens[:num_rows].copy_(seq_lens)
        entry.block_table[:num_rows].copy_(block_table[:, :slots])
        if num_rows < rows:  # padded rows: one token of page 0, whatever ran before
            entry.seq_lens[num_rows:].fill_(1)
            entry.block_table[num_rows:].zero_()
        if fresh:
            self._capture(entry, summaries, key_cache, value_cache, params, slots, with_metrics)
            self._graphs[(rows, slots)] = entry
        entry.graph.replay()
        result = entry.result
        return StepResult(
            result.out[:num_rows],
            result.keep_counts[:num_rows],
            result.num_pages[:num_rows],
            result.est_kept_mass[:num_rows],
            None if result.certified_dropped is None else result.certified_dropped[:num_rows],
        )

    def _capture(self, entry, summaries, key_cache, value_cache, params, slots, with_metrics):
        workspace = self._workspace(entry.query, key_cache, slots)

        def step() -> StepResult:
            return sparse_step(
                entry.query, summaries, key_cache, value_cache, entry.block_table,
                entry.seq_lens, params, slots, with_metrics, workspace,
            )  # fmt: skip

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()  # compiles Triton kernels, warms the allocator
        torch.cuda.current_stream().wait_stream(side)
        if StepGraphs._pool is None:
            StepGraphs._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(entry.graph, pool=StepGraphs._pool):
            entry.result = step()

    @classmethod
    def _workspace(cls, query, key_cache, slots) -> torch.Tensor | None:
        """Split-K workspace per bucket, shared by the layers (they run in turn)."""
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
