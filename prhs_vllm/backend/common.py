"""The parts of the prhs backend shared by every platform.

A platform module (cuda.py, cpu.py) subclasses vLLM's own backend for that
platform and mixes these in, so the KV layout, prefill and every dense fallback
are vLLM's own code; only sparse decode rows take the prhs path, and a sparse
layer's cache write also updates the page summaries (on CUDA in one csrc
launch that stores what vLLM's write would).
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from typing import Any

import torch
from vllm.v1.attention.backend import AttentionCGSupport, AttentionType

from prhs_vllm import LOGGER_NAME, _compat, metrics, ops
from prhs_vllm.backend.full_graph import (
    DeviceRowBuffers,
    DeviceRows,
    count_rows,
    dense_rows_metadata,
    keep_path_outputs,
)
from prhs_vllm.backend.reuse import ReuseConfig, ReuseState
from prhs_vllm.backend.step import StepGraphs, sparse_step
from prhs_vllm.config import PrhsConfig, PrhsConfigError, depth_fraction, resolve_config
from prhs_vllm.ops import SelectionParams
from prhs_vllm.ops.ref.quant import QuantizedCentroids, centroid_bits, code_bytes, summary_bytes

logger = logging.getLogger(LOGGER_NAME)


@functools.lru_cache(maxsize=8)
def _resolve_cached(additional_config_json: str) -> PrhsConfig:
    from vllm.platforms import current_platform

    config = resolve_config(json.loads(additional_config_json) or None)
    text = config.describe()
    if not current_platform.is_cuda():
        # The CUDA-only switches do nothing here: say so where the line shows them on.
        where = str(getattr(current_platform, "device_type", "") or "this platform").upper()
        note = f" (CUDA only: unused on {where})"
        text = text.replace("cuda_graphs=on", "cuda_graphs=on" + note)
        if config.full_graph_max_rows:
            rows = f"full_graph_max_rows={config.full_graph_max_rows}"
            text = text.replace(rows, rows + note)
    logger.info("%s; ops: %s", text, ops.kernel_report())
    return config


def config_for(vllm_config: Any) -> PrhsConfig:
    """The prhs config of this engine (`--additional-config`, env var, defaults)."""
    additional = getattr(vllm_config, "additional_config", None) or {}
    config = _resolve_cached(json.dumps(additional, sort_keys=True, default=str))
    metrics.process_stats().log_interval_s = config.log_interval_s
    return config


@dataclass
class SparseRows:
    """The decode rows of one step that run sparse.

    token_idx: [S] long, row of each sparse token in the step's query tensor
        (0..S-1 when all_sparse).
    seq_lens: [S] int32 context lengths; block_table: [S, >=max_pages] page ids.
    max_pages: pages of the longest sparse row (host int: no device sync).
    all_sparse: no other rows in the step, so the dense kernel is skipped.
    host_mask: [R] bool host, which of the step's R requests run sparse.
    """

    token_idx: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    max_pages: int
    all_sparse: bool
    host_mask: torch.Tensor


@dataclass
class PrhsMetadata:
    """Per-step metadata: vLLM's own metadata for the whole batch, plus the
    sparse decode rows (None when the step runs entirely dense).

    last_keep: (layer index, [S, Hkv, M] keep) of the latest sparse layer of
    this step, for ETF (layers run in order within a step).
    dense_rows_base: ``base`` with the sparse rows at length 0, which a sparse
        layer runs vLLM's kernel with for the step's other rows (None: ``base``).
    graph_rows: set when vLLM captures a full graph that holds the sparse
        step: the rows as device data (``full_graph``), decided per replay.
    """

    base: Any
    sparse: SparseRows | None
    last_keep: tuple[int, torch.Tensor] | None = None
    dense_rows_base: Any = None
    graph_rows: DeviceRows | None = None


def sparse_row_mask(query_lens: torch.Tensor, seq_lens: torch.Tensor, min_context: int):
    """[R] bool: the rows that run sparse -- decodes of one token (query
    length 1) whose sequence length is at least ``min_context``.

    query_lens, seq_lens: [R] host integer tensors of the step's requests.
    """
    return (query_lens == 1) & (seq_lens >= max(min_context, 1))


def plan_sparse_rows(
    common: Any,
    config: PrhsConfig,
    stats: metrics.StepStats,
    block_size: int,
    exact_lens: bool = False,
) -> SparseRows | None:
    """Pick the decode rows whose context is long enough to run sparse
    (``sparse_row_mask``). Only host data is read and nothing waits for the
    device (where vLLM provides host sequence lengths). exact_lens: never
    decide on vLLM's host upper bound of the lengths (with speculative
    decoding it can run ahead of a row's real length), at the cost of a
    device-to-host copy where it is all vLLM has."""
    num_reqs = common.num_reqs
    qsl = common.query_start_loc_cpu[: num_reqs + 1]
    query_lens = qsl[1:] - qsl[:-1]
    decode = query_lens == 1
    if common.max_seq_len < config.min_context:
        stats.record_step(0, int(decode.sum()))
        return None
    seq_lens = _compat.seq_lens_host(common, exact=exact_lens)
    sparse = sparse_row_mask(query_lens, seq_lens, config.min_context)
    num_sparse = int(sparse.sum())
    stats.record_step(num_sparse, int(decode.sum()) - num_sparse)
    if num_sparse == 0:
        return None
    max_pages = -(-int(seq_lens[sparse].max()) // block_size)
    if num_sparse == num_reqs:  # steady decode: every row, no copy at all
        return SparseRows(
            token_idx=common.query_start_loc[:num_reqs].to(torch.long),
            seq_lens=common.seq_lens[:num_reqs],
            block_table=common.block_table_tensor[:num_reqs],
            max_pages=max_pages,
            all_sparse=True,
            host_mask=sparse,
        )
    req_idx = sparse.nonzero().squeeze(1)
    rows = _to_device(torch.stack([req_idx, qsl[req_idx].to(req_idx.dtype)]), common.seq_lens)
    return SparseRows(
        token_idx=rows[1],
        seq_lens=common.seq_lens[rows[0]],
        block_table=common.block_table_tensor[rows[0]],
        max_pages=max_pages,
        all_sparse=False,
        host_mask=sparse,
    )


def _to_device(host: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``host`` on the device of ``like``, without waiting for the device: a
    copy from pageable memory waits for the stream to drain, which would stop
    the host from preparing the next step while the GPU runs this one."""
    if like.device.type != "cuda":
        return host.to(like.device)
    return host.pin_memory().to(like.device, non_blocking=True)


def step_has_sparse_rows(runner: Any, scheduler_output: Any) -> bool:
    """Whether a step of vLLM's model runner has a row the prhs builder will
    plan sparse (``sparse_row_mask`` over the step's requests)."""
    config = runner.vllm_config
    if not _compat.is_prhs_selection(config.attention_config.backend):
        return False
    query_lens, seq_lens = _compat.step_contexts(runner, scheduler_output)
    return bool(sparse_row_mask(query_lens, seq_lens, config_for(config).min_context).any())


def full_graph_cannot_run(runner: Any, scheduler_output: Any, graph: Any) -> bool:
    """Whether vLLM's full graph ``graph`` (a BatchExecutionDescriptor) would
    run a sparse row of this step dense: the step has one, and the graph holds
    no sparse step (``graph_holds_sparse_step``)."""
    single_token = getattr(graph, "uniform_token_count", None) == 1
    num_reqs = getattr(graph, "num_reqs", None) or 0
    if graph_holds_sparse_step(runner.vllm_config, num_reqs, single_token):
        return False
    return step_has_sparse_rows(runner, scheduler_output)


def sparse_full_graphs(vllm_config: Any) -> bool:
    """Whether vLLM's full graphs of small decode batches hold the sparse step
    (``full_graph_refusal`` finds no reason against it)."""
    return full_graph_refusal(vllm_config) is None


def full_graph_refusal(vllm_config: Any) -> str | None:
    """Why vLLM's full graphs cannot hold the sparse step under this engine
    (None: they do). Off in the config (``full_graph_max_rows`` 0); the sparse
    step not in graphs at all (``cuda_graphs``); ``audit``, whose dense work is
    for measurement; time reuse, whose state a padded row must not touch; vLLM
    capturing no full graphs; or no dispatch guard (``full_graphs_dense_only``)."""
    cfg = config_for(vllm_config)
    compilation = getattr(vllm_config, "compilation_config", None)
    mode = getattr(compilation, "cudagraph_mode", None)
    if cfg.full_graph_max_rows == 0:
        return "full_graph_max_rows is 0"
    if not cfg.cuda_graphs:
        return "cuda_graphs is off"
    if cfg.audit:
        return "audit is on"
    if cfg.reuse_tau is not None:
        return "time reuse (reuse_tau) is on"
    if mode is None or not mode.has_full_cudagraphs():
        return f"vLLM captures no full CUDA graphs (cudagraph_mode {mode})"
    if not full_graphs_dense_only(vllm_config):
        return (
            "vLLM's graph dispatch is not guarded here (it is on vLLM 0.26's model runner "
            "v2 with one data-parallel and pipeline stage and no speculative decoding)"
        )
    return None


def graph_holds_sparse_step(vllm_config: Any, num_reqs: int, single_token_rows: bool) -> bool:
    """Whether vLLM's full graph of ``num_reqs`` requests holds the sparse step:
    a graph of one-token rows (uniform decode) of at most
    ``full_graph_max_rows`` requests, where ``sparse_full_graphs`` allows it."""
    if not single_token_rows or num_reqs < 1:
        return False
    if num_reqs > config_for(vllm_config).full_graph_max_rows:
        return False
    return sparse_full_graphs(vllm_config)


class PageSummaries:
    """Key summaries of one layer, keyed by physical page id.

    float32: key_sum (a [P, Hkv, D] float32 running sum), key_min, key_max
    [P, Hkv, D] float32. int8 / int4: key_sum is QuantizedCentroids (codes
    [P, Hkv, D * bits / 8] uint8) and key_min / key_max are bfloat16.
    """

    def __init__(self, num_pages, num_kv_heads, head_dim, device, dtype="float32") -> None:
        shape = (num_pages, num_kv_heads, head_dim)
        box = torch.float32 if dtype == "float32" else torch.bfloat16
        if dtype == "float32":
            self.key_sum = torch.zeros(shape, dtype=torch.float32, device=device)
        else:
            bits = centroid_bits(dtype)
            codes = torch.zeros(
                (num_pages, num_kv_heads, code_bytes(head_dim, bits)),
                dtype=torch.uint8,
                device=device,
            )
            self.key_sum = QuantizedCentroids(codes, bits)
        self.key_min = torch.full(shape, float("inf"), dtype=box, device=device)
        self.key_max = torch.full(shape, float("-inf"), dtype=box, device=device)
        self.num_pages = num_pages

    @staticmethod
    def bytes_per_page(num_kv_heads: int, head_dim: int, dtype: str = "float32") -> int:
        return num_kv_heads * summary_bytes(head_dim, dtype)


def summary_bytes_per_page(vllm_config: Any, num_kv_heads: int, head_dim: int) -> int:
    """Summary bytes per KV page of one layer under this engine's config."""
    dtype = config_for(vllm_config).centroid_dtype
    return PageSummaries.bytes_per_page(num_kv_heads, head_dim, dtype)


def _install_memory_accounting() -> None:
    # Runs when vLLM first imports the backend class, inside the worker process
    # (whose worker module is already loaded), before the KV cache is sized.
    from vllm.platforms import current_platform

    _compat.reserve_summary_memory(
        summary_bytes_per_page, current_platform.is_cpu(), reuse_state_bytes
    )


def reuse_state_bytes(vllm_config: Any) -> int:
    """Memory of every layer's reuse state (0 when reuse is off)."""
    cfg = config_for(vllm_config)
    if cfg.reuse_tau is None:
        return 0
    model = vllm_config.model_config
    parallel = vllm_config.parallel_config
    max_pages = -(-model.max_model_len // vllm_config.cache_config.block_size)
    per_slot = ReuseState.bytes_per_slot(
        model.get_num_attention_heads(parallel), model.get_num_kv_heads(parallel),
        model.get_head_size(), max_pages,
    )  # fmt: skip
    return _num_layers(vllm_config) * cfg.reuse_slots * per_slot


_install_memory_accounting()


class PrhsBuilderMixin:
    """Wraps the platform builder: its metadata plus the sparse rows."""

    supports_update_block_table = False

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        """The platform builder's own support where vLLM replays its full
        graphs for dense steps only (``full_graphs_dense_only``); otherwise
        NEVER: sparsity is decided per step on the host, and a full graph
        replayed for a step with sparse rows would run them dense. NEVER keeps
        attention out of vLLM's graphs (piecewise graphs around it); the sparse
        step replays graphs of its own (backend/step.py) either way."""
        if full_graphs_dense_only(vllm_config):
            return super().get_cudagraph_support(vllm_config, kv_cache_spec)
        return AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.prhs_config = config_for(vllm_config)
        self.prhs_stats = metrics.process_stats()
        self._capturing = False
        self._exact_lens = getattr(vllm_config, "speculative_config", None) is not None
        self._vllm_config = vllm_config
        self._device_rows: DeviceRowBuffers | None = None
        refusal = full_graph_refusal(vllm_config)
        if refusal is not None and self.prhs_config.full_graph_max_rows > 0:
            logger.warning(
                "prhs: full_graph_max_rows=%d is not used: %s; steps with sparse rows "
                "run piecewise", self.prhs_config.full_graph_max_rows, refusal,
            )  # fmt: skip
        if refusal is None:
            max_rows = max(
                vllm_config.scheduler_config.max_num_seqs,
                vllm_config.compilation_config.max_cudagraph_capture_size or 0,
            )
            self._device_rows = DeviceRowBuffers(
                max_rows, kv_cache_spec.num_kv_heads, device, self.prhs_config.metrics
            )

    def build_for_cudagraph_capture(self, common_attn_metadata):
        """The metadata vLLM captures a full graph with, no step counted:
        with the sparse step and its rows as device data where
        ``graph_holds_sparse_step``, else every row dense (a step with sparse
        rows never replays it: the dispatch guard)."""
        self._capturing = True
        try:
            return super().build_for_cudagraph_capture(common_attn_metadata)
        finally:
            self._capturing = False

    def build(self, common_prefix_len: int, common_attn_metadata, fast_build: bool = False):
        common = common_attn_metadata
        base = super().build(common_prefix_len, common, fast_build)
        if self._capturing:
            meta = PrhsMetadata(base=base, sparse=None)
            single_token = common.max_query_len == 1
            if self._device_rows is not None and graph_holds_sparse_step(
                self._vllm_config, common.num_reqs, single_token
            ):
                meta.graph_rows = self._write_device_rows(meta, common, None)
            return meta
        if _compat.in_warmup():
            # A batch of vLLM's own (warm-up, profiling, dummy batch): every
            # row dense, no step counted.
            sparse = None
        else:
            if self.prhs_config.metrics:
                # Before this step is counted: the stats file then holds whole steps
                # (their layers' rows included), never a step planned but not yet run.
                self.prhs_stats.maybe_flush()
            sparse = plan_sparse_rows(
                common, self.prhs_config, self.prhs_stats,
                self.kv_cache_spec.block_size, exact_lens=self._exact_lens,
            )  # fmt: skip
        meta = PrhsMetadata(base=base, sparse=sparse)
        if (
            self._device_rows is not None
            and common.num_reqs <= self.prhs_config.full_graph_max_rows
            and common_prefix_len == 0
        ):
            # This step may replay a full graph that holds the sparse step: it
            # reads the rows from these buffers.
            self._write_device_rows(meta, common, None if sparse is None else sparse.host_mask)
        return meta

    def _write_device_rows(self, meta: PrhsMetadata, common, host_mask) -> DeviceRows:
        """Write the step's rows into the device buffers; where any row may run
        sparse (a capture, or a step with sparse rows), ``meta`` gets the
        metadata vLLM's kernel runs its dense rows with."""
        rows = self._device_rows.write(common.seq_lens, common.block_table_tensor, host_mask)
        if self._capturing or host_mask is not None:
            meta.dense_rows_base = dense_rows_metadata(meta.base, rows.dense_lens)
        return rows


# Runs when vLLM first imports the backend class, inside the worker process
# (model construction), before its profiling and warm-up: their batches reach
# ``build`` marked as vLLM's own (``_compat.in_warmup``), never counted as steps.
_WARMUP_MARKED = _compat.mark_warmup_steps()


# vLLM's model runner dispatches steps with sparse rows around its full graphs
# (where the installed version allows it: see _compat).
_DISPATCH_GUARDED = _compat.keep_sparse_steps_off_full_graphs(full_graph_cannot_run)


def full_graphs_dense_only(vllm_config: Any) -> bool:
    """Whether every step with sparse rows is kept off vLLM's full graphs: the
    guarded runner (v2) is the one running, with one data-parallel and one
    pipeline stage and no speculative decoding (a drafter's steps and the
    ranks' graph agreement are not guarded)."""
    parallel = getattr(vllm_config, "parallel_config", None)
    return bool(
        _DISPATCH_GUARDED
        and _uses_v2_runner(vllm_config)
        and getattr(vllm_config, "speculative_config", None) is None
        and getattr(parallel, "data_parallel_size", 1) == 1
        and getattr(parallel, "pipeline_parallel_size", 1) == 1
    )


# id(vllm_config) -> (the config, kept so that its id is not reused; the answer)
_V2_RUNNER: dict[int, tuple[Any, bool]] = {}


def _uses_v2_runner(vllm_config: Any) -> bool:
    """vLLM's ``use_v2_model_runner``, read once per config: the property scans
    the installed packages' entry points (~20 ms on the H100 machine), and the
    dispatch guard asks on every step."""
    known = _V2_RUNNER.get(id(vllm_config))
    if known is None or known[0] is not vllm_config:
        known = _V2_RUNNER[id(vllm_config)] = (
            vllm_config,
            bool(getattr(vllm_config, "use_v2_model_runner", False)),
        )
    return known[1]


def dense_reason(impl: Any, kv_cache_dtype: str) -> str | None:
    """Why a layer can never run sparse (None if it can)."""
    if impl.attn_type != AttentionType.DECODER:
        return f"attention type {impl.attn_type}"
    if getattr(impl, "kv_sharing_target_layer_name", None):
        return "it shares the KV cache of another layer"
    window = getattr(impl, "sliding_window", None)
    if window not in (None, -1, (-1, -1)):
        return "sliding-window attention"
    if getattr(impl, "alibi_slopes", None) is not None:
        return "ALiBi"
    if getattr(impl, "logits_soft_cap", 0):
        return "logits soft-capping"
    if getattr(impl, "sinks", None) is not None:
        return "learned attention sinks"
    if kv_cache_dtype not in ("auto", "bfloat16", "float16"):
        return f"kv_cache_dtype={kv_cache_dtype}"
    return None


class PrhsImplMixin:
    """Wraps the platform impl: summaries on cache writes, sparse decode rows.

    Platform modules provide ``split_kv_cache(kv_cache) -> (key_cache,
    value_cache)``, each [num_pages, num_kv_heads, block_size, head_dim], and
    set ``fused_cache_write`` where the platform's cache write is a plain copy
    of the rows into their slots (``ops.cache_writer`` then does it, with the
    summaries, in one launch).
    """

    fused_cache_write = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        from vllm.config import get_current_vllm_config

        vllm_config = get_current_vllm_config()
        self.prhs_config = config_for(vllm_config)
        self._num_layers = _num_layers(vllm_config)
        validate_head_block_pages(self.prhs_config, self._num_layers, self.num_kv_heads)
        self.prhs_stats = metrics.process_stats()
        self._dense_reason = dense_reason(self, self.kv_cache_dtype)
        self._sparse_layer: bool | None = None  # known once the layer name is seen
        self._summaries: PageSummaries | None = None
        # (KV cache data_ptr, this layer's do_kv_cache_update) once it has written.
        self._cache_write: tuple[int, Any] | None = None
        self._reuse: tuple[ReuseState, ReuseConfig] | None = None
        self._max_pages_per_seq = 0
        model_config = getattr(vllm_config, "model_config", None)
        self._max_model_len = int(getattr(model_config, "max_model_len", 0) or 0)
        self._step_graphs = StepGraphs()
        self._params: SelectionParams | None = None
        self._layer_index = -1

    def split_kv_cache(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _layer_is_sparse(self, layer: Any) -> bool:
        if self._sparse_layer is None:
            reason = self._dense_reason
            index = _compat.extract_layer_index(layer.layer_name)
            self._layer_index = index
            if reason is None and index in self.prhs_config.dense_layers:
                reason = "listed in dense_layers"
            if reason is not None:
                logger.info("prhs: layer %s runs dense: %s", layer.layer_name, reason)
            self._sparse_layer = reason is None
        return self._sparse_layer

    def _page_summaries(self, kv_cache: torch.Tensor) -> PageSummaries:
        num_pages, num_kv_heads = kv_cache.shape[0], kv_cache.shape[1]
        if self._summaries is None or self._summaries.num_pages != num_pages:
            # The KV cache is allocated twice (profiling, then for real).
            self._summaries = PageSummaries(
                num_pages, num_kv_heads, self.head_size, kv_cache.device,
                self.prhs_config.centroid_dtype,
            )  # fmt: skip
            cfg = self.prhs_config
            if cfg.reuse_tau is not None:
                block_size = kv_cache.shape[2]
                max_pages = -(-(self._max_model_len or num_pages * block_size) // block_size)
                state = ReuseState(
                    cfg.reuse_slots, self.num_heads, num_kv_heads, self.head_size, max_pages,
                    kv_cache.device,
                )  # fmt: skip
                knobs = ReuseConfig(
                    cfg.reuse_tau, cfg.reuse_max_age, cfg.reuse_top_m, cfg.reuse_radius
                )
                self._reuse = (state, knobs)
        return self._summaries

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        bound = self._cache_write
        if bound is None or bound[0] != kv_cache.data_ptr():
            # Once per layer (and per KV cache allocation): the write with its
            # fixed arguments checked and bound, so each step pays little more
            # than the launch (the dense fallback's cost is host time per layer).
            write = self._bind_cache_write(layer, key, value, kv_cache, slot_mapping)
            bound = self._cache_write = (kv_cache.data_ptr(), write)
        bound[1](layer, key, value, kv_cache, slot_mapping)

    def _bind_cache_write(self, layer, key, value, kv_cache, slot_mapping):
        """This layer's ``do_kv_cache_update``: vLLM's, plus the page-summary
        update on a sparse layer -- fused into one op with the cache write where
        the platform's write is a plain copy (``fused_cache_write``)."""
        vllm_write = super().do_kv_cache_update
        if kv_cache.numel() == 0 or not self._layer_is_sparse(layer):
            return vllm_write
        summaries = self._page_summaries(kv_cache)
        sums = (summaries.key_sum, summaries.key_min, summaries.key_max)
        fused = None
        if self.fused_cache_write:
            key_cache, value_cache = self.split_kv_cache(kv_cache)
            fused = ops.cache_writer(key, value, key_cache, value_cache, slot_mapping, *sums)
        if fused is not None:

            def write(layer, key, value, kv_cache, slot_mapping):
                fused(key, value, slot_mapping)

        else:
            update = ops.summary_updater(key, slot_mapping, kv_cache.shape[2], *sums)

            def write(layer, key, value, kv_cache, slot_mapping):
                vllm_write(layer, key, value, kv_cache, slot_mapping)
                update(key, slot_mapping)

        if self._reuse is None:
            return write
        invalidate, block_size = self._reuse[0].invalidate_written, kv_cache.shape[2]

        def write_and_invalidate(layer, key, value, kv_cache, slot_mapping):
            write(layer, key, value, kv_cache, slot_mapping)
            invalidate(slot_mapping, block_size)

        return write_and_invalidate

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        if not isinstance(attn_metadata, PrhsMetadata):  # profiling run (None)
            return super().forward(
                layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs
            )
        meta = attn_metadata
        sparse = meta.sparse
        dense_layer = not self._layer_is_sparse(layer)
        if dense_layer or (sparse is None and meta.graph_rows is None):
            return super().forward(
                layer, query, key, value, kv_cache, meta.base, output, *args, **kwargs
            )
        if meta.graph_rows is not None or not sparse.all_sparse:
            # Rows that stay dense (prefill, short decodes) run vLLM's kernel over
            # the whole batch, the sparse rows at length 0 where the builder
            # wrote them so; the sparse rows' results are overwritten below.
            rows_base = meta.base if meta.dense_rows_base is None else meta.dense_rows_base
            super().forward(layer, query, key, value, kv_cache, rows_base, output, *args, **kwargs)
        if meta.graph_rows is not None:
            self._forward_graph_rows(query, kv_cache, meta, output)
        else:
            self._forward_sparse(query, kv_cache, meta, output)
        return output

    def _selection_params(self, block_size: int) -> SelectionParams:
        # Fixed per layer: built once, not on every step.
        if self._params is None or self._params.block_size != block_size:
            self._params = layer_selection_params(
                self.prhs_config, self._layer_index, self._num_layers, block_size,
                self.scale,
            )  # fmt: skip
        return self._params

    def _forward_sparse(
        self,
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: PrhsMetadata,
        output: torch.Tensor,
    ) -> None:
        cfg = self.prhs_config
        rows = meta.sparse
        key_cache, value_cache = self.split_kv_cache(kv_cache)
        summaries = self._page_summaries(kv_cache)
        # Every row sparse: one token each, the step's first rows in order, so a
        # slice reads and writes them in place (no gather, no scatter kernel).
        index = slice(0, rows.seq_lens.shape[0]) if rows.all_sparse else rows.token_idx
        q = query.view(query.shape[0], self.num_heads, self.head_size)[index]
        params = self._selection_params(key_cache.shape[2])
        prev_keep = self._prev_keep(params, meta)
        args = (q, summaries, key_cache, value_cache, rows.block_table, rows.seq_lens, params)
        if q.is_cuda and cfg.cuda_graphs and not cfg.audit:
            result = self._step_graphs.run(
                *args, rows.max_pages, cfg.metrics, prev_keep, reuse=self._reuse, step=rows
            )
        else:
            result = sparse_step(
                *args, rows.max_pages, cfg.metrics, prev_keep=prev_keep, audit=cfg.audit,
                reuse=self._reuse,
            )  # fmt: skip
        meta.last_keep = (self._layer_index, result.keep)
        output.view(output.shape[0], self.num_heads, self.head_size)[index] = result.out.to(
            output.dtype
        )
        if cfg.metrics and result.stats_recorded:
            self.prhs_stats.count_rows(result.out.shape[0], self.num_kv_heads)
        elif cfg.metrics:
            self.prhs_stats.record_rows(
                result.row_stats, self.num_kv_heads, audited=result.true_dropped is not None
            )

    def _prev_keep(self, params: SelectionParams, meta: PrhsMetadata) -> torch.Tensor | None:
        """ETF: the previous layer's keep, where this layer freezes pages and
        the previous layer ran sparse in this step."""
        if params.frozen_fraction > 0 and meta.last_keep is not None:
            if meta.last_keep[0] == self._layer_index - 1:
                return meta.last_keep[1]
        return None

    def _forward_graph_rows(
        self,
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: PrhsMetadata,
        output: torch.Tensor,
    ) -> None:
        """The sparse step over every row of a step captured in vLLM's full
        graph (``full_graph``): which rows keep its output is device data."""
        rows = meta.graph_rows
        num_rows = rows.sparse.shape[0]
        key_cache, value_cache = self.split_kv_cache(kv_cache)
        q = query.view(query.shape[0], self.num_heads, self.head_size)[:num_rows]
        params = self._selection_params(key_cache.shape[2])
        workspace = StepGraphs.shared_workspace(q, key_cache, rows.num_slots)
        result = sparse_step(
            q, self._page_summaries(kv_cache), key_cache, value_cache, rows.block_table,
            rows.sparse_lens, params, rows.num_slots, self.prhs_config.metrics, workspace,
            prev_keep=self._prev_keep(params, meta),
        )  # fmt: skip
        meta.last_keep = (self._layer_index, result.keep)
        keep_path_outputs(
            output.view(output.shape[0], self.num_heads, self.head_size), result.out, rows
        )
        count_rows(rows, result.row_stats)


def _num_layers(vllm_config: Any) -> int:
    """Decoder layers of the model being served (PSAW / ETF depth); 0 if unknown."""
    model_config = getattr(vllm_config, "model_config", None)
    hf = getattr(model_config, "hf_text_config", None)
    return int(getattr(hf, "num_hidden_layers", 0) or 0)


def validate_head_block_pages(cfg: PrhsConfig, num_layers: int, num_kv_heads: int) -> None:
    """``head_block_pages`` must fit the model: known layers, one size per KV head.

    Raises:
        PrhsConfigError: naming the layer and the counts.
    """
    for layer, sizes in sorted(cfg.head_block_pages.items()):
        if num_layers and layer >= num_layers:
            raise PrhsConfigError(
                f"head_block_pages names layer {layer}, but the model has {num_layers} layers"
            )
        if len(sizes) != num_kv_heads:
            raise PrhsConfigError(
                f"head_block_pages[{layer}] has {len(sizes)} sizes, but the model has "
                f"{num_kv_heads} KV heads per layer on this worker (one size per KV head)"
            )


def layer_selection_params(
    cfg: PrhsConfig,
    layer: int,
    num_layers: int,
    block_size: int,
    scale: float,
) -> SelectionParams:
    """The SelectionParams of one layer: its block sizes and depth fractions
    (``cfg`` already passed ``validate_head_block_pages`` at start-up)."""
    sizes = cfg.head_block_pages.get(layer)
    block_pages = cfg.block_pages if sizes is None else tuple(sizes)
    return SelectionParams(
        block_size=block_size,
        scale=scale,
        budget=cfg.budget,
        delta=cfg.delta,
        sink_tokens=cfg.sink_tokens,
        local_tokens=cfg.local_tokens,
        block_pages=block_pages,
        estimator=cfg.estimator,
        delta_control=cfg.delta_control,
        rerank=cfg.rerank,
        exact_centroid=cfg.centroid_dtype == "float32",
        over_budget=cfg.over_budget,
        dropped_weight=cfg.dropped_weight,
        window_start=depth_fraction(
            cfg.psaw_start_layer, cfg.psaw_phi, cfg.psaw_alpha, layer, num_layers
        ),
        frozen_fraction=depth_fraction(
            cfg.etf_start_layer, cfg.etf_psi, cfg.etf_gamma, layer, num_layers
        ),
    )
