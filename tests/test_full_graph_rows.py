"""Sparse rows inside vLLM's full graphs (`backend/full_graph.py`): the row
buffers a captured graph reads, how the builder writes them before each step,
which output each row keeps, and the device row counters. On the CPU, with a
stand-in for vLLM's FlashAttention builder; the GPU replay is in
tests/gpu/test_full_graph_replay.py."""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch

from prhs_vllm import metrics
from prhs_vllm.backend import common
from prhs_vllm.backend.common import PrhsBuilderMixin
from prhs_vllm.backend.full_graph import (
    ROW_COUNT_FIELDS,
    DeviceRowBuffers,
    count_rows,
    dense_rows_metadata,
    keep_path_outputs,
)

MIN_CONTEXT = 100


@dataclasses.dataclass
class FlashMeta:
    seq_lens: torch.Tensor
    scheduler_metadata: torch.Tensor | None
    max_num_splits: int = 32


class _FlashBuilder:
    """vLLM's builder as the mixin sees it: build() reads common.seq_lens."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        self.kv_cache_spec = kv_cache_spec

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        return FlashMeta(common_attn_metadata.seq_lens, torch.zeros(3, dtype=torch.int32))

    def build_for_cudagraph_capture(self, common_attn_metadata):
        return self.build(0, common_attn_metadata)


class _Builder(PrhsBuilderMixin, _FlashBuilder):
    pass


def engine(**prhs):
    # 64 rows unless asked; a field given as None keeps its default
    prhs = {"min_context": MIN_CONTEXT, "metrics": True, "full_graph_max_rows": 64, **prhs}
    prhs = {k: v for k, v in prhs.items() if v is not None}
    from vllm.config import CUDAGraphMode

    return types.SimpleNamespace(
        use_v2_model_runner=True, speculative_config=None,
        parallel_config=types.SimpleNamespace(data_parallel_size=1, pipeline_parallel_size=1),
        compilation_config=types.SimpleNamespace(
            cudagraph_mode=CUDAGraphMode.FULL_AND_PIECEWISE, max_cudagraph_capture_size=32
        ),
        scheduler_config=types.SimpleNamespace(max_num_seqs=16),
        additional_config={"prhs": prhs},
    )  # fmt: skip


def common_metadata(query_lens, seq_lens):
    qsl = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.tensor(query_lens, dtype=torch.int32).cumsum(0)
    seq = torch.tensor(seq_lens, dtype=torch.int32)
    return types.SimpleNamespace(
        num_reqs=len(query_lens), query_start_loc_cpu=qsl, query_start_loc=qsl,
        max_seq_len=int(seq.max()), max_query_len=max(query_lens), _seq_lens_cpu=seq,
        seq_lens=seq, block_table_tensor=torch.arange(len(seq_lens) * 8).view(-1, 8),
    )  # fmt: skip


def builder(monkeypatch, **prhs) -> _Builder:
    monkeypatch.setattr(common, "_DISPATCH_GUARDED", True)
    spec = types.SimpleNamespace(block_size=16, num_kv_heads=8)
    return _Builder(spec, ["model.layers.0.self_attn.attn"], engine(**prhs), "cpu")


def test_capture_holds_the_sparse_step_with_every_row_dense(monkeypatch):
    b = builder(monkeypatch)
    meta = b.build_for_cudagraph_capture(common_metadata([1] * 4, [1, 1, 1, 1]))
    rows = meta.graph_rows
    assert rows is not None and meta.sparse is None
    assert rows.sparse.tolist() == [False] * 4
    assert rows.num_slots == 8
    # The graph reads the builder's buffers: their addresses are what it holds.
    assert rows.dense_lens.data_ptr() == b._device_rows.dense_lens.data_ptr()
    assert meta.dense_rows_base.seq_lens is rows.dense_lens
    assert meta.dense_rows_base.scheduler_metadata is None  # made for other lengths
    assert meta.base.seq_lens.data_ptr() != rows.dense_lens.data_ptr()  # dense layers


@pytest.mark.parametrize(
    ("query_lens", "num_reqs"), [([2, 1, 1], 3), ([1] * 33, 33)], ids=["mixed", "too-many"]
)
def test_capture_of_other_graphs_stays_dense(monkeypatch, query_lens, num_reqs):
    b = builder(monkeypatch, full_graph_max_rows=32)
    meta = b.build_for_cudagraph_capture(common_metadata(query_lens, [200] * num_reqs))
    assert meta.graph_rows is None and meta.dense_rows_base is None


def test_each_step_writes_the_host_decision(monkeypatch):
    b = builder(monkeypatch)
    buffers = b._device_rows
    # rows: sparse, short decode, sparse, padding (query length 0, seq_len 0)
    meta = b.build(0, common_metadata([1, 1, 1, 0], [500, 50, 100, 0]))
    assert meta.graph_rows is None  # only a capture's metadata runs the graph path
    assert meta.sparse.host_mask.tolist() == [True, False, True, False]
    assert buffers.sparse[:4].tolist() == [True, False, True, False]
    assert buffers.sparse_lens[:4].tolist() == [500, 1, 100, 1]
    assert buffers.dense_lens[:4].tolist() == [0, 50, 0, 0]
    assert buffers.row_weight[:4].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert buffers.dense[:4].tolist() == [False, True, False, True]
    assert buffers.layer_counts.tolist() == [2.0, 16.0]  # rows, rows x 8 KV heads
    assert meta.dense_rows_base.seq_lens.tolist() == [0, 50, 0, 0]
    assert meta.base.seq_lens.tolist() == [500, 50, 100, 0]  # vLLM's, for dense layers
    # A later dense step leaves no sparse row behind in the buffers.
    meta = b.build(0, common_metadata([1, 1], [40, 60]))
    assert meta.sparse is None and meta.dense_rows_base is None
    assert buffers.sparse[:2].tolist() == [False, False]
    assert buffers.dense_lens[:2].tolist() == [40, 60]
    assert buffers.sparse_lens[:2].tolist() == [1, 1]


def test_steps_beyond_the_graph_rows_are_not_written(monkeypatch):
    b = builder(monkeypatch, full_graph_max_rows=2)
    meta = b.build(0, common_metadata([1, 1, 1], [500, 500, 500]))
    assert meta.sparse is not None and meta.dense_rows_base is None
    assert b._device_rows.sparse.sum() == 0


@pytest.mark.parametrize("prhs", [{"full_graph_max_rows": 0}, {"audit": True}])
def test_no_buffers_where_graphs_hold_no_sparse_step(monkeypatch, prhs):
    assert builder(monkeypatch, **prhs)._device_rows is None


@pytest.mark.parametrize(
    ("prhs", "reason"),
    [
        ({"cuda_graphs": False}, "cuda_graphs is off"),
        ({"audit": True}, "audit is on"),
        ({"reuse_tau": 0.9}, "time reuse (reuse_tau) is on"),
    ],
)
def test_a_refused_full_graph_setting_is_named(monkeypatch, caplog, prhs, reason):
    with caplog.at_level("WARNING", logger="vllm.prhs"):
        assert builder(monkeypatch, **prhs)._device_rows is None
    assert f"full_graph_max_rows=64 is not used: {reason}" in caplog.text


def test_the_default_is_off_and_quiet(monkeypatch, caplog):
    with caplog.at_level("WARNING", logger="vllm.prhs"):
        assert builder(monkeypatch, full_graph_max_rows=None)._device_rows is None
    assert "full_graph_max_rows" not in caplog.text


def test_row_buffers_refuse_more_rows_than_they_hold():
    buffers = DeviceRowBuffers(2, 8, torch.device("cpu"), with_metrics=False)
    with pytest.raises(ValueError, match="3 rows, but the row buffers hold 2"):
        buffers.write(torch.ones(3, dtype=torch.int32), torch.zeros(3, 4), None)


def test_each_row_keeps_the_output_of_its_path():
    buffers = DeviceRowBuffers(8, 8, torch.device("cpu"), with_metrics=False)
    rows = buffers.write(
        torch.tensor([300, 7, 900], dtype=torch.int32), torch.zeros(3, 4, dtype=torch.int32),
        torch.tensor([True, False, True]),
    )  # fmt: skip
    output = torch.full((5, 2, 4), 1.0, dtype=torch.bfloat16)  # 5 tokens: 2 beyond the rows
    sparse_out = torch.full((3, 2, 4), 2.0)
    keep_path_outputs(output, sparse_out, rows)
    assert output[:, 0, 0].tolist() == [2.0, 1.0, 2.0, 1.0, 1.0]


def test_dense_rows_metadata_replaces_only_lengths_and_schedule():
    base = FlashMeta(torch.tensor([5, 6]), torch.zeros(2))
    lens = torch.tensor([0, 6])
    out = dense_rows_metadata(base, lens)
    assert out.seq_lens is lens and out.scheduler_metadata is None
    assert out.max_num_splits == 32  # vLLM's, as its own graph runs dense rows
    assert base.seq_lens.tolist() == [5, 6]  # vLLM's own is untouched


def test_device_counters_take_sparse_rows_only(monkeypatch):
    stats = metrics.StepStats()
    monkeypatch.setattr(metrics, "process_stats", lambda: stats)
    buffers = DeviceRowBuffers(4, 8, torch.device("cpu"), with_metrics=True)
    rows = buffers.write(
        torch.tensor([300, 7, 900], dtype=torch.int32), torch.zeros(3, 4, dtype=torch.int32),
        torch.tensor([True, False, True]),
    )  # fmt: skip
    row_stats = torch.arange(3 * metrics.num_device_fields(), dtype=torch.float64).view(3, -1)
    row_stats[1] = float("nan")  # a dense row's stats over a page never written
    count_rows(rows, row_stats)
    count_rows(rows, row_stats)  # two layers
    totals = stats.totals()
    assert totals["prhs_sparse_layer_rows"] == 4  # 2 rows x 2 layers
    assert totals["prhs_head_selections"] == 32
    expected = 2 * (row_stats[0] + row_stats[2])
    assert totals["prhs_pages_kept"] == expected[0]
    scored = metrics._DEVICE_FIELDS.index("prhs_scored_selections")
    assert totals["prhs_scored_selections"] == expected[scored]
    assert set(ROW_COUNT_FIELDS) <= set(metrics.METRICS)


def test_the_runner_question_is_asked_once_per_config(monkeypatch):
    asked = []

    class Config:
        @property
        def use_v2_model_runner(self):
            asked.append(1)
            return True

    config = Config()
    assert common._uses_v2_runner(config) and common._uses_v2_runner(config)
    assert len(asked) == 1


def test_device_totals_refuse_unknown_names():
    with pytest.raises(ValueError, match="unknown metric names"):
        metrics.StepStats().add_device_totals(torch.zeros(1), ("prhs_no_such_counter",))
