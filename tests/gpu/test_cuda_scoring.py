"""The csrc page scoring op (torch.ops.prhs.page_logits) on the GPU against
the torch reference, with the workloads of the Triton kernel's tests: empty,
one-token, page-aligned and 32K rows, stale page ids past each context, a
column-major block table, queries sliced from a packed qkv row. Every head
size, GQA group 1..8 (odd ones too), query dtype, summary format and block
round count it serves; skipped heads; graph replay; and the dispatch in
``prhs_vllm.ops.page_logits`` (csrc where it serves, Triton elsewhere)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from test_triton_ops import (  # noqa: E402
    check_page_logits,
    check_page_logits_quantized,
    check_page_logits_skip,
    scoring_inputs,
)

from prhs_vllm import ops  # noqa: E402
from prhs_vllm.ops.cuda import scoring  # noqa: E402
from prhs_vllm.ops.ref import page_logits as ref_page_logits  # noqa: E402
from prhs_vllm.ops.ref.quant import QuantizedCentroids  # noqa: E402

# With a GPU, a missing prhs_vllm._C fails every test (tests/gpu/conftest.py).
pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("csrc_extension")]

DEVICE = "cuda"
csrc = scoring.page_logits


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("group", [1, 3, 4, 8])
def test_page_logits(gen, group, head_dim):
    lens = [0, 1, 16, 4097, 32768 + 5, 300]
    check_page_logits(
        gen, group, head_dim, 16, lens, torch.bfloat16, DEVICE, num_kv_heads=8, impl=csrc
    )


@pytest.mark.parametrize("block_size", [1, 32, 48])
def test_page_logits_block_sizes(gen, block_size):
    lens = [0, 1, block_size, 5 * block_size + 3, 3000]
    check_page_logits(
        gen, 4, 128, block_size, lens, torch.bfloat16, DEVICE, num_kv_heads=2, impl=csrc
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_page_logits_query_dtypes(gen, dtype):
    check_page_logits(gen, 2, 128, 16, [5, 1000, 2049], dtype, DEVICE, impl=csrc)


@pytest.mark.parametrize("iters", [1, 3, 4, 64])
@pytest.mark.parametrize("head_dim", [64, 256])
def test_page_logits_rounds_per_block(gen, iters, head_dim):
    """Tiles of 4..1024 slots: rows ending inside a tile, a round or a group."""
    lens = [1, 17, 16 * 63 + 1, 16 * 64, 16 * 65 + 7, 5000]
    check_page_logits(
        gen, 4, head_dim, 16, lens, torch.bfloat16, DEVICE, num_kv_heads=3, impl=csrc,
        iters=iters,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("group, head_dim", [(4, 128), (1, 64), (8, 256), (3, 128)])
def test_page_logits_int8(gen, group, head_dim, dtype):
    check_page_logits_quantized(
        gen, 8, group, head_dim, [3, 2000, 129, 700, 0], DEVICE, num_kv_heads=8, dtype=dtype,
        impl=csrc,
    )  # fmt: skip


@pytest.mark.parametrize("head_dim", [64, 128])
def test_page_logits_skip(gen, head_dim):
    lens = [40, 3000, 129, 700]
    check_page_logits_skip(gen, lens, 4, head_dim, 8, torch.bfloat16, DEVICE, 1e-4, impl=csrc)


def test_page_logits_graph_replay(gen):
    """Captured once, replayed on new queries and lengths: no host sync, no
    allocation outside the graph pool."""
    query, summaries, table, seq_lens, num_slots = scoring_inputs(
        gen, 4, 128, 16, [100, 2000, 33], torch.bfloat16, DEVICE, 8
    )
    scale = 128**-0.5
    args = (*summaries, table, seq_lens, 16, scale, num_slots)
    static_q = query.clone()
    csrc(static_q, *args)  # warm-up outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = csrc(static_q, *args)
    for step in range(3):
        static_q.copy_(torch.randn(static_q.shape, generator=gen).to(static_q))
        seq_lens.copy_(torch.tensor([100 + step, 2000 - 7 * step, 33 * step], device=DEVICE))
        graph.replay()
        want = ref_page_logits(static_q, *args)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-5)


def quantized_summaries(num_pages, num_kv_heads, head_dim, bits):
    codes = torch.zeros(num_pages, num_kv_heads, head_dim * bits // 8, dtype=torch.uint8)
    box = torch.zeros(num_pages, num_kv_heads, head_dim, dtype=torch.bfloat16)
    return QuantizedCentroids(codes.to(DEVICE), bits), box.to(DEVICE), box.clone().to(DEVICE)


def test_unsupported_summaries_are_named_and_go_to_triton(gen):
    """What csrc does not serve: a reason from ``unsupported_reason``, a
    ValueError from the op, and ``ops.page_logits`` scores it with Triton."""
    query, (k_sum, k_min, k_max), table, seq_lens, num_slots = scoring_inputs(
        gen, 4, 96, 16, [40, 300], torch.bfloat16, DEVICE, 2
    )
    cases = {
        "head_dim 96": (query, k_sum, k_min, k_max),
        "int4 centroid codes": (
            torch.randn(2, 8, 128, device=DEVICE),
            *quantized_summaries(int(table.max()) + 1, 2, 128, 4),
        ),
        "16 query heads for 1 KV heads": (
            torch.randn(2, 16, 64, device=DEVICE),
            *(torch.zeros(int(table.max()) + 1, 1, 64, device=DEVICE) for _ in range(3)),
        ),
        "summary rows not 16-byte aligned": (
            torch.randn(2, 8, 64, device=DEVICE),
            *(torch.zeros(40 * 2 * 64 + 1, device=DEVICE)[1:].view(40, 2, 64) for _ in range(3)),
        ),
    }
    for reason, (q, s, lo, hi) in cases.items():
        assert scoring.unsupported_reason(q, s, lo, hi).startswith(reason)
        call = (q, s, lo, hi, table, seq_lens, 16, 0.1, num_slots)
        with pytest.raises(ValueError, match=reason):
            csrc(*call)
        for g, w in zip(ops.page_logits(*call), ref_page_logits(*call), strict=True):
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-5)


def test_ops_page_logits_uses_csrc_where_it_serves(gen, monkeypatch):
    """float32 and int8 summaries of a served shape reach the csrc op."""
    calls = []
    real = scoring.page_logits
    monkeypatch.setattr(scoring, "page_logits", lambda *a, **k: calls.append(1) or real(*a, **k))
    query, summaries, table, seq_lens, num_slots = scoring_inputs(
        gen, 4, 128, 16, [40, 300], torch.bfloat16, DEVICE, 2
    )
    call = (query, *summaries, table, seq_lens, 16, 0.1, num_slots)
    for g, w in zip(ops.page_logits(*call), ref_page_logits(*call), strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-5)
    assert calls == [1]


def test_cpp_checks_name_the_argument(gen):
    """The C++ op's own checks (past the Python wrapper) raise, naming the tensor."""
    query, summaries, table, seq_lens, num_slots = scoring_inputs(
        gen, 4, 128, 16, [40, 300], torch.bfloat16, DEVICE, 2
    )
    est = torch.empty(2, 2, 4, num_slots, device=DEVICE)
    wrong = torch.empty(2, 2, 3, num_slots, device=DEVICE)
    with pytest.raises(RuntimeError, match="upper must be float32"):
        torch.ops.prhs.page_logits(
            query, *summaries, table, seq_lens, None, 16, 0.1, 0, 0, est, wrong, est.clone()
        )
    with pytest.raises(RuntimeError, match="seq_lens must be contiguous int32"):
        torch.ops.prhs.page_logits(
            query, *summaries, table, seq_lens.long(), None, 16, 0.1, 0, 0, est, est.clone(),
            est.clone(),
        )  # fmt: skip
