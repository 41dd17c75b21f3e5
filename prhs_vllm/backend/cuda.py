"""prhs on CUDA: a subclass of vLLM's FlashAttention backend."""

from __future__ import annotations

import torch
from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadataBuilder,
)

from prhs_vllm import _compat
from prhs_vllm.backend.common import PrhsBuilderMixin, PrhsImplMixin


class PrhsFlashAttentionMetadataBuilder(PrhsBuilderMixin, FlashAttentionMetadataBuilder):
    """FlashAttention's builder plus the step's sparse decode rows."""


class PrhsFlashAttentionImpl(PrhsImplMixin, FlashAttentionImpl):
    """FlashAttention's impl; sparse decode rows go through the prhs ops."""

    # vLLM 0.26's write is reshape_and_cache_flash, a copy for the unquantized
    # caches prhs layers run on (fp8 caches keep their layers dense).
    fused_cache_write = True

    def split_kv_cache(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[P, H, bs, 2D] cache -> key and value views, each [P, H, bs, D].

        FlashAttention packs K and V into the last dim: K is channels [0, D).
        """
        return kv_cache[..., : self.head_size], kv_cache[..., self.head_size :]


class PrhsFlashAttentionBackend(FlashAttentionBackend):
    """`--attention-backend prhs` on CUDA (KV layout and kernels of FLASH_ATTN)."""

    @staticmethod
    def get_name() -> str:
        return _compat.backend_member_name()

    @staticmethod
    def get_impl_cls() -> type[PrhsFlashAttentionImpl]:
        return PrhsFlashAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[PrhsFlashAttentionMetadataBuilder]:
        return PrhsFlashAttentionMetadataBuilder
