"""Triton ops (prhs_vllm.ops.triton) against the torch references on CUDA.

The comparisons of tests/test_triton_ops.py (run there under the interpreter)
with compiled kernels, bigger shapes, real atomics contention, and CUDA graph
capture (vLLM captures decode steps: the ops must not sync with the host).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from test_triton_ops import (
    KEY_DTYPES,
    SELECT_CASES,
    SUMMARY_SHAPES,
    assert_same_quantized,
    assert_same_summaries,
    check_group_page_mass,
    check_page_logits,
    check_page_logits_quantized,
    check_page_logits_skip,
    check_quantized_box_edge_values,
    check_quantized_decode_drift,
    check_quantized_one_call,
    check_quantized_recycled_pages,
    check_select_compact,
    check_summaries_one_call,
    check_summaries_recycled_pages,
    clone_quantized,
    group_page_mass_ref,
    random_pages,
    scoring_inputs,
    selection_logits,
    slots_for,
    stale_quantized,
    strided_keys,
    with_padding,
)

from prhs_vllm.ops.ref import page_logits as ref_page_logits
from prhs_vllm.ops.ref import update_page_summaries as ref_update_page_summaries

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") == "1",
        reason="TRITON_INTERPRET=1 replaces the compiled kernels these tests are for",
    ),
]

pytest.importorskip("triton")

DEVICE = "cuda"


@pytest.fixture(autouse=True)
def _no_tf32():
    """The references' einsum must stay float32 even if another module enabled TF32."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


DTYPES = KEY_DTYPES


@pytest.mark.parametrize("dtype", DTYPES)
@SUMMARY_SHAPES
def test_summaries_one_call(gen, num_kv_heads, head_dim, block_size, dtype):
    lens = [1, block_size, 1000, 4099, 3 * block_size - 1]
    check_summaries_one_call(gen, num_kv_heads, head_dim, block_size, dtype, lens, DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
def test_summaries_recycled_pages(gen, block_size, dtype):
    check_summaries_recycled_pages(gen, 8, 128, block_size, dtype, DEVICE)


def test_summaries_long_prefill(gen):
    """A 32K-token prefill chunk: every page takes bs concurrent atomic updates."""
    check_summaries_one_call(gen, 8, 128, 16, torch.bfloat16, [32768, 777], DEVICE)


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("head_dim", [64, 96, 128, 256])
@pytest.mark.parametrize("group", [1, 3, 4, 8])
def test_page_logits(gen, group, head_dim, block_size):
    lens = [0, 1, block_size, 4097, 32768 + 5, 300]
    check_page_logits(
        gen, group, head_dim, block_size, lens, torch.bfloat16, DEVICE, num_kv_heads=8
    )


@pytest.mark.parametrize(
    "block_m, num_warps", [(8, 1), (16, 2), (32, 4), (64, 8)], ids=lambda v: str(v)
)
def test_page_logits_launch_configs(gen, block_m, num_warps):
    lens = [5, 1000, 2049]
    check_page_logits(
        gen, 4, 128, 16, lens, torch.float32, DEVICE, block_m=block_m, num_warps=num_warps
    )


@pytest.mark.parametrize("num_slots", [37, 1024, 8193])
@pytest.mark.parametrize("group", [1, 3, 4, 8])
def test_group_page_mass(gen, group, num_slots):
    check_group_page_mass(gen, group, num_slots, DEVICE, num_rows=6, num_kv_heads=8)


@pytest.mark.parametrize("block_m", [16, 128])
def test_group_page_mass_chunks(gen, block_m):
    check_group_page_mass(gen, 4, 1000, DEVICE, block_m=block_m, num_rows=6, num_kv_heads=8)


def test_cuda_graph_replay(gen):
    """update + page_logits + group_page_mass captured once, replayed on new inputs."""
    from prhs_vllm.ops.triton import group_page_mass, page_logits, update_page_summaries

    group, head_dim, block_size, num_kv_heads = 4, 128, 16, 8
    lens = [100, 2000, 33]
    query, summaries, table, seq_lens, num_slots = scoring_inputs(
        gen, group, head_dim, block_size, lens, torch.bfloat16, DEVICE, num_kv_heads
    )
    query = query.contiguous()
    # One decode token per row, at position L - 1 (already counted in seq_lens).
    rows = [table[i, : math.ceil(n / block_size)].tolist() for i, n in enumerate(lens)]
    slots = torch.cat([slots_for(p, n - 1, 1, block_size) for p, n in zip(rows, lens, strict=True)])
    slots = slots.to(DEVICE)
    key = strided_keys(gen, len(lens), num_kv_heads, head_dim, torch.bfloat16, DEVICE)
    scale = head_dim**-0.5
    want = tuple(s.clone() for s in summaries)

    def step():
        update_page_summaries(key, slots, block_size, *summaries)
        est, bound, _ = page_logits(
            query, *summaries, table, seq_lens, block_size, scale, num_slots
        )
        return est, bound, group_page_mass(est)

    step()  # compiles the kernels outside the capture
    ref_update_page_summaries(key, slots, block_size, *want)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        est, bound, mass = step()
    torch.cuda.synchronize()

    for _ in range(2):
        # New decode tokens (same slots), queries and a summary rewrite through the graph.
        key.copy_(strided_keys(gen, len(lens), num_kv_heads, head_dim, torch.bfloat16, DEVICE))
        query.copy_(torch.randn(query.shape, generator=gen).to(query))
        graph.replay()
        ref_update_page_summaries(key, slots, block_size, *want)
        torch.cuda.synchronize()
        assert_same_summaries(summaries, want, where="after replay")
        want_est, want_bound, _ = ref_page_logits(
            query, *want, table, seq_lens, block_size, scale, num_slots
        )
        torch.testing.assert_close(est, want_est, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(bound, want_bound, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(mass, group_page_mass_ref(est), atol=1e-6, rtol=1e-5)


def test_page_logits_skip_on_gpu(gen):
    check_page_logits_skip(gen, [40, 3000, 129, 700], 4, 128, 8, torch.bfloat16, DEVICE, 1e-3)


@pytest.mark.parametrize("case", list(SELECT_CASES), ids=list(SELECT_CASES))
@pytest.mark.parametrize(
    "num_rows, num_kv_heads, group, num_slots",
    [(16, 8, 4, 2048), (3, 2, 8, 8192), (5, 3, 1, 333)],
    ids=["b16-m2048", "g8-m8192", "g1-m333"],
)
def test_select_compact(gen, case, num_rows, num_kv_heads, group, num_slots):
    knobs = select_knobs(case, num_kv_heads)
    check_select_compact(gen, DEVICE, num_rows, num_kv_heads, group, num_slots, **knobs)


def select_knobs(case: str, num_kv_heads: int) -> dict:
    """SELECT_CASES[case], with one block size per KV head where the case has them."""
    knobs = dict(SELECT_CASES[case])
    if isinstance(knobs.get("block_pages"), tuple):
        knobs["block_pages"] = (1, 3, 2, 4, 1, 1, 2, 8)[:num_kv_heads]
    return knobs


@pytest.mark.parametrize("case", ["delta", "blocks-per-head"])
def test_select_compact_without_bound(gen, case):
    check_select_compact(gen, DEVICE, 16, 8, 4, 2048, with_bound=False, **select_knobs(case, 8))


@pytest.mark.parametrize("case", ["budget", "delta", "blocks-per-head", "etf"])
def test_select_compact_ties(gen, case):
    check_select_compact(gen, DEVICE, 4, 3, 4, 700, ties=True, **SELECT_CASES[case])


def test_select_compact_graph_replay(gen):
    """Captured once, replayed on new logits and lengths: same as eager."""
    from prhs_vllm.ops.ref.compact_selection import select_compact as ref_select
    from prhs_vllm.ops.ref.selection import SelectionParams
    from prhs_vllm.ops.triton import select_compact

    params = SelectionParams(block_size=16, scale=1.0, budget=1 / 16, delta=0.05,
                             sink_tokens=64, local_tokens=256)  # fmt: skip
    logits, seq_lens = selection_logits(gen, 6, 8, 4, 1024, 16, DEVICE)
    select_compact(logits, seq_lens, params)  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = select_compact(logits, seq_lens, params)
    for _ in range(2):
        new_logits, new_lens = selection_logits(gen, 6, 8, 4, 1024, 16, DEVICE)
        for dst, src in zip(logits, new_logits, strict=True):
            dst.copy_(src)
        seq_lens.copy_(new_lens)
        graph.replay()
        want = ref_select(logits, seq_lens, params)
        assert torch.equal(got.num_kept, want.num_kept)
        torch.testing.assert_close(got.est_kept_mass, want.est_kept_mass, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [8, 4])
def test_page_logits_quantized(gen, bits, dtype):
    check_page_logits_quantized(
        gen, bits, 4, 128, [3, 2000, 129, 700], DEVICE, num_kv_heads=8, dtype=dtype
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("bits", [8, 4], ids=["int8", "int4"])
def test_quantized_summaries(gen, bits, dtype):
    """The interpreter's quantized-summary checks at served shapes: long prefill runs
    from offset 0 and mid-page, decodes, -1 padding, recycled pages, 2 * block_size
    decode calls of 64 requests (drift, within its worst case: 128K channels), box edge
    values. Codes within one level of the reference (its CUDA sums are atomics)."""
    requests = [(0, 1), (5, 1000), (0, 4099), (37, 1), (15, 48), (643, 1), (0, 32768)]
    check_quantized_one_call(gen, bits, 8, 128, 16, dtype, requests, DEVICE)
    check_quantized_one_call(gen, bits, 3, 64, 32, dtype, requests[:-1], DEVICE)
    check_quantized_recycled_pages(gen, bits, 8, 128, 16, dtype, DEVICE)
    check_quantized_decode_drift(gen, bits, 8, 128, 16, dtype, DEVICE, num_requests=64)
    check_quantized_box_edge_values(gen, bits, DEVICE)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_summaries_graph_replay(gen, bits):
    """A decode step through ``ops.update_summaries`` (the backend's entry point)
    captured once, replayed on new keys: no host sync, the reference's result."""
    from prhs_vllm import ops
    from prhs_vllm.ops.ref.quant import update_quantized_summaries as ref_update

    if not ops._triton_ready():
        pytest.skip("PRHS_OPS=reference: the dispatcher does not use the Triton kernel")
    bs, heads, dim, num_pages = 16, 8, 128, 160
    lens = [100, 2000, 33, 17]  # decode offsets 3, 15, 0 (a new page), 0
    rows = random_pages(gen, lens, bs, num_pages)
    runs = [slots_for(p, n - 1, 1, bs) for p, n in zip(rows, lens, strict=True)]
    slots = with_padding(gen, runs, 3).to(DEVICE)
    want = stale_quantized(gen, num_pages, heads, dim, bits, DEVICE)
    got = clone_quantized(want)
    key = strided_keys(gen, len(slots), heads, dim, torch.bfloat16, DEVICE)
    ops.update_summaries(key, slots, bs, *got)  # compiles the kernel outside the capture
    ref_update(key, slots, bs, *want)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.update_summaries(key, slots, bs, *got)
    torch.cuda.synchronize()
    assert_same_quantized(got, want, exact=False, where="after capture")
    for i in range(3):
        key.copy_(strided_keys(gen, len(slots), heads, dim, torch.bfloat16, DEVICE))
        graph.replay()
        ref_update(key, slots, bs, *want)
        torch.cuda.synchronize()
        assert_same_quantized(got, want, exact=False, where=f"after replay {i}")
