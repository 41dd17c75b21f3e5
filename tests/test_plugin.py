"""Plugin registration (vLLM backend registry, CPU platform routing, the
--attention-backend parser) and the Prometheus stats collector."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import pytest
import torch
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.config.attention import AttentionConfig
from vllm.platforms.cpu import CpuPlatform
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
from vllm.v1.attention.backends.registry import AttentionBackendEnum
from vllm.v1.attention.selector import AttentionSelectorConfig

from prhs_vllm import metrics, plugin
from prhs_vllm.backend.cpu import (
    PrhsCpuAttentionBackend,
    PrhsCpuAttentionImpl,
    PrhsCpuAttentionMetadataBuilder,
)


@pytest.fixture
def registered(tmp_path, monkeypatch):
    """The plugin registered (once per process; later calls are no-ops), with its
    stats directory under tmp_path rather than in the real environment."""
    monkeypatch.setenv(metrics.STATS_DIR_ENV, str(tmp_path / "stats"))
    plugin.register()
    return plugin


def selector_config(**overrides) -> AttentionSelectorConfig:
    """As vllm.v1.attention.selector.get_attn_backend builds it for a decoder layer."""
    fields = {"head_size": 64, "dtype": torch.bfloat16, "kv_cache_dtype": "auto", "block_size": 32}
    return AttentionSelectorConfig(**{**fields, **overrides})


def prhs_selection():
    """What `--attention-backend prhs` parses to."""
    return AttentionConfig.validate_backend_before("prhs")


def prhs_collectors():
    from prometheus_client import REGISTRY

    return [c for c in REGISTRY._collector_to_names if isinstance(c, metrics.PrhsCollector)]


# --------------------------------------------------------------------------- registration


def test_register_is_idempotent(registered, monkeypatch):
    state = lambda: (  # noqa: E731
        CpuPlatform.__dict__["get_attn_backend_cls"].__func__,
        AttentionConfig.__dict__["validate_backend_before"],
        AttentionBackendEnum.CUSTOM.get_path(),
        list(AttentionBackendEnum.__members__),
        prhs_collectors(),
    )
    before = state()
    registered.register()
    assert state() == before
    # Even a process that runs the whole registration again (the guard reset)
    # wraps nothing twice and adds no second collector.
    monkeypatch.setattr(registered, "_registered", False)
    registered.register()
    assert state() == before
    assert len(prhs_collectors()) == 1
    assert getattr(CpuPlatform.get_attn_backend_cls, "_prhs_wrapped", False)


def test_backend_class_is_in_the_custom_slot(registered):
    member = AttentionBackendEnum.CUSTOM
    assert member.get_path() == plugin.CPU_BACKEND
    assert member.get_class() is PrhsCpuAttentionBackend
    # vLLM looks the backend up again with AttentionBackendEnum[get_name()].
    name = PrhsCpuAttentionBackend.get_name()
    assert name in AttentionBackendEnum.__members__
    assert AttentionBackendEnum[name] is member
    assert issubclass(PrhsCpuAttentionBackend, CPUAttentionBackend)
    assert PrhsCpuAttentionBackend.get_impl_cls() is PrhsCpuAttentionImpl
    assert PrhsCpuAttentionBackend.get_builder_cls() is PrhsCpuAttentionMetadataBuilder


@pytest.mark.parametrize("value", ["prhs", "PrHs", "PRHS"])
def test_attention_backend_flag_parses_prhs(registered, value):
    assert AttentionConfig.validate_backend_before(value) is AttentionBackendEnum.CUSTOM


@pytest.mark.parametrize(
    ("value", "expected"),
    [("auto", None), ("cpu_attn", "CPU_ATTN"), ("FLASH_ATTN", "FLASH_ATTN")],
)
def test_attention_backend_flag_other_values_unchanged(registered, value, expected):
    parsed = AttentionConfig.validate_backend_before(value)
    assert parsed is (None if expected is None else AttentionBackendEnum[expected])
    with pytest.raises(ValueError, match="Unknown attention backend"):
        AttentionConfig.validate_backend_before("prhs-nope")


def test_parsed_selection_unpickles_in_a_process_without_the_plugin(registered):
    """vLLM pickles the parsed config to processes that unpickle it before they
    load plugins: the selection must not need the plugin to unpickle."""
    payload = pickle.dumps(prhs_selection())
    code = "import pickle, sys; print(pickle.loads(sys.stdin.buffer.read()).name)"
    result = subprocess.run(
        [sys.executable, "-c", code], input=payload, capture_output=True, timeout=120
    )
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert result.stdout.decode().split()[-1] == "CUSTOM"


# --------------------------------------------------------------------------- CPU platform


def test_cpu_platform_routes_prhs_to_our_backend(registered):
    cfg = selector_config()
    assert CpuPlatform.get_attn_backend_cls(prhs_selection(), cfg) == plugin.CPU_BACKEND
    assert CpuPlatform.get_attn_backend_cls(AttentionBackendEnum.CUSTOM, cfg) == plugin.CPU_BACKEND


@pytest.mark.parametrize("selected", [None, "CPU_ATTN"], ids=["auto", "cpu-attn"])
def test_cpu_platform_other_selections_unchanged(registered, selected):
    member = None if selected is None else AttentionBackendEnum[selected]
    cpu_attn = AttentionBackendEnum.CPU_ATTN.get_path()
    assert CpuPlatform.get_attn_backend_cls(member, selector_config()) == cpu_attn
    assert CpuPlatform.get_attn_backend_cls(member, selector_config(dtype=torch.float32)) == (
        cpu_attn
    )


def test_cpu_platform_rejects_prhs_for_mla(registered):
    with pytest.raises(ValueError, match="MLA"):
        CpuPlatform.get_attn_backend_cls(prhs_selection(), selector_config(use_mla=True))


@pytest.mark.parametrize(
    ("backend", "expected"),
    [("prhs", PrhsCpuAttentionBackend), ("auto", CPUAttentionBackend)],
)
def test_selector_returns_backend_class(registered, backend, expected):
    """vLLM's own selector, with the engine config as --attention-backend sets it."""
    from vllm.v1.attention.selector import _cached_get_attn_backend, get_attn_backend

    config = VllmConfig(
        attention_config=AttentionConfig(backend=AttentionConfig.validate_backend_before(backend))
    )
    _cached_get_attn_backend.cache_clear()
    try:
        with set_current_vllm_config(config):
            assert get_attn_backend(64, torch.bfloat16, "auto") is expected
    finally:
        _cached_get_attn_backend.cache_clear()


# --------------------------------------------------------------------------- stats collector


def write_worker_file(directory, pid, values):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"prhs-{pid}.json").write_text(json.dumps(values))


def test_collector_yields_nothing_without_stats(tmp_path, monkeypatch):
    monkeypatch.setenv(metrics.STATS_DIR_ENV, str(tmp_path / "missing"))
    assert metrics.read_totals() is None
    assert list(metrics.PrhsCollector().collect()) == []
    # The directory exists (prhs selected) but no worker has written yet: zeros.
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "unrelated.json").write_text("{}")
    monkeypatch.setenv(metrics.STATS_DIR_ENV, str(tmp_path / "empty"))
    assert set(metrics.read_totals(str(tmp_path / "empty")).values()) == {0.0}
    assert {s.value for f in metrics.PrhsCollector().collect() for s in f.samples} == {0.0}


def test_collector_sums_worker_files(tmp_path, monkeypatch):
    directory = tmp_path / "stats"
    names = [*metrics.METRICS, *metrics._HISTOGRAM_FIELDS]
    worker_a = {name: float(i + 1) for i, name in enumerate(names)}
    worker_b = {name: 10.0 * (i + 1) for i, name in enumerate(names)}
    worker_b.pop("prhs_sparse_steps")  # an older worker without a counter: counts as 0
    write_worker_file(directory, 111, worker_a)
    write_worker_file(directory, 222, worker_b)
    (directory / "prhs-333.tmp").write_text(json.dumps(worker_b))  # a write in progress
    expected = {name: worker_a[name] + worker_b.get(name, 0.0) for name in names}

    assert metrics.read_totals(str(directory)) == expected

    monkeypatch.setenv(metrics.STATS_DIR_ENV, str(directory))
    families = {f.name: f for f in metrics.PrhsCollector().collect()}
    assert set(families) == set(metrics.METRICS) | {"prhs_kept_fraction", "prhs_est_dropped_mass"}
    for name, (kind, _) in metrics.METRICS.items():
        assert families[name].type == kind
        assert [s.value for s in families[name].samples] == [expected[name]]
    kept_fraction = expected["prhs_pages_kept"] / expected["prhs_context_pages"]
    assert families["prhs_kept_fraction"].samples[0].value == pytest.approx(kept_fraction)
    hist = {
        (s.name, s.labels.get("le")): s.value for s in families["prhs_est_dropped_mass"].samples
    }
    assert (
        hist[("prhs_est_dropped_mass_bucket", "0.05")] == expected["prhs_est_dropped_mass_le_0.05"]
    )
    assert hist[("prhs_est_dropped_mass_bucket", "+Inf")] == expected["prhs_scored_selections"]
    assert hist[("prhs_est_dropped_mass_sum", None)] == expected["prhs_est_dropped_mass_sum"]


def test_worker_flush_round_trips_through_collector(tmp_path, monkeypatch):
    monkeypatch.setenv(metrics.STATS_DIR_ENV, str(tmp_path / "stats"))
    stats = metrics.StepStats()
    stats.record_step(sparse_rows=3, dense_decode_rows=2)
    row_stats = metrics.layer_row_stats(
        keep_counts=torch.tensor([[2, 3], [4, 1], [2, 2]]),
        num_pages=torch.tensor([8, 8, 5]),
        est_dropped=torch.tensor([[0.1, 0.01], [0.1, 0.3], [0.04, 0.1]]),
        certified_dropped=torch.full((3, 2), 0.2),
        over_budget=torch.tensor([[True, False], [False, False], [False, True]]),
    )
    stats.record_rows(row_stats, num_kv_heads=2)
    stats.maybe_flush(force=True)
    totals = metrics.read_totals()
    assert totals["prhs_sparse_steps"] == 1
    assert totals["prhs_sparse_decode_tokens"] == 3
    assert totals["prhs_dense_decode_tokens"] == 2
    assert totals["prhs_sparse_layer_rows"] == 3
    assert totals["prhs_pages_kept"] == 14
    assert totals["prhs_context_pages"] == 42
    assert totals["prhs_head_selections"] == 6
    assert totals["prhs_est_dropped_mass_sum"] == pytest.approx(0.65)
    assert totals["prhs_certified_dropped_mass_sum"] == pytest.approx(1.2)
    assert totals["prhs_capped_selections"] == 2
    assert totals["prhs_all_pages_selections"] == 0
    assert totals["prhs_est_dropped_mass_le_0.01"] == 1
    assert totals["prhs_est_dropped_mass_le_0.05"] == 2
    assert totals["prhs_est_dropped_mass_le_0.1"] == 5
    assert totals["prhs_est_dropped_mass_le_0.5"] == 6


def test_flush_process_stats_writes_only_a_process_with_stats(tmp_path, monkeypatch):
    monkeypatch.setenv(metrics.STATS_DIR_ENV, str(tmp_path / "stats"))
    monkeypatch.setenv(metrics.FLUSH_INTERVAL_ENV, "3600")  # only forced flushes write
    monkeypatch.setattr(metrics, "_STATS", None)
    assert metrics.flush_process_stats() is False
    assert metrics.read_totals() is None  # a dense run leaves no file

    stats = metrics.process_stats()
    stats.record_step(sparse_rows=2, dense_decode_rows=0)
    stats.maybe_flush(force=True)
    stats.record_step(sparse_rows=3, dense_decode_rows=1)
    stats.maybe_flush()  # within the interval: not written
    assert metrics.read_totals()["prhs_sparse_decode_tokens"] == 2
    assert metrics.flush_process_stats() is True
    totals = metrics.read_totals()
    assert totals["prhs_sparse_decode_tokens"] == 5
    assert totals["prhs_dense_decode_tokens"] == 1


def test_device_totals_added_by_graphs_are_counted():
    """Step graphs add their rows' stats into registered device tensors and
    the host counts only rows: the totals equal record_rows of the same rows."""
    row_stats = metrics.layer_row_stats(
        keep_counts=torch.tensor([[2, 3], [4, 1]]),
        num_pages=torch.tensor([8, 5]),
        est_dropped=torch.full((2, 2), 0.1),
        certified_dropped=torch.full((2, 2), 0.2),
    )
    recorded = metrics.StepStats()
    recorded.record_rows(row_stats, num_kv_heads=2)
    counted = metrics.StepStats()
    sums = torch.zeros(metrics.num_device_fields(), dtype=torch.float64)
    counted.add_device_totals(sums)
    sums += row_stats.sum(0)  # what a replayed graph does
    counted.count_rows(2, num_kv_heads=2)
    assert counted.totals() == pytest.approx(recorded.totals())
    assert counted.totals()["prhs_pages_kept"] == 10


def stats_column_by_column(
    keep_counts, num_pages, est_dropped, certified_dropped, true_dropped, delta, reused,
    over_budget, dense_over,
):  # fmt: skip
    """``layer_row_stats`` as first written: each column converted to float64
    and reduced on its own (the reference for the one-table version)."""
    scored = torch.ones_like(est_dropped, dtype=torch.bool) if reused is None else ~reused
    zeros = torch.zeros_like(est_dropped)
    audit = [zeros, zeros, zeros]
    if true_dropped is not None:
        audit = [
            true_dropped,
            (true_dropped > delta).to(torch.float32),
            ((certified_dropped < true_dropped - 1e-4) & scored).to(torch.float32),
        ]
    est = est_dropped.clamp(0, 1) * scored
    over = over_budget & scored
    columns = [
        keep_counts,
        num_pages[:, None].expand_as(keep_counts) * 1.0,
        est,
        certified_dropped * scored,
        *audit,
        ~scored,
        scored,
        zeros if dense_over else over,
        over if dense_over else zeros,
        *[(est <= edge) & scored for edge in metrics.EST_DROPPED_BUCKETS],
    ]
    return torch.stack([c.to(torch.float64).sum(-1) for c in columns], dim=-1)


@pytest.mark.parametrize("audit", [False, True], ids=["no-audit", "audit"])
@pytest.mark.parametrize("reuse", [False, True], ids=["no-reuse", "reuse"])
def test_layer_row_stats_equal_the_column_by_column_sums(audit, reuse):
    gen = torch.Generator().manual_seed(int(audit) * 2 + int(reuse))
    rows, heads = 7, 8
    num_pages = torch.randint(1, 5000, (rows,), generator=gen).to(torch.int32)
    keep_counts = torch.randint(0, 300, (rows, heads), generator=gen)
    est = torch.rand(rows, heads, generator=gen) * 0.3 - 0.01  # some below 0: clamped
    certified = torch.rand(rows, heads, generator=gen)
    true = torch.rand(rows, heads, generator=gen) if audit else None
    reused = torch.rand(rows, heads, generator=gen) < 0.4 if reuse else None
    over = torch.rand(rows, heads, generator=gen) < 0.3
    args = (keep_counts, num_pages, est, certified, true, 0.3, reused, over, reuse)
    got = metrics.layer_row_stats(*args)
    assert got.dtype == torch.float64 and got.shape == (rows, metrics.num_device_fields())
    torch.testing.assert_close(got, stats_column_by_column(*args), rtol=1e-6, atol=1e-6)


def test_add_row_stats_weighs_the_rows():
    """The step graphs' one-launch add: padded rows (weight 0) add nothing."""
    from prhs_vllm.backend.step import add_row_stats

    gen = torch.Generator().manual_seed(5)
    row_stats = torch.rand(6, metrics.num_device_fields(), generator=gen, dtype=torch.float64)
    weight = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    totals = torch.full((metrics.num_device_fields(),), 2.0, dtype=torch.float64)
    add_row_stats(totals, row_stats, weight)
    torch.testing.assert_close(totals, 2.0 + row_stats[[0, 1, 3]].sum(0))


def test_unsupported_vllm_version_skips_registration_without_breaking_vllm(monkeypatch, caplog):
    import prhs_vllm.plugin as plugin
    from prhs_vllm import _compat

    monkeypatch.setattr(plugin, "_registered", False)
    monkeypatch.setattr(_compat, "vllm_version", lambda: (0, 40))
    called = []
    monkeypatch.setattr(_compat, "register_prhs_backend", lambda path: called.append(path))
    with caplog.at_level("ERROR", logger="vllm.prhs"):
        plugin.register()  # must not raise
    assert called == []
    assert "supports vLLM >= 0.26, < 0.34; found 0.40" in caplog.text
