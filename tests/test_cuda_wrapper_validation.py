"""The argument checks of the CUDA sparse decode wrapper
(prhs_vllm.ops.cuda.sparse_decode), on CPU / meta tensors without the
extension: every bad argument raises SparseDecodeArgumentError naming it
before anything calls into C++, and good arguments reach the (mocked) op.
"""

from __future__ import annotations

import types

import pytest
import torch

from prhs_vllm.ops.cuda import sparse_decode as sd
from prhs_vllm.ops.cuda.sparse_decode import SparseDecodeArgumentError

N, HKV, GROUP, D, BS, PAGES, M, K = 3, 2, 4, 128, 16, 9, 5, 4
HQ = HKV * GROUP
NEED = 4096  # workspace bytes the mocked plan asks for
COUNTER_BYTES = 64  # of which the leading arrival counters


class FakeOps:
    """Stands in for torch.ops.prhs: records sparse_paged_decode calls."""

    def __init__(self):
        self.calls = []

    def sparse_paged_decode(self, *args):
        self.calls.append(args)


@pytest.fixture
def fake(monkeypatch):
    """No extension, no CUDA: CPU counts as the kernel's device, split_plan
    asks for NEED bytes, _ops() hands out a recorder. Both record their calls,
    so a test can tell that nothing reached the (mocked) C++ side. No graph
    is being captured unless a test says so."""
    ops = FakeOps()
    plans = []

    def split_plan(*args):
        plans.append(args)
        return {
            "heads_per_cta": 4,
            "head_chunks": 1,
            "num_splits": 2,
            "workspace_bytes": NEED,
            "merge_in_split": True,
            "counter_bytes": COUNTER_BYTES,
            "dependent_launch": False,
            "stages": 3,
        }

    monkeypatch.setattr(sd, "_KERNEL_DEVICE_TYPE", "cpu")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(sd, "split_plan", split_plan)
    monkeypatch.setattr(sd, "_ops", lambda: ops)
    monkeypatch.setattr(sd, "_workspaces", {})
    return types.SimpleNamespace(ops=ops, plans=plans)


def good_args(device="cpu", dtype=torch.bfloat16):
    """Valid arguments of sparse_paged_decode_indexed (contents irrelevant)."""
    return dict(
        query=torch.zeros(N, HQ, D, dtype=dtype, device=device),
        key_cache=torch.zeros(PAGES, HKV, BS, D, dtype=dtype, device=device),
        value_cache=torch.zeros(PAGES, HKV, BS, D, dtype=dtype, device=device),
        block_table=torch.zeros(N, M, dtype=torch.int32, device=device),
        seq_lens=torch.ones(N, dtype=torch.int32, device=device),
        kept_slots=torch.zeros(N, HKV, K, dtype=torch.int32, device=device),
        num_kept=torch.ones(N, HKV, dtype=torch.int32, device=device),
        scale=D**-0.5,
        out=torch.empty(N, HQ, D, dtype=dtype, device=device),
        lse=torch.empty(N, HQ, dtype=torch.float32, device=device),
        workspace=torch.empty(NEED, dtype=torch.uint8, device=device),
    )


def call(args):
    args = dict(args)
    positional = [
        args.pop(name)
        for name in (
            "query",
            "key_cache",
            "value_cache",
            "block_table",
            "seq_lens",
            "kept_slots",
            "num_kept",
            "scale",
        )
    ]
    return sd.sparse_paged_decode_indexed(*positional, **args)


def misaligned(shape, dtype, offset_elems=4):
    """A contiguous tensor of `shape` starting offset_elems (8 bytes) past an
    aligned allocation."""
    numel = 1
    for size in shape:
        numel *= size
    return torch.zeros(numel + 16, dtype=dtype)[offset_elems : offset_elems + numel].view(shape)


def padded_cache():
    """[P, Hkv, bs, D] view of a [P, Hkv, bs, D + 4] tensor: token stride D + 4,
    not a multiple of 8 elements."""
    return torch.zeros(PAGES, HKV, BS, D + 4, dtype=torch.bfloat16)[..., :D]


def bf16(*shape):
    return torch.zeros(*shape, dtype=torch.bfloat16)


def i32(*shape):
    return torch.zeros(*shape, dtype=torch.int32)


def f32_inputs(a):
    for name in ("query", "key_cache", "value_cache", "out"):
        a[name] = a[name].float()


# (id, changes to good_args(), pattern of the message)
BAD = [
    ("empty_workspace", dict(workspace=torch.empty(0, dtype=torch.uint8)), "workspace holds 0"),
    ("small_workspace", dict(workspace=torch.empty(NEED - 1, dtype=torch.uint8)), "workspace"),
    (
        "misaligned_workspace",
        dict(workspace=torch.empty(NEED + 16, dtype=torch.uint8)[1 : NEED + 1]),
        "workspace must be 16-byte aligned",
    ),
    (
        "strided_workspace",
        dict(workspace=torch.empty(2 * NEED, dtype=torch.uint8)[::2]),
        "workspace must be contiguous",
    ),
    ("int64_kept_slots", dict(kept_slots=torch.zeros(N, HKV, K, dtype=torch.int64)), "int32"),
    ("float32_inputs", f32_inputs, "bfloat16 or float16"),
    (
        "head_dim_96",
        dict(query=bf16(N, HQ, 96), key_cache=bf16(PAGES, HKV, BS, 96), out=bf16(N, HQ, 96)),
        "head_dim",
    ),
    ("not_a_tensor", dict(query=[[0.0]]), "query must be a torch.Tensor"),
    ("query_2d", dict(query=bf16(N, HQ * D)), "query must have 3 dims"),
    ("key_3d", dict(key_cache=bf16(PAGES, HKV, BS * D)), "key_cache must have 4 dims"),
    ("key_dtype", dict(key_cache=torch.zeros(PAGES, HKV, BS, D)), "key_cache must have query's"),
    ("key_head_dim", dict(key_cache=bf16(PAGES, HKV, BS, 64)), "key_cache head_dim 64"),
    ("gqa_ratio", dict(key_cache=bf16(PAGES, 3, BS, D)), "num_q_heads 8 .* num_kv_heads 3"),
    ("block_size_24", dict(key_cache=bf16(PAGES, HKV, 24, D)), "block_size .* 16, got 24"),
    ("value_dtype", dict(value_cache=torch.zeros(PAGES, HKV, BS, D)), "value_cache must have"),
    ("value_shape", dict(value_cache=bf16(PAGES + 1, HKV, BS, D)), "value_cache .* shape"),
    (
        "value_strides",
        dict(value_cache=bf16(PAGES, BS, HKV, D).transpose(1, 2)),
        "value_cache .* strides",
    ),
    ("block_table_int64", dict(block_table=torch.zeros(N, M, dtype=torch.int64)), "block_table"),
    ("block_table_rows", dict(block_table=i32(N + 1, M)), "block_table must be \\[N=3"),
    ("block_table_strided", dict(block_table=i32(M, N).t()), "block_table .* contiguous rows"),
    ("seq_lens_2d", dict(seq_lens=i32(N, 1)), "seq_lens must have 1 dims"),
    ("seq_lens_len", dict(seq_lens=i32(N + 1)), "seq_lens must be contiguous \\[N=3\\]"),
    ("kept_slots_2d", dict(kept_slots=i32(N, K)), "kept_slots must have 3 dims"),
    ("kept_slots_heads", dict(kept_slots=i32(N, HKV + 1, K)), "kept_slots must be contiguous"),
    (
        "kept_slots_strided",
        dict(kept_slots=i32(N, K, HKV).transpose(1, 2)),
        "kept_slots must be contiguous",
    ),
    ("num_kept_shape", dict(num_kept=i32(N, HKV + 1)), "num_kept must be contiguous"),
    ("num_kept_int64", dict(num_kept=torch.ones(N, HKV, dtype=torch.int64)), "num_kept .* int32"),
    ("out_dtype", dict(out=torch.empty(N, HQ, D, dtype=torch.float16)), "out must have query's"),
    ("out_shape", dict(out=bf16(N, HQ + 1, D)), "out must be \\[N, Hq, D\\]"),
    ("lse_dtype", dict(lse=bf16(N, HQ)), "lse must be float32"),
    ("lse_shape", dict(lse=torch.zeros(N, HQ + 1)), "lse must be \\[N, Hq\\]"),
    ("query_strided_last", dict(query=bf16(N, D, HQ).transpose(1, 2)), "query .* last dim"),
    ("query_misaligned", dict(query=misaligned((N, HQ, D), torch.bfloat16)), "query .* aligned"),
    ("out_misaligned", dict(out=misaligned((N, HQ, D), torch.bfloat16)), "out .* aligned"),
    ("out_head_stride", dict(out=bf16(N, HQ, D + 4)[..., :D]), "out stride 1 .* multiple of 8"),
    (
        "cache_token_stride",
        lambda a: a.update(key_cache=padded_cache(), value_cache=padded_cache()),
        "key_cache stride 2 .* multiple of 8",
    ),
    (
        "key_on_other_device",
        dict(key_cache=torch.zeros(PAGES, HKV, BS, D, dtype=torch.bfloat16, device="meta")),
        "key_cache is on meta, query on cpu",
    ),
    (
        "lse_on_other_device",
        dict(lse=torch.empty(N, HQ, device="meta")),
        "lse is on meta",
    ),
    (
        "workspace_on_other_device",
        dict(workspace=torch.empty(NEED, dtype=torch.uint8, device="meta")),
        "workspace is on meta",
    ),
    ("negative_splits", dict(num_splits=-1), "num_splits must be in \\[0, 256\\], got -1"),
    ("too_many_splits", dict(num_splits=257), "num_splits must be in \\[0, 256\\], got 257"),
    ("unknown_stages", dict(stages=5), "stages must be 0 \\(the plan's\\), 3 or 4, got 5"),
]


@pytest.mark.parametrize("change, pattern", [pytest.param(c, p, id=i) for i, c, p in BAD])
def test_bad_argument_raises_before_the_op(fake, change, pattern):
    args = good_args()
    if callable(change):
        change(args)
    else:
        args.update(change)
    with pytest.raises(SparseDecodeArgumentError, match=pattern) as info:
        call(args)
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith("sparse_paged_decode: ")
    assert fake.ops.calls == [], "a bad argument reached the op"


def test_shape_errors_never_reach_the_plan(fake):
    """split_plan calls into C++ (whose own checks throw): shapes it cannot
    take are rejected before it runs."""
    args = good_args()
    args.update(query=bf16(N, HQ, 96), key_cache=bf16(PAGES, HKV, BS, 96), out=bf16(N, HQ, 96))
    with pytest.raises(SparseDecodeArgumentError, match="head_dim"):
        call(args)
    assert fake.plans == []


def test_non_cuda_query_rejected(monkeypatch):
    """Without the device patch, CPU tensors are refused, and the extension is
    never asked for (no CUDA, no prhs_vllm._C needed)."""

    def no_ops():
        raise AssertionError("_ops() called before validation")

    monkeypatch.setattr(sd, "_ops", no_ops)
    monkeypatch.setattr(sd, "split_plan", no_ops)
    with pytest.raises(SparseDecodeArgumentError, match="query must be a CUDA tensor, got device"):
        call(good_args())


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_good_arguments_reach_the_op(fake, monkeypatch, device, dtype):
    monkeypatch.setattr(sd, "_KERNEL_DEVICE_TYPE", device)
    args = good_args(device, dtype)
    out, lse = call(args)
    assert out is args["out"] and lse is args["lse"]
    (sent,) = fake.ops.calls
    names = ["query", "key_cache", "value_cache", "block_table", "seq_lens", "kept_slots"]
    names += ["num_kept", "scale", "out", "lse", "workspace", "num_splits", "stages"]
    for name, value in zip(names, sent, strict=True):
        if name == "scale":
            assert type(value) is float and value == args["scale"]
        elif name in ("num_splits", "stages"):
            assert value == 0  # the plan's own choice
        else:
            assert value is args[name], name
    # The workspace size check asked the plan with the call's shapes.
    assert fake.plans == [(N, HQ, HKV, D, BS, K, dtype, torch.device(device), 0, 0)]


def test_good_arguments_without_outputs(fake, monkeypatch):
    """out / lse / workspace allocated by the wrapper (the shared workspace
    sized by split_plan)."""
    args = good_args()
    for name in ("out", "lse", "workspace"):
        del args[name]
    out, lse = call(args)
    (sent,) = fake.ops.calls
    assert out.shape == (N, HQ, D) and out.dtype == torch.bfloat16
    assert lse.shape == (N, HQ) and lse.dtype == torch.float32
    assert sent[-5] is out and sent[-4] is lse and sent[-3].numel() == NEED


def test_fa_layout_cache_views_pass(fake):
    """vLLM's FlashAttention cache: [..., :D] / [..., D:] views of a [P, Hkv,
    bs, 2D] view of a physical [P, bs, Hkv, 2D] tensor (strided, aligned)."""
    physical = bf16(PAGES, BS, HKV, 2 * D).transpose(1, 2)
    args = good_args()
    args.update(key_cache=physical[..., :D], value_cache=physical[..., D:])
    assert not args["key_cache"].is_contiguous()
    call(args)
    assert len(fake.ops.calls) == 1


def test_error_is_a_value_error():
    assert issubclass(SparseDecodeArgumentError, ValueError)


def test_unseen_workspace_gets_its_counters_zeroed_once(fake, monkeypatch):
    """The last split merges by counting arrivals in the workspace's first
    bytes, which must start at zero: a caller's torch.empty workspace is zeroed
    on its first call, then trusted (every launch leaves the counters zero)."""
    args = good_args()
    workspace = args["workspace"]
    workspace.fill_(0xFF)
    call(args)
    assert (workspace[:COUNTER_BYTES] == 0).all()
    assert (workspace[COUNTER_BYTES:] == 0xFF).all(), "only the counters are zeroed"
    workspace.fill_(7)  # stands for state the (mocked) kernel would leave
    call(args)
    assert (workspace == 7).all(), "a known workspace is not zeroed again"


def test_workspace_first_seen_in_capture_is_zeroed_on_every_call(fake, monkeypatch):
    """Capture runs nothing: the zeroing is recorded into the graph, and the
    workspace is not taken as zeroed for later eager calls."""
    capturing = [True]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    args = good_args()
    workspace = args["workspace"]
    for _ in range(2):
        workspace.fill_(0xFF)
        call(args)
        assert (workspace[:COUNTER_BYTES] == 0).all()
    capturing[0] = False
    workspace.fill_(0xFF)
    call(args)
    assert (workspace[:COUNTER_BYTES] == 0).all()


def test_wrapper_workspaces_are_zero_filled(fake, monkeypatch):
    """The shared workspace and alloc_workspace's start with zero counters."""
    monkeypatch.setattr(sd, "workspace_size", lambda *args: NEED)
    monkeypatch.setattr(torch, "empty", _poisoned(torch.empty))
    args = good_args()
    del args["workspace"]
    call(args)
    (sent,) = fake.ops.calls
    assert (sent[-3] == 0).all()
    allocated = sd._zeroed_workspace(NEED, torch.device("cpu"))
    assert (allocated == 0).all() and allocated.numel() == NEED


def _poisoned(empty):
    """torch.empty that fills with 0xFF bytes: shows a zero-filled result was
    not a lucky fresh page."""

    def poisoned(*args, **kwargs):
        return empty(*args, **kwargs).fill_(0xFF if kwargs.get("dtype") is torch.uint8 else 1)

    return poisoned
