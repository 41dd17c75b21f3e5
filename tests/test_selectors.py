"""The selectors against their definitions: the mean-constrained bound,
exact rerank, certified delta control, per-head block sizes, PSAW, ETF, time
reuse (replay), and calibration."""

from __future__ import annotations

import math

import pytest
import torch
from test_ops_ref import (
    adversarial_cache,
    oracle_decode,
    random_paged_kv,
    summaries_of,
    true_dropped_mass,
)
from tolerances import tol

from prhs_vllm.ops.ref import (
    PageLogits,
    SelectionParams,
    dropped_mass_upper_bound,
    exact_page_logits,
    mean_constrained_bound,
    page_logits,
    select_pages,
    sparse_paged_decode,
)
from prhs_vllm.ops.ref.selection import mandatory_pages, pages_before, select_from_logits

BS = 16
LENS = [45, 200, 417, 333]
KINDS = ["gaussian", "large-norm-keys", "spike-token", "uniform-pages"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_case(gen, kind="gaussian", group=2, head_dim=32, num_kv_heads=3, lens=LENS, sharp=1.0):
    key_cache, value_cache, table = random_paged_kv(
        gen, lens, num_kv_heads, head_dim, BS, torch.float32
    )
    query = sharp * torch.randn(len(lens), num_kv_heads * group, head_dim, generator=gen)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    adversarial_cache(gen, kind, key_cache, table, seq_lens, query, BS)
    return query, key_cache, value_cache, table, seq_lens, summaries_of(key_cache, table, lens)


def params(**kw) -> SelectionParams:
    base = dict(block_size=BS, scale=32**-0.5, budget=0.25, delta=0.0, sink_tokens=16,
                local_tokens=32)  # fmt: skip
    return SelectionParams(**{**base, **kw})


def all_slots(query, key_cache, table):
    n, hkv, m = query.shape[0], key_cache.shape[1], table.shape[1]
    return torch.arange(m).expand(n, hkv, m)


def true_logits(query, key_cache, table, seq_lens, scale):
    return exact_page_logits(
        query, key_cache, table, seq_lens, scale, all_slots(query, key_cache, table)
    )


# --------------------------------------------------------------------------- bounds


def brute_page_logits(query, key_cache, table, seq_lens, scale):
    """[N, Hkv, G, M] fp64 loops."""
    n_rows, hq, _ = query.shape
    hkv, m = key_cache.shape[1], table.shape[1]
    g = hq // hkv
    out = torch.full((n_rows, hkv, g, m), -math.inf, dtype=torch.float64)
    for n in range(n_rows):
        for j in range(m):
            count = min(BS, int(seq_lens[n]) - j * BS)
            if count <= 0:
                continue
            keys = key_cache[int(table[n, j]), :, :count].double()
            for h in range(hkv):
                q = query[n, h * g : (h + 1) * g].double()
                out[n, h, :, j] = torch.logsumexp(scale * q @ keys[h].T, dim=-1)
    return out


def test_exact_page_logits_matches_loops(gen):
    query, key_cache, _, table, seq_lens, _ = make_case(gen)
    got = true_logits(query, key_cache, table, seq_lens, 0.2)
    want = brute_page_logits(query, key_cache, table, seq_lens, 0.2)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)


def test_exact_page_logits_minus_one_slot_is_empty(gen):
    query, key_cache, _, table, seq_lens, _ = make_case(gen)
    slots = torch.full((len(LENS), key_cache.shape[1], 2), -1)
    slots[:, :, 0] = 1
    got = exact_page_logits(query, key_cache, table, seq_lens, 0.2, slots)
    assert torch.isinf(got[..., 1]).all() and (got[..., 1] < 0).all()
    want = brute_page_logits(query, key_cache, table, seq_lens, 0.2)[..., 1]
    torch.testing.assert_close(got[..., 0].double(), want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("seed", range(3), ids=lambda s: f"seed{s}")
@pytest.mark.parametrize("kind", KINDS)
def test_mean_constrained_bound_brackets_the_truth(gen, kind, seed):
    """est <= true <= bound <= Quest on every page (random and adversarial keys)."""
    query, key_cache, _, table, seq_lens, summaries = make_case(gen, kind, sharp=2.0)
    scale = 32**-0.5
    logits = page_logits(query, *summaries, table, seq_lens, BS, scale, table.shape[1])
    bound = mean_constrained_bound(logits)
    true = true_logits(query, key_cache, table, seq_lens, scale)
    live = torch.isfinite(true)
    assert torch.equal(live, torch.isfinite(bound))
    slack = 1e-3  # float32 rounding of logits in the tens
    assert (logits.est[live] <= true[live] + slack).all(), "Jensen lower bound broken"
    assert (bound[live] >= true[live] - slack).all(), "upper bound below the truth"
    assert (bound[live] <= logits.upper[live] + 1e-5).all(), "looser than Quest"
    assert (logits.lower[live] <= logits.est[live] + slack).all()
    if kind == "uniform-pages":  # a point box: all three coincide with the truth
        torch.testing.assert_close(bound[live], true[live], atol=1e-3, rtol=1e-4)


def test_mean_constrained_bound_formula():
    """Two-point extreme: n (p e^hi + (1-p) e^lo), p = (m - lo) / (hi - lo)."""
    n, lo, hi, m = 16.0, -1.0, 3.0, 0.5
    logits = PageLogits(
        torch.tensor([math.log(n) + m]),
        torch.tensor([math.log(n) + hi]),
        torch.tensor([math.log(n) + lo]),
    )
    p = (m - lo) / (hi - lo)
    want = math.log(n * (p * math.exp(hi) + (1 - p) * math.exp(lo)))
    assert mean_constrained_bound(logits).item() == pytest.approx(want, rel=1e-5)


# --------------------------------------------------------------------------- rerank / certified


def keep_masses(keep, true):
    """Sorted [N, Hkv, K] group-mean true masses of kept pages (compare by scores)."""
    mass = torch.nan_to_num(torch.softmax(true.double(), dim=-1), nan=0.0).mean(2)
    return torch.sort(torch.where(keep, mass, -1.0), dim=-1, descending=True).values


@pytest.mark.parametrize("sinks", [0, 16], ids=lambda s: f"sink{s}")
@pytest.mark.parametrize("delta", [0.0, 0.1])
def test_full_rerank_selects_like_the_oracle(gen, delta, sinks):
    """Shortlisting every page makes the estimate exact: the same kept masses as
    the selection rule fed with true page log-masses (slot 0 a candidate too)."""
    query, key_cache, _, table, seq_lens, summaries = make_case(gen, sharp=2.0)
    p = params(rerank=8.0, budget=0.5, delta=delta, sink_tokens=sinks)
    sel = select_pages(query, *summaries, table, seq_lens, p, key_cache=key_cache)
    true = true_logits(query, key_cache, table, seq_lens, p.scale)
    oracle = select_from_logits(PageLogits(true, true, true), seq_lens, p)
    torch.testing.assert_close(
        keep_masses(sel.keep, true), keep_masses(oracle.keep, true), atol=1e-6, rtol=0
    )


def test_rerank_needs_key_cache(gen):
    query, _, _, table, seq_lens, summaries = make_case(gen)
    with pytest.raises(ValueError, match="key cache"):
        select_pages(query, *summaries, table, seq_lens, params(rerank=1.0))


@pytest.mark.parametrize("rerank", [0.0, 2.0, 8.0])
@pytest.mark.parametrize("kind", KINDS)
def test_certified_control_never_exceeds_delta(gen, kind, rerank):
    """budget 1 (the cap never binds): certified control keeps the true dropped
    mass <= delta on every (row, KV head), and the reported bound holds."""
    delta = 0.1
    query, key_cache, value_cache, table, seq_lens, summaries = make_case(gen, kind, sharp=2.0)
    p = params(budget=1.0, delta=delta, delta_control="certified", rerank=rerank)
    sel = select_pages(query, *summaries, table, seq_lens, p, key_cache=key_cache)
    _, _, weights = oracle_decode(query, key_cache, value_cache, table, seq_lens, p.scale)
    true = true_dropped_mass(weights, sel.keep, seq_lens, BS, 2)
    assert (true <= delta + 1e-6).all(), f"true dropped {true.max():.4f} > delta"
    _, lse = sparse_paged_decode(query, key_cache, value_cache, table, seq_lens, sel.keep, p.scale)
    bound = dropped_mass_upper_bound(sel.bound_logits, sel.keep, lse.view(*sel.keep.shape[:2], -1))
    assert (bound.double() >= true * (1 - tol(torch.float32).bound_rtol)).all()


def test_certified_with_full_rerank_keeps_fewer_than_without(gen):
    """Exact masses make the certificate tight: fewer pages for the same delta."""
    query, key_cache, _, table, seq_lens, summaries = make_case(gen, sharp=2.0)
    loose = params(budget=1.0, delta=0.1, delta_control="certified")
    exact = params(budget=1.0, delta=0.1, delta_control="certified", rerank=8.0)
    a = select_pages(query, *summaries, table, seq_lens, loose, key_cache=key_cache)
    b = select_pages(query, *summaries, table, seq_lens, exact, key_cache=key_cache)
    assert b.keep.sum() < a.keep.sum()


# --------------------------------------------------------------------------- block sizes


def test_per_head_block_sizes_equal_uniform_per_head(gen):
    query, key_cache, _, table, seq_lens, summaries = make_case(gen)
    sizes = (1, 4, 2)
    mixed = select_pages(query, *summaries, table, seq_lens, params(block_pages=sizes))
    for h, size in enumerate(sizes):
        uniform = select_pages(query, *summaries, table, seq_lens, params(block_pages=size))
        assert torch.equal(mixed.keep[:, h], uniform.keep[:, h]), f"head {h}"


def test_per_head_block_sizes_wrong_count(gen):
    query, _, _, table, seq_lens, summaries = make_case(gen)
    with pytest.raises(ValueError, match="3 KV heads"):
        select_pages(query, *summaries, table, seq_lens, params(block_pages=(1, 2)))


# --------------------------------------------------------------------------- PSAW / ETF


@pytest.mark.parametrize("start", [0.3, 0.7])
def test_psaw_drops_early_candidates_but_not_sinks(gen, start):
    query, _, _, table, seq_lens, summaries = make_case(gen)
    p = params(window_start=start, budget=1.0)
    sel = select_pages(query, *summaries, table, seq_lens, p)
    m = table.shape[1]
    early = pages_before(seq_lens, start, m, BS)[:, None, :].expand_as(sel.keep)
    must = mandatory_pages(sel.num_pages, m, p)[:, None, :].expand_as(sel.keep)
    assert not (sel.keep & early & ~must).any()
    assert sel.keep[must].all()
    late = ~early & (torch.arange(m) < sel.num_pages[:, None])[:, None, :]
    assert sel.keep[late].all(), "budget 1: every page after the window start is kept"


def test_etf_freezes_early_pages_to_the_previous_layer(gen):
    query, _, _, table, seq_lens, summaries = make_case(gen)
    prev = torch.rand(len(LENS), 3, table.shape[1], generator=gen) < 0.5
    p = params(frozen_fraction=0.5)
    sel = select_pages(query, *summaries, table, seq_lens, p, prev_keep=prev)
    m = table.shape[1]
    frozen = pages_before(seq_lens, 0.5, m, BS)[:, None, :].expand_as(sel.keep)
    must = mandatory_pages(sel.num_pages, m, p)[:, None, :].expand_as(sel.keep)
    region = frozen & ~must & (torch.arange(m) < sel.num_pages[:, None])[:, None, :]
    assert torch.equal(sel.keep[region], prev[region])
    # Without a previous layer there is nothing to freeze: the plain selection.
    plain = select_pages(query, *summaries, table, seq_lens, params())
    alone = select_pages(query, *summaries, table, seq_lens, p)
    assert torch.equal(plain.keep, alone.keep)


# --------------------------------------------------------------------------- replay / reuse


def synthetic_window(gen, steps=24, length=700, jitter=0.0):
    from prhs_vllm.eval.replay import page_window

    key = torch.randn(2, length, 32, generator=gen)
    base = torch.randn(4, 1, 32, generator=gen) * 2
    query = base + jitter * torch.randn(4, steps, 32, generator=gen)
    return page_window(query, key, 32**-0.5, BS)


def test_page_window_rows_never_see_the_future(gen):
    win = synthetic_window(gen)
    for row, seq_len in enumerate(win.seq_lens.tolist()):
        last = (seq_len - 1) // BS
        page = int(win.block_table[row, last])
        count = seq_len - last * BS
        kmax = win.summaries[2][page]
        want = win.key_cache[page, :, :count].amax(1)
        torch.testing.assert_close(kmax, want)
    assert torch.allclose(win.true_mass.sum(-1), torch.ones(1, dtype=torch.float64))


def test_reuse_skips_scoring_for_identical_queries(gen):
    from prhs_vllm.eval.replay import ReuseParams, replay_layer

    win = synthetic_window(gen, jitter=0.0)
    p = params(budget=0.125, scale=win.scale)
    fresh = replay_layer(win, p)
    reused = replay_layer(win, p, ReuseParams(tau=0.8, max_age=4))
    assert not fresh.reused.any()
    # every step but the first and each 5th (age limit 4) reuses
    assert reused.reused.float().mean() >= 0.7
    assert torch.isnan(reused.est_dropped[reused.reused]).all()
    for t in range(1, reused.keep.shape[0]):
        for h in range(reused.keep.shape[1]):
            if reused.reused[t, h]:
                older = reused.keep[t - 1, h] & (torch.arange(reused.keep.shape[2]) < 1 + (
                    int(win.seq_lens[t]) - 1) // BS)  # fmt: skip
                assert (reused.keep[t, h] | ~older).all(), "reuse lost a page it had"
    never = replay_layer(win, p, ReuseParams(tau=1.01))
    assert not never.reused.any()


# --------------------------------------------------------------------------- calibration


def test_allocate_respects_the_budget_and_is_deterministic(gen):
    from prhs_vllm.calibration import SIZES, allocate

    drop = {li: torch.sort(torch.rand(3, 4, generator=gen), dim=-1).values for li in (2, 3, 5, 7)}
    a = allocate(drop, 2)
    assert a == allocate({k: v.clone() for k, v in drop.items()}, 2)
    sizes = [s for v in a.values() for s in v]
    assert all(s in SIZES for s in sizes)
    assert sum(1 / s for s in sizes) / len(sizes) <= 1 / 2 + 1e-9
    # The insensitive head keeps the largest blocks; the sensitive one gets the
    # smallest that fits (8 and 1 would cost 1/8 + 1 > 2 heads / 2).
    flat = {2: torch.tensor([[0.1, 0.1, 0.1, 0.1], [0.0, 0.2, 0.4, 0.8]])}
    assert allocate(flat, 2)[2] == (8, 2)


def test_calibration_is_deterministic_and_writes_a_loadable_config(gen, tmp_path):
    from prhs_vllm.calibration import calibrate, config_yaml
    from prhs_vllm.config import load_config_file

    wins = {li: [synthetic_window(gen, steps=6, jitter=1.0)] for li in (2, 3)}
    one = calibrate(wins, 0.125, 2)
    two = calibrate(wins, 0.125, 2)
    assert one.sizes == two.sizes and one.similarity == two.similarity
    for li in one.drop:
        assert torch.equal(one.drop[li], two.drop[li])
    path = tmp_path / "c.yaml"
    path.write_text(config_yaml(one, "test\nheader", 2, (0, 1)))
    cfg = load_config_file(path)
    assert cfg.head_block_pages == one.sizes


def test_capture_qk_is_causal_and_complete():
    """Captured keys of a prefix equal the same positions of a longer run, one
    LayerQK per layer with the model's head counts and scale."""
    pytest.importorskip("transformers")
    from prhs_vllm.eval.capture import capture_qk, load_model

    try:
        model, tokenizer = load_model("smollm2")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 12)["input_ids"][:96]
    long = capture_qk(model, ids, 8, "smollm2")
    short = capture_qk(model, ids[:64], 8, "smollm2")
    assert len(long.layers) == model.config.num_hidden_layers
    for a, b in zip(long.layers, short.layers, strict=True):
        assert a.query.shape == (9, 8, 64) and a.key.shape == (3, 96, 64)
        assert a.scale == pytest.approx(64**-0.5) and a.sliding_window is None
        torch.testing.assert_close(a.key[:, :64], b.key, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- quantized summaries


def fill(keys, slots_per_call, bits, num_pages, block_size=BS):
    """Quantized and float32 summaries of the same writes."""
    from prhs_vllm.ops.ref import update_page_summaries
    from prhs_vllm.ops.ref.quant import QuantizedCentroids, code_bytes, update_quantized_summaries

    _, heads, dim = keys.shape
    shape = (num_pages, heads, dim)
    q = QuantizedCentroids(
        torch.zeros(num_pages, heads, code_bytes(dim, bits), dtype=torch.uint8), bits
    )
    qmin = torch.full(shape, math.inf, dtype=torch.bfloat16)
    qmax = torch.full(shape, -math.inf, dtype=torch.bfloat16)
    f = (torch.zeros(shape), torch.full(shape, math.inf), torch.full(shape, -math.inf))
    for slots in slots_per_call:
        k = keys[slots.clamp(min=0)]
        update_quantized_summaries(k, slots, block_size, q, qmin, qmax)
        update_page_summaries(k, slots, block_size, *f)
    return (q, qmin, qmax), f


@pytest.mark.parametrize("bits, atol", [(8, 0.01), (4, 0.2)])
@pytest.mark.parametrize("order", ["decode", "prefill", "chunked"])
def test_quantized_centroids_match_float32_within_tolerance(gen, bits, atol, order):
    from prhs_vllm.ops.ref.quant import decode_centroids

    num_pages = 12
    keys = torch.randn(num_pages * BS, 2, 64, generator=gen) * 3
    all_slots = torch.arange(num_pages * BS)
    if order == "decode":  # one token per page per call, -1 padding mixed in
        calls = [torch.cat([all_slots[o::BS], torch.tensor([-1])]) for o in range(BS)]
    elif order == "prefill":
        calls = [all_slots[torch.randperm(len(all_slots), generator=gen)]]
    else:  # chunks that end mid-page
        calls = list(all_slots.split(37))
    (q, qmin, qmax), (fsum, fmin, fmax) = fill(keys, calls, bits, num_pages)
    assert (qmin.float() <= fmin).all() and (qmax.float() >= fmax).all(), "box not outward"
    assert ((qmax.float() - qmin.float()) <= (fmax - fmin) * 1.01 + 1e-3).all()
    centroid = decode_centroids(q.codes, qmin, qmax, bits)
    rel = (centroid - fsum / BS).abs() / (fmax - fmin)
    assert rel.max() <= atol, f"max relative error {rel.max():.4f}"


def test_quantized_padding_only_step_is_a_no_op(gen):
    from prhs_vllm.ops.ref.quant import update_quantized_summaries

    keys = torch.randn(3 * BS, 2, 64, generator=gen)
    (q, qmin, qmax), _ = fill(keys, [torch.arange(3 * BS)], 8, 4)
    before = (q.codes.clone(), qmin.clone(), qmax.clone())
    update_quantized_summaries(keys[:3], torch.full((3,), -1), BS, q, qmin, qmax)
    assert all(torch.equal(a, b) for a, b in zip(before, (q.codes, qmin, qmax), strict=True))


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_selection_close_to_float32_and_bounds_hold(gen, bits):
    """Scoring from quantized summaries: estimates within tolerance of float32;
    the certified bound (box only) still holds."""
    query, key_cache, value_cache, table, seq_lens, _ = make_case(gen, sharp=2.0)
    num_pages = key_cache.shape[0]
    flat = key_cache.permute(0, 2, 1, 3).reshape(num_pages * BS, 3, 32)
    written = torch.cat([
        table[n, torch.arange(length) // BS].long() * BS + torch.arange(length) % BS
        for n, length in enumerate(seq_lens.tolist())
    ])  # fmt: skip
    (q, qmin, qmax), f = fill(flat, [written], bits, num_pages)
    m = table.shape[1]
    got = page_logits(query, q, qmin, qmax, table, seq_lens, BS, 32**-0.5, m)
    want = page_logits(query, *f, table, seq_lens, BS, 32**-0.5, m)
    live = torch.isfinite(want.est)
    assert torch.equal(live, torch.isfinite(got.est))
    gap = (got.est - want.est)[live].abs()
    assert gap.max() <= (0.05 if bits == 8 else 0.6), f"estimate off by {gap.max():.3f}"
    assert (got.upper[live] >= want.upper[live] - 1e-4).all(), "bf16 box tighter than exact"
    p = params(budget=0.3, delta=0.05, exact_centroid=False)
    sel = select_pages(query, q, qmin, qmax, table, seq_lens, p)
    _, lse = sparse_paged_decode(query, key_cache, value_cache, table, seq_lens, sel.keep, p.scale)
    bound = dropped_mass_upper_bound(sel.bound_logits, sel.keep, lse.view(*sel.keep.shape[:2], -1))
    _, _, weights = oracle_decode(query, key_cache, value_cache, table, seq_lens, p.scale)
    true = true_dropped_mass(weights, sel.keep, seq_lens, BS, 2)
    assert (bound.double() >= true * (1 - tol(torch.float32).bound_rtol)).all()


def test_summary_memory_per_page():
    from prhs_vllm.backend.common import PageSummaries

    assert PageSummaries.bytes_per_page(8, 128) == 12 * 8 * 128
    assert PageSummaries.bytes_per_page(8, 128, "int8") == 8 * (128 + 4 * 128)
    assert PageSummaries.bytes_per_page(8, 128, "int4") == 8 * (64 + 4 * 128)


# --------------------------------------------------------------------------- the delta contract


def _exact_logits(gen, lens, num_kv_heads=3, group=2, sharp=2.0):
    """PageLogits whose estimate is the truth (est == upper == lower), so the
    delta rule's estimate is exact, over [N, Hkv, G, M] random page masses."""
    num_slots = max(-(-n // BS) for n in lens)
    x = sharp * torch.randn(len(lens), num_kv_heads, group, num_slots, generator=gen)
    pages = torch.tensor([-(-n // BS) for n in lens])
    x = x.masked_fill(torch.arange(num_slots)[None, None, None, :] >= pages[:, None, None, None],
                      -math.inf)  # fmt: skip
    return PageLogits(x, x, x), torch.tensor(lens, dtype=torch.int32)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("over_budget", ["dense", "cap"])
def test_exact_estimate_keeps_the_contract_where_the_budget_allows(seed, over_budget):
    """Where the estimate is the truth, every selection the budget did not stop
    drops at most delta; over_budget 'dense' keeps every page of those it did
    stop, 'cap' keeps at most the cap and flags them the same."""
    gen = torch.Generator().manual_seed(seed)
    lens = [int(n) for n in torch.randint(64, 2000, (5,), generator=gen)]
    logits, seq_lens = _exact_logits(gen, lens)
    p = params(budget=0.2, delta=0.05, over_budget=over_budget, dropped_weight=0.3)
    sel = select_from_logits(logits, seq_lens, p)
    mass = torch.softmax(logits.est.double(), -1).mean(2)
    true = (mass * ~sel.keep).sum(-1)
    num_pages = -(-seq_lens.long() // BS)
    valid = torch.arange(mass.shape[-1])[None, :] < num_pages[:, None]
    met = ~sel.over_budget
    assert (true[met] <= 0.05 + 1e-6).all()
    torch.testing.assert_close(1 - sel.est_kept_mass.double(), true, atol=1e-5, rtol=0)
    if over_budget == "dense":
        assert torch.equal(sel.keep[sel.over_budget], valid[:, None, :].expand_as(sel.keep)[
            sel.over_budget])  # fmt: skip
    else:
        cap = torch.ceil(0.2 * num_pages.double()).long()
        must = mandatory_pages(num_pages, mass.shape[-1], p).sum(-1)
        assert (sel.keep.sum(-1) <= torch.maximum(cap, must)[:, None]).all()
    other = select_from_logits(logits, seq_lens, params(
        budget=0.2, delta=0.05, over_budget="cap" if over_budget == "dense" else "dense",
        dropped_weight=0.3))  # fmt: skip
    assert torch.equal(other.over_budget, sel.over_budget)


@pytest.mark.parametrize("kind", KINDS)
def test_dropped_weight_only_adds_pages(gen, kind):
    """A larger weight raises every dropped page's estimate: the fill goes on at
    least as long, so no selection keeps fewer pages (same ranking)."""
    query, key_cache, _, table, seq_lens, sums = make_case(gen, kind)
    counts = []
    for weight in (0.0, 0.05, 0.1, 0.3, 1.0):
        p = params(budget=1.0, delta=0.05, over_budget="dense", dropped_weight=weight)
        counts.append(select_pages(query, *sums, table, seq_lens, p).keep.sum(-1))
    for fewer, more in zip(counts, counts[1:], strict=False):
        assert (more >= fewer).all()


def test_all_pages_selection_reports_nothing_dropped():
    gen = torch.Generator().manual_seed(3)
    logits, seq_lens = _exact_logits(gen, [900, 1500], sharp=0.1)  # flat: delta needs most pages
    sel = select_from_logits(logits, seq_lens, params(budget=0.1, delta=0.01, over_budget="dense"))
    assert sel.over_budget.all()
    assert torch.equal(sel.est_kept_mass, torch.ones_like(sel.est_kept_mass))
    assert torch.isneginf(sel.dropped_est_lse).all()


def test_selection_params_reject_unknown_contract_values():
    with pytest.raises(ValueError, match="over_budget"):
        params(over_budget="skip")
    with pytest.raises(ValueError, match="dropped_weight"):
        params(dropped_weight=2.0)


def test_oracle_count_at_matches_a_sorted_fill():
    """The audit's oracle keeps the sinks and window, then the heaviest pages,
    until no more than the given mass is left out."""
    from prhs_vllm.eval.replay import oracle_count_at

    mass = torch.tensor([[[0.5, 0.05, 0.2, 0.1, 0.15, 0.0]]], dtype=torch.float64)  # [1, 1, 6]
    must = torch.tensor([[True, False, False, False, False, False]])
    num_pages = torch.tensor([6])
    counts = [
        oracle_count_at(mass, must, num_pages, torch.tensor([[d]])).item()
        for d in (0.5, 0.3, 0.15, 0.05, 0.0)
    ]
    assert counts == [1, 2, 3, 4, 5]


def test_a_short_rerank_list_counts_as_over_the_budget(gen):
    """Pages the rerank shortlist leaves out cannot be taken: a selection that
    ends above delta with such pages left is over the budget (dense: read whole)."""
    query, key_cache, _, table, seq_lens, sums = make_case(gen, "uniform-pages")
    knobs = dict(budget=0.5, delta=0.001, rerank=0.2, dropped_weight=0.1)
    capped = select_pages(query, *sums, table, seq_lens, params(over_budget="cap", **knobs),
                          key_cache=key_cache)  # fmt: skip
    dense = select_pages(query, *sums, table, seq_lens, params(over_budget="dense", **knobs),
                         key_cache=key_cache)  # fmt: skip
    assert capped.over_budget.any()
    num_pages = -(-seq_lens.long() // BS)
    valid = torch.arange(dense.keep.shape[-1])[None, :] < num_pages[:, None]
    whole = dense.keep == valid[:, None, :]
    assert whole.all(-1)[dense.over_budget].all()
