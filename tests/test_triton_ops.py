"""Triton ops (prhs_vllm.ops.triton) against the torch references, on CPU under
the Triton interpreter.

Triton picks interpreted vs compiled kernels when a kernel is defined, from
TRITON_INTERPRET. Setting it here would leak into every later test module of
the session (vLLM's own triton kernels included), so the comparisons run in a
child pytest process with TRITON_INTERPRET=1 (``test_under_interpreter``); in
the parent they are skipped. ``TRITON_INTERPRET=1 pytest tests/test_triton_ops.py``
runs them directly.

The ``check_*`` helpers take a device and are reused on CUDA by
tests/gpu/test_triton_ops_gpu.py.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from tolerances import tol

from prhs_vllm.ops.ref import page_logits as ref_page_logits
from prhs_vllm.ops.ref import update_page_summaries as ref_update_page_summaries

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
ROOT = Path(__file__).resolve().parents[1]

# Tests that need no interpreter run in the parent only, so that the child's
# "N passed" counts interpreted comparisons alone (test_under_interpreter).
parent_only = pytest.mark.skipif(
    INTERPRETED, reason="not an interpreted comparison: runs in the parent process"
)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def group_page_mass_ref(logits: torch.Tensor) -> torch.Tensor:
    """[N, Hkv, G, M] -> [N, Hkv, M]: the group-mean softmax of ``select_pages``."""
    return torch.softmax(logits, dim=-1).mean(dim=2)


# --------------------------------------------------------------------------- inputs


def garbage_summaries(gen, num_pages, num_kv_heads, head_dim, device):
    """(sum, min, max) [P, H, D] float32 holding stale values of earlier occupants."""
    shape = (num_pages, num_kv_heads, head_dim)
    key_sum = 100.0 * torch.randn(shape, generator=gen)
    key_min = torch.randn(shape, generator=gen) - 3.0
    key_max = torch.randn(shape, generator=gen) + 3.0
    return tuple(x.to(device) for x in (key_sum, key_min, key_max))


def random_pages(gen, seq_lens, block_size, num_pages):
    """Disjoint random page ids in [1, P) per row (page 0 is vLLM's null page)."""
    need = [cdiv(n, block_size) for n in seq_lens]
    assert sum(need) <= num_pages - 1, "not enough pages"
    free = (torch.randperm(num_pages - 1, generator=gen) + 1).tolist()
    rows = []
    for n in need:
        rows.append(free[:n])
        free = free[n:]
    return rows


def slots_for(pages, start, count, block_size):
    """[count] int64 slot ids of tokens start .. start+count-1 of a request on ``pages``."""
    pos = torch.arange(start, start + count)
    return torch.tensor(pages, dtype=torch.long)[pos // block_size] * block_size + pos % block_size


def strided_keys(gen, num_tokens, num_kv_heads, head_dim, dtype, device):
    """[T, H, D] keys as a non-contiguous view (the K half of a packed K|V tensor)."""
    packed = torch.randn(num_tokens, num_kv_heads, 2 * head_dim, generator=gen)
    # A per-(token, head) offset spreads the page summaries apart.
    packed += 2.0 * torch.randn(num_tokens, num_kv_heads, 1, generator=gen)
    return packed.to(dtype).to(device)[..., :head_dim]


def padded_slot_mapping(gen, slots, num_pad, in_order=False):
    """``slots`` and ``num_pad`` -1 entries, all shuffled; ``in_order``: the -1
    entries at random positions, the slots in their order (vLLM's layout)."""
    out = torch.cat([slots, torch.full((num_pad,), -1, dtype=torch.long)])
    order = torch.randperm(len(out), generator=gen)
    if in_order:
        is_pad = torch.zeros(len(out), dtype=torch.bool)
        is_pad[order[:num_pad]] = True
        out = torch.full((len(out),), -1, dtype=torch.long)
        out[~is_pad] = slots
        return out
    return out[order]


# --------------------------------------------------------------------------- checks


def assert_same_summaries(got, want, where=""):
    """Triton vs reference summaries: sums up to summation order, min / max exact.

    Both fold the same already-rounded keys in float32, whatever the key dtype.
    """
    torch.testing.assert_close(
        got[0],
        want[0],
        atol=tol(torch.float32).sum_atol,
        rtol=1e-6,
        msg=lambda m: f"key_sum {where}: {m}",
    )
    assert torch.equal(got[1], want[1]), f"key_min {where}"
    assert torch.equal(got[2], want[2]), f"key_max {where}"


def run_summary_steps(
    gen, steps, key_rows, num_pages, num_kv_heads, head_dim, block_size, dtype, update=None
):
    """Apply the same update calls to a kernel's and a reference copy; compare after each.

    Args:
        steps: list of [T'] int64 slot mappings (may hold -1), one per call.
        key_rows: extra key rows past each slot mapping (padding rows to ignore).
        update: the kernel (default: the Triton update_page_summaries).
    """
    from prhs_vllm.ops.triton import update_page_summaries

    update_page_summaries = update or update_page_summaries
    device = steps[0].device
    want = garbage_summaries(gen, num_pages, num_kv_heads, head_dim, device)
    got = tuple(x.clone() for x in want)
    for i, slots in enumerate(steps):
        key = strided_keys(gen, len(slots) + key_rows, num_kv_heads, head_dim, dtype, device)
        update_page_summaries(key, slots, block_size, *got)
        ref_update_page_summaries(key, slots, block_size, *want)
        assert_same_summaries(got, want, where=f"after call {i}")


# (num_kv_heads, head_dim, block_size) of the compiled summary-update tests.
SUMMARY_SHAPES = pytest.mark.parametrize(
    "num_kv_heads, head_dim, block_size",
    [(8, 128, 16), (8, 128, 32), (3, 64, 16), (2, 96, 16), (1, 256, 32), (40, 128, 16)],
    ids=["h8-d128-bs16", "h8-d128-bs32", "h3-d64", "h2-d96", "h1-d256", "h40-d128"],
)
KEY_DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="fp16"),
]


def check_summaries_one_call(
    gen, num_kv_heads, head_dim, block_size, dtype, lens, device, update=None, in_order=False
):
    """Several requests prefilled in one call: shuffled tokens (``in_order``:
    vLLM's order), -1 padding anywhere, stale pages."""
    num_pages = 1 + sum(cdiv(n, block_size) for n in lens) + 3
    rows = random_pages(gen, lens, block_size, num_pages)
    slots = torch.cat([slots_for(p, 0, n, block_size) for p, n in zip(rows, lens, strict=True)])
    slots = padded_slot_mapping(gen, slots, num_pad=5, in_order=in_order).to(device)
    run_summary_steps(gen, [slots], 7, num_pages, num_kv_heads, head_dim, block_size, dtype, update)


def recycled_page_sets(gen):
    """(num_pages, pages of A, pages of B, pages of C): C takes A's pages in
    another order once A has finished."""
    num_pages = 24
    free = (torch.randperm(num_pages - 1, generator=gen) + 1).tolist()
    pages_a, pages_b = free[:4], free[4:7]
    return num_pages, pages_a, pages_b, [pages_a[2], pages_a[0], pages_a[3]]


def check_summaries_recycled_pages(
    gen, num_kv_heads, head_dim, block_size, dtype, device, update=None, in_order=False
):
    """A served batch over several calls: chunked prefill, decode, a finished request's
    pages recycled (from offset 0) by a new request in the same call as decodes."""
    bs = block_size
    # A finishes after step 5; C takes A's pages in another order.
    num_pages, pages_a, pages_b, pages_c = recycled_page_sets(gen)
    steps = [
        # A prefills in chunks that split pages.
        [(pages_a, 0, bs + 5)],
        [(pages_a, bs + 5, bs - 2), (pages_b, 0, 3)],
        [(pages_a, 2 * bs + 3, bs - 3), (pages_b, 3, 1)],
        # Decodes: A's token lands on offset 0 of a new page.
        [(pages_a, 3 * bs, 1), (pages_b, 4, 1)],
        [(pages_a, 3 * bs + 1, 1), (pages_b, 5, 1)],
        # C prefills over A's old pages (offset 0 of two of them) while B decodes.
        [(pages_b, 6, 1), (pages_c, 0, bs + 7)],
        # C's third page is still A's until its offset 0 arrives here.
        [(pages_c, bs + 7, bs - 6), (pages_b, 7, 1)],
    ]
    steps = [torch.cat([slots_for(p, start, n, bs) for p, start, n in step]) for step in steps]
    steps = [padded_slot_mapping(gen, s, num_pad=2, in_order=in_order).to(device) for s in steps]
    run_summary_steps(gen, steps, 3, num_pages, num_kv_heads, head_dim, block_size, dtype, update)


def scoring_inputs(gen, group, head_dim, block_size, lens, dtype, device, num_kv_heads=2):
    """Summaries of real keys, a block table padded with stale page ids, queries.

    Returns (query [N, Hq, D] non-contiguous, (sum, min, max), block_table [N, W] int32,
    seq_lens [N] int32, num_slots). W > num_slots > the longest row's page count.
    """
    num_pages = 1 + sum(cdiv(n, block_size) for n in lens) + 4
    rows = random_pages(gen, lens, block_size, num_pages)
    summaries = garbage_summaries(gen, num_pages, num_kv_heads, head_dim, "cpu")
    slots = torch.cat(
        [slots_for(p, 0, n, block_size) for p, n in zip(rows, lens, strict=True)]
        + [torch.empty(0, dtype=torch.long)]
    )
    key = strided_keys(gen, len(slots), num_kv_heads, head_dim, torch.float32, "cpu")
    ref_update_page_summaries(key, slots, block_size, *summaries)

    num_slots = max(cdiv(n, block_size) for n in lens) + 1
    width = num_slots + 2
    # Column-major storage: the kernel must follow both strides of the table.
    table = torch.randint(0, num_pages, (width, len(lens)), generator=gen, dtype=torch.int32).t()
    for i, pages in enumerate(rows):
        table[i, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
    num_q_heads = num_kv_heads * group
    # Queries as a slice of a packed q|k|v row, like vLLM's qkv split.
    packed = 2.0 * torch.randn(len(lens), num_q_heads + 2 * num_kv_heads, head_dim, generator=gen)
    query = packed.to(dtype).to(device)[:, :num_q_heads]
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    return (
        query,
        tuple(s.to(device) for s in summaries),
        table.to(device),
        seq_lens.to(device),
        num_slots,
    )


def check_page_logits(
    gen, group, head_dim, block_size, lens, dtype, device, num_kv_heads=2, impl=None, **launch
):
    """page_logits (and Triton group_page_mass of est / bound) vs the references.

    ``impl``: the page_logits under test, called with ``launch``; default
    Triton's (``_page_logits`` with ``launch``: block_m / num_warps).
    """
    from prhs_vllm.ops.triton import group_page_mass, page_logits
    from prhs_vllm.ops.triton.scoring import _page_logits

    if impl is None:
        impl = _page_logits if launch else page_logits
    query, summaries, table, seq_lens, num_slots = scoring_inputs(
        gen, group, head_dim, block_size, lens, dtype, device, num_kv_heads
    )
    scale = head_dim**-0.5
    args = (query, *summaries, table, seq_lens, block_size, scale, num_slots)
    est, bound, lower = impl(*args, **launch)
    want_est, want_bound, want_lower = ref_page_logits(*args)
    assert est.shape == want_est.shape == (len(lens), num_kv_heads, group, num_slots)
    assert est.dtype == bound.dtype == lower.dtype == torch.float32
    t = tol(torch.float32)
    # inf entries (empty slots) must match exactly; assert_close checks that.
    torch.testing.assert_close(est, want_est, atol=t.lse_atol, rtol=1e-5)
    torch.testing.assert_close(bound, want_bound, atol=t.lse_atol, rtol=1e-5)
    torch.testing.assert_close(lower, want_lower, atol=t.lse_atol, rtol=1e-5)
    assert torch.all(bound >= est - t.lse_atol), "the Quest bound is below the centroid estimate"
    assert torch.all(lower <= est + t.lse_atol), "the box minimum is above the centroid estimate"
    for got_logits, ref_logits in ((est, want_est), (bound, want_bound), (lower, want_lower)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # nan of empty rows (interpreter)
            mass = group_page_mass(got_logits)
        want = group_page_mass_ref(ref_logits)
        torch.testing.assert_close(mass, want, atol=10 * t.mass_atol, rtol=1e-5, equal_nan=True)


def check_page_logits_quantized(
    gen, bits, group, head_dim, lens, device, num_kv_heads=2, dtype=torch.float32, impl=None
):
    """page_logits (``impl``, default Triton's) over int8 / int4 centroid codes
    and bf16 boxes vs the reference, for queries of ``dtype``."""
    from prhs_vllm.ops.ref.quant import QuantizedCentroids, code_bytes, update_quantized_summaries
    from prhs_vllm.ops.triton import page_logits

    block_size = 16
    query, _, table, seq_lens, num_slots = scoring_inputs(
        gen, group, head_dim, block_size, lens, dtype, device, num_kv_heads
    )
    num_pages = int(table.max()) + 1
    codes = torch.randint(0, 256, (num_pages, num_kv_heads, code_bytes(head_dim, bits)),
                          generator=gen, dtype=torch.uint8)  # fmt: skip
    centroids = QuantizedCentroids(codes.to(device), bits)
    shape = (num_pages, num_kv_heads, head_dim)
    key_min = torch.full(shape, math.inf, dtype=torch.bfloat16, device=device)
    key_max = torch.full(shape, -math.inf, dtype=torch.bfloat16, device=device)
    for i, n in enumerate(lens):
        pages = table[i, : cdiv(n, block_size)].to(torch.long).cpu()
        pos = torch.arange(n)
        slots = (pages[pos // block_size] * block_size + pos % block_size).to(device)
        key = strided_keys(gen, n, num_kv_heads, head_dim, torch.float32, device)
        update_quantized_summaries(key, slots, block_size, centroids, key_min, key_max)
    args = (query, centroids, key_min, key_max, table, seq_lens, block_size, 0.3, num_slots)
    got, want = (impl or page_logits)(*args), ref_page_logits(*args)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=tol(torch.float32).lse_atol, rtol=1e-5)


def random_logits(gen, num_rows, num_kv_heads, group, num_slots, device):
    """[N, Hkv, G, M] float32 log-masses: -inf tails per row (short contexts), one row
    all -inf (no context: nan mass, as torch gives), one of large magnitude and one
    with a -inf head."""
    x = 3.0 * torch.randn(num_rows, num_kv_heads, group, num_slots, generator=gen)
    lengths = torch.randint(1, num_slots + 1, (num_rows,), generator=gen)
    lengths[0] = num_slots
    lengths[-1] = 0
    empty = torch.arange(num_slots)[None, :] >= lengths[:, None]
    x = x.masked_fill(empty[:, None, None, :], -math.inf)
    if num_rows > 2:
        x[1] *= 40.0
        # Leading -inf slots (e.g. logits of kept pages masked out): a chunk that
        # has seen only -inf must not poison the running sum.
        x[2, ..., : num_slots // 2] = -math.inf
        x[2, ..., num_slots // 2 :] = 3.0 * torch.randn(
            num_kv_heads, group, num_slots - num_slots // 2, generator=gen
        )
    return x.to(device)


def check_group_page_mass(gen, group, num_slots, device, block_m=None, num_rows=4, num_kv_heads=3):
    """Triton group_page_mass vs softmax-then-group-mean, nan rows included.

    ``block_m``: page slots per chunk to force through ``_group_page_mass``.
    """
    from prhs_vllm.ops.triton import group_page_mass
    from prhs_vllm.ops.triton.scoring import _group_page_mass

    x = random_logits(gen, num_rows, num_kv_heads, group, num_slots, device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nan of the empty row (interpreter)
        if block_m is None:
            got = group_page_mass(x)
        else:
            got = _group_page_mass(x, block_m=block_m, num_warps=4)
    want = group_page_mass_ref(x)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(
        got, want, atol=tol(torch.float32).mass_atol, rtol=1e-5, equal_nan=True
    )
    assert torch.isnan(got[-1]).all() and not torch.isnan(got[:-1]).any()
    # A non-contiguous input (a view of every other page slot) reads through strides.
    view = x[..., ::2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = group_page_mass(view)
    torch.testing.assert_close(
        got, group_page_mass_ref(view), atol=tol(torch.float32).mass_atol, rtol=1e-5, equal_nan=True
    )


def selection_logits(gen, num_rows, num_kv_heads, group, num_slots, block_size, device, ties=False):
    """PageLogits [N, Hkv, G, M] with consistent est <= tight <= upper, and seq_lens [N].

    Rows: a full one, a short one (fewer pages than the sinks + window), one
    with a partial last page, then random lengths. ``ties``: every page of a
    row has the same logits, so ranks tie exactly in any implementation.
    """
    from prhs_vllm.ops.ref.selection import PageLogits

    shape = (num_rows, num_kv_heads, group, num_slots)
    est = 3.0 * torch.randn(shape, generator=gen)
    if ties:
        est = est[..., :1].expand(shape).clone()
    width = 4.0 * torch.rand(shape, generator=gen) + (0.0 if ties else 0.05)
    upper = est + width * torch.rand(shape, generator=gen)
    lower = est - width
    lens = torch.randint(1, num_slots * block_size + 1, (num_rows,), generator=gen)
    lens[0] = num_slots * block_size
    if num_rows > 1:
        lens[1] = min(2 * block_size, num_slots * block_size)
    if num_rows > 2:
        lens[2] = max(1, num_slots * block_size - block_size // 2)
    pages = -(-lens // block_size)
    empty = (torch.arange(num_slots)[None, :] >= pages[:, None])[:, None, None, :]
    logits = PageLogits(*(x.masked_fill(empty, -math.inf).to(device) for x in (est, upper, lower)))
    return logits, lens.to(torch.int32).to(device)


def check_select_compact(gen, device, num_rows=5, num_kv_heads=3, group=4, num_slots=37,
                         block_size=16, ties=False, etf=False, with_bound=True,
                         **knobs):  # fmt: skip
    """Triton select_compact vs the reference, compared by what the pages score.

    Where ranks tie (``ties``), both must keep the same pages (lower slots
    first); elsewhere the kept page counts must agree, and the reference's rank
    masses of the pages each kept must sum the same (a swap of equal scores is fine).
    """
    from prhs_vllm.ops.ref.compact_selection import select_compact as ref_select
    from prhs_vllm.ops.ref.selection import SelectionParams, _blocks, mandatory_pages, rank_mass
    from prhs_vllm.ops.ref.sparse_decode_indexed import compact_keep
    from prhs_vllm.ops.triton.selection import select_compact

    logits, seq_lens = selection_logits(
        gen, num_rows, num_kv_heads, group, num_slots, block_size, device, ties
    )
    params = SelectionParams(**{
        "block_size": block_size, "scale": 1.0, "budget": 0.3, "delta": 0.0,
        "sink_tokens": block_size, "local_tokens": 2 * block_size, **knobs,
    })  # fmt: skip
    prev = None
    if etf:
        prev = torch.rand(num_rows, num_kv_heads, num_slots + 3, generator=gen) < 0.5
        prev = prev.to(device)[..., 1:]  # a strided view, wider than M
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # -inf - -inf (interpreter)
        got = select_compact(logits, seq_lens, params, prev_keep=prev, with_bound=with_bound)
        want = ref_select(logits, seq_lens, params, prev_keep=prev, with_bound=with_bound)
    shape = (num_rows, num_kv_heads, num_slots)
    assert got.keep.shape == shape and got.keep.dtype == torch.bool
    assert got.bound_logits is None
    assert torch.equal(got.num_pages, want.num_pages)
    # Compaction is exact given the keep mask.
    slots, counts = compact_keep(got.keep)
    assert torch.equal(got.kept_slots, slots) and torch.equal(got.num_kept, counts)
    must = mandatory_pages(want.num_pages, num_slots, params)[:, None, :]
    live = torch.arange(num_slots, device=device)[None, :] < want.num_pages[:, None]
    assert not (must & ~got.keep).any(), "a sink or window page was dropped"
    assert not (got.keep & ~live[:, None, :]).any(), "a page past the context was kept"
    t = tol(torch.float32)
    if ties:
        assert torch.equal(got.keep, want.keep)
    else:
        assert torch.equal(got.num_kept, want.num_kept)
        score = rank_mass(logits, params.estimator)
        bp = params.block_pages if isinstance(params.block_pages, int) else 1
        kept_score = _blocks(score * got.keep, bp).sum(-1)
        want_score = _blocks(score * want.keep, bp).sum(-1)
        torch.testing.assert_close(kept_score, want_score, atol=10 * t.mass_atol, rtol=1e-5)
    torch.testing.assert_close(
        got.est_kept_mass, want.est_kept_mass, atol=10 * t.mass_atol, rtol=1e-5
    )
    assert torch.equal(got.over_budget, want.over_budget)
    if not with_bound:
        assert got.dropped_est_lse is None and want.dropped_est_lse is None
        return got, want
    torch.testing.assert_close(
        got.dropped_est_lse, want.dropped_est_lse, atol=t.lse_atol, rtol=1e-5
    )
    return got, want


SELECT_CASES = {
    "budget": {},
    "delta": {"delta": 0.2},
    "delta-wins": {"budget": 1.0, "delta": 0.4},
    "centroid": {"estimator": "centroid", "delta": 0.1},
    "quest": {"estimator": "quest"},
    "bound": {"estimator": "bound", "delta": 0.05},
    "blocks-2": {"block_pages": 2, "delta": 0.1},
    "blocks-per-head": {"block_pages": (1, 3, 2)},
    "psaw": {"window_start": 0.4},
    "etf": {"frozen_fraction": 0.5, "etf": True},
    "tiny-budget": {"budget": 0.01},
    "quantized": {"exact_centroid": False, "delta": 0.1},
    "raised": {"delta": 0.1, "dropped_weight": 0.1},
    "raised-quest": {"estimator": "quest", "delta": 0.2, "dropped_weight": 0.5},
    "over-dense": {"delta": 0.05, "dropped_weight": 0.1, "over_budget": "dense"},
    "over-dense-blocks": {"delta": 0.05, "block_pages": (1, 3, 2), "over_budget": "dense"},
    "over-dense-fill": {"budget": 0.5, "over_budget": "dense"},
}


# --------------------------------------------------------------------------- driver


_SUMMARY_COUNT = re.compile(
    r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected|warnings?)\b"
)


def summary_counts(output: str) -> dict[str, int] | None:
    """{outcome: count} from pytest's closing line ("12 passed, 1 skipped in 3.4s";
    "error" for errors), or None when the output has no such line."""
    for line in reversed(output.strip().splitlines()):
        found = _SUMMARY_COUNT.findall(line)
        if found and re.search(r" in [\d.]+s\b", line):
            singular = {"errors": "error", "warnings": "warning"}
            return {singular.get(word, word): int(n) for n, word in found}
    return None


def child_problem(returncode: int, output: str) -> str | None:
    """Why a child pytest run does not count as a pass (None if it does): it must
    exit 0 and report N passed with N > 0, and no failures or errors."""
    counts = summary_counts(output)
    if returncode != 0:
        return f"exit code {returncode}"
    if counts is None:
        return "no pytest summary line (no tests ran?)"
    if counts.get("failed", 0) or counts.get("error", 0):
        return f"failures in the summary: {counts}"
    if counts.get("passed", 0) == 0:
        return f"nothing passed: {counts}"
    return None


@parent_only
@pytest.mark.parametrize(
    "rc, output, ok",
    [
        (0, "....\n96 passed, 3 skipped, 2 warnings in 61.20s (0:01:01)\n", True),
        (0, "==== 5 passed in 1.00s ====", True),
        (0, "s\n1 skipped in 0.10s\n", False),  # the interpreter was unusable
        (5, "no tests ran in 0.01s\n", False),
        (0, "no tests ran in 0.01s\n", False),
        (1, "3 passed, 1 failed in 2.00s\n", False),
        (0, "2 passed, 1 error in 1.00s\n", False),
        (0, "", False),
    ],
)
def test_child_summary_is_checked(rc, output, ok):
    assert (child_problem(rc, output) is None) == ok


@parent_only
def test_under_interpreter():
    """Run this module's comparisons in a child pytest with TRITON_INTERPRET=1:
    they must run (N passed, N > 0: the child skips the parent-only tests, so N
    counts interpreted comparisons) and pass."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", str(Path(__file__).relative_to(ROOT))]
    cmd += ["-q", "-rfEs", "-p", "no:cacheprovider", "--no-header"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    problem = child_problem(proc.returncode, out)
    if problem is not None:
        pytest.fail(f"interpreted Triton tests did not pass ({problem}):\n{out[-8000:]}")
    print(out.strip().splitlines()[-1])


# --------------------------------------------------------------------------- interpreted

interpreted = pytest.mark.skipif(
    not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 child of test_under_interpreter"
)


def _interpreter_problem() -> str | None:
    """None if a trivial kernel runs under the interpreter, else why not."""
    try:
        import triton
        import triton.language as tl

        @triton.jit
        def _double(x_ptr, n, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            tl.store(x_ptr + offs, 2.0 * tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)

        x = torch.ones(5)
        _double[(1,)](x, 5, BLOCK=8)
        if not torch.equal(x, torch.full((5,), 2.0)):
            return f"a trivial kernel computed {x.tolist()}"
    except Exception as e:  # any failure means "unusable", with its reason
        return f"{type(e).__name__}: {e}"
    return None


if INTERPRETED:
    _problem = _interpreter_problem()
    if _problem is not None:
        pytest.skip(f"triton interpreter unusable here: {_problem}", allow_module_level=True)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tensors here are tiny: intra-op threads only add wake-up latency."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


@interpreted
def test_is_available():
    from prhs_vllm.ops import triton as ops

    assert ops.is_available()


@interpreted
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "num_kv_heads, head_dim, block_size",
    [(1, 32, 16), (3, 64, 32), (2, 128, 16)],
    ids=["h1-d32-bs16", "h3-d64-bs32", "h2-d128-bs16"],
)
def test_summaries_one_call(gen, num_kv_heads, head_dim, block_size, dtype):
    lens = [1, block_size, 2 * block_size + 3]
    check_summaries_one_call(gen, num_kv_heads, head_dim, block_size, dtype, lens, "cpu")


@interpreted
def test_summaries_head_chunks(gen, monkeypatch):
    """Heads split over several programs (a small tile forces BLOCK_H < H); a head_dim
    that is not a power of two."""
    from prhs_vllm.ops.triton import summaries

    monkeypatch.setattr(summaries, "_TILE", 128)
    assert summaries._tile(3, 48) == (2, 64)
    check_summaries_one_call(gen, 3, 48, 16, torch.float32, [7, 20], "cpu")


@interpreted
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
def test_summaries_recycled_pages(gen, block_size, dtype):
    check_summaries_recycled_pages(gen, 2, 32, block_size, dtype, "cpu")


@interpreted
def test_summaries_noop_on_empty_slot_mapping(gen):
    from prhs_vllm.ops.triton import update_page_summaries

    summaries = garbage_summaries(gen, 4, 2, 32, "cpu")
    before = tuple(x.clone() for x in summaries)
    update_page_summaries(torch.randn(3, 2, 32), torch.empty(0, dtype=torch.long), 16, *summaries)
    update_page_summaries(torch.randn(3, 2, 32), torch.full((3,), -1), 16, *summaries)
    for a, b in zip(summaries, before, strict=True):
        assert torch.equal(a, b)


@interpreted
def test_summaries_reject_mismatched_shapes(gen):
    from prhs_vllm.ops.triton import update_page_summaries

    summaries = garbage_summaries(gen, 4, 2, 32, "cpu")
    slots = torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="summary must be"):
        update_page_summaries(torch.randn(3, 2, 64), slots, 16, *summaries)
    with pytest.raises(ValueError, match="rows for"):
        update_page_summaries(torch.randn(2, 2, 32), slots, 16, *summaries)


@interpreted
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("group", [1, 3, 4])
def test_page_logits(gen, group, head_dim, block_size):
    # A 0-length row, a partial page, an exact page, a long row of a partial last page.
    lens = [0, 5, block_size, 4 * block_size + 3]
    check_page_logits(gen, group, head_dim, block_size, lens, torch.float32, "cpu")


@interpreted
def test_page_logits_bf16_query_and_chunked_slots(gen):
    """bf16 queries, head_dim 96; BLOCK_M = 4 splits a row's page slots over programs."""
    lens = [3, 9 * 16 + 1, 40]
    check_page_logits(gen, 4, 96, 16, lens, torch.bfloat16, "cpu", block_m=4, num_warps=1)


@interpreted
def test_page_logits_dead_tiles(gen):
    """Tiles wholly past a short row's context (and a 0-length row) write
    -inf and read nothing; a long row's tiles beside them score as usual."""
    lens = [0, 7, 3 * 16, 20 * 16 + 9]
    check_page_logits(gen, 3, 32, 16, lens, torch.float32, "cpu", block_m=4, num_warps=1)


@interpreted
def test_page_logits_no_slots(gen):
    from prhs_vllm.ops.triton import group_page_mass, page_logits

    query, summaries, table, seq_lens, _ = scoring_inputs(gen, 2, 32, 16, [5], torch.float32, "cpu")
    est, bound, lower = page_logits(query, *summaries, table, seq_lens, 16, 0.1, 0)
    assert est.shape == bound.shape == lower.shape == (1, 2, 2, 0)
    assert group_page_mass(est).shape == (1, 2, 0)


def check_page_logits_skip(
    gen, lens, group, head_dim, num_kv_heads, dtype, device, atol, impl=None
):
    """Skipped (row, head) pairs get -inf; every other pair equals the reference
    (``impl``: the page_logits under test, default Triton's)."""
    from prhs_vllm.ops.triton import page_logits

    page_logits = impl or page_logits

    query, summaries, table, seq_lens, num_slots = scoring_inputs(
        gen, group, head_dim, 16, lens, dtype, device, num_kv_heads
    )
    skip = (torch.rand(len(lens), num_kv_heads, generator=gen) < 0.5).to(device)
    skip[0, 0], skip[-1, -1] = True, False
    args = (query, *summaries, table, seq_lens, 16, head_dim**-0.5, num_slots)
    got = page_logits(*args, skip=skip)
    want = ref_page_logits(*args)
    for g, w in zip(got, want, strict=True):
        assert torch.isinf(g[skip]).all() and (g[skip] < 0).all()
        torch.testing.assert_close(g[~skip], w[~skip], atol=atol, rtol=1e-4)


@interpreted
def test_page_logits_skip_reads_nothing_for_skipped_heads(gen):
    check_page_logits_skip(gen, [40, 300, 129], 2, 32, 3, torch.float32, "cpu", 1e-4)


@interpreted
@pytest.mark.parametrize("group", [1, 3, 4])
def test_group_page_mass(gen, group):
    check_group_page_mass(gen, group, 37, "cpu")


@interpreted
@pytest.mark.parametrize("group", [1, 3])
def test_group_page_mass_chunks(gen, group):
    """BLOCK_M = 16 < M: partial max / sums combined over chunks, all -inf chunks too."""
    check_group_page_mass(gen, group, 53, "cpu", block_m=16)


@interpreted
@pytest.mark.parametrize("case", list(SELECT_CASES), ids=list(SELECT_CASES))
def test_select_compact(gen, case):
    check_select_compact(gen, "cpu", **SELECT_CASES[case])


@interpreted
@pytest.mark.parametrize("case", ["budget", "delta", "blocks-per-head", "etf", "over-dense"])
def test_select_compact_ties_keep_lower_slots(gen, case):
    check_select_compact(gen, "cpu", ties=True, **SELECT_CASES[case])


@interpreted
@pytest.mark.parametrize(
    "num_rows, num_kv_heads, group, num_slots",
    [(1, 1, 1, 1), (2, 1, 8, 5), (3, 2, 3, 130)],
    ids=["one-slot", "g8", "g3-m130"],
)
def test_select_compact_odd_shapes(gen, num_rows, num_kv_heads, group, num_slots):
    check_select_compact(gen, "cpu", num_rows, num_kv_heads, group, num_slots, delta=0.1)


@interpreted
@pytest.mark.parametrize("case", ["delta", "blocks-per-head"])
def test_select_compact_without_bound(gen, case):
    """Metrics off: the dropped-bound pass is skipped, the selection is the same."""
    check_select_compact(gen, "cpu", with_bound=False, **SELECT_CASES[case])


@interpreted
def test_select_compact_no_slots():
    from prhs_vllm.ops.ref.selection import PageLogits, SelectionParams
    from prhs_vllm.ops.triton import select_compact

    empty = torch.empty(2, 1, 2, 0)
    params = SelectionParams(block_size=16, scale=1.0, budget=0.5, delta=0.0,
                             sink_tokens=0, local_tokens=16)  # fmt: skip
    got = select_compact(PageLogits(empty, empty, empty), torch.zeros(2, dtype=torch.int32), params)
    assert got.keep.shape == (2, 1, 0) and got.num_kept.tolist() == [[0], [0]]
    assert torch.isneginf(got.dropped_est_lse).all()


@parent_only
def test_select_compact_rejects_what_it_does_not_cover():
    from prhs_vllm.ops.ref.compact_selection import select_compact
    from prhs_vllm.ops.ref.selection import PageLogits, SelectionParams

    x = torch.zeros(1, 1, 1, 2)
    for knobs in ({"rerank": 2.0}, {"delta": 0.1, "delta_control": "certified"}):
        base = {"block_size": 16, "scale": 1.0, "budget": 0.5, "delta": 0.0}
        params = SelectionParams(**{**base, "sink_tokens": 0, "local_tokens": 16, **knobs})
        with pytest.raises(ValueError, match="does not cover"):
            select_compact(PageLogits(x, x, x), torch.tensor([32]), params)


@interpreted
@pytest.mark.parametrize("bits", [8, 4])
def test_page_logits_quantized(gen, bits):
    check_page_logits_quantized(gen, bits, 2, 32, [0, 5, 40, 70], "cpu")


# --------------------------------------------------------------------------- quantized summaries


def stale_quantized(gen, num_pages, num_kv_heads, head_dim, bits, device):
    """(QuantizedCentroids, key_min, key_max) of earlier occupants: random codes in
    random bfloat16 boxes, so a run that starts mid-page merges with a real old state."""
    from prhs_vllm.ops.ref.quant import QuantizedCentroids, code_bytes

    shape = (num_pages, num_kv_heads, head_dim)
    key_min = torch.randn(shape, generator=gen) - 3.0
    key_max = (key_min + 0.5 + 6.0 * torch.rand(shape, generator=gen)).to(torch.bfloat16)
    key_min = key_min.to(torch.bfloat16)
    codes = torch.randint(0, 256, (num_pages, num_kv_heads, code_bytes(head_dim, bits)),
                          generator=gen, dtype=torch.uint8)  # fmt: skip
    return QuantizedCentroids(codes.to(device), bits), key_min.to(device), key_max.to(device)


def clone_quantized(state):
    centroids, key_min, key_max = state
    codes = type(centroids)(centroids.codes.clone(), centroids.bits)
    return codes, key_min.clone(), key_max.clone()


def unpack_codes(codes, bits):
    """[..., D * bits / 8] uint8 -> [..., D] int32 levels."""
    codes = codes.to(torch.int32)
    if bits == 8:
        return codes
    return torch.stack([codes & 0xF, codes >> 4], dim=-1).flatten(-2)


def assert_same_quantized(got, want, exact, where=""):
    """Triton vs reference quantized summaries (centroids, key_min, key_max).

    Boxes must be bit-identical (compared as bit patterns, so -0.0, subnormals and
    +-inf count): they come from min / max and the outward bf16 rounding only.

    Codes: the kernel does the reference's float32 operations in the reference's
    order (sum in slot order, IEEE division, no fused multiply-add), so where the
    reference also sums in slot order -- on CPU, ``exact`` -- they must be equal,
    which also pins torch.round's ties-to-even. On CUDA the reference sums a page's
    keys with atomics (another order) and divides by the scalar ``levels`` through
    its reciprocal: a centroid next to a rounding boundary may land on the
    neighbouring level, so codes may differ by one level and the decoded centroids
    by one quantization step ((max - min) / levels), never more (a difference carried
    into a later call is diluted by the larger count and the box only widens).
    Codes are compared where the box is finite (an infinite box has no centroid).
    """
    from prhs_vllm.ops.ref.quant import decode_centroids

    (got_c, got_min, got_max), (want_c, want_min, want_max) = got, want
    bits = want_c.bits
    assert got_c.bits == bits
    assert torch.equal(got_min.view(torch.int16), want_min.view(torch.int16)), f"key_min {where}"
    assert torch.equal(got_max.view(torch.int16), want_max.view(torch.int16)), f"key_max {where}"
    finite = torch.isfinite(want_min) & torch.isfinite(want_max)
    diff = (unpack_codes(got_c.codes, bits) - unpack_codes(want_c.codes, bits)).abs()[finite]
    worst = int(diff.max()) if diff.numel() else 0
    assert worst <= (0 if exact else 1), f"codes {where}: {worst} levels apart"
    step = ((want_max.float() - want_min.float()) / ((1 << bits) - 1))[finite]
    got_dec = decode_centroids(got_c.codes, got_min, got_max, bits)[finite]
    want_dec = decode_centroids(want_c.codes, want_min, want_max, bits)[finite]
    # Decoding adds to the box minimum: two roundings at the box's magnitude on top.
    magnitude = torch.maximum(want_min.float().abs(), want_max.float().abs())[finite]
    slack = step * (1 + 1e-5) + 2 * torch.finfo(torch.float32).eps * magnitude
    assert ((got_dec - want_dec).abs() <= slack).all(), f"centroids {where}"


def with_padding(gen, runs, num_pad):
    """Concatenate per-request slot runs with ``num_pad`` -1 entries spread between
    and after them (a page's run is never split: the kernel's adjacency contract)."""
    gaps = torch.randint(0, len(runs) + 1, (num_pad,), generator=gen).tolist()
    parts = []
    for i, run in enumerate([*runs, torch.empty(0, dtype=torch.long)]):
        parts += [torch.full((gaps.count(i),), -1, dtype=torch.long), run]
    return torch.cat(parts)


def run_quantized_steps(
    gen, steps, key_rows, num_pages, num_kv_heads, head_dim, block_size, bits, dtype, update=None
):
    """Apply the same update calls to a kernel's (``update``, default Triton's) and a
    reference copy of stale quantized summaries; compare after each call.

    Returns the kernel's state and float32 summaries (``ref.update_page_summaries``) of
    the same writes. ``key_rows``: extra key rows past each slot mapping (ignored).
    """
    from prhs_vllm.ops.ref.quant import update_quantized_summaries as ref_update
    from prhs_vllm.ops.triton import update_quantized_summaries

    update_quantized_summaries = update or update_quantized_summaries
    device = steps[0].device
    want = stale_quantized(gen, num_pages, num_kv_heads, head_dim, bits, device)
    got = clone_quantized(want)
    floats = garbage_summaries(gen, num_pages, num_kv_heads, head_dim, device)
    for i, slots in enumerate(steps):
        key = 3.0 * strided_keys(gen, len(slots) + key_rows, num_kv_heads, head_dim, dtype, device)
        update_quantized_summaries(key, slots, block_size, *got)
        ref_update(key, slots, block_size, *want)
        ref_update_page_summaries(key, slots, block_size, *floats)
        assert_same_quantized(got, want, device.type == "cpu", where=f"after call {i}")
    return got, floats


def check_quantized_one_call(gen, bits, num_kv_heads, head_dim, block_size, dtype, requests,
                             device, update=None):  # fmt: skip
    """One call, requests (start, count) on their own pages: runs from offset 0 (reset)
    or mid-page (merged with the stale old state), crossing pages, -1 padding."""
    lens = [start + count for start, count in requests]
    num_pages = 1 + sum(cdiv(n, block_size) for n in lens) + 3
    rows = random_pages(gen, lens, block_size, num_pages)
    runs = [slots_for(p, s, n, block_size) for p, (s, n) in zip(rows, requests, strict=True)]
    slots = with_padding(gen, runs, 5).to(device)
    run_quantized_steps(
        gen, [slots], 3, num_pages, num_kv_heads, head_dim, block_size, bits, dtype, update
    )


def check_quantized_recycled_pages(gen, bits, num_kv_heads, head_dim, block_size, dtype,
                                   device, update=None):  # fmt: skip
    """Chunked prefill, decodes, a finished request's pages taken over (from offset 0)
    in another order while others decode (``check_summaries_recycled_pages``)."""
    bs = block_size
    num_pages, pages_a, pages_b, pages_c = recycled_page_sets(gen)
    steps = [
        [(pages_a, 0, bs + 5)],
        [(pages_a, bs + 5, bs - 2), (pages_b, 0, 3)],
        [(pages_b, 3, 1), (pages_a, 2 * bs + 3, bs - 3)],
        [(pages_a, 3 * bs, 1), (pages_b, 4, 1)],
        [(pages_b, 5, 1), (pages_c, 0, bs + 7)],
        [(pages_c, bs + 7, bs - 6), (pages_b, 6, 1)],
    ]
    steps = [[slots_for(p, start, n, bs) for p, start, n in step] for step in steps]
    steps = [with_padding(gen, runs, 2).to(device) for runs in steps]
    run_quantized_steps(gen, steps, 3, num_pages, num_kv_heads, head_dim, bs, bits, dtype, update)


def check_quantized_decode_drift(gen, bits, num_kv_heads, head_dim, block_size, dtype, device,
                                 num_requests=3, update=None):  # fmt: skip
    """Pages filled token by token over 2 * block_size decode calls (request r joins at
    call r % block_size); at the end the boxes contain the float32 boxes and the decoded
    centroids are within the worst-case re-encoding drift of the float32 centroids
    (test_selectors.py bounds the reference's typical drift on a few pages; over many
    channels that can be exceeded): n re-encodings of half a step each, diluted by the
    later counts, add up to sum_k (k / n) half-steps = (n + 1) / (4 * levels) of the box
    (the box only widens), n = block_size. The error is relative to the bf16 box width,
    the codes' scale (a page of one or two tokens can have a float32 box far narrower
    than one bf16 ulp, or empty)."""
    from prhs_vllm.ops.ref.quant import decode_centroids

    bs = block_size
    join = [r % bs for r in range(num_requests)]
    lens = [2 * bs - j for j in join]
    num_pages = 1 + 2 * num_requests + 2
    rows = random_pages(gen, lens, bs, num_pages)
    steps = []
    for s in range(2 * bs):
        runs = [slots_for(rows[r], s - j, 1, bs) for r, j in enumerate(join) if s >= j]
        steps.append(with_padding(gen, runs, 1).to(device))
    got, (fsum, fmin, fmax) = run_quantized_steps(
        gen, steps, 0, num_pages, num_kv_heads, head_dim, bs, bits, dtype, update
    )
    pages = torch.tensor([p for row in rows for p in row], device=device)
    counts = [c for n in lens for c in (bs, n - bs)]
    count = torch.tensor(counts, dtype=torch.float32, device=device)[:, None, None]
    centroids, qmin, qmax = got
    qmin, qmax, fmin, fmax = qmin[pages].float(), qmax[pages].float(), fmin[pages], fmax[pages]
    assert (qmin <= fmin).all() and (qmax >= fmax).all(), "box not outward"
    centroid = decode_centroids(centroids.codes[pages], qmin, qmax, bits)
    atol = (bs + 1) / (4 * ((1 << bits) - 1)) * (1 + 1e-3)
    err = (centroid - fsum[pages] / count).abs()
    rel = torch.where(err > 0, err / (qmax - qmin), 0.0)
    assert rel.max() <= atol, f"max relative error {rel.max():.4f}"


BOX_EDGE_VALUES = [
    0.0, -0.0, 1e-40, -1e-40, 1e-45, -1e-45, 2.0**-126, -(2.0**-126),
    1.0 + 2.0**-8, -(1.0 + 2.0**-8), 1.0 + 3 * 2.0**-8, -(1.0 + 3 * 2.0**-8),
    1.5, -1.5, 3.3895313892515355e38, -3.3895313892515355e38, 3.4e38, -3.4e38,
    65504.1, -65504.1, 0.1, -0.1,
]  # fmt: skip


def check_quantized_box_edge_values(gen, bits, device, update=None):
    """Outward bf16 rounding bit-identical on +-0, subnormals, bf16 ties, exact bf16
    values, the bf16 maximum and finite values beyond it (rounded to +-inf / +-max):
    fresh pages first (box = one key rounded outward), then merged with random keys.
    ``update``: the kernel under test (default Triton's)."""
    from prhs_vllm.ops.ref.quant import update_quantized_summaries as ref_update
    from prhs_vllm.ops.triton import update_quantized_summaries

    update_quantized_summaries = update or update_quantized_summaries

    edge = torch.tensor(BOX_EDGE_VALUES)
    num_tokens, num_heads, dim = 6, 2, 12
    # Every edge value once per token, on shuffled (head, channel)s; two random ones.
    key = torch.stack([
        torch.cat([edge[torch.randperm(len(edge), generator=gen)], torch.randn(2, generator=gen)])
        for _ in range(num_tokens)
    ]).reshape(num_tokens, num_heads, dim)  # fmt: skip
    want = stale_quantized(gen, num_tokens + 1, num_heads, dim, bits, device)
    got = clone_quantized(want)
    pages = torch.arange(1, num_tokens + 1)
    for offset, keys in ((0, key), (1, 3.0 * torch.randn(key.shape, generator=gen))):
        slots = (pages * 16 + offset).to(device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # inf - inf (interpreter)
            update_quantized_summaries(keys.to(device), slots, 16, *got)
        ref_update(keys.to(device), slots, 16, *want)
        assert_same_quantized(got, want, device == "cpu", where=f"offset {offset}")


@interpreted
@pytest.mark.parametrize(
    "bits, num_kv_heads, head_dim, block_size, dtype",
    [
        (8, 3, 64, 16, torch.bfloat16),
        (4, 3, 128, 16, torch.float32),
        (4, 1, 64, 32, torch.bfloat16),
        (8, 2, 128, 32, torch.float32),
    ],
    ids=["int8-h3-d64-bf16", "int4-h3-d128-fp32", "int4-h1-d64-bs32-bf16", "int8-h2-d128-fp32"],
)
def test_quantized_summaries_one_call(gen, bits, num_kv_heads, head_dim, block_size, dtype):
    bs = block_size
    # Fresh single token, mid-page prefill over two boundaries, a full page, a decode
    # step mid-page, a run crossing one boundary by one token.
    requests = [(0, 1), (5, 2 * bs), (bs, bs), (3, 1), (bs - 1, 2)]
    check_quantized_one_call(gen, bits, num_kv_heads, head_dim, bs, dtype, requests, "cpu")


@interpreted
def test_quantized_summaries_head_chunks(gen, monkeypatch):
    """Heads split over programs (BLOCK_H < H); head_dim 48 (not a power of two)."""
    from prhs_vllm.ops.triton import summaries

    monkeypatch.setattr(summaries, "_TILE", 128)
    requests = [(0, 7), (9, 20)]
    check_quantized_one_call(gen, 4, 3, 48, 16, torch.float32, requests, "cpu")


@interpreted
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_summaries_recycled_pages(gen, bits):
    check_quantized_recycled_pages(gen, bits, 2, 64, 16, torch.bfloat16, "cpu")


@interpreted
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_summaries_decode_drift(gen, bits):
    check_quantized_decode_drift(gen, bits, 2, 64, 16, torch.float32, "cpu")


@interpreted
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_summaries_round_ties_to_even(bits):
    """Centroids exactly halfway between two levels: torch.round's ties-to-even.

    Page i holds one old token (offset 1 written now) with code k_i in the box
    [0, levels]; the new key k_i + 1 makes the centroid k_i + 0.5, which encodes to
    exactly k_i + 0.5 levels. Rounding half up would move every even k_i one level up.
    """
    from prhs_vllm.ops.ref.quant import QuantizedCentroids
    from prhs_vllm.ops.ref.quant import update_quantized_summaries as ref_update
    from prhs_vllm.ops.triton import update_quantized_summaries

    levels = (1 << bits) - 1
    k = torch.arange(levels) if bits == 4 else torch.tensor([0, 1, 2, 3, 126, 127, 253, 254])
    num_pages = len(k)
    byte = k * 0x11 if bits == 4 else k  # int4: code k on both channels of the byte
    codes = byte.to(torch.uint8)[:, None, None].repeat(1, 1, 2 * bits // 8)
    box = torch.zeros(num_pages, 1, 2, dtype=torch.bfloat16)
    want = (QuantizedCentroids(codes, bits), box, box + levels)
    got = clone_quantized(want)
    key = (k + 1).float()[:, None, None].repeat(1, 1, 2)
    slots = torch.arange(num_pages) * 16 + 1
    update_quantized_summaries(key, slots, 16, *got)
    ref_update(key, slots, 16, *want)
    assert_same_quantized(got, want, exact=True)
    assert torch.equal(
        unpack_codes(want[0].codes, bits), (k + k % 2)[:, None, None].repeat(1, 1, 2)
    )


@interpreted
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_summaries_box_edge_values(gen, bits):
    check_quantized_box_edge_values(gen, bits, "cpu")


@interpreted
def test_quantized_summaries_noop_and_validation(gen):
    from prhs_vllm.ops.triton import update_quantized_summaries

    state = stale_quantized(gen, 4, 2, 32, 4, "cpu")
    before = clone_quantized(state)
    update_quantized_summaries(torch.randn(3, 2, 32), torch.empty(0, dtype=torch.long), 16, *state)
    update_quantized_summaries(torch.randn(3, 2, 32), torch.full((3,), -1), 16, *state)
    assert_same_quantized(state, before, exact=True)
    slots = torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="rows for"):
        update_quantized_summaries(torch.randn(2, 2, 32), slots, 16, *state)
    with pytest.raises(ValueError, match="box must be"):
        update_quantized_summaries(torch.randn(3, 2, 64), slots, 16, *state)
    with pytest.raises(ValueError, match="codes must be"):
        as_int8 = type(state[0])(state[0].codes, 8)  # 16 bytes where int8 takes 32
        update_quantized_summaries(torch.randn(3, 2, 32), slots, 16, as_int8, *state[1:])
