"""Sparse paged decode over an index list of kept pages (the GPU kernels'
interface): ``kept_slots`` names, per (row, KV head), the block-table slots to
read, so no op needs a host sync to learn how many pages were kept."""

import math

import torch


def compact_keep(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Turns a keep mask into sorted slot lists, without a host sync.

    Args:
        keep: [N, Hkv, M] bool pages to read.
    Returns:
        (kept_slots [N, Hkv, M] int32: the kept slots ascending, then -1;
        num_kept [N, Hkv] int32: how many entries of kept_slots are slots).
    """
    num_slots = keep.shape[-1]
    slots = torch.arange(num_slots, device=keep.device, dtype=torch.int32)
    # Kept slots sort first (in order), dropped ones after them.
    order = torch.where(keep, slots, slots + num_slots).sort(dim=-1).values
    kept_slots = torch.where(order < num_slots, order, -1).to(torch.int32)
    return kept_slots, keep.sum(-1, dtype=torch.int32)


def sparse_paged_decode_indexed(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    kept_slots: torch.Tensor,
    num_kept: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each row's query over the kept pages of its context.

    Same result as ``sparse_paged_decode`` with keep[n, h, s] set for the first
    num_kept[n, h] slots s of kept_slots[n, h]; tokens at positions >= seq_len
    are invisible. A (row, KV head) with no visible token gets out = 0 and
    lse = -inf. float32 math.

    Args:
        query: [N, Hq, D].
        key_cache, value_cache: [P, Hkv, block_size, D] (views are fine).
        block_table: [N, M] int32 page ids.
        seq_lens: [N] int32 context lengths (the current token included).
        kept_slots: [N, Hkv, K] int32 slots (indices into block_table rows),
            ascending; entries from num_kept on are padding (-1).
        num_kept: [N, Hkv] int32.
        scale: softmax scale.
        out: optional [N, Hq, D] tensor (query's dtype) to write into.
    Returns:
        (out [N, Hq, D] in query's dtype, lse [N, Hq] float32 log-sum-exp of
        the scaled logits over the visible kept tokens).
    """
    num_rows, num_q_heads, head_dim = query.shape
    num_kv_heads, block_size = key_cache.shape[1], key_cache.shape[2]
    group = num_q_heads // num_kv_heads
    device = query.device
    max_kept = kept_slots.shape[-1]

    valid = torch.arange(max_kept, device=device) < num_kept.to(torch.long)[..., None]
    slots = torch.where(valid, kept_slots.to(torch.long), 0)  # [N, Hkv, K]
    pages = block_table.to(torch.long).gather(1, slots.flatten(1)).view_as(slots)
    heads = torch.arange(num_kv_heads, device=device)[None, :, None]
    pos = slots[..., None] * block_size + torch.arange(block_size, device=device)
    visible = valid[..., None] & (pos < seq_lens.to(torch.long)[:, None, None, None])

    keys = key_cache[pages, heads].to(torch.float32)  # [N, Hkv, K, bs, D]
    # Zeroed so that unwritten (possibly NaN) slots cannot leak through 0 * NaN.
    values = value_cache[pages, heads].to(torch.float32).masked_fill(~visible[..., None], 0.0)

    q = query.to(torch.float32).view(num_rows, num_kv_heads, group, head_dim)
    logits = scale * torch.einsum("nhgd,nhktd->nhgkt", q, keys)
    logits = logits.masked_fill(~visible[:, :, None], -math.inf).flatten(3)
    lse = torch.logsumexp(logits, dim=-1)  # [N, Hkv, G]; -inf when nothing is visible
    weights = torch.exp(logits - lse.nan_to_num(neginf=0.0)[..., None])
    result = torch.einsum("nhgs,nhsd->nhgd", weights, values.flatten(2, 3))

    result = result.reshape(num_rows, num_q_heads, head_dim)
    lse = lse.reshape(num_rows, num_q_heads)
    if out is None:
        return result.to(query.dtype), lse
    out.copy_(result)
    return out, lse
