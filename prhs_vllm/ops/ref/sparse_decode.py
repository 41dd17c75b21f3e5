"""Sparse paged decode attention: one query token per row attends to the
selected pages of its KV cache only (GQA: a group shares its KV head's pages)."""

import math

import torch


def sparse_paged_decode(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    keep: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each row's query over the kept pages of its context.

    Only the kept pages are gathered, so the bytes read scale with the
    selection, not with the context.

    Args:
        query: [N, Hq, D].
        key_cache, value_cache: [P, Hkv, block_size, D] (views are fine).
        block_table: [N, >=M] int page ids.
        seq_lens: [N] int context lengths (the current token included).
        keep: [N, Hkv, M] bool pages to read; at least one per (row, head).
        scale: softmax scale.
    Returns:
        (out [N, Hq, D] in query's dtype, lse [N, Hq] float32 log-sum-exp of
        the scaled logits over the kept tokens).
    """
    num_rows, num_q_heads, head_dim = query.shape
    num_kv_heads, block_size = key_cache.shape[1], key_cache.shape[2]
    group = num_q_heads // num_kv_heads
    num_kept = int(keep.sum(-1).max().item())
    slots = torch.sort(keep.to(torch.int8), dim=-1, descending=True, stable=True).indices
    slots = slots[..., :num_kept]  # [N, Hkv, K]
    slot_kept = keep.gather(-1, slots)
    pages = block_table.to(torch.long).gather(1, slots.flatten(1)).view_as(slots)
    heads = torch.arange(num_kv_heads, device=query.device)[None, :, None]
    keys = key_cache[pages, heads].to(torch.float32)  # [N, Hkv, K, bs, D]
    values = value_cache[pages, heads].to(torch.float32)
    pos = slots[..., None] * block_size + torch.arange(block_size, device=query.device)
    visible = slot_kept[..., None] & (pos < seq_lens.to(torch.long)[:, None, None, None])

    q = query.to(torch.float32).view(num_rows, num_kv_heads, group, head_dim)
    logits = scale * torch.einsum("nhgd,nhktd->nhgkt", q, keys)
    logits = logits.masked_fill(~visible[:, :, None], -math.inf).flatten(3)
    lse = torch.logsumexp(logits, dim=-1)  # [N, Hkv, G]
    weights = torch.exp(logits - lse[..., None])
    out = torch.einsum("nhgs,nhsd->nhgd", weights, values.flatten(2, 3))
    return (
        out.reshape(num_rows, num_q_heads, head_dim).to(query.dtype),
        lse.reshape(num_rows, num_q_heads),
    )
