"""The csrc page-summary update (torch.ops.prhs.update_page_summaries) against
the torch reference, on the GPU: the same workloads as the Triton kernel's
tests in vLLM's slot order (prefills splitting pages, -1 padding anywhere,
decodes, recycled pages, stale summaries), every key dtype, int32 and int64 slots, graph replay."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from prhs_vllm.ops.cuda import summaries  # noqa: E402
from prhs_vllm.ops.cuda.sparse_decode import is_available  # noqa: E402

if not is_available():
    pytest.skip("prhs_vllm._C is not built", allow_module_level=True)

from test_triton_ops import (  # noqa: E402
    KEY_DTYPES,
    SUMMARY_SHAPES,
    assert_same_summaries,
    check_summaries_one_call,
    check_summaries_recycled_pages,
    garbage_summaries,
    slots_for,
    strided_keys,
)

from prhs_vllm.ops.ref import update_page_summaries as ref_update  # noqa: E402

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
