"""vLLM's full CUDA graphs replay a step with sparse rows only where they hold
the sparse step: the graph-dispatch guard (`_compat.full_graphs_for_dense_steps`,
`handing_step_to_graph_manager`), the predicate it asks (`full_graph_cannot_run`:
`graph_holds_sparse_step`, `step_has_sparse_rows` over `_compat.step_contexts`),
and the graph support the builder declares."""

from __future__ import annotations

import dataclasses
import types

import numpy as np
import pytest
import torch
from vllm.config import CUDAGraphMode
from vllm.v1.attention.backend import AttentionCGSupport

from prhs_vllm import _compat
from prhs_vllm.backend import common
from prhs_vllm.backend.common import (
    PrhsBuilderMixin,
    full_graph_cannot_run,
    graph_holds_sparse_step,
    sparse_row_mask,
    step_has_sparse_rows,
)


def test_sparse_row_mask_takes_long_single_token_decodes():
    query_lens = torch.tensor([1, 1, 5, 1, 1])
    seq_lens = torch.tensor([2048, 2047, 9000, 1, 70000])
    assert sparse_row_mask(query_lens, seq_lens, 2048).tolist() == [True, False, False, False, True]
    # min_context 0 still needs a context (a row of length 0 is padding)
    assert sparse_row_mask(query_lens, torch.tensor([0, 1, 1, 1, 1]), 0).tolist() == [
        False, True, False, True, True,
    ]  # fmt: skip


def fake_runner(computed: dict[str, int], backend="PRHS", min_context=2048):
    """The parts of vLLM 0.26's v2 GPUModelRunner the predicate reads."""
    index = {req: i for i, req in enumerate(computed)}
    config = types.SimpleNamespace(
        attention_config=types.SimpleNamespace(backend=backend),
        additional_config={"prhs": {"min_context": min_context}},
    )
    states = types.SimpleNamespace(
        req_id_to_index=index,
        num_computed_tokens_np=np.array(list(computed.values()), dtype=np.int32),
    )
    return types.SimpleNamespace(vllm_config=config, req_states=states)


def step(**scheduled):
    return types.SimpleNamespace(num_scheduled_tokens=scheduled)


def test_step_contexts_read_the_runner_mirror():
    runner = fake_runner({"a": 100, "b": 4000})
    query_lens, seq_lens = _compat.step_contexts(runner, step(b=1, a=7, new=1))
    assert query_lens.tolist() == [1, 7, 1]
    assert seq_lens.tolist() == [4001, 107, 2**62]  # unknown: counted long


@pytest.mark.parametrize(
    ("computed", "scheduled", "sparse"),
    [
        ({"a": 2047, "b": 10}, {"a": 1, "b": 1}, True),  # a reaches 2048 with this token
        ({"a": 2046, "b": 10}, {"a": 1, "b": 1}, False),
        ({"a": 5000}, {"a": 16}, False),  # a prefill chunk runs dense
        ({"a": 10}, {"a": 1, "unknown": 1}, True),  # not in the mirror yet: never full
    ],
)
def test_step_has_sparse_rows(computed, scheduled, sparse):
    assert step_has_sparse_rows(fake_runner(computed), step(**scheduled)) is sparse


def test_step_has_sparse_rows_is_false_for_other_backends():
    runner = fake_runner({"a": 9000}, backend="FLASH_ATTN")
    assert not step_has_sparse_rows(runner, step(a=1))


@dataclasses.dataclass(frozen=True)
class Desc:
    cg_mode: CUDAGraphMode
    num_tokens: int
    num_reqs: int | None
    uniform_token_count: int | None = None
    num_active_loras: int = 0


def is_compatible(desc, num_reqs, num_tokens, uniform_token_count, loras):
    return desc.num_tokens >= num_tokens and (desc.num_reqs is None or desc.num_reqs >= num_reqs)


UTILS = types.SimpleNamespace(_is_compatible=is_compatible, BatchExecutionDescriptor=Desc)
FULL8 = Desc(CUDAGraphMode.FULL, 8, 8, 1)
PIECEWISE8 = Desc(CUDAGraphMode.PIECEWISE, 8, None)


class FakeManager:
    """A graph manager whose own dispatch always answers FULL (when captured)."""

    def __init__(self, candidates):
        self._candidates = {(6, 0): candidates}  # candidates per runtime token count

    def dispatch(self, num_reqs, num_tokens, uniform_token_count, num_active_loras):
        return self._candidates[(num_tokens, num_active_loras)][0]

    def _resolve_effective_loras(self, num_active_loras):
        return num_active_loras


def guarded_manager(candidates, sparse: bool, asked=None):
    manager = FakeManager(candidates)

    def cannot_run(runner, out, desc):
        if asked is not None:
            asked.append((runner, out, desc))
        return sparse

    guard = _compat.full_graphs_for_dense_steps(
        FakeManager.dispatch, cannot_run, CUDAGraphMode, UTILS
    )
    return manager, lambda: guard(manager, 6, 6, 1, 0)


def test_dispatch_keeps_full_graphs_for_dense_steps():
    asked = []
    manager, dispatch = guarded_manager([FULL8, PIECEWISE8], sparse=False, asked=asked)
    manager._prhs_step = ("runner", "out")
    assert dispatch() == FULL8
    assert asked == [("runner", "out", FULL8)]  # the predicate sees the graph picked


def test_dispatch_skips_full_graphs_for_sparse_steps():
    manager, dispatch = guarded_manager([FULL8, PIECEWISE8], sparse=True)
    manager._prhs_step = ("runner", "out")
    assert dispatch() == PIECEWISE8
    manager, dispatch = guarded_manager([FULL8], sparse=True)  # FULL only: eager
    manager._prhs_step = ("runner", "out")
    assert dispatch() == Desc(CUDAGraphMode.NONE, 6, 6)


def test_dispatch_outside_a_step_is_untouched():
    """Capture and dummy runs: no step handed over, vLLM's own answer."""
    _, dispatch = guarded_manager([FULL8, PIECEWISE8], sparse=True)
    assert dispatch() == FULL8


def test_execute_model_hands_the_step_over_and_takes_it_back():
    seen = []

    def execute_model(self, scheduler_output, intermediate_tensors=None, dummy_run=False):
        seen.append(getattr(self.cudagraph_manager, "_prhs_step", None))
        return "output"

    wrapped = _compat.handing_step_to_graph_manager(execute_model)
    runner = types.SimpleNamespace(cudagraph_manager=types.SimpleNamespace())
    assert wrapped(runner, "sched") == "output"
    assert wrapped(runner, "dummy", None, True) == "output"
    assert seen == [(runner, "sched"), None]
    assert runner.cudagraph_manager._prhs_step is None


def test_guard_is_installed_only_on_the_version_read():
    # This machine's vLLM (CPU 0.32) has another runner: no guard, NEVER below.
    assert _compat.vllm_version() != (0, 26)
    assert not _compat.keep_sparse_steps_off_full_graphs(full_graph_cannot_run)


class _AlwaysBase:
    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec):
        return AttentionCGSupport.ALWAYS


class _Builder(PrhsBuilderMixin, _AlwaysBase):
    pass


def engine(v2=True, speculative=None, dp=1, pp=1, full=True, **prhs):
    # 64 rows unless asked; a field given as None keeps its default
    prhs = {k: v for k, v in {"full_graph_max_rows": 64, **prhs}.items() if v is not None}
    parallel = types.SimpleNamespace(data_parallel_size=dp, pipeline_parallel_size=pp)
    mode = CUDAGraphMode.FULL_AND_PIECEWISE if full else CUDAGraphMode.PIECEWISE
    return types.SimpleNamespace(
        use_v2_model_runner=v2, speculative_config=speculative, parallel_config=parallel,
        compilation_config=types.SimpleNamespace(cudagraph_mode=mode),
        additional_config={"prhs": prhs}, attention_config=types.SimpleNamespace(backend="PRHS"),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("config", "num_reqs", "single_token", "holds"),
    [
        (engine(), 64, True, True),
        (engine(), 1, True, True),
        (engine(), 65, True, False),  # beyond full_graph_max_rows (64)
        (engine(full_graph_max_rows=None), 1, True, False),  # the default: off
        (engine(), 8, False, False),  # a graph of mixed batches
        (engine(full_graph_max_rows=8), 16, True, False),
        (engine(full_graph_max_rows=0), 1, True, False),
        (engine(cuda_graphs=False), 8, True, False),
        (engine(audit=True), 8, True, False),
        (engine(reuse_tau=0.9), 8, True, False),
        (engine(full=False), 8, True, False),  # vLLM captures no full graphs
        (engine(speculative=object()), 8, True, False),  # no guard for a drafter
        (engine(v2=False), 8, True, False),
    ],
)
def test_graph_holds_sparse_step(monkeypatch, config, num_reqs, single_token, holds):
    monkeypatch.setattr(common, "_DISPATCH_GUARDED", True)
    assert graph_holds_sparse_step(config, num_reqs, single_token) is holds


@pytest.mark.parametrize(
    ("graph", "scheduled", "cannot"),
    [
        (FULL8, {"a": 1}, False),  # a decode graph of 8 rows holds the sparse step
        (Desc(CUDAGraphMode.FULL, 8, 8, None), {"a": 1}, True),  # a mixed-batch graph
        (Desc(CUDAGraphMode.FULL, 128, 128, 1), {"a": 1}, True),  # beyond 64 rows
        (Desc(CUDAGraphMode.FULL, 128, 128, 1), {"b": 1}, False),  # no sparse row
    ],
)
def test_full_graph_cannot_run(monkeypatch, graph, scheduled, cannot):
    monkeypatch.setattr(common, "_DISPATCH_GUARDED", True)
    runner = fake_runner({"a": 9000, "b": 10})
    runner.vllm_config = engine()
    runner.vllm_config.additional_config = {
        "prhs": {"min_context": 2048, "full_graph_max_rows": 64}
    }
    assert full_graph_cannot_run(runner, step(**scheduled), graph) is cannot


@pytest.mark.parametrize(
    ("guarded", "config", "support"),
    [
        (True, engine(), AttentionCGSupport.ALWAYS),
        (False, engine(), AttentionCGSupport.NEVER),
        (True, engine(v2=False), AttentionCGSupport.NEVER),
        (True, engine(speculative=object()), AttentionCGSupport.NEVER),
        (True, engine(dp=2), AttentionCGSupport.NEVER),
        (True, engine(pp=2), AttentionCGSupport.NEVER),
    ],
    ids=["guarded", "no-guard", "v1-runner", "speculative", "dp2", "pp2"],
)
def test_builder_declares_full_graphs_only_behind_the_guard(monkeypatch, guarded, config, support):
    monkeypatch.setattr(common, "_DISPATCH_GUARDED", guarded)
    assert _Builder.get_cudagraph_support(config, None) is support
