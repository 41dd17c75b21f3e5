"""Sparse decode rows inside vLLM's full CUDA graphs.

vLLM replays one full graph for a whole decode step, without running the
backend's Python, so the graph cannot hold a host decision of which rows run
sparse. A graph that holds the sparse step therefore takes that decision as
device data, written by the builder before every step into buffers the graph
reads (``DeviceRowBuffers``):

- vLLM's kernel runs for every row, with sparse rows at length 0 (no work);
- the sparse step runs for every row, with dense and padded rows at length 1
  (little work);
- each row keeps the output of the path it belongs to.

The rows are the host's own decision (``sparse_row_mask``), copied in, so a
replayed step and a step run eagerly agree row for row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from prhs_vllm import metrics

# Counted by the graphs on the device: a replayed graph runs no host code.
ROW_COUNT_FIELDS = ("prhs_sparse_layer_rows", "prhs_head_selections")


@dataclass
class DeviceRows:
    """One step's rows as device data (R rows: the step's, padding included).

    sparse: [R] bool, the rows that run sparse; dense: [R] bool, the others.
    sparse_lens: [R] int32, the context length where sparse, else 1.
    dense_lens: [R] int32, 0 where sparse, else the context length.
    row_weight: [R] float64, 1 where sparse (weights of the device counters).
    block_table: [R, M] page ids; num_slots: M, the page slots the sparse
        step scores (every page of ``max_model_len``).
    totals, row_counts: device counters of ``metrics.layer_row_stats`` and of
        ``ROW_COUNT_FIELDS`` (None without metrics); layer_counts: [2] float64,
        what one layer adds to row_counts (sparse rows, times the KV heads).
    """

    sparse: torch.Tensor
    dense: torch.Tensor
    sparse_lens: torch.Tensor
    dense_lens: torch.Tensor
    row_weight: torch.Tensor
    block_table: torch.Tensor
    num_slots: int
    totals: torch.Tensor | None
    row_counts: torch.Tensor | None
    layer_counts: torch.Tensor


class DeviceRowBuffers:
    """The builder's persistent row buffers: a captured graph holds their
    addresses, and every step writes them before it runs (or replays)."""

    def __init__(
        self, max_rows: int, num_kv_heads: int, device: torch.device, with_metrics: bool
    ) -> None:
        self.sparse = torch.zeros(max_rows, dtype=torch.bool, device=device)
        self.dense = torch.ones(max_rows, dtype=torch.bool, device=device)
        self.sparse_lens = torch.ones(max_rows, dtype=torch.int32, device=device)
        self.dense_lens = torch.zeros(max_rows, dtype=torch.int32, device=device)
        self.row_weight = torch.zeros(max_rows, dtype=torch.float64, device=device)
        # One layer's row counts, [sparse rows, sparse rows x KV heads]: from
        # the per-row counts, once a step (not once a layer).
        self._per_row = torch.tensor([1.0, num_kv_heads], dtype=torch.float64, device=device)
        self.layer_counts = torch.zeros(len(ROW_COUNT_FIELDS), dtype=torch.float64, device=device)
        self.totals = self.row_counts = None
        if with_metrics:
            stats = metrics.process_stats()
            self.totals = torch.zeros(
                metrics.num_device_fields(), dtype=torch.float64, device=device
            )
            self.row_counts = torch.zeros(len(ROW_COUNT_FIELDS), dtype=torch.float64, device=device)
            stats.add_device_totals(self.totals)
            stats.add_device_totals(self.row_counts, ROW_COUNT_FIELDS)

    @property
    def max_rows(self) -> int:
        return self.sparse.shape[0]

    def write(
        self,
        seq_lens: torch.Tensor,
        block_table: torch.Tensor,
        host_sparse: torch.Tensor | None,
    ) -> DeviceRows:
        """Write one step's rows (nothing waits for the device).

        Args:
            seq_lens: [R] int32 device context lengths (vLLM's, padded rows 0).
            block_table: [R, M] device page ids.
            host_sparse: [R] bool host mask of the sparse rows, or None (none).
        """
        num_rows = seq_lens.shape[0]
        if num_rows > self.max_rows:
            raise ValueError(f"{num_rows} rows, but the row buffers hold {self.max_rows}")
        sparse = self.sparse[:num_rows]
        if host_sparse is None:
            sparse.zero_()
        else:
            # Pinned, so the copy does not wait for the stream to drain.
            sparse.copy_(host_sparse.pin_memory(), non_blocking=True)
        sparse_lens, dense_lens = self.sparse_lens[:num_rows], self.dense_lens[:num_rows]
        dense_lens.copy_(seq_lens).masked_fill_(sparse, 0)
        # A sparse row's length (>= 1), the others' 1.
        torch.sub(seq_lens, dense_lens, out=sparse_lens).clamp_(min=1)
        dense = torch.logical_not(sparse, out=self.dense[:num_rows])
        row_weight = self.row_weight[:num_rows].copy_(sparse)
        torch.mul(self._per_row, row_weight.sum(), out=self.layer_counts)
        return DeviceRows(
            sparse, dense, sparse_lens, dense_lens, row_weight, block_table,
            block_table.shape[1], self.totals, self.row_counts, self.layer_counts,
        )  # fmt: skip


def dense_rows_metadata(base: Any, dense_lens: torch.Tensor) -> Any:
    """vLLM's FlashAttention metadata with the sparse rows at length 0, for the
    dense rows of a sparse layer. The ahead-of-time schedule was made for the
    full lengths, so it is dropped: the kernel then runs the same scheduling
    step itself, on these lengths. vLLM's split count is kept, so a step with
    no sparse row computes what vLLM's own graph does. The price: with every
    row sparse, the kernel still took ~15 us a sparse layer at vLLM's 32
    splits for graphs on an H100 (docs/results.md)."""
    import dataclasses

    return dataclasses.replace(base, seq_lens=dense_lens, scheduler_metadata=None)


def keep_path_outputs(output: torch.Tensor, sparse_out: torch.Tensor, rows: DeviceRows) -> None:
    """Overwrite the sparse rows of ``output`` [>=R, Hq, D] (vLLM's kernel's
    result) with ``sparse_out`` [R, Hq, D]; the other rows keep theirs."""
    num_rows = rows.sparse.shape[0]
    dense_out = output[:num_rows]
    dense_out.copy_(torch.where(rows.sparse[:, None, None], sparse_out.to(output.dtype), dense_out))


def count_rows(rows: DeviceRows, row_stats: torch.Tensor | None) -> None:
    """Add one layer's sparse rows into the device counters (no host work at
    replay). row_stats: [R, K] ``metrics.layer_row_stats`` of every row."""
    if rows.totals is None or row_stats is None:
        return
    # masked_fill, not a product with the weights: a dense or padded row's
    # stats may be NaN (its length-1 "context" can be a page never written).
    rows.totals.add_(row_stats.masked_fill(rows.dense[:, None], 0).sum(0))
    rows.row_counts.add_(rows.layer_counts)
