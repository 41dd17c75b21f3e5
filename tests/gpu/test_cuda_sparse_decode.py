"""The CUDA sparse decode (prhs_vllm.ops.cuda, csrc/sparse_decode) against the
indexed torch reference on the same GPU tensors.

Every call first poisons out / lse with NaN, so an element the kernel fails to
write shows up. Cases cover the kernel paths (one split writing out directly,
split-K merged by the last split to finish, split-K with the merge kernel),
empty splits, more kept segments than the
kernel's segment table holds, the FlashAttention cache view, CUDA graphs.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from test_sparse_decode_indexed import decode_tol, paged_inputs, random_keep, trim_slots

from prhs_vllm.ops import cuda as cuda_ops
from prhs_vllm.ops.cuda.sparse_decode import SparseDecodeArgumentError
from prhs_vllm.ops.ref.sparse_decode_indexed import compact_keep
from prhs_vllm.ops.ref.sparse_decode_indexed import sparse_paged_decode_indexed as reference

# Skipped without a CUDA GPU; with one, a missing prhs_vllm._C fails every test
# (tests/gpu/conftest.py).
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.usefixtures("csrc_extension"),
]

DEVICE = "cuda"
# exp2 / log2 run as ex2.approx / lg2.approx (--use_fast_math): ~2 ulp each.
LSE_ATOL = 1e-3


@pytest.fixture(autouse=True)
def _no_tf32():
    """The reference's einsums must stay float32 even if another module enabled TF32."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


def run_kernel(query, key, value, table, seq_lens, kept_slots, num_kept, scale, **kwargs):
    """The CUDA op with NaN-poisoned outputs; returns (out, lse)."""
    out = kwargs.pop("out", None)
    if out is None:
        out = torch.empty_like(query)
    out.fill_(math.nan)
    lse = torch.full(query.shape[:2], math.nan, device=query.device)
    cuda_ops.sparse_paged_decode_indexed(
        query, key, value, table, seq_lens, kept_slots, num_kept, scale, out, lse=lse, **kwargs
    )
    return out, lse


def check(query, key, value, table, seq_lens, kept_slots, num_kept, scale=None, **kwargs):
    """Kernel vs reference; returns the kernel's (out, lse)."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    args = (query, key, value, table, seq_lens, kept_slots, num_kept, scale)
    out, lse = run_kernel(*args, **kwargs)
    ref_out, ref_lse = reference(*args)
    assert not out.isnan().any(), "out has unwritten (NaN) elements"
    assert not lse.isnan().any(), "lse has unwritten (NaN) elements"
    t = decode_tol(query.dtype)
    torch.testing.assert_close(out.float(), ref_out.float(), **t.close())
    torch.testing.assert_close(lse, ref_lse, atol=LSE_ATOL, rtol=0)
    return out, lse


def num_splits(query, key, kept_slots, asked: int = 0):
    return plan_of(query, key, kept_slots, asked)["num_splits"]


def plan_of(query, key, kept_slots, asked: int = 0, stages: int = 0):
    return cuda_ops.split_plan(
        query.shape[0],
        query.shape[1],
        key.shape[1],
        query.shape[2],
        key.shape[2],
        kept_slots.shape[-1],
        query.dtype,
        query.device,
        asked,
        stages,
    )


def inputs_and_slots(gen, lens, num_kv_heads, group, head_dim, block_size, dtype, **kwargs):
    fraction = kwargs.pop("fraction", 0.4)
    query, key, value, table, seq_lens = paged_inputs(
        gen, lens, num_kv_heads, group, head_dim, block_size, dtype, device=DEVICE, **kwargs
    )
    keep = random_keep(gen, seq_lens, num_kv_heads, table.shape[1], block_size, fraction)
    return (query, key, value, table, seq_lens, *compact_keep(keep))


DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]
GROUPS = [pytest.param(g, id=f"gqa{g}") for g in (1, 3, 4, 8, 16)]
HEAD_DIMS = [pytest.param(d, id=f"d{d}") for d in (64, 128, 256)]
BLOCK_SIZES = [pytest.param(b, id=f"bs{b}") for b in (16, 32)]
LENS = [1, 17, 100, 161, 333, 2000]  # no multiple of 16 or 32


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("group", GROUPS)
def test_matches_reference_split_k(gen, group, head_dim, dtype, block_size):
    """Few rows: split-K, with empty splits for the short rows."""
    args = inputs_and_slots(gen, LENS, 2, group, head_dim, block_size, dtype)
    assert num_splits(args[0], args[1], args[5]) > 1
    check(*args)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("group", [pytest.param(g, id=f"gqa{g}") for g in (4, 8)])
def test_matches_reference_one_split(gen, group, head_dim):
    """One split: out written directly, no merge kernel."""
    lens = [int(n) for n in torch.randint(1, 700, (160,), generator=gen)]
    args = inputs_and_slots(gen, lens, 8, group, head_dim, 16, torch.bfloat16)
    assert num_splits(args[0], args[1], args[5], asked=1) == 1
    check(*args, num_splits=1)


@pytest.mark.parametrize("stages", [3, 4])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("group", [pytest.param(g, id=f"gqa{g}") for g in (1, 4, 8)])
def test_both_ring_depths_match_reference(gen, group, head_dim, dtype, stages):
    """Each cp.async ring depth, asked for, on split-K and one-split shapes."""
    for lens, splits in ((LENS, 0), (LENS[:3], 1)):
        args = inputs_and_slots(gen, lens, 2, group, head_dim, 16, dtype)
        assert plan_of(args[0], args[1], args[5], splits, stages)["stages"] == stages
        check(*args, num_splits=splits, stages=stages)


@pytest.mark.parametrize("rows", [1, 12, 16, 32])
def test_plan_picks_the_ring_whose_busiest_sm_reads_least(rows):
    """The plan's ring depth and splits give its busiest SM no more kept pages
    than the other depth's plan would (LLaMA-3-8B attention at 32K, 1/16)."""
    sms = torch.cuda.get_device_properties(DEVICE).multi_processor_count
    shape = (rows, 32, 8, 128, 16, 128, torch.bfloat16, DEVICE)

    def busiest_sm_pages(plan):
        ctas = rows * 8 * plan["head_chunks"] * plan["num_splits"]
        return -(-ctas // sms) * -(-128 // plan["num_splits"])

    chosen = cuda_ops.split_plan(*shape)
    for stages in (3, 4):
        other = cuda_ops.split_plan(*shape, 0, stages)
        assert other["stages"] == stages
        assert busiest_sm_pages(chosen) <= busiest_sm_pages(other), (chosen, other)
    assert chosen == cuda_ops.split_plan(*shape, 0, chosen["stages"])


@pytest.mark.parametrize("splits", [1, 2, 3, 7, 64, 256])
def test_any_split_count_matches_reference(gen, splits):
    """Split counts asked for (benchmarks): more splits than kept pages leave
    empty splits; 256 is capped to what the shape allows."""
    args = inputs_and_slots(gen, LENS, 2, 4, 128, 16, torch.bfloat16)
    width = args[5].shape[-1]
    cap = min(256, width, -(-width * 16 // 64))  # at least 64 kept tokens a split
    assert num_splits(args[0], args[1], args[5], asked=splits) == min(splits, cap)
    check(*args, num_splits=splits)


def test_last_split_merge_reuses_one_workspace(gen):
    """The last split of a (row, KV head) to arrive merges the partials and
    resets its arrival counter: calls of other row counts and split counts on
    one workspace (one started as garbage) stay exact, and every call leaves
    the counters zero."""
    cases = [
        inputs_and_slots(gen, LENS, 2, 4, 128, 16, torch.bfloat16),
        inputs_and_slots(gen, LENS * 3, 8, 4, 128, 16, torch.bfloat16),
        inputs_and_slots(gen, LENS[:2], 4, 8, 64, 32, torch.float16),
    ]
    asks = [0, 2, 3, 16]
    plans = [plan_of(a[0], a[1], a[5], asked) for a in cases for asked in asks]
    assert all(plan["merge_in_split"] for plan in plans if plan["num_splits"] > 1)
    assert sum(plan["num_splits"] > 1 for plan in plans) >= 6
    counter_bytes = max(plan["counter_bytes"] for plan in plans)
    need = max(plan["workspace_bytes"] for plan in plans)
    workspace = torch.full((need,), 0xFF, dtype=torch.uint8, device=DEVICE)
    for _ in range(3):
        for args in cases:
            for asked in asks:
                check(*args, workspace=workspace, num_splits=asked)
                torch.cuda.synchronize()
                assert (workspace[:counter_bytes] == 0).all(), (asked, args[0].shape)


def test_merge_kernel_beyond_the_counters(gen):
    """Forced splits over more (row, KV head) units than the workspace has
    counters: the partials are merged by the second kernel."""
    lens = [int(n) for n in torch.randint(1, 120, (520,), generator=gen)]
    args = inputs_and_slots(gen, lens, 8, 4, 128, 16, torch.bfloat16, fraction=0.7)
    plan = plan_of(args[0], args[1], args[5], asked=2)
    assert plan["num_splits"] == 2 and not plan["merge_in_split"]
    assert plan_of(args[0][:100], args[1], args[5][:100], asked=2)["merge_in_split"]
    check(*args, num_splits=2)


def test_split_count_out_of_range_is_refused(gen):
    args = inputs_and_slots(gen, LENS, 2, 4, 128, 16, torch.bfloat16)
    with pytest.raises(SparseDecodeArgumentError, match="num_splits must be in"):
        run_kernel(*args, args[0].shape[-1] ** -0.5, num_splits=257)


def test_more_kept_segments_than_the_segment_table(gen):
    """> 256 kept 16-token segments in one CTA: the table is refilled."""
    lens = [4200 + int(n) for n in torch.randint(0, 50, (256,), generator=gen)]
    args = inputs_and_slots(gen, lens, 4, 1, 64, 16, torch.bfloat16, fraction=1.0)
    assert num_splits(args[0], args[1], args[5], asked=1) == 1
    assert int(args[6].min()) > 256
    check(*args, num_splits=1)


@pytest.mark.parametrize("block_size", [pytest.param(b, id=f"bs{b}") for b in (48, 64, 256)])
def test_page_sizes_beyond_powers_of_two(gen, block_size):
    check(*inputs_and_slots(gen, LENS, 2, 4, 128, block_size, torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES)
def test_flash_attention_cache_view(gen, dtype):
    """[..., :D] / [..., D:] views of vLLM's FA cache (physical [P, bs, Hkv, 2D])."""
    args = inputs_and_slots(gen, LENS, 8, 4, 128, 16, dtype, fa_layout=True)
    assert not args[1].is_contiguous() and args[1].stride(2) == 8 * 2 * 128
    check(*args)


def test_trimmed_slots_and_strided_out(gen):
    query, key, value, table, seq_lens, kept_slots, num_kept = inputs_and_slots(
        gen, LENS, 2, 4, 128, 16, torch.bfloat16, fraction=0.2
    )
    trimmed = trim_slots(kept_slots, num_kept, extra=3, pad=-1)
    wide = torch.empty(query.shape[0], query.shape[1] + 8, 128, dtype=query.dtype, device=DEVICE)
    out, _ = check(query, key, value, table, seq_lens, trimmed, num_kept, out=wide[:, 4:-4])
    assert wide[:, 4:-4].data_ptr() == out.data_ptr()


def test_nothing_visible_gives_zero_and_minus_inf(gen):
    query, key, value, table, seq_lens, kept_slots, num_kept = inputs_and_slots(
        gen, LENS, 2, 4, 64, 16, torch.bfloat16
    )
    num_kept[2, 1] = 0  # nothing kept
    kept_slots[4, 0, 0] = table.shape[1] - 1  # only a slot past the context
    num_kept[4, 0] = 1
    out, lse = check(query, key, value, table, seq_lens, kept_slots, num_kept)
    for row, head in ((2, 1), (4, 0)):
        heads = slice(4 * head, 4 * head + 4)
        assert (out[row, heads] == 0).all() and (lse[row, heads] == -math.inf).all()


def test_nan_in_unwritten_slots_does_not_leak(gen):
    query, key, value, table, seq_lens, kept_slots, num_kept = inputs_and_slots(
        gen, LENS, 2, 4, 128, 32, torch.bfloat16, garbage=math.nan
    )
    # Also keep the spare slot past each context (null page, all NaN).
    keep = torch.zeros(*num_kept.shape, table.shape[1], dtype=torch.bool, device=DEVICE)
    valid = torch.arange(kept_slots.shape[-1], device=DEVICE) < num_kept[..., None]
    keep.scatter_(-1, torch.where(valid, kept_slots, 0).long(), valid)
    keep[..., -1] = True
    out, _ = check(query, key, value, table, seq_lens, *compact_keep(keep))
    assert out.isfinite().all()


def test_cuda_graph_replay(gen):
    """Captured once, replayed on new queries and selections (no host sync)."""
    head_dim, block_size, num_kv_heads, group = 128, 16, 8, 4
    query, key, value, table, seq_lens, kept_slots, num_kept = inputs_and_slots(
        gen, LENS, num_kv_heads, group, head_dim, block_size, torch.bfloat16
    )
    workspace = cuda_ops.alloc_workspace(
        len(LENS),
        query.shape[1],
        num_kv_heads,
        head_dim,
        block_size,
        kept_slots.shape[-1],
        query.dtype,
        DEVICE,
    )
    out = torch.empty_like(query)
    lse = torch.empty(query.shape[:2], device=DEVICE)
    args = (query, key, value, table, seq_lens, kept_slots, num_kept, head_dim**-0.5)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: loads the extension, prepares the kernel
        cuda_ops.sparse_paged_decode_indexed(*args, out, lse=lse, workspace=workspace)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cuda_ops.sparse_paged_decode_indexed(*args, out, lse=lse, workspace=workspace)

    for _ in range(2):
        query.copy_(torch.randn(query.shape, device=DEVICE, dtype=query.dtype))
        keep = random_keep(gen, seq_lens, num_kv_heads, table.shape[1], block_size)
        new_slots, new_kept = compact_keep(keep)
        kept_slots.copy_(new_slots)
        num_kept.copy_(new_kept)
        out.fill_(math.nan)
        lse.fill_(math.nan)
        graph.replay()
        ref_out, ref_lse = reference(*args)
        torch.testing.assert_close(out.float(), ref_out.float(), **decode_tol(query.dtype).close())
        torch.testing.assert_close(lse, ref_lse, atol=LSE_ATOL, rtol=0)


def test_dependent_launch_on_hopper_only(gen):
    """Programmatic dependent launch where the kernel the GPU runs was built for
    sm_90+ (it waits in griddepcontrol.wait); elsewhere a plain launch."""
    args = inputs_and_slots(gen, LENS, 2, 4, 128, 16, torch.bfloat16)
    plan = plan_of(args[0], args[1], args[5])
    major = torch.cuda.get_device_capability()[0]
    off = os.environ.get("PRHS_SPARSE_DECODE_PDL") == "0"
    assert plan["dependent_launch"] == (major == 9 and not off)


def test_back_to_back_calls_read_what_the_kernel_before_wrote(gen):
    """The split kernel is a programmatic dependent launch on Hopper: it may
    start while the kernel before it runs, and must still read that kernel's
    writes. Call 2's query is call 1's output, and a kernel right before call 2
    rewrites the kept slots and counts (which held call 1's); eagerly and
    replayed from one CUDA graph."""
    head_dim, block_size, num_kv_heads, group = 128, 16, 8, 4
    query, key, value, table, seq_lens, slots_1, kept_1 = inputs_and_slots(
        gen, LENS * 4, num_kv_heads, group, head_dim, block_size, torch.bfloat16
    )
    keep_2 = random_keep(gen, seq_lens, num_kv_heads, table.shape[1], block_size, 0.6)
    slots_2, kept_2 = compact_keep(keep_2)
    assert slots_2.shape == slots_1.shape and not torch.equal(kept_2, kept_1)
    scale = head_dim**-0.5
    workspace = cuda_ops.alloc_workspace(
        query.shape[0], query.shape[1], num_kv_heads, head_dim, block_size,
        slots_1.shape[-1], query.dtype, DEVICE,
    )  # fmt: skip
    assert plan_of(query, key, slots_1)["num_splits"] > 1  # the counted merge runs too
    kept_slots, num_kept = slots_1.clone(), kept_1.clone()
    out_1, out_2 = torch.empty_like(query), torch.empty_like(query)
    lse = torch.empty(query.shape[:2], device=DEVICE)

    def chain():
        kept_slots.copy_(slots_1)
        num_kept.copy_(kept_1)
        out_1.fill_(math.nan)  # a kernel: call 2 must not read these
        cuda_ops.sparse_paged_decode_indexed(
            query, key, value, table, seq_lens, kept_slots, num_kept, scale, out_1,
            lse=lse, workspace=workspace,
        )  # fmt: skip
        torch.add(slots_2, 0, out=kept_slots)  # kernels writing call 2's selection
        torch.add(kept_2, 0, out=num_kept)
        cuda_ops.sparse_paged_decode_indexed(
            out_1, key, value, table, seq_lens, kept_slots, num_kept, scale, out_2,
            lse=lse, workspace=workspace,
        )  # fmt: skip

    def check_chain():
        tol = decode_tol(query.dtype).close()
        ref_1, _ = reference(query, key, value, table, seq_lens, slots_1, kept_1, scale)
        ref_2, _ = reference(out_1, key, value, table, seq_lens, slots_2, kept_2, scale)
        torch.testing.assert_close(out_1.float(), ref_1.float(), **tol)
        torch.testing.assert_close(out_2.float(), ref_2.float(), **tol)

    for _ in range(3):
        out_2.fill_(math.nan)
        chain()
        check_chain()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        chain()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chain()
    for _ in range(3):
        out_2.fill_(math.nan)
        graph.replay()
        torch.cuda.synchronize()
        check_chain()


def test_rejects_bad_arguments(gen):
    """Checked in Python before the extension is called (see also
    tests/test_cuda_wrapper_validation.py). Mismatched devices need 2 GPUs."""
    args = list(inputs_and_slots(gen, LENS, 2, 4, 128, 16, torch.bfloat16))
    with pytest.raises(SparseDecodeArgumentError, match="workspace"):
        run_kernel(*args, 0.1, workspace=torch.empty(0, dtype=torch.uint8, device=DEVICE))
    with pytest.raises(SparseDecodeArgumentError, match="kept_slots must be int32"):
        run_kernel(*args[:5], args[5].long(), args[6], 0.1)
    with pytest.raises(SparseDecodeArgumentError, match="head_dim"):
        run_kernel(*inputs_and_slots(gen, LENS, 2, 4, 96, 16, torch.bfloat16), 0.1)
    with pytest.raises(SparseDecodeArgumentError, match="bfloat16 or float16"):
        run_kernel(*inputs_and_slots(gen, LENS, 2, 4, 128, 16, torch.float32), 0.1)


# The op itself, bypassing the Python checks, in a child process: a C++
# TORCH_CHECK must come back as RuntimeError, and a crash in the exception path
# fails this test instead of killing the whole run.
_CPP_ERROR_SCRIPT = """
import torch
import prhs_vllm._C  # noqa: F401

def case(name, fn):
    try:
        fn()
    except RuntimeError as exc:
        print(name, "RuntimeError:", str(exc).splitlines()[0][:120], flush=True)
    else:
        print(name, "no error", flush=True)

case("aten", lambda: torch.ones(2, 3) @ torch.ones(2, 3))
case("plan", lambda: torch.ops.prhs.sparse_paged_decode_plan(1, 4, 2, 96, 16, 1, torch.bfloat16, 0))
q = torch.zeros(6, 8, 128, dtype=torch.bfloat16, device="cuda")
kv = torch.zeros(40, 2, 16, 128, dtype=torch.bfloat16, device="cuda")
i32 = lambda *shape: torch.zeros(*shape, dtype=torch.int32, device="cuda")
case("decode", lambda: torch.ops.prhs.sparse_paged_decode(
    q, kv, kv, i32(6, 8), i32(6), i32(6, 2, 8), i32(6, 2), 0.1, torch.empty_like(q),
    torch.empty(6, 8, device="cuda"), torch.empty(0, dtype=torch.uint8, device="cuda")))
"""


def test_cpp_checks_raise_runtime_error():
    """Fails where the extension was built by a toolchain whose exceptions do not
    cross into torch: the H100 image's /opt/gcc wrapper did that (the process
    died with SIGSEGV); its system gcc does not (`benchmarks/gpu_run.sh setup`
    builds with it)."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", _CPP_ERROR_SCRIPT],
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = f"rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, report
    assert "aten RuntimeError" in proc.stdout, report
    assert "plan RuntimeError: prhs sparse_paged_decode: head_dim" in proc.stdout, report
    assert "decode RuntimeError: workspace holds 0 bytes" in proc.stdout, report
