"""prhs on vLLM's CPU platform: a subclass of the CPU_ATTN backend."""

from __future__ import annotations

import torch
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadataBuilder,
)

from prhs_vllm import _compat
from prhs_vllm.backend.common import PrhsBuilderMixin, PrhsImplMixin, logger

# CPU_ATTN ISAs whose cache write stores a page's keys as [head_dim, block_size].
_KEY_COLUMN_MAJOR_ISAS = ("vec", "vec16", "neon")


class PrhsCpuAttentionMetadataBuilder(PrhsBuilderMixin, CPUAttentionMetadataBuilder):
    """CPU_ATTN's builder plus the step's sparse decode rows."""


class PrhsCpuAttentionImpl(PrhsImplMixin, CPUAttentionBackendImpl):
    """CPU_ATTN's impl; sparse decode rows go through the torch reference ops."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        from vllm.config import get_current_vllm_config

        config = get_current_vllm_config()
        self._isa = _compat.cpu_attn_isa(
            config.model_config.dtype,
            config.cache_config.block_size,
            self.head_size,
            self.kv_cache_dtype,
        )
        if self._dense_reason is None and self._isa not in _KEY_COLUMN_MAJOR_ISAS:
            self._dense_reason = f"CPU_ATTN's {self._isa!r} KV layout is not readable by prhs yet"
            logger.warning("prhs: layer decodes dense: %s", self._dense_reason)

    def split_kv_cache(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[P, H, bs, 2D] cache -> key and value views, each [P, H, bs, D].

        CPU_ATTN stores a page's keys in the first half of the page's memory
        and its values in the second half, in a layout chosen by the kernel
        ISA: for vec / vec16 / neon the keys are [D, bs] row-major (column-major
        per token) and the values [bs, D] (csrc/cpu/cpu_attn_vec.hpp). Other
        ISAs (amx packs K and V for its tiles) are not decoded here.
        """
        num_pages, num_kv_heads, block_size, _ = kv_cache.shape
        halves = kv_cache.view(num_pages, num_kv_heads, 2, block_size * self.head_size)
        key = halves[:, :, 0].view(num_pages, num_kv_heads, self.head_size, block_size)
        value = halves[:, :, 1].view(num_pages, num_kv_heads, block_size, self.head_size)
        return key.transpose(2, 3), value


class PrhsCpuAttentionBackend(CPUAttentionBackend):
    """`--attention-backend prhs` on CPU (KV layout and kernels of CPU_ATTN)."""

    @staticmethod
    def get_name() -> str:
        return _compat.backend_member_name()

    @staticmethod
    def get_impl_cls() -> type[PrhsCpuAttentionImpl]:
        return PrhsCpuAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[PrhsCpuAttentionMetadataBuilder]:
        return PrhsCpuAttentionMetadataBuilder
