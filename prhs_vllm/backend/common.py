"""The parts of the prhs backend shared by every platform.

A platform module (cuda.py, cpu.py) subclasses vLLM's own backend for that
platform and mixes these in, so the KV layout, cache writes, prefill and every
dense fallback are vLLM's own code; only sparse decode rows take the prhs path.
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
from prhs_vllm.backend.step import StepGraphs, sparse_step
from prhs_vllm.config import PrhsConfig, resolve_config
from prhs_vllm.ops import SelectionParams

logger = logging.getLogger(LOGGER_NAME)


@functools.lru_cache(maxsize=8)
def _resolve_cached(additional_config_json: str) -> PrhsConfig:
    config = resolve_config(json.loads(additional_config_json) or None)
    logger.info("%s; ops: %s", config.describe(), ops.kernel_report())
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

    token_idx: [S] long, row of each sparse token in the step's query tensor.
    seq_lens: [S] int32 context lengths; block_table: [S, >=max_pages] page ids.
    max_pages: pages of the longest sparse row (host int: no device sync).
    all_sparse: no other rows in the step, so the dense kernel is skipped.
    """

    token_idx: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    max_pages: int
    all_sparse: bool


@dataclass
class PrhsMetadata:
    """Per-step metadata: vLLM's own metadata for the whole batch, plus the
    sparse decode rows (None when the step runs entirely dense)."""

    base: Any
    sparse: SparseRows | None


def plan_sparse_rows(
    common: Any, config: PrhsConfig, stats: metrics.StepStats, block_size: int
) -> SparseRows | None:
    """Pick the decode rows whose context is long enough to run sparse.

    A row is sparse when it decodes one token (query length 1) and its
    sequence length is at least ``config.min_context``. Only host data is
    read (no device sync where vLLM provides host sequence lengths).
    """
    num_reqs = common.num_reqs
    qsl = common.query_start_loc_cpu[: num_reqs + 1]
    query_lens = qsl[1:] - qsl[:-1]
    decode = query_lens == 1
    if common.max_seq_len < config.min_context:
        stats.record_step(0, int(decode.sum()))
        return None
    seq_lens = _compat.seq_lens_host(common)
    sparse = decode & (seq_lens >= max(config.min_context, 1))
    num_sparse = int(sparse.sum())
    stats.record_step(num_sparse, int(decode.sum()) - num_sparse)
    if num_sparse == 0:
        return None
    req_idx = sparse.nonzero().squeeze(1)
    device = common.seq_lens.device
    req_idx_dev = req_idx.to(device)
    return SparseRows(
        token_idx=qsl[req_idx].to(device=device, dtype=torch.long),
        seq_lens=common.seq_lens[req_idx_dev],
        block_table=common.block_table_tensor[req_idx_dev],
        max_pages=-(-int(seq_lens[sparse].max()) // block_size),
        all_sparse=num_sparse == num_reqs,
    )


class PageSummaries:
    """Key summaries of one layer, keyed by physical page id.

    key_sum, key_min, key_max: [num_pages, num_kv_heads, head_dim] float32.
    """

    def __init__(self, num_pages: int, num_kv_heads: int, head_dim: int, device) -> None:
        shape = (num_pages, num_kv_heads, head_dim)
        self.key_sum = torch.zeros(shape, dtype=torch.float32, device=device)
        self.key_min = torch.full(shape, float("inf"), dtype=torch.float32, device=device)
        self.key_max = torch.full(shape, float("-inf"), dtype=torch.float32, device=device)

    @property
    def num_pages(self) -> int:
        return self.key_sum.shape[0]

    @staticmethod
    def bytes_per_page(num_kv_heads: int, head_dim: int) -> int:
        return 3 * 4 * num_kv_heads * head_dim


def _install_memory_accounting() -> None:
    # Runs when vLLM first imports the backend class, inside the worker process
    # (whose worker module is already loaded), before the KV cache is sized.
    from vllm.platforms import current_platform

    _compat.reserve_summary_memory(PageSummaries.bytes_per_page, current_platform.is_cpu())


_install_memory_accounting()


class PrhsBuilderMixin:
    """Wraps the platform builder: its metadata plus the sparse rows."""

    # Sparsity is decided on the host each step, so a graph captured by vLLM
    # would freeze one step's decision. NEVER keeps attention out of vLLM's
    # graphs (it then uses piecewise graphs); the sparse step replays graphs of
    # its own (backend/step.py).
    _cudagraph_support = AttentionCGSupport.NEVER
    supports_update_block_table = False

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.prhs_config = config_for(vllm_config)
        self.prhs_stats = metrics.process_stats()

    def build(self, common_prefix_len: int, common_attn_metadata, fast_build: bool = False):
        base = super().build(common_prefix_len, common_attn_metadata, fast_build)
        sparse = plan_sparse_rows(
            common_attn_metadata, self.prhs_config, self.prhs_stats, self.kv_cache_spec.block_size
        )
        if self.prhs_config.metrics:
            self.prhs_stats.maybe_flush()
        return PrhsMetadata(base=base, sparse=sparse)


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
    value_cache)``, each [num_pages, num_kv_heads, block_size, head_dim].
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        from vllm.config import get_current_vllm_config

        self.prhs_config = config_for(get_current_vllm_config())
        self.prhs_stats = metrics.process_stats()
        self._dense_reason = dense_reason(self, self.kv_cache_dtype)
        self._sparse_layer: bool | None = None  # known once the layer name is seen
        self._summaries: PageSummaries | None = None
        self._step_graphs = StepGraphs()
        self._params: SelectionParams | None = None

    def split_kv_cache(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _layer_is_sparse(self, layer: Any) -> bool:
        if self._sparse_layer is None:
            reason = self._dense_reason
            index = _compat.extract_layer_index(layer.layer_name)
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
                num_pages, num_kv_heads, self.head_size, kv_cache.device
            )
        return self._summaries

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        if kv_cache.numel() == 0 or not self._layer_is_sparse(layer):
            return
        summaries = self._page_summaries(kv_cache)
        ops.update_summaries(
            key,
            slot_mapping,
            kv_cache.shape[2],
            summaries.key_sum,
            summaries.key_min,
            summaries.key_max,
        )

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        if not isinstance(attn_metadata, PrhsMetadata):  # profiling run (None)
            return super().forward(
                layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs
            )
        sparse = attn_metadata.sparse
        if sparse is None or not self._layer_is_sparse(layer):
            return super().forward(
                layer, query, key, value, kv_cache, attn_metadata.base, output, *args, **kwargs
            )
        if not sparse.all_sparse:
            # Rows that stay dense (prefill, short decodes) run vLLM's kernel over
            # the whole batch; the sparse rows' dense results are overwritten below.
            super().forward(
                layer, query, key, value, kv_cache, attn_metadata.base, output, *args, **kwargs
            )
        self._forward_sparse(query, kv_cache, sparse, output)
        return output

    def _selection_params(self, block_size: int) -> SelectionParams:
        # Fixed per layer: built once, not on every step.
        if self._params is None or self._params.block_size != block_size:
            cfg = self.prhs_config
            self._params = SelectionParams(
                block_size=block_size,
                scale=self.scale,
                budget=cfg.budget,
                delta=cfg.delta,
                sink_tokens=cfg.sink_tokens,
                local_tokens=cfg.local_tokens,
                block_pages=cfg.block_pages,
                estimator=cfg.estimator,
            )
        return self._params

    def _forward_sparse(
        self, query: torch.Tensor, kv_cache: torch.Tensor, rows: SparseRows, output: torch.Tensor
    ) -> None:
        cfg = self.prhs_config
        key_cache, value_cache = self.split_kv_cache(kv_cache)
        summaries = self._page_summaries(kv_cache)
        q = query.view(query.shape[0], self.num_heads, self.head_size)[rows.token_idx]
        params = self._selection_params(key_cache.shape[2])
        args = (q, summaries, key_cache, value_cache, rows.block_table, rows.seq_lens, params)
        if q.is_cuda and cfg.cuda_graphs:
            result = self._step_graphs.run(*args, rows.max_pages, cfg.metrics)
        else:
            result = sparse_step(*args, rows.max_pages, cfg.metrics)
        output.view(output.shape[0], self.num_heads, self.head_size)[rows.token_idx] = (
            result.out.to(output.dtype)
        )
        if cfg.metrics:
            self.prhs_stats.record_layer(
                result.keep_counts, result.num_pages, result.est_kept_mass, result.certified_dropped
            )
