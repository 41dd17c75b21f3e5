"""prhs on vLLM's CPU platform: a subclass of the CPU_ATTN backend."""

from __future__ import annotations

import torch
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadataBuilder,
)

from prhs_vllm import _compat
from prhs_vllm.backend.common import PrhsBuilderMixin, PrhsImplMixin


class PrhsCpuAttentionMetadataBuilder(PrhsBuilderMixin, CPUAttentionMetadataBuilder):
    """CPU_ATTN's builder plus the step's sparse decode rows."""


class PrhsCpuAttentionImpl(PrhsImplMixin, CPUAttentionBackendImpl):
    """CPU_ATTN's impl; sparse decode rows go through the torch reference ops."""

    def split_kv_cache(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[P, H, bs, 2D] cache -> key and value views, each [P, H, bs, D].

        CPU_ATTN stores a page's keys in the first half of the page's memory
        (it views the page as [2 * bs, D]), not in the first D channels.
        """
        num_pages, num_kv_heads, block_size, _ = kv_cache.shape
        paired = kv_cache.view(num_pages, num_kv_heads, 2 * block_size, self.head_size)
        return paired[:, :, :block_size], paired[:, :, block_size:]


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
