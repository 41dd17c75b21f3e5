"""The csrc page-summary ops on the GPU against the torch references, with the
same workloads as the Triton kernel's tests in vLLM's slot order (prefills
splitting pages, -1 padding anywhere, decodes, recycled pages, stale
summaries), every key dtype, int32 and int64 slots:

- the update alone (torch.ops.prhs.update_page_summaries), graph replay too;
- the update fused with the KV cache write
  (torch.ops.prhs.write_cache_and_summaries): the caches bit for bit against
  the reference and against vLLM's own reshape_and_cache_flash, both cache
  layouts;
- both for int8 centroids in bfloat16 boxes: against the reference (boxes bit
  for bit, codes within one level, as the Triton kernel's tests) and against
  the Triton kernel, bit for bit."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from test_triton_ops import (  # noqa: E402
    KEY_DTYPES,
    SUMMARY_SHAPES,
    assert_same_summaries,
    check_quantized_box_edge_values,
    check_quantized_decode_drift,
    check_quantized_one_call,
    check_quantized_recycled_pages,
    check_summaries_one_call,
    check_summaries_recycled_pages,
    clone_quantized,
    garbage_summaries,
    slots_for,
    strided_keys,
)

from prhs_vllm.ops.cuda import summaries  # noqa: E402
from prhs_vllm.ops.ref import update_page_summaries as ref_update  # noqa: E402
from prhs_vllm.ops.ref import write_cache_and_summaries as ref_write  # noqa: E402
from prhs_vllm.ops.ref.quant import QuantizedCentroids  # noqa: E402

# With a GPU, a missing prhs_vllm._C fails every test (tests/gpu/conftest.py).
pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("csrc_extension")]

DEVICE = "cuda"
DTYPES = KEY_DTYPES
update = summaries.update_page_summaries


def int32_slots(key, slots, block_size, *out):
    update(key, slots.to(torch.int32), block_size, *out)


class BoundUpdate:
    """``update`` through ``summaries.bind_update``: bound at the first call
    (block size and summaries fixed), as the backend does per layer."""

    def __init__(self) -> None:
        self.bound = None

    def __call__(self, key, slots, block_size, *out):
        if self.bound is None:
            self.bound = summaries.bind_update(key, slots, block_size, *out)
        self.bound(key, slots)


@pytest.mark.parametrize("dtype", DTYPES)
@SUMMARY_SHAPES
def test_one_call(gen, num_kv_heads, head_dim, block_size, dtype):
    lens = [1, block_size, 1000, 4099, 3 * block_size - 1]
    check_summaries_one_call(
        gen, num_kv_heads, head_dim, block_size, dtype, lens, DEVICE, update, in_order=True
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize(
    "kernel", [update, int32_slots, "bound"], ids=["int64-slots", "int32-slots", "bound"]
)
def test_recycled_pages(gen, block_size, dtype, kernel):
    kernel = BoundUpdate() if kernel == "bound" else kernel
    check_summaries_recycled_pages(gen, 8, 128, block_size, dtype, DEVICE, kernel, in_order=True)


def test_long_prefill(gen):
    check_summaries_one_call(
        gen, 8, 128, 16, torch.bfloat16, [32768, 777], DEVICE, update, in_order=True
    )


def test_graph_replay_of_decode_steps(gen):
    """Captured once (padded batch, -1 tail), replayed for 40 decode steps."""
    block_size, pages = 16, [[3, 9, 4, 11], [7, 2, 12, 5]]
    want = garbage_summaries(gen, 16, 8, 128, DEVICE)
    got = tuple(x.clone() for x in want)
    key = torch.zeros(4, 8, 128, dtype=torch.bfloat16, device=DEVICE)
    slots = torch.full((4,), -1, dtype=torch.long, device=DEVICE)
    update(key, slots, block_size, *got)  # eager first
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        update(key, slots, block_size, *got)
    for step in range(40):
        new_key = strided_keys(gen, 4, 8, 128, torch.bfloat16, DEVICE)
        new_slots = torch.cat([slots_for(p, 5 + step, 1, block_size) for p in pages])
        key.copy_(new_key)
        slots[:2].copy_(new_slots)
        graph.replay()
        ref_update(new_key, slots, block_size, *want)
        assert_same_summaries(got, want, where=f"after step {step}")


def test_bad_arguments_raise_value_errors(gen):
    key = torch.zeros(4, 2, 64, device=DEVICE)
    out = garbage_summaries(gen, 8, 2, 64, DEVICE)
    slots = torch.zeros(4, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="slot_mapping"):
        update(key, slots.float(), 16, *out)
    with pytest.raises(ValueError, match="rows for"):
        update(key[:2], slots, 16, *out)
    with pytest.raises(ValueError, match="float32"):
        update(key, slots, 16, out[0].half(), *out[1:])
    with pytest.raises(ValueError, match="key must"):
        update(key.cpu(), slots, 16, *out)


def test_bound_update_checks_each_call(gen):
    """What a step can change is re-checked on every call of the bound update,
    with the unbound op's errors (never a call into the extension)."""
    key = torch.zeros(4, 2, 64, device=DEVICE)
    out = garbage_summaries(gen, 8, 2, 64, DEVICE)
    slots = torch.arange(4, device=DEVICE)
    bound = summaries.bind_update(key, slots, 16, *out)
    bound(key.half(), slots.to(torch.int32))  # other supported dtypes pass
    with pytest.raises(ValueError, match="slot_mapping"):
        bound(key, slots.float())
    with pytest.raises(ValueError, match="rows for"):
        bound(key[:2], slots)
    with pytest.raises(ValueError, match="key must"):
        bound(key.cpu(), slots)
    with pytest.raises(ValueError, match="key must"):
        bound(key.double(), slots)
    with pytest.raises(ValueError, match="summaries must"):
        bound(torch.zeros(4, 3, 64, device=DEVICE), slots)
    with pytest.raises(ValueError, match="contiguous"):
        bound(key, torch.zeros(8, dtype=torch.long, device=DEVICE)[::2])


# The fused KV cache write and summary update.
def packed_cache(gen, num_pages, num_kv_heads, block_size, head_dim, dtype, layout):
    """FlashAttention's KV cache, logical [P, H, bs, 2D] (K | V in the last dim),
    full of stale values; ``layout`` "NHD" is vLLM's default memory order
    (P, bs, H, 2D) seen through a permuted view."""
    if layout == "NHD":
        base = torch.randn(num_pages, block_size, num_kv_heads, 2 * head_dim, generator=gen)
        return base.to(dtype).to(DEVICE).permute(0, 2, 1, 3)
    base = torch.randn(num_pages, num_kv_heads, block_size, 2 * head_dim, generator=gen)
    return base.to(dtype).to(DEVICE)


def clone_summaries(sums):
    """A copy of (key_sum, key_min, key_max), float32 or quantized."""
    if isinstance(sums[0], QuantizedCentroids):
        return clone_quantized(sums)
    return tuple(s.clone() for s in sums)


def halves(kv_cache):
    head_dim = kv_cache.shape[-1] // 2
    return kv_cache[..., :head_dim], kv_cache[..., head_dim:]


class FusedWrite:
    """The fused op behind the ``update(key, slots, block_size, *summaries)``
    interface of the summary checks: each call also writes fresh values and the
    keys into a packed cache, and the reference into a copy of it; the two
    caches must then be equal bit for bit (the summaries are compared by the
    check itself). ``bound``: through ``bind_cache_write``, bound at the first call."""

    def __init__(self, gen, layout="NHD", bound=False) -> None:
        self.gen, self.layout, self.bound = gen, layout, bound
        self.cache = self.want = self.write = None

    def __call__(self, key, slots, block_size, *sums):
        num_pages, num_kv_heads, head_dim = sums[1].shape
        if self.cache is None:
            self.cache = packed_cache(
                self.gen, num_pages, num_kv_heads, block_size, head_dim, key.dtype, self.layout
            )
            self.want = self.cache.clone()
        value = strided_keys(self.gen, key.shape[0], num_kv_heads, head_dim, key.dtype, DEVICE)
        key_cache, value_cache = halves(self.cache)
        if not self.bound:
            summaries.write_cache_and_summaries(key, value, key_cache, value_cache, slots, *sums)
        else:
            if self.write is None:
                self.write = summaries.bind_cache_write(
                    key, value, key_cache, value_cache, slots, *sums
                )
            self.write(key, value, slots)
        ref_write(key, value, *halves(self.want), slots, *clone_summaries(sums))
        assert torch.equal(self.cache, self.want), "KV cache differs from the reference"


@pytest.mark.parametrize("dtype", KEY_DTYPES)
@SUMMARY_SHAPES
def test_cache_write_one_call(gen, num_kv_heads, head_dim, block_size, dtype):
    lens = [1, block_size, 1000, 4099, 3 * block_size - 1]
    check_summaries_one_call(
        gen, num_kv_heads, head_dim, block_size, dtype, lens, DEVICE, FusedWrite(gen),
        in_order=True,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", KEY_DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("bound", [False, True], ids=["op", "bound"])
def test_cache_write_recycled_pages(gen, block_size, dtype, layout, bound):
    check_summaries_recycled_pages(
        gen, 8, 128, block_size, dtype, DEVICE, FusedWrite(gen, layout, bound), in_order=True
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_cache_equals_vllm_reshape_and_cache_flash(gen, dtype, layout):
    """What vLLM's FlashAttention write stores (its do_kv_cache_update, 0.26),
    bit for bit: the fused op replaces it on prhs's sparse layers."""
    vllm_ops = pytest.importorskip("vllm._custom_ops")
    num_pages, heads, block_size, head_dim = 40, 8, 16, 128
    kv_cache = packed_cache(gen, num_pages, heads, block_size, head_dim, dtype, layout)
    theirs = kv_cache.clone()
    perm = torch.randperm(num_pages * block_size, generator=gen)[:300].to(DEVICE)
    slots = torch.cat([perm[:200], torch.full((7,), -1, device=DEVICE), perm[200:]])
    # As the model hands them over: views of one qkv row per token (vLLM's
    # kernel takes the heads of a token as contiguous; ours takes any strides).
    qkv = torch.randn(slots.shape[0] + 5, (4 + 2) * heads * head_dim, generator=gen)
    qkv = qkv.to(dtype).to(DEVICE)
    key, value = (
        qkv[:, i * heads * head_dim : (i + 1) * heads * head_dim].view(-1, heads, head_dim)
        for i in (4, 5)
    )
    sums = garbage_summaries(gen, num_pages, heads, head_dim, DEVICE)
    # Scattered slots: the cache is checked here; summaries need vLLM's run order.
    summaries.write_cache_and_summaries(key, value, *halves(kv_cache), slots, *sums)
    key_cache, value_cache = theirs.transpose(1, 2).split(head_dim, dim=-1)
    scale = torch.ones((), device=DEVICE)
    vllm_ops.reshape_and_cache_flash(
        key, value, key_cache, value_cache, slots, "auto", scale, scale
    )
    assert torch.equal(kv_cache, theirs)


def test_cache_write_bad_arguments_raise_value_errors(gen):
    sums = garbage_summaries(gen, 8, 2, 64, DEVICE)
    key = torch.zeros(4, 2, 64, dtype=torch.bfloat16, device=DEVICE)
    slots = torch.arange(4, device=DEVICE)
    caches = halves(torch.zeros(8, 2, 16, 128, dtype=torch.bfloat16, device=DEVICE))
    write = summaries.write_cache_and_summaries
    with pytest.raises(ValueError, match="value must"):
        write(key, key[:, :1], *caches, slots, *sums)
    with pytest.raises(ValueError, match="value must have key's dtype"):
        write(key, key.half(), *caches, slots, *sums)
    with pytest.raises(ValueError, match="key_cache must have key's dtype"):
        write(key.half(), key.half(), *caches, slots, *sums)
    with pytest.raises(ValueError, match="pages"):
        write(key, key, caches[0][:4], caches[1][:4], slots, *sums)
    with pytest.raises(ValueError, match="share shape and strides"):
        write(key, key, caches[0], caches[1].contiguous(), slots, *sums)
    with pytest.raises(ValueError, match=r"key_cache must be \[P, 2, block_size, 64\]"):
        write(key, key, caches[0][:, :1], caches[1][:, :1], slots, *sums)
    bound = summaries.bind_cache_write(key, key, *caches, slots, *sums)
    bound(key, key, slots.to(torch.int32))
    with pytest.raises(ValueError, match="value must have key's dtype"):
        bound(key, key.float(), slots)
    with pytest.raises(ValueError, match="key_cache must have key's dtype"):
        bound(key.float(), key.float(), slots)
    with pytest.raises(ValueError, match="rows for"):
        bound(key[:2], key[:2], slots)
    with pytest.raises(ValueError, match="value must"):
        bound(key, key[:3], slots)


def test_cache_writer_serves_matching_float32_and_int8_summaries_only(gen):
    """``ops.cache_writer`` binds the op for rows of the cache's dtype and float32
    or int8 summaries; for int4 summaries or fp16 rows into a bf16 cache it
    declines (None): the layer then writes the platform's way and updates separately."""
    from prhs_vllm import ops
    from prhs_vllm.backend.common import PageSummaries

    caches = halves(packed_cache(gen, 8, 2, 16, 64, torch.bfloat16, "NHD"))
    key = torch.zeros(4, 2, 64, dtype=torch.bfloat16, device=DEVICE)
    slots = torch.arange(4, device=DEVICE)
    for dtype in ("float32", "int8"):
        s = PageSummaries(8, 2, 64, DEVICE, dtype)
        sums = (s.key_sum, s.key_min, s.key_max)
        assert callable(ops.cache_writer(key, key, *caches, slots, *sums)), dtype
        assert ops.cache_writer(key.half(), key.half(), *caches, slots, *sums) is None
    s = PageSummaries(8, 2, 64, DEVICE, "int4")
    assert ops.cache_writer(key, key, *caches, slots, s.key_sum, s.key_min, s.key_max) is None


# int8 centroids in bfloat16 boxes: the same ops, the Triton kernel's checks.


class Int8AgainstTriton:
    """``update`` (or another op behind its interface) on the summaries under
    test, the Triton kernel on a shadow copy: equal bit for bit after each call."""

    def __init__(self, op=update) -> None:
        self.op, self.shadow = op, None

    def __call__(self, key, slots, block_size, *sums):
        from prhs_vllm.ops.triton import update_quantized_summaries

        if self.shadow is None:
            self.shadow = clone_quantized(sums)
        self.op(key, slots, block_size, *sums)
        update_quantized_summaries(key, slots, block_size, *self.shadow)
        for got, want, name in zip(sums, self.shadow, ("codes", "key_min", "key_max"), strict=True):
            got = got.codes if isinstance(got, QuantizedCentroids) else got.view(torch.int16)
            want = want.codes if isinstance(want, QuantizedCentroids) else want.view(torch.int16)
            assert torch.equal(got, want), f"{name} differ from the Triton kernel's"


INT8_UPDATES = {
    "op": lambda gen: update,
    "bound": lambda gen: BoundUpdate(),
    "fused": lambda gen: FusedWrite(gen),
    "fused-bound-hnd": lambda gen: FusedWrite(gen, "HND", bound=True),
    "op-vs-triton": lambda gen: Int8AgainstTriton(),
    "fused-vs-triton": lambda gen: Int8AgainstTriton(FusedWrite(gen)),
}


@pytest.mark.parametrize("impl", list(INT8_UPDATES))
@pytest.mark.parametrize(
    "num_kv_heads, head_dim, block_size, dtype",
    [(3, 64, 16, torch.bfloat16), (2, 128, 32, torch.float32), (8, 128, 16, torch.float16)],
    ids=["h3-d64-bf16", "h2-d128-bs32-fp32", "h8-d128-fp16"],
)
def test_int8_one_call(gen, impl, num_kv_heads, head_dim, block_size, dtype):
    bs = block_size
    requests = [(0, 1), (5, 2 * bs), (bs, bs), (3, 1), (bs - 1, 2)]
    check_quantized_one_call(
        gen, 8, num_kv_heads, head_dim, bs, dtype, requests, DEVICE, INT8_UPDATES[impl](gen)
    )


@pytest.mark.parametrize("impl", list(INT8_UPDATES))
@pytest.mark.parametrize("block_size", [16, 32])
def test_int8_recycled_pages(gen, impl, block_size):
    check_quantized_recycled_pages(
        gen, 8, 8, 128, block_size, torch.bfloat16, DEVICE, INT8_UPDATES[impl](gen)
    )


@pytest.mark.parametrize("impl", ["op", "fused-vs-triton"])
def test_int8_decode_drift(gen, impl):
    check_quantized_decode_drift(
        gen, 8, 4, 128, 16, torch.bfloat16, DEVICE, num_requests=5, update=INT8_UPDATES[impl](gen)
    )


@pytest.mark.parametrize("impl", ["op", "op-vs-triton"])
def test_int8_box_edge_values(gen, impl):
    check_quantized_box_edge_values(gen, 8, DEVICE, update=INT8_UPDATES[impl](gen))


def test_int8_bad_arguments_raise_value_errors(gen):
    from prhs_vllm.backend.common import PageSummaries

    key = torch.zeros(4, 2, 64, device=DEVICE)
    slots = torch.arange(4, device=DEVICE)
    s = PageSummaries(8, 2, 64, DEVICE, "int8")
    with pytest.raises(ValueError, match="int8 codes in bfloat16 boxes"):
        update(key, slots, 16, s.key_sum, s.key_min.float(), s.key_max.float())
    with pytest.raises(ValueError, match="codes must match"):
        update(key, slots, 16, QuantizedCentroids(s.key_sum.codes[:4], 8), s.key_min, s.key_max)
    int4 = PageSummaries(8, 2, 64, DEVICE, "int4")
    with pytest.raises(ValueError, match="int4 centroids"):
        update(key, slots, 16, int4.key_sum, int4.key_min, int4.key_max)
