"""Per-page key summaries: the running key sum (-> centroid) and per-channel min/max.

The summaries are keyed by physical page id and updated from the keys that
vLLM writes into the KV cache, so every request that maps a page (prefix
caching included) sees the same summary.
"""

import torch

from prhs_vllm.ops.ref.quant import QuantizedCentroids, update_quantized_summaries


def update_page_summaries(
    key: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_size: int,
    key_sum: torch.Tensor,
    key_min: torch.Tensor,
    key_max: torch.Tensor,
) -> None:
    """Fold newly written keys into the summaries of their pages, in place.

    A page's first token (offset 0) starts a new occupant: its summary is reset
    before the step's keys are added, so a recycled page never mixes tokens of
    two requests. Pages are written in offset order by vLLM, so offset 0 of a
    page is always written before, or in the same step as, its other offsets.

    Args:
        key: [T, H, D] keys of this step (model dtype); rows past
            ``slot_mapping.shape[0]`` are padding and ignored.
        slot_mapping: [T'] int, T' <= T, slot = page * block_size + offset;
            -1 marks padding.
        block_size: tokens per page.
        key_sum: [P, H, D] float32 running sum of keys per page and head.
        key_min: [P, H, D] float32 per-channel minimum.
        key_max: [P, H, D] float32 per-channel maximum.
    """
    num_slots = slot_mapping.shape[0]
    if num_slots == 0:
        return
    slots = slot_mapping.to(torch.long)
    valid = slots >= 0
    keys = key[:num_slots][valid].to(torch.float32)
    slots = slots[valid]
    pages = torch.div(slots, block_size, rounding_mode="floor")
    fresh = pages[slots % block_size == 0]
    key_sum.index_fill_(0, fresh, 0.0)
    key_min.index_fill_(0, fresh, float("inf"))
    key_max.index_fill_(0, fresh, float("-inf"))
    key_sum.index_add_(0, pages, keys)
    index = pages[:, None, None].expand_as(keys)
    key_min.scatter_reduce_(0, index, keys, "amin", include_self=True)
    key_max.scatter_reduce_(0, index, keys, "amax", include_self=True)


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
    """vLLM's KV cache write for an unquantized paged cache, then
    ``update_page_summaries``: each real token's key and value rows copied to
    its slot, in place.

    Args:
        key, value: [T, H, D] rows of this step, the dtype of the caches; rows
            past ``slot_mapping.shape[0]`` are padding and ignored.
        key_cache, value_cache: [P, H, block_size, D] paged caches (views).
        slot_mapping: [T'] int, T' <= T, slot = page * block_size + offset;
            -1 marks padding.
        key_sum, key_min, key_max: [P, H, D] float32 summaries, as in
            ``update_page_summaries``; or key_sum QuantizedCentroids and bfloat16
            boxes, as in ``quant.update_quantized_summaries``.
    """
    block_size = key_cache.shape[2]
    slots = slot_mapping.to(torch.long)
    rows = (slots >= 0).nonzero().squeeze(1)
    pages = torch.div(slots[rows], block_size, rounding_mode="floor")
    offsets = slots[rows] % block_size
    # Advanced indices around a slice: the indexed view is [n, H, D].
    key_cache[pages, :, offsets] = key[rows]
    value_cache[pages, :, offsets] = value[rows]
    if isinstance(key_sum, QuantizedCentroids):
        update_quantized_summaries(key, slot_mapping, block_size, key_sum, key_min, key_max)
    else:
        update_page_summaries(key, slot_mapping, block_size, key_sum, key_min, key_max)
