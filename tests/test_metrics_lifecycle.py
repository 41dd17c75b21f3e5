"""The prhs series on /metrics over a server's life: present at zero from
start-up, and settled (every step written) soon after the server goes idle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from prhs_vllm import _compat, metrics
from tests.e2e_server import smollm2_dir

FLUSH_S = 0.05


@pytest.fixture
def stats_dir(tmp_path, monkeypatch):
    directory = tmp_path / "stats"
    monkeypatch.setenv(metrics.STATS_DIR_ENV, str(directory))
    monkeypatch.setenv(metrics.FLUSH_INTERVAL_ENV, str(FLUSH_S))
    return directory


def written(directory) -> dict[str, float] | None:
    files = list(directory.glob("prhs-*.json"))
    return json.loads(files[0].read_text()) if files else None


def wait_for(predicate, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def some_rows():
    return metrics.layer_row_stats(
        keep_counts=torch.tensor([[2, 3]]),
        num_pages=torch.tensor([8]),
        est_dropped=torch.tensor([[0.1, 0.01]]),
    )


# --------------------------------------------------------------------------- from start-up


def test_series_exist_at_zero_once_the_front_end_prepared_the_directory(stats_dir):
    assert list(metrics.PrhsCollector().collect()) == []  # no directory: a dense server
    metrics.prepare_stats_dir()
    assert stats_dir.is_dir()
    families = {f.name: f for f in metrics.PrhsCollector().collect()}
    assert set(families) == set(metrics.METRICS) | {"prhs_kept_fraction", "prhs_est_dropped_mass"}
    for name in metrics.METRICS:
        assert [s.value for s in families[name].samples] == [0.0]
    assert families["prhs_kept_fraction"].samples[0].value == 0.0
    buckets = [s.value for s in families["prhs_est_dropped_mass"].samples]
    assert buckets and set(buckets) == {0.0}


def test_prepare_stats_dir_names_the_directory_if_unset(tmp_path, monkeypatch):
    monkeypatch.setenv(metrics.STATS_DIR_ENV, "")  # unset (restored after the test)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    path = metrics.prepare_stats_dir()
    assert path.startswith(str(tmp_path)) and (tmp_path / path).is_dir()
    assert metrics.read_totals() == {name: 0.0 for name in metrics._FIELDS}


# --------------------------------------------------------------------------- idle flush


def test_idle_worker_writes_the_steps_the_step_path_held_back(stats_dir):
    stats = metrics.StepStats()
    stats.step_started()
    stats.maybe_flush()  # the builder, before the first step is counted: writes zeros
    stats.record_step(sparse_rows=1, dense_decode_rows=2)
    stats.record_rows(some_rows(), num_kv_heads=2)
    stats.step_ended()
    stats.step_started()
    stats.maybe_flush()  # within the interval: held back
    stats.record_step(sparse_rows=3, dense_decode_rows=0)
    stats.step_ended()
    assert written(stats_dir)["prhs_sparse_decode_tokens"] == 0
    # No further step: the idle flush writes both steps.
    assert wait_for(lambda: written(stats_dir)["prhs_sparse_decode_tokens"] == 4)
    totals = written(stats_dir)
    assert totals["prhs_dense_decode_tokens"] == 2
    assert totals["prhs_pages_kept"] == 5
    assert totals == stats.totals()


def test_idle_flush_never_writes_during_a_step(stats_dir):
    stats = metrics.StepStats()
    stats.step_started()
    stats.record_step(sparse_rows=1, dense_decode_rows=0)
    stats.step_ended()
    assert wait_for(lambda: written(stats_dir) is not None)
    stats.step_started()
    stats.record_step(sparse_rows=5, dense_decode_rows=0)  # a long step, still running
    time.sleep(10 * FLUSH_S)
    assert written(stats_dir)["prhs_sparse_decode_tokens"] == 1
    stats.step_ended()
    assert wait_for(lambda: written(stats_dir)["prhs_sparse_decode_tokens"] == 6)


def test_idle_flush_waits_a_flush_interval_after_the_last_step(stats_dir):
    stats = metrics.StepStats()
    with stats._lock:
        stats.step_started()
        assert stats.idle_flush_due() is None  # in a step
        stats.step_ended()
        assert stats.idle_flush_due() is None  # nothing recorded
        stats.record_step(sparse_rows=1, dense_decode_rows=0)
        ended = stats._step_ended_at
        assert stats.idle_flush_due(ended) == pytest.approx(FLUSH_S)
        assert stats.idle_flush_due(ended + 2 * FLUSH_S) == 0.0


def test_steps_without_counts_start_no_thread(stats_dir):
    """vLLM's own batches (warm-up, profiling) record nothing: no thread, no file."""
    stats = metrics.StepStats()
    for _ in range(3):
        stats.step_started()
        stats.step_ended()
    assert stats._idle_thread is None
    time.sleep(3 * FLUSH_S)
    assert written(stats_dir) is None


# --------------------------------------------------------------------------- step boundaries


class FakeWorker:
    def __init__(self) -> None:
        self.calls = []

    def execute_model(self, scheduler_output):
        self.calls.append(scheduler_output)
        if scheduler_output == "fail":
            raise RuntimeError("step failed")
        return f"out-{scheduler_output}"


def test_step_boundaries_wrap_the_worker_step_once(monkeypatch):
    monkeypatch.setattr(FakeWorker, "execute_model", FakeWorker.execute_model)
    events = []
    entry = (__name__, "FakeWorker", "execute_model")
    started, ended = (lambda: events.append("start")), (lambda: events.append("end"))
    assert _compat.mark_step_boundaries(started, ended, entry)
    assert _compat.mark_step_boundaries(started, ended, entry)  # idempotent
    worker = FakeWorker()
    assert worker.execute_model("a") == "out-a"
    with pytest.raises(RuntimeError):
        worker.execute_model("fail")
    assert events == ["start", "end", "start", "end"]
    assert worker.calls == ["a", "fail"]
    assert not _compat.mark_step_boundaries(started, ended, (__name__, "Nope", "execute_model"))


def test_process_stats_hooks_the_vllm_worker_step(stats_dir, monkeypatch):
    from vllm.v1.worker.gpu_worker import Worker

    monkeypatch.setattr(metrics, "_STATS", None)
    stats = metrics.process_stats()
    assert getattr(Worker.execute_model, "_prhs_steps", False)
    metrics._step_started()
    assert stats._in_step
    metrics._step_ended()
    assert not stats._in_step


# --------------------------------------------------------------------------- a real engine

ENGINE_CHECK = textwrap.dedent(
    """
    import json, sys, time
    from vllm import LLM, SamplingParams
    from prhs_vllm import metrics

    llm = LLM(model=sys.argv[1], attention_backend="prhs", max_model_len=512,
              max_num_seqs=4, block_size=32, enforce_eager=True, dtype="bfloat16",
              additional_config={"prhs": {"min_context": 64}})
    result = {"started": metrics.read_totals()}
    llm.generate(["The capital of France is"],
                 SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    result["right_after"] = metrics.read_totals()
    time.sleep(1.5)  # idle: no step, no flush_process_stats
    result["idle"] = metrics.read_totals()
    result["process"] = metrics.process_stats().totals()
    print("RESULT " + json.dumps(result), flush=True)
    """
)


def test_engine_series_from_start_up_and_settled_when_idle(tmp_path):
    """vLLM's offline engine on the CPU (~45 s on 2 cores), stats read as the
    collector reads them: zeros before the first request (the front end made
    the directory), every step of the request written once the engine is
    idle, with no further step and no explicit flush."""
    model = smollm2_dir(skip_if_missing=True)
    env = {
        **os.environ,
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the engine, and its stats, here
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        metrics.STATS_DIR_ENV: str(tmp_path / "prhs-stats"),
        metrics.FLUSH_INTERVAL_ENV: "0.5",
    }
    proc = subprocess.run(
        [sys.executable, "-c", ENGINE_CHECK, str(model)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    result = json.loads(lines[-1][len("RESULT ") :])

    assert result["started"] is not None and set(result["started"].values()) == {0.0}
    # 8 tokens: the prefill samples the first, 7 decode steps (short context: dense).
    assert result["process"]["prhs_dense_decode_tokens"] == 7
    assert result["idle"] == result["process"]
