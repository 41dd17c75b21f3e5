"""Sparse-decode counters: accumulated where attention runs, exported on
vLLM's `/metrics` and in logs.

vLLM runs attention in engine-core / worker processes while `/metrics` is
served by the API-server process. Workers write their totals to a small JSON
file per process in a directory named by ``PRHS_STATS_DIR`` (set by the plugin
in the first process, inherited by the processes vLLM spawns); the API server
registers a Prometheus collector that sums those files at scrape time. Device
counters are only read at flush time, so there is no host sync per layer.

Lifecycle: when prhs is the selected backend (and ``metrics`` is on), the
front end creates the directory before the engine starts (``prepare_stats_dir``),
so every series exists on ``/metrics`` from start-up, at zero until a worker
writes. Workers write from the step path at most once per flush interval, and
once more when they go idle: a step's totals are on ``/metrics`` at most a flush
interval after the step, busy or not (``StepStats``).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from prhs_vllm import LOGGER_NAME

logger = logging.getLogger(LOGGER_NAME)

STATS_DIR_ENV = "PRHS_STATS_DIR"
FLUSH_INTERVAL_ENV = "PRHS_STATS_FLUSH_S"

# name -> (prometheus type, help). Counters end in _total in the exposition.
METRICS: dict[str, tuple[str, str]] = {
    "prhs_sparse_steps": ("counter", "Scheduler steps with at least one sparse decode row."),
    "prhs_sparse_decode_tokens": ("counter", "Decode tokens whose attention ran sparse."),
    "prhs_dense_decode_tokens": ("counter", "Decode tokens that ran dense (context too short)."),
    "prhs_sparse_layer_rows": ("counter", "Sparse (token, layer) attention calls."),
    "prhs_pages_kept": ("counter", "KV pages read by sparse attention, summed over KV heads."),
    "prhs_context_pages": ("counter", "KV pages holding context in sparse steps, same sum."),
    "prhs_est_dropped_mass_sum": (
        "counter",
        "Sum of the estimated dropped mass per scored (row, layer, KV head): the sparse "
        "attention's exact kept mass against the raised estimate of the dropped pages.",
    ),
    "prhs_certified_dropped_mass_sum": (
        "counter",
        "Sum of certified upper bounds on dropped mass per (row, KV head); computed only "
        "with delta_control: certified or in audit mode (0 otherwise).",
    ),
    "prhs_capped_selections": (
        "counter",
        "(row, layer, KV head) selections the budget cap stopped before the estimated "
        "dropped mass reached delta (over_budget: cap): their dropped mass may exceed delta.",
    ),
    "prhs_all_pages_selections": (
        "counter",
        "(row, layer, KV head) selections that would have exceeded the budget before "
        "reaching delta and read every page instead (over_budget: dense; exact).",
    ),
    "prhs_head_selections": ("counter", "Number of (row, layer, KV head) selections."),
    "prhs_audit_true_dropped_mass_sum": (
        "counter",
        "Audit mode: sum of the true dropped mass per (row, KV head), from dense attention.",
    ),
    "prhs_audit_over_delta": (
        "counter",
        "Audit mode: (row, layer, KV head) selections whose true dropped mass exceeds delta.",
    ),
    "prhs_audit_bound_violations": (
        "counter",
        "Audit mode: selections whose certified bound is below the true dropped mass "
        "(should stay 0).",
    ),
    "prhs_audit_selections": ("counter", "Audit mode: (row, layer, KV head) selections audited."),
    "prhs_reused_selections": (
        "counter",
        "(row, layer, KV head) selections reused from an earlier step (time axis).",
    ),
    "prhs_scored_selections": (
        "counter",
        "(row, layer, KV head) selections scored this step: the estimate and certified "
        "sums cover these (a reused selection has neither).",
    ),
}
EST_DROPPED_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
"""Upper edges of the ``prhs_est_dropped_mass`` histogram (``+Inf`` is the scored count)."""
_HISTOGRAM_FIELDS = tuple(f"prhs_est_dropped_mass_le_{edge}" for edge in EST_DROPPED_BUCKETS)
"""Cumulative counts of scored selections whose estimated dropped mass is <= each edge."""
_DEVICE_FIELDS = (
    "prhs_pages_kept",
    "prhs_context_pages",
    "prhs_est_dropped_mass_sum",
    "prhs_certified_dropped_mass_sum",
    "prhs_audit_true_dropped_mass_sum",
    "prhs_audit_over_delta",
    "prhs_audit_bound_violations",
    "prhs_reused_selections",
    "prhs_scored_selections",
    "prhs_capped_selections",
    "prhs_all_pages_selections",
    *_HISTOGRAM_FIELDS,
)
_FIELDS = (*METRICS, *_HISTOGRAM_FIELDS)
"""Every total a stats file holds."""
OVER_BUDGET_WARN_SHARE = 0.1
"""Share of a log window's scored selections over the budget that the log warns about."""


def ensure_stats_dir_env() -> str:
    """Name a per-server stats directory in the environment (created lazily)."""
    path = os.environ.get(STATS_DIR_ENV)
    if not path:
        path = os.path.join(tempfile.gettempdir(), f"prhs-stats-{os.getpid()}-{time.time_ns()}")
        os.environ[STATS_DIR_ENV] = path
    return path


def prepare_stats_dir() -> str:
    """Create this server's stats directory now (the front end does, when prhs is
    the selected backend): ``/metrics`` then has every prhs series from
    start-up, at zero until a worker writes its file (``read_totals``)."""
    path = ensure_stats_dir_env()
    Path(path).mkdir(parents=True, exist_ok=True)
    return path


class StepStats:
    """Per-process accumulator. Device counters stay on the device until flush.

    Writes: from the step path (the builder's ``maybe_flush``) at most once per
    flush interval, and from an idle-flush thread once the worker has run no
    step for a flush interval and holds counts not yet written. Step boundaries
    come from ``step_started`` / ``step_ended`` (the worker's ``execute_model``,
    hooked by ``process_stats``). The thread reads the counters only between
    steps, under the lock each step takes on entry: never half a step, never
    while a step may capture a CUDA graph. On CUDA its read of the device
    counters (a few hundred bytes) waits only for work already finished: the
    worker has been idle for a flush interval.
    """

    def __init__(self) -> None:
        self._host: dict[str, float] = {name: 0.0 for name in _FIELDS}
        self._device: Any = None  # torch tensor [len(_DEVICE_FIELDS)] float64
        # (tensor, field names): counters that CUDA graphs add into on replay.
        self._device_totals: list[tuple[Any, tuple[str, ...]]] = []
        self._last_flush = 0.0
        self._last_log = time.monotonic()
        self._logged: dict[str, float] = dict(self._host)  # totals at the last log line
        self._flush_interval = float(os.environ.get(FLUSH_INTERVAL_ENV, "1.0"))
        self.log_interval_s = 30.0
        # Idle flush: counts recorded since the last write, whether a step is
        # running, when the last one ended; guarded by _lock (re-entrant: a step
        # flushes from inside its own boundaries).
        self._lock = threading.RLock()
        self._unflushed = False
        self._in_step = False
        self._step_ended_at = 0.0
        self._idle_wake = threading.Event()
        self._idle_thread: tuple[int, threading.Thread] | None = None  # (pid, thread)

    def record_step(self, sparse_rows: int, dense_decode_rows: int) -> None:
        """Host-side counts known when a step's metadata is built."""
        self._unflushed = True
        if sparse_rows:
            self._host["prhs_sparse_steps"] += 1
        self._host["prhs_sparse_decode_tokens"] += sparse_rows
        self._host["prhs_dense_decode_tokens"] += dense_decode_rows

    def record_rows(self, row_stats, num_kv_heads: int, audited: bool = False) -> None:
        """Add ``layer_row_stats`` of one layer's rows: one reduction and one add
        on the device (eager steps; a step graph sums its rows itself, and the
        caller then uses ``count_rows``)."""
        rows = row_stats.shape[0]
        self._unflushed = True
        # Shapes are host ints; creating device scalars from them would copy
        # from the host on every layer, so they are counted on the host.
        self._host["prhs_sparse_layer_rows"] += rows
        self._host["prhs_head_selections"] += rows * num_kv_heads
        if audited:
            self._host["prhs_audit_selections"] += rows * num_kv_heads
        values = row_stats.sum(0)
        self._device = values if self._device is None else self._device + values

    def count_rows(self, rows: int, num_kv_heads: int) -> None:
        """``record_rows`` of rows whose ``layer_row_stats`` a CUDA graph has
        already added into a tensor of ``add_device_totals``: host counts only."""
        self._unflushed = True
        self._host["prhs_sparse_layer_rows"] += rows
        self._host["prhs_head_selections"] += rows * num_kv_heads

    def add_device_totals(self, totals, fields: tuple[str, ...] | None = None) -> None:
        """Counts the sums that device code accumulates into ``totals`` from now
        on: [len(fields)] float64, zero at registration, one value per metric
        name in ``fields`` (default: the ``layer_row_stats`` columns)."""
        unknown = [name for name in fields or () if name not in _FIELDS]
        if unknown:
            raise ValueError(f"unknown metric names {unknown}")
        self._device_totals.append((totals, tuple(fields or _DEVICE_FIELDS)))

    def totals(self) -> dict[str, float]:
        """Current totals (reads device counters: a sync on GPU)."""
        totals = dict(self._host)
        device = [] if self._device is None else [(self._device, _DEVICE_FIELDS)]
        for values, fields in device + self._device_totals:
            for name, value in zip(fields, values.tolist(), strict=True):
                totals[name] += value
        return totals

    def maybe_flush(self, force: bool = False) -> None:
        """Write totals to this process's stats file, at most once per interval."""
        with self._lock:
            now = time.monotonic()
            if not force and now - self._last_flush < self._flush_interval:
                return
            self._write(now)

    def step_started(self) -> None:
        """The worker starts a step (waits for an idle flush in progress)."""
        with self._lock:
            self._in_step = True

    def step_ended(self) -> None:
        """The worker finished a step: arm the idle flush if counts are unwritten."""
        with self._lock:
            self._in_step = False
            self._step_ended_at = time.monotonic()
            if not self._unflushed:
                return
            self._idle_wake.set()
            # One thread per process (a forked child does not inherit it).
            if self._idle_thread is None or self._idle_thread[0] != os.getpid():
                thread = threading.Thread(
                    target=self._idle_flush_loop, name="prhs-stats-idle-flush", daemon=True
                )
                self._idle_thread = (os.getpid(), thread)
                thread.start()

    def idle_flush_due(self, now: float | None = None) -> float | None:
        """Seconds until the idle flush should write (0: now); None when there is
        nothing to write or a step is running. Call with the lock held."""
        if self._in_step or not self._unflushed:
            return None
        now = time.monotonic() if now is None else now
        return max(0.0, self._step_ended_at + self._flush_interval - now)

    def _idle_flush_loop(self) -> None:
        while True:
            self._idle_wake.wait()
            with self._lock:
                delay = self.idle_flush_due()
                if delay is None or delay <= 0:
                    if delay is not None:
                        self._idle_write()
                    self._idle_wake.clear()  # step_ended sets it again
                    continue
            time.sleep(delay)

    def _idle_write(self) -> None:
        try:
            self._write(time.monotonic())
        except Exception as exc:  # a failed write must not end the thread
            logger.warning("prhs: writing the stats file failed: %s", exc)

    def _write(self, now: float) -> None:
        """Write the totals file (and the periodic log line when due); lock held."""
        self._last_flush = now
        self._unflushed = False
        totals = self.totals()
        directory = Path(ensure_stats_dir_env())
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / f"prhs-{os.getpid()}.json"
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps(totals))
        os.replace(tmp, target)
        if self.log_interval_s > 0 and now - self._last_log >= self.log_interval_s:
            self._last_log = now
            logger.info("prhs stats: %s", format_summary(totals))
            warning = over_budget_warning(self._logged, totals)
            if warning:
                logger.warning("prhs: %s", warning)
            self._logged = totals


def over_budget_warning(before: dict[str, float], after: dict[str, float]) -> str | None:
    """The warning for a log window (totals ``before`` -> ``after``) in which more
    than ``OVER_BUDGET_WARN_SHARE`` of the scored selections hit the budget
    before the estimated dropped mass reached delta; None otherwise."""

    def window(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    scored = window("prhs_scored_selections")
    capped, dense = window("prhs_capped_selections"), window("prhs_all_pages_selections")
    if scored <= 0 or (capped + dense) / scored <= OVER_BUDGET_WARN_SHARE:
        return None
    if capped:
        return (
            f"{capped / scored:.0%} of the last window's (row, layer, KV head) selections hit "
            "the budget cap before their estimated dropped mass reached delta, so they may "
            "drop more than delta: raise `budget`, set `over_budget: dense` (exact where the "
            "cap binds) or raise `delta`"
        )
    return (
        f"{dense / scored:.0%} of the last window's (row, layer, KV head) selections needed "
        "more than the budget to reach delta and read every page (exact, no saving): raise "
        "`budget` or `delta`, or raise `min_context` so that such requests decode dense"
    )


def format_summary(totals: dict[str, float]) -> str:
    """One line: sparse tokens, kept fraction, mean estimated dropped mass, share
    of selections over the budget (and the certified bound where computed)."""
    heads = totals.get("prhs_head_selections", 0.0)
    scored = totals.get("prhs_scored_selections", heads)
    pages = totals.get("prhs_context_pages", 0.0)
    kept = totals["prhs_pages_kept"] / pages if pages else 0.0
    est = totals["prhs_est_dropped_mass_sum"] / scored if scored else 0.0
    cert_sum = totals.get("prhs_certified_dropped_mass_sum", 0.0)
    cert = f" certified_dropped={cert_sum / scored:.4f}" if cert_sum and scored else ""
    over = totals.get("prhs_capped_selections", 0.0) + totals.get("prhs_all_pages_selections", 0.0)
    over_share = over / scored if scored else 0.0
    reused = totals.get("prhs_reused_selections", 0.0) / heads if heads else 0.0
    audited = totals.get("prhs_audit_selections", 0.0)
    audit = ""
    if audited:
        audit = (
            f" true_dropped={totals['prhs_audit_true_dropped_mass_sum'] / audited:.4f}"
            f" over_delta={totals['prhs_audit_over_delta'] / audited:.4f}"
            f" bound_violations={int(totals['prhs_audit_bound_violations'])}"
        )
    return (
        f"sparse_tokens={int(totals['prhs_sparse_decode_tokens'])} "
        f"dense_decode_tokens={int(totals['prhs_dense_decode_tokens'])} "
        f"kept_fraction={kept:.3f} est_dropped={est:.4f} over_budget={over_share:.3f}{cert}"
        f" reused={reused:.3f}{audit}"
    )


_STATS: StepStats | None = None


def process_stats() -> StepStats:
    """The accumulator of this process (one per worker)."""
    global _STATS
    if _STATS is None:
        _STATS = StepStats()
        from prhs_vllm import _compat

        if not _compat.mark_step_boundaries(_step_started, _step_ended):
            logger.info("prhs: vLLM's step entry point was not found; stats are written "
                        "on the next step only, not when the server goes idle")  # fmt: skip
    return _STATS


def _step_started() -> None:
    if _STATS is not None:
        _STATS.step_started()


def _step_ended() -> None:
    if _STATS is not None:
        _STATS.step_ended()


def flush_process_stats() -> bool:
    """Write this process's totals now, if it has recorded any (an engine in
    this process: its file otherwise lags by up to the flush interval, which is
    all of a short run's last second). Returns whether it wrote."""
    if _STATS is None:
        return False
    _STATS.maybe_flush(force=True)
    return True


def read_totals(directory: str | None = None) -> dict[str, float] | None:
    """Sum the stats files of all worker processes of this server.

    Returns None when the stats directory does not exist (prhs not selected,
    or its metrics off), zeros while it holds no worker file yet (prhs
    selected: the front end created it before the engine started).
    """
    directory = directory or os.environ.get(STATS_DIR_ENV)
    if not directory or not os.path.isdir(directory):
        return None
    files = list(Path(directory).glob("prhs-*.json"))
    totals = {name: 0.0 for name in _FIELDS}
    for path in files:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a file being replaced right now; next scrape reads it
        for name in totals:
            totals[name] += float(data.get(name, 0.0))
    return totals


class PrhsCollector:
    """Prometheus collector reading the worker stats files at scrape time."""

    def collect(self):
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        totals = read_totals()
        if totals is None:
            return  # prhs is not serving here: /metrics stays as vLLM's own
        for name, (kind, help_text) in METRICS.items():
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(name, help_text, value=totals[name])
        pages = totals["prhs_context_pages"]
        yield GaugeMetricFamily(
            "prhs_kept_fraction",
            "Fraction of context pages read by sparse attention (cumulative).",
            value=totals["prhs_pages_kept"] / pages if pages else 0.0,
        )
        buckets = [
            (str(edge), totals[name])
            for edge, name in zip(EST_DROPPED_BUCKETS, _HISTOGRAM_FIELDS, strict=True)
        ]
        buckets.append(("+Inf", totals["prhs_scored_selections"]))
        yield HistogramMetricFamily(
            "prhs_est_dropped_mass",
            "Estimated dropped attention mass per scored (row, layer, KV head) selection.",
            buckets=buckets,
            sum_value=totals["prhs_est_dropped_mass_sum"],
        )


_COLLECTOR_REGISTERED = False


def register_collector() -> None:
    """Add the collector to prometheus_client's default registry, once."""
    global _COLLECTOR_REGISTERED
    if _COLLECTOR_REGISTERED:
        return
    try:
        from prometheus_client import REGISTRY
    except ImportError:
        return
    REGISTRY.register(PrhsCollector())
    _COLLECTOR_REGISTERED = True


def num_device_fields() -> int:
    """Columns of ``layer_row_stats`` (the device counters)."""
    return len(_DEVICE_FIELDS)


def layer_row_stats(
    keep_counts, num_pages, est_dropped, certified_dropped=None, true_dropped=None,
    delta: float = 0.0, reused=None, over_budget=None, dense_over: bool = False,
):  # fmt: skip
    """Per-row contributions to the device counters (``_DEVICE_FIELDS``).

    Device ops only, with no host data: safe inside a CUDA graph.

    Args:
        keep_counts: [N, Hkv] int pages kept; num_pages: [N] int pages of context;
        est_dropped: [N, Hkv] float32 estimated dropped mass.
        certified_dropped: [N, Hkv] float32 certified bound, or None (not computed).
        true_dropped: [N, Hkv] float32 from dense attention (audit mode), or None.
        delta: the layer's target, for the audit's over-delta count.
        reused: [N, Hkv] bool selections taken from an earlier step, or None.
        over_budget: [N, Hkv] bool the cap bound before delta was met, or None.
        dense_over: those selections read every page (over_budget: dense).
    Returns:
        [N, len(_DEVICE_FIELDS)] float64.
    """
    import torch

    num_rows, num_heads = est_dropped.shape
    # One float32 [N, Hkv, K] table written column by column and one float64
    # reduction: a launch or two per column instead of a conversion and a
    # reduction each (the counts are exact in float32 below 2**24).
    table = torch.zeros(
        (num_rows, num_heads, len(_DEVICE_FIELDS)), dtype=torch.float32,
        device=est_dropped.device,
    )  # fmt: skip
    column = {name: table[..., i] for i, name in enumerate(_DEVICE_FIELDS)}
    est = column["prhs_est_dropped_mass_sum"]
    certified = column["prhs_certified_dropped_mass_sum"]
    column["prhs_pages_kept"].copy_(keep_counts)
    column["prhs_context_pages"].copy_(num_pages[:, None])
    torch.clamp(est_dropped, min=0, max=1, out=est)
    if certified_dropped is not None:
        certified.copy_(certified_dropped)
    scored = None
    if reused is None:
        column["prhs_scored_selections"].fill_(1)
    else:
        scored = ~reused
        est.mul_(scored)
        certified.mul_(scored)
        column["prhs_reused_selections"].copy_(reused)
        column["prhs_scored_selections"].copy_(scored)
    start = _DEVICE_FIELDS.index(_HISTOGRAM_FIELDS[0])
    hist = table[..., start : start + len(EST_DROPPED_BUCKETS)]
    edges = _bucket_edges(est.device)
    if edges is None:  # first use inside a graph capture: no host-to-device copy
        for i, edge in enumerate(EST_DROPPED_BUCKETS):
            hist[..., i].copy_(est <= edge)
    else:
        hist.copy_(est[..., None] <= edges)
    if scored is not None:
        hist.mul_(scored[..., None])
    if over_budget is not None:
        name = "prhs_all_pages_selections" if dense_over else "prhs_capped_selections"
        column[name].copy_(over_budget if scored is None else over_budget & scored)
    if true_dropped is not None:
        column["prhs_audit_true_dropped_mass_sum"].copy_(true_dropped)
        column["prhs_audit_over_delta"].copy_(true_dropped > delta)
        if certified_dropped is not None:
            # 1e-4: float32 rounding of masses near 1, not a real violation. A
            # reused selection has no bound to violate.
            violated = certified_dropped < true_dropped - 1e-4
            if scored is not None:
                violated &= scored
            column["prhs_audit_bound_violations"].copy_(violated)
    return table.sum(1, dtype=torch.float64)


_EDGES: dict = {}


def _bucket_edges(device):
    """[len(EST_DROPPED_BUCKETS)] float32 edges on ``device``, made on first use
    outside a CUDA graph capture (None while capturing before that)."""
    import torch

    edges = _EDGES.get(device)
    if edges is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        edges = _EDGES[device] = torch.tensor(
            EST_DROPPED_BUCKETS, dtype=torch.float32, device=device
        )
    return edges
