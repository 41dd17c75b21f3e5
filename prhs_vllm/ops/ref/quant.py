"""Quantized page summaries: the key centroid in int8 or int4, asymmetric per
channel, with the page's own min/max box as zero point and scale.

The min/max box is stored anyway (it gives the upper bounds), and the
centroid always lies inside it, so code = round((c - min) / (max - min) *
(2^bits - 1)) needs no extra scales. The box is kept in bfloat16, rounded
outward (min down, max up) so every bound computed from it stays valid.

Pages fill one token at a time: the centroid is decoded, updated with the
new keys (the page's old token count is the offset of its first new slot,
since vLLM writes a page in order) and encoded again against the widened box.
The re-encoding error of a filling page shrinks with its count
(n_old / (n_old + n_new)) and is bounded in the tests.

Memory per page and KV head: bits / 8 * D bytes of codes + 4 D bytes of box,
against 12 D bytes for the float32 sum/min/max.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = [
    "QuantizedCentroids",
    "centroid_bits",
    "code_bytes",
    "decode_centroids",
    "encode_centroids",
    "round_outward_bf16",
    "summary_bytes",
    "update_quantized_summaries",
]


class QuantizedCentroids(NamedTuple):
    """codes: [P, Hkv, D * bits / 8] uint8 (two 4-bit codes per byte for int4)."""

    codes: torch.Tensor
    bits: int


def centroid_bits(centroid_dtype: str) -> int:
    """Bits of a centroid code: 8 (int8) or 4 (int4); 0 for the float32 sum."""
    return {"float32": 0, "int8": 8, "int4": 4}[centroid_dtype]


def summary_bytes(head_dim: int, centroid_dtype: str) -> int:
    """Bytes of one page and KV head's summary: float32 sum / min / max, or
    the codes plus the bfloat16 box."""
    bits = centroid_bits(centroid_dtype)
    if bits == 0:
        return 3 * 4 * head_dim
    return code_bytes(head_dim, bits) + 2 * 2 * head_dim


def code_bytes(head_dim: int, bits: int) -> int:
    """Bytes of one page-head's codes."""
    return head_dim * bits // 8


def round_outward_bf16(kmin: torch.Tensor, kmax: torch.Tensor):
    """(min, max) in bfloat16 with min <= every input min and max >= every input max."""
    lo = kmin.to(torch.bfloat16)
    hi = kmax.to(torch.bfloat16)
    lo = torch.where(lo.float() > kmin, torch.nextafter(lo, torch.full_like(lo, -torch.inf)), lo)
    hi = torch.where(hi.float() < kmax, torch.nextafter(hi, torch.full_like(hi, torch.inf)), hi)
    return lo, hi


def encode_centroids(centroid, kmin, kmax, bits: int) -> torch.Tensor:
    """[..., D] float centroids in their [min, max] boxes -> [..., D * bits / 8] uint8."""
    levels = (1 << bits) - 1
    lo, hi = kmin.float(), kmax.float()
    width = hi - lo
    frac = torch.where(width > 0, (centroid.float() - lo) / width.clamp(min=1e-30), 0.0)
    codes = torch.round(frac.clamp(0, 1) * levels).to(torch.uint8)
    if bits == 8:
        return codes
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def decode_centroids(codes, kmin, kmax, bits: int) -> torch.Tensor:
    """Inverse of ``encode_centroids``: [..., D] float32."""
    levels = (1 << bits) - 1
    if bits == 4:
        codes = torch.stack([codes & 0xF, codes >> 4], dim=-1).flatten(-2)
    lo, hi = kmin.float(), kmax.float()
    return lo + codes.float() / levels * (hi - lo)


def update_quantized_summaries(
    key: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_size: int,
    centroids: QuantizedCentroids,
    key_min: torch.Tensor,
    key_max: torch.Tensor,
) -> None:
    """Fold newly written keys into quantized summaries, in place.

    Args:
        key: [T, H, D] keys of this step; slot_mapping: [T'] int, -1 = padding.
        centroids: codes [P, H, D * bits / 8] uint8.
        key_min, key_max: [P, H, D] bfloat16 boxes (+-inf marks an empty page).
    """
    num_slots = slot_mapping.shape[0]
    if num_slots == 0:
        return
    slots = slot_mapping.to(torch.long)
    keys = key[:num_slots].to(torch.float32)
    # Padding (-1) forms a segment of page -1, which is never written back:
    # no boolean indexing, hence no host sync on CUDA.
    pages = torch.where(slots >= 0, torch.div(slots, block_size, rounding_mode="floor"), -1)
    offsets = slots % block_size
    touched, inverse = _segments(pages)
    num_touched, heads, dim = touched.shape[0], keys.shape[1], keys.shape[2]
    # Tokens already in each touched page: the offset of its first new slot.
    first = torch.full((num_touched,), block_size, dtype=torch.long, device=keys.device)
    first.scatter_reduce_(0, inverse, offsets, "amin")
    new_count = torch.zeros(num_touched, dtype=torch.long, device=keys.device)
    new_count.index_add_(0, inverse, torch.ones_like(inverse))
    new_sum = torch.zeros(num_touched, heads, dim, device=keys.device)
    new_sum.index_add_(0, inverse, keys)
    new_min = torch.full((num_touched, heads, dim), torch.inf, device=keys.device)
    new_max = torch.full((num_touched, heads, dim), -torch.inf, device=keys.device)
    index = inverse[:, None, None].expand_as(keys)
    new_min.scatter_reduce_(0, index, keys, "amin")
    new_max.scatter_reduce_(0, index, keys, "amax")

    old_min = key_min[touched.clamp(min=0)].float()
    old_max = key_max[touched.clamp(min=0)].float()
    old_n = first.to(torch.float32)[:, None, None]
    has_old = first > 0  # offset 0 written now: a new occupant, the old summary is void
    old_c = decode_centroids(
        centroids.codes[touched.clamp(min=0)], old_min, old_max, centroids.bits
    )
    old_c = torch.where(has_old[:, None, None], old_c, 0.0)
    lo = torch.where(has_old[:, None, None], torch.minimum(old_min, new_min), new_min)
    hi = torch.where(has_old[:, None, None], torch.maximum(old_max, new_max), new_max)
    count = old_n + new_count.to(torch.float32)[:, None, None]
    centroid = (old_c * torch.where(has_old[:, None, None], old_n, 0.0) + new_sum) / count
    lo_b, hi_b = round_outward_bf16(lo, hi)
    codes = encode_centroids(centroid, lo_b, hi_b, centroids.bits)
    # Unused and padding segments (touched < 0) repeat the first live segment's
    # write: duplicate indices then carry identical values (deterministic).
    live = touched >= 0
    pick = torch.where(live, torch.arange(num_touched, device=keys.device), live.long().argmax())
    target = touched[pick].clamp(min=0)
    any_live = live.any()
    for dst, src in ((key_min, lo_b), (key_max, hi_b), (centroids.codes, codes)):
        dst[target] = torch.where(any_live, src[pick], dst[target])


def _segments(pages: torch.Tensor):
    """(touched [T], inverse [T]): distinct pages (then -1 padding) and each slot's
    index into them -- ``torch.unique`` without its host sync (T = slots)."""
    order = torch.argsort(pages, stable=True)
    sorted_pages = pages[order]
    starts = torch.ones_like(sorted_pages, dtype=torch.bool)
    starts[1:] = sorted_pages[1:] != sorted_pages[:-1]
    segment = torch.cumsum(starts.to(torch.long), 0) - 1
    inverse = torch.empty_like(segment).scatter_(0, order, segment)
    touched = torch.full_like(pages, -1).scatter_(0, segment, sorted_pages)
    return touched, inverse
