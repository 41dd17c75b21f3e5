"""Page-summary update on CUDA: ``torch.ops.prhs.update_page_summaries``
(csrc/summaries) behind the signature of
``prhs_vllm.ops.ref.update_page_summaries``.

One launch, no atomics: the tokens of a page form one run in ``slot_mapping``
(vLLM writes each request's new tokens contiguously, in slot order), and the
run's first token folds the whole run into the page, in token order. The
reference accepts any order; this op needs that layout.
"""

from __future__ import annotations

import torch

from prhs_vllm.ops.cuda.sparse_decode import _ops

_KEY_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_SLOT_DTYPES = (torch.int64, torch.int32)


def update_page_summaries(
    key: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_size: int,
    key_sum: torch.Tensor,
    key_min: torch.Tensor,
    key_max: torch.Tensor,
) -> None:
    """Fold newly written keys into the float32 summaries of their pages, in place.

    Args:
        key: [T, H, D] CUDA keys (bf16 / fp16 / fp32), channels contiguous.
        slot_mapping: [T'] int64 / int32, contiguous, T' <= T; slot = page *
            block_size + offset, -1 = padding. A page's slots form one run of
            consecutive entries; a run starting at offset 0 resets the page.
        block_size: tokens per page.
        key_sum, key_min, key_max: [P, H, D] float32, same strides, channels contiguous.
    Raises:
        ValueError: naming the argument that does not fit (checked here, before the op).
    """
    _check(key, slot_mapping, block_size, key_sum, key_min, key_max)
    _ops().update_page_summaries(key, slot_mapping, block_size, key_sum, key_min, key_max)


def bind_update(key, slot_mapping, block_size, key_sum, key_min, key_max):
    """``update_page_summaries`` with block_size and the summaries fixed: the
    backend calls it once per layer and step, where the host time is the cost.

    The fixed arguments are checked here, once; each call re-checks only what a
    step can change (key and slot_mapping), with the same errors.

    Args:
        key, slot_mapping: a first step's (see ``update_page_summaries``).
        block_size, key_sum, key_min, key_max: as in ``update_page_summaries``.
    Returns:
        update(key [T, H, D], slot_mapping [T']) -> None.
    """
    _check(key, slot_mapping, block_size, key_sum, key_min, key_max)
    op = _ops().update_page_summaries.default
    row_shape, device = tuple(key.shape[1:]), key.get_device()

    def update(key: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        if not (
            key.dtype in _KEY_DTYPES
            and slot_mapping.dtype in _SLOT_DTYPES
            and key.dim() == 3
            and tuple(key.shape[1:]) == row_shape
            and key.stride(2) == 1
            and slot_mapping.dim() == 1
            and slot_mapping.stride(0) == 1
            and slot_mapping.shape[0] <= key.shape[0]
            and key.get_device() == device
            and slot_mapping.get_device() == device
        ):
            _check(key, slot_mapping, block_size, key_sum, key_min, key_max)  # raises
        op(key, slot_mapping, block_size, key_sum, key_min, key_max)

    return update


def _check(key, slot_mapping, block_size, key_sum, key_min, key_max) -> None:
    if not key.is_cuda or key.dim() != 3 or key.dtype not in _KEY_DTYPES:
        raise ValueError(f"key must be a CUDA [T, H, D] bf16/fp16/fp32 tensor, got {key.dtype}")
    if key.stride(2) != 1:
        raise ValueError("key must be contiguous in its last dim")
    if slot_mapping.dim() != 1 or slot_mapping.dtype not in _SLOT_DTYPES:
        raise ValueError(f"slot_mapping must be 1-d int64 or int32, got {slot_mapping.dtype}")
    if slot_mapping.stride(0) != 1 or slot_mapping.device != key.device:
        raise ValueError("slot_mapping must be contiguous, on the device of key")
    if slot_mapping.shape[0] > key.shape[0]:
        raise ValueError(f"key has {key.shape[0]} rows for {slot_mapping.shape[0]} slots")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    shape, strides = key_sum.shape, key_sum.stride()
    for s in (key_sum, key_min, key_max):
        if s.dtype != torch.float32 or s.dim() != 3 or s.shape[1:] != key.shape[1:]:
            raise ValueError(f"summaries must be float32 [P, {key.shape[1]}, {key.shape[2]}]")
        if s.shape != shape or s.stride() != strides or strides[2] != 1:
            raise ValueError("key_sum, key_min and key_max must share shape and strides")
        if s.device != key.device:
            raise ValueError("the summaries must be on the device of key")
