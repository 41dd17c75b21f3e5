"""The sparse step as vLLM's full graphs hold it (backend/full_graph.py): one
CUDA graph over every row, the rows decided per replay as device data, equals
the eager sparse step on the sparse rows and leaves the others alone; and
FlashAttention 3 (vLLM's dense kernel) with the sparse rows at length 0 and no
ahead-of-time schedule, captured once, serves the dense rows at every replay."""

import math

import pytest
import torch
from test_step_graphs import BS, HKV, HQ, D
from test_step_graphs import _layer as paged_layer

from prhs_vllm import metrics
from prhs_vllm.backend.full_graph import DeviceRowBuffers, count_rows, keep_path_outputs
from prhs_vllm.backend.step import StepGraphs, sparse_step
from prhs_vllm.ops import SelectionParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PAGES = 4096


def test_one_graph_serves_every_row_decision(monkeypatch):
    gen = torch.Generator(device="cuda").manual_seed(0)
    key, value, summaries = paged_layer(PAGES, gen)
    params = SelectionParams(
        block_size=BS, scale=D**-0.5, budget=0.125, delta=0.05, sink_tokens=64, local_tokens=256
    )
    rows, width = 8, 800  # width: every page of a 12800-token max_model_len
    stats = metrics.StepStats()
    monkeypatch.setattr(metrics, "process_stats", lambda: stats)
    buffers = DeviceRowBuffers(16, HKV, torch.device("cuda"), with_metrics=True)
    # vLLM's persistent inputs, which the graph holds.
    query = torch.zeros(rows, HQ, D, device="cuda", dtype=torch.bfloat16)
    seq_lens = torch.zeros(rows, dtype=torch.int32, device="cuda")
    table = torch.zeros(rows, width, dtype=torch.int32, device="cuda")
    dense_in = torch.zeros(rows, HQ, D, device="cuda", dtype=torch.bfloat16)
    output = torch.zeros(rows + 3, HQ, D, device="cuda", dtype=torch.bfloat16)
    device_rows = buffers.write(seq_lens, table, None)
    workspace = StepGraphs.shared_workspace(query, key, width)

    def step():
        output[:rows].copy_(dense_in)  # vLLM's kernel, for the dense rows
        result = sparse_step(
            query, summaries, key, value, device_rows.block_table, device_rows.sparse_lens,
            params, width, True, workspace,
        )  # fmt: skip
        keep_path_outputs(output, result.out, device_rows)
        count_rows(device_rows, result.row_stats)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up: Triton compiles, the allocator settles
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    totals_before = stats.totals()
    expected_rows = 0
    expected_kept = 0.0
    masks = [
        [True] * 8,
        [True, False, True, True, False, False, True, False],
        [False] * 8,
        [False, True, True, True, True, True, True, True],
    ]
    for mask in masks:
        lens = torch.randint(3000, 12800, (rows,), device="cuda", generator=gen).to(torch.int32)
        lens[~torch.tensor(mask, device="cuda")] = torch.randint(
            0, 50, (rows - sum(mask),), device="cuda", generator=gen
        ).to(torch.int32)  # dense rows: short, or padding (0)
        q = torch.randn(rows, HQ, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        tab = torch.randint(1, PAGES, (rows, width), device="cuda", generator=gen)
        dense = torch.randn(rows, HQ, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        query.copy_(q)
        seq_lens.copy_(lens)
        table.copy_(tab.to(torch.int32))
        dense_in.copy_(dense)
        buffers.write(seq_lens, table, torch.tensor(mask))
        output.fill_(float("nan"))
        graph.replay()
        sparse = torch.tensor(mask, device="cuda")
        assert torch.equal(output[:rows][~sparse], dense[~sparse])
        assert output[rows:].isnan().all()  # tokens beyond the rows are untouched
        if not any(mask):
            continue
        idx = sparse.nonzero().squeeze(1)
        sub_lens = lens[idx]
        want = sparse_step(
            q[idx], summaries, key, value, table[idx], sub_lens, params,
            math.ceil(int(sub_lens.max()) / BS), True,
        )  # fmt: skip
        torch.testing.assert_close(output[idx].float(), want.out.float(), atol=2e-2, rtol=2e-2)
        expected_rows += len(idx)
        expected_kept += float(want.keep_counts.sum())
    totals = stats.totals()
    assert totals["prhs_sparse_layer_rows"] - totals_before["prhs_sparse_layer_rows"] == (
        expected_rows
    )
    assert totals["prhs_head_selections"] - totals_before["prhs_head_selections"] == (
        expected_rows * HKV
    )
    assert totals["prhs_pages_kept"] - totals_before["prhs_pages_kept"] == expected_kept


def _dense_reference(q, key_cache, value_cache, table, lens):
    """[R, Hq, D] float32 attention of each row's one query over its context."""
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    group = HQ // HKV
    for r, length in enumerate(lens.tolist()):
        if length == 0:
            continue
        pages = table[r, : math.ceil(length / BS)].long()
        k = key_cache[pages].reshape(-1, HKV, D)[:length].float().repeat_interleave(group, 1)
        v = value_cache[pages].reshape(-1, HKV, D)[:length].float().repeat_interleave(group, 1)
        logits = torch.einsum("hd,thd->ht", q[r].float(), k) * D**-0.5
        out[r] = torch.einsum("ht,thd->hd", logits.softmax(-1), v)
    return out


@pytest.mark.parametrize("num_splits", [1, 32])  # 32: vLLM's for graphs, which the rows keep
def test_flash_attention_with_sparse_rows_at_length_zero(num_splits):
    fa = pytest.importorskip("vllm.vllm_flash_attn")
    gen = torch.Generator(device="cuda").manual_seed(3)
    rows, width, max_len = 8, 512, 8192
    # vLLM's FA layout: [P, bs, Hkv, D] key and value caches.
    key_cache = torch.randn(PAGES, BS, HKV, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    value_cache = torch.randn(PAGES, BS, HKV, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    query = torch.zeros(rows, HQ, D, device="cuda", dtype=torch.bfloat16)
    lens = torch.zeros(rows, dtype=torch.int32, device="cuda")
    table = torch.zeros(rows, width, dtype=torch.int32, device="cuda")
    out = torch.zeros(rows, HQ, D, device="cuda", dtype=torch.bfloat16)
    cu_q = torch.arange(rows + 1, dtype=torch.int32, device="cuda")

    def attend():
        fa.flash_attn_varlen_func(
            q=query, k=key_cache, v=value_cache, out=out, cu_seqlens_q=cu_q, max_seqlen_q=1,
            seqused_k=lens, max_seqlen_k=max_len, softmax_scale=D**-0.5, causal=True,
            block_table=table, scheduler_metadata=None, fa_version=3, num_splits=num_splits,
        )  # fmt: skip

    lens.fill_(100)
    attend()  # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        attend()
    for zeros in ([0, 3, 4], [], list(range(8)), [7]):
        row_lens = torch.randint(1, max_len + 1, (rows,), device="cuda", generator=gen)
        row_lens[zeros] = 0
        query.copy_(torch.randn(rows, HQ, D, device="cuda", dtype=torch.bfloat16, generator=gen))
        lens.copy_(row_lens.to(torch.int32))
        table.copy_(torch.randint(0, PAGES, (rows, width), device="cuda", generator=gen))
        out.fill_(float("nan"))
        graph.replay()
        want = _dense_reference(query, key_cache, value_cache, table, lens)
        live = lens > 0
        torch.testing.assert_close(out[live].float(), want[live], atol=2e-2, rtol=2e-2)
