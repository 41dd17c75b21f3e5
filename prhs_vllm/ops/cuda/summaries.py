"""Page-summary update on CUDA: ``torch.ops.prhs.update_page_summaries`` and
``torch.ops.prhs.write_cache_and_summaries`` (csrc/summaries) behind the
signatures of their ``prhs_vllm.ops.ref`` references.

One launch, no atomics: the tokens of a page form one run in ``slot_mapping``
(vLLM writes each request's new tokens contiguously, in slot order), and the
run's first token folds the whole run into the page, in token order. The
reference accepts any order; this op needs that layout. Summaries are float32
sums, or int8 centroids in bfloat16 boxes (``ref.quant``).
"""

from __future__ import annotations

import torch

from prhs_vllm.ops.cuda.sparse_decode import _ops
from prhs_vllm.ops.ref.quant import QuantizedCentroids

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
        key_sum, key_min, key_max: [P, H, D] float32, same strides, channels contiguous;
            or key_sum int8 QuantizedCentroids (codes [P, H, D] uint8) and bfloat16
            boxes (``ref.quant.update_quantized_summaries``; the Triton kernel's
            arithmetic, bit for bit).
    Raises:
        ValueError: naming the argument that does not fit (checked here, before the op).
    """
    _check(key, slot_mapping, block_size, key_sum, key_min, key_max)
    _ops().update_page_summaries(key, slot_mapping, block_size, _sums(key_sum), key_min, key_max)


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
    row_shape, device, sums = key.shape[1:], key.get_device(), _sums(key_sum)

    def update(key: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        if not (key.dtype in _KEY_DTYPES and _step_args_fit(key, slot_mapping, row_shape, device)):
            _check(key, slot_mapping, block_size, key_sum, key_min, key_max)  # raises
        op(key, slot_mapping, block_size, sums, key_min, key_max)

    return update


def write_cache_and_summaries(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    key_sum: torch.Tensor,
    key_min: torch.Tensor,
    key_max: torch.Tensor,
) -> None:
    """vLLM's KV cache write for an unquantized cache plus ``update_page_summaries``,
    in one launch (``torch.ops.prhs.write_cache_and_summaries``); the signature of
    ``prhs_vllm.ops.ref.write_cache_and_summaries``. The cache rows are copies,
    bit for bit what vLLM's ``reshape_and_cache_flash`` writes.

    Args:
        key, value: [T, H, D] CUDA rows (bf16 / fp16 / fp32, the caches' dtype),
            channels contiguous.
        key_cache, value_cache: [P, H, block_size, D] views sharing shape and
            strides, channels contiguous.
        slot_mapping: [T'] int64 / int32, as in ``update_page_summaries``.
        key_sum, key_min, key_max: as in ``update_page_summaries`` (same P as the caches).
    Raises:
        ValueError: naming the argument that does not fit (checked here, before the op).
    """
    _check_cache_write(key, value, key_cache, value_cache, slot_mapping, key_sum, key_min, key_max)
    _ops().write_cache_and_summaries(
        key, value, key_cache, value_cache, slot_mapping, _sums(key_sum), key_min, key_max
    )


def bind_cache_write(key, value, key_cache, value_cache, slot_mapping, key_sum, key_min, key_max):
    """``write_cache_and_summaries`` with the caches and summaries fixed, for one
    layer's cache writes (per layer and step the host time is the cost): the
    fixed arguments are checked here, once; each call re-checks only what a
    step can change (key, value and slot_mapping), with the same errors.

    Args:
        key, value, slot_mapping: a first step's; the rest as in
            ``write_cache_and_summaries``.
    Returns:
        write(key [T, H, D], value [T, H, D], slot_mapping [T']) -> None.
    """
    _check_cache_write(key, value, key_cache, value_cache, slot_mapping, key_sum, key_min, key_max)
    op = _ops().write_cache_and_summaries.default
    row_shape, device, dtype = key.shape[1:], key.get_device(), key_cache.dtype
    sums = _sums(key_sum)

    def write(key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        if not (
            key.dtype == dtype
            and value.dtype == dtype
            and value.shape == key.shape
            and value.stride(2) == 1
            and value.get_device() == device
            and _step_args_fit(key, slot_mapping, row_shape, device)
        ):
            _check_cache_write(  # raises
                key, value, key_cache, value_cache, slot_mapping, key_sum, key_min, key_max
            )
        op(key, value, key_cache, value_cache, slot_mapping, sums, key_min, key_max)

    return write


def _step_args_fit(key, slot_mapping, row_shape, device) -> bool:
    """The per-step part of ``_check`` (key's dtype aside), as one fast test."""
    return (
        slot_mapping.dtype in _SLOT_DTYPES
        and key.dim() == 3
        and key.shape[1:] == row_shape
        and key.stride(2) == 1
        and slot_mapping.dim() == 1
        and slot_mapping.stride(0) == 1
        and slot_mapping.shape[0] <= key.shape[0]
        and key.get_device() == device
        and slot_mapping.get_device() == device
    )


def _check_cache_write(key, value, key_cache, value_cache, slot_mapping, *summaries) -> None:
    if key_cache.dim() != 4:
        raise ValueError(f"key_cache must be [P, H, block_size, D], got {key_cache.dim()} dims")
    _check(key, slot_mapping, key_cache.shape[2], *summaries)
    if value.shape != key.shape or value.stride(2) != 1:
        raise ValueError(
            f"value must be {list(key.shape)} like key, contiguous in its last dim; "
            f"got {list(value.shape)}"
        )
    num_heads, head_dim = key.shape[1:]
    if key_cache.shape[1] != num_heads or key_cache.shape[3] != head_dim:
        raise ValueError(
            f"key_cache must be [P, {num_heads}, block_size, {head_dim}], "
            f"got {list(key_cache.shape)}"
        )
    if value_cache.shape != key_cache.shape or value_cache.stride() != key_cache.stride():
        raise ValueError("key_cache and value_cache must share shape and strides")
    if key_cache.stride(3) != 1:
        raise ValueError("the caches must be contiguous in their last dim")
    if key_cache.shape[0] != summaries[1].shape[0]:
        raise ValueError(
            f"the caches have {key_cache.shape[0]} pages, the summaries {summaries[1].shape[0]}"
        )
    for name, t in (("value", value), ("key_cache", key_cache), ("value_cache", value_cache)):
        if t.dtype != key.dtype or t.device != key.device:
            raise ValueError(
                f"{name} must have key's dtype and device ({key.dtype}, {key.device}), "
                f"got {t.dtype}, {t.device}"
            )


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
    quantized = isinstance(key_sum, QuantizedCentroids)
    if quantized:
        if key_sum.bits != 8:
            raise ValueError(f"int{key_sum.bits} centroids: the csrc update takes int8 only")
        sums, box_dtype = key_sum.codes, torch.bfloat16
        if sums.dtype != torch.uint8 or sums.dim() != 3 or sums.shape[1:] != key.shape[1:]:
            raise ValueError(f"codes must be uint8 [P, {key.shape[1]}, {key.shape[2]}]")
        if sums.shape != key_min.shape or sums.stride(2) != 1 or sums.device != key.device:
            raise ValueError("codes must match the boxes' shape, contiguous, on key's device")
    else:
        box_dtype = torch.float32
    shape, strides = key_min.shape, key_min.stride()
    for s in (key_min, key_max) if quantized else (key_sum, key_min, key_max):
        if s.dtype != box_dtype or s.dim() != 3 or s.shape[1:] != key.shape[1:]:
            raise ValueError(
                f"summaries must be float32 [P, {key.shape[1]}, {key.shape[2]}], "
                "or int8 codes in bfloat16 boxes"
            )
        if s.shape != shape or s.stride() != strides or strides[2] != 1:
            raise ValueError("key_sum, key_min and key_max must share shape and strides")
        if s.device != key.device:
            raise ValueError("the summaries must be on the device of key")


def _sums(key_sum) -> torch.Tensor:
    """The tensor the op takes as key_sum: the float32 sums, or the int8 codes."""
    return key_sum.codes if isinstance(key_sum, QuantizedCentroids) else key_sum
