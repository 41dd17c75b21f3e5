"""The CUDA-graph replay of the sparse step equals the eager step."""

import gc
import math

import pytest
import torch

from prhs_vllm import metrics
from prhs_vllm.backend.common import PageSummaries
from prhs_vllm.backend.step import StepGraphs, sparse_step
from prhs_vllm.ops import SelectionParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

HQ, HKV, D, BS = 32, 8, 128, 16


def _layer(num_pages: int, gen: torch.Generator):
    kv = torch.randn(num_pages, BS, HKV, 2 * D, device="cuda", dtype=torch.bfloat16, generator=gen)
    logical = kv.permute(0, 2, 1, 3)  # FlashAttention's [P, Hkv, bs, 2D] view
    key, value = logical[..., :D], logical[..., D:]
    summaries = PageSummaries(num_pages, HKV, D, "cuda")
    summaries.key_sum.copy_(key.float().sum(2))
    summaries.key_min.copy_(key.float().amin(2))
    summaries.key_max.copy_(key.float().amax(2))
    return key, value, summaries


@pytest.mark.parametrize("with_metrics", [True, False], ids=["metrics", "no-metrics"])
def test_graph_replay_equals_eager(with_metrics):
    gen = torch.Generator(device="cuda").manual_seed(0)
    key, value, summaries = _layer(4096, gen)
    params = SelectionParams(
        block_size=BS, scale=D**-0.5, budget=0.125, delta=0.05, sink_tokens=64, local_tokens=256
    )
    graphs = StepGraphs()
    width = 700  # block-table columns, as vLLM's max pages per request
    for num_rows, max_len in [(3, 5000), (5, 9000), (3, 2000), (8, 11000), (2, 11000)]:
        seq_lens = torch.randint(
            max_len // 2, max_len + 1, (num_rows,), device="cuda", generator=gen
        )
        seq_lens = seq_lens.to(torch.int32)
        table = torch.randint(1, 4096, (num_rows, width), device="cuda", generator=gen).to(
            torch.int32
        )
        query = torch.randn(num_rows, HQ, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        max_pages = math.ceil(int(seq_lens.max()) / BS)
        args = (query, summaries, key, value, table, seq_lens, params, max_pages, with_metrics)
        got = graphs.run(*args)
        want = sparse_step(*args)
        torch.testing.assert_close(got.out.float(), want.out.float(), atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(got.keep_counts, want.keep_counts)
        torch.testing.assert_close(got.est_kept_mass, want.est_kept_mass, atol=1e-4, rtol=1e-4)
        if with_metrics:
            assert got.certified_dropped is None and want.certified_dropped is None
            torch.testing.assert_close(got.est_dropped, want.est_dropped, atol=1e-4, rtol=1e-4)
            assert torch.equal(got.over_budget, want.over_budget)
            # Summarised inside the graph: padded rows are cut, not counted.
            fields = metrics.num_device_fields()
            assert got.row_stats.shape == want.row_stats.shape == (num_rows, fields)
            torch.testing.assert_close(got.row_stats, want.row_stats, atol=1e-4, rtol=1e-5)
        else:
            assert got.row_stats is None
    assert len(graphs._graphs) >= 2, "row/context buckets should have been captured"


def test_graph_replay_with_reuse_state_equals_eager():
    """Reuse state read and written inside the graph: a graphed and an eager run
    over the same steps (same queries drifting slowly) take the same decisions."""
    from prhs_vllm.backend.reuse import ReuseConfig, ReuseState

    gen = torch.Generator(device="cuda").manual_seed(1)
    key, value, summaries = _layer(4096, gen)
    params = SelectionParams(
        block_size=BS, scale=D**-0.5, budget=0.125, delta=0.05, sink_tokens=64, local_tokens=256
    )
    cfg = ReuseConfig(tau=0.9, max_age=4, top_m=1 / 3, radius=1)
    states = [ReuseState(64, HQ, HKV, D, 700, "cuda") for _ in range(2)]
    graphs = StepGraphs()
    num_rows, width = 5, 700
    table = torch.randperm(4095, device="cuda", generator=gen)[: num_rows * width] + 1
    table = table.view(num_rows, width).to(torch.int32)
    seq_lens = torch.randint(4000, 9000, (num_rows,), device="cuda", generator=gen)
    base = torch.randn(num_rows, HQ, D, device="cuda", generator=gen)
    reused = 0
    for step in range(10):
        lens = (seq_lens + step).to(torch.int32)
        query = (base + 0.05 * torch.randn(base.shape, device="cuda", generator=gen)).bfloat16()
        max_pages = math.ceil(int(lens.max()) / BS)
        args = (query, summaries, key, value, table, lens, params, max_pages, True)
        got = graphs.run(*args, reuse=(states[0], cfg))
        want = sparse_step(*args, reuse=(states[1], cfg))
        assert torch.equal(got.reused, want.reused), f"step {step}"
        assert torch.equal(got.keep_counts, want.keep_counts), f"step {step}"
        torch.testing.assert_close(got.out.float(), want.out.float(), atol=2e-2, rtol=2e-2)
        reused += int(want.reused.sum())
    assert reused > 0


def test_layers_of_a_step_share_one_copy_of_the_rows():
    """Two layers replay graphs that read one staged copy of a step's
    block_table and seq_lens: the second layer of a step copies nothing, a new
    step (new token, other rows and lengths) is copied in again, and every
    layer's result equals its eager step. The graphs add their real rows'
    metrics (not the padded ones) into the bucket's device counters."""
    gen = torch.Generator(device="cuda").manual_seed(2)
    layers = [_layer(4096, gen) for _ in range(2)]
    params = SelectionParams(
        block_size=BS, scale=D**-0.5, budget=0.125, delta=0.05, sink_tokens=64, local_tokens=256
    )
    graphs = [StepGraphs(), StepGraphs()]
    width = 1100
    counters = StepGraphs._inputs(8, 1024, torch.int32, torch.device("cuda", 0)).totals()
    before, added = counters.clone(), torch.zeros_like(counters)
    for num_rows in (5, 7, 6):  # one bucket: 8 rows, 1024 slots (513-563 pages)
        token = object()
        seq_lens = torch.randint(8200, 9001, (num_rows,), device="cuda", generator=gen)
        seq_lens = seq_lens.to(torch.int32)
        table = torch.randint(1, 4096, (num_rows, width), device="cuda", generator=gen)
        table = table.to(torch.int32)
        max_pages = math.ceil(int(seq_lens.max()) / BS)
        for index, (key, value, summaries) in enumerate(layers):
            query = torch.randn(num_rows, HQ, D, device="cuda", dtype=torch.bfloat16, generator=gen)
            args = (query, summaries, key, value, table, seq_lens, params, max_pages, True)
            got = graphs[index].run(*args, step=token)
            entry = graphs[index]._graphs[(8, 1024)]
            assert entry.inputs.step is token
            if index == 1:  # the first layer's copy, not a second one
                assert entry.inputs is graphs[0]._graphs[(8, 1024)].inputs
            want = sparse_step(*args)
            torch.testing.assert_close(got.out.float(), want.out.float(), atol=2e-2, rtol=2e-2)
            torch.testing.assert_close(got.keep_counts, want.keep_counts)
            torch.testing.assert_close(got.row_stats, want.row_stats, atol=1e-4, rtol=1e-5)
            assert got.stats_recorded and not want.stats_recorded
            added += want.row_stats.sum(0)
        # Padded rows hold one token of page 0 whatever the previous step held.
        assert entry.inputs.seq_lens[num_rows:].eq(1).all()
        assert entry.inputs.block_table[num_rows:].eq(0).all()
    torch.testing.assert_close(counters - before, added, atol=1e-3, rtol=1e-6)


def test_capture_after_every_graph_was_dropped_while_a_result_lives():
    """All step graphs dropped (as when the KV cache moves) while a tensor from
    their memory pool lives on: a new capture into the shared pool must still
    work and equal the eager step."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    key, value, summaries = _layer(4096, gen)
    params = SelectionParams(
        block_size=BS, scale=D**-0.5, budget=0.125, delta=0.05, sink_tokens=64, local_tokens=256
    )
    seq_lens = torch.full((3,), 5000, dtype=torch.int32, device="cuda")
    table = torch.randint(1, 4096, (3, 700), device="cuda", generator=gen).to(torch.int32)
    query = torch.randn(3, HQ, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    args = (query, summaries, key, value, table, seq_lens, params, math.ceil(5000 / BS), True)
    kept = StepGraphs().run(*args).keep  # its StepGraphs and graphs are gone now
    gc.collect()
    got = StepGraphs().run(*args)
    want = sparse_step(*args)
    torch.testing.assert_close(got.out.float(), want.out.float(), atol=2e-2, rtol=2e-2)
    assert torch.equal(kept, got.keep)
