"""Time-axis reuse (PrHS): a (request, KV head) reuses the selection of an
earlier step while its query stays similar to the one that produced it.

The state lives on the device in S hashed slots per layer, keyed by the
physical page that the request is writing (its last page) and the context
length at which it was stored:

- The page being written belongs to one request only (vLLM shares only full
  pages), so a batch reorder never mixes states: rows find their state by
  page, never by batch index.
- A state is valid only for the very next step of the same sequence
  (stored length == seq_len - 1). When a row crosses into a new page it
  looks its state up under the previous page and moves it.
- A page's first slot written (offset 0) means a new occupant: any state
  under that page is dropped. Finished, aborted and preempted requests free
  their pages, and whoever writes them next starts clean; a preempted
  request is recomputed into fresh pages and starts clean too.
- Two rows hashing to one slot in a step: the highest row wins the slot, the
  other simply has no state at its next step (fewer reuses, never wrong ones).

Everything is device ops without host syncs, so the step stays capturable in
CUDA graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ReuseConfig", "ReuseState", "dilate"]


@dataclass(frozen=True)
class ReuseConfig:
    """tau: cosine similarity a group's every query head needs to its anchor;
    max_age: steps a selection may be reused before scoring again; top_m:
    fraction of the budget cap (the anchor's best kept pages) dilated by
    +-radius pages. Defaults as in prhs_vllm.config."""

    tau: float
    max_age: int = 8
    top_m: float = 1 / 3
    radius: int = 1


class ReuseState:
    """One layer's reuse state in ``slots`` hashed slots.

    page, length: [S] long (page -1 = empty); age: [S, Hkv] long;
    anchor: [S, Hq, D] float32 query that produced the stored selection;
    keep: [S, Hkv, Ms] bool, the anchor's selection already dilated.
    """

    def __init__(self, slots, num_q_heads, num_kv_heads, head_dim, max_pages, device) -> None:
        self.slots = slots
        self.page = torch.full((slots,), -1, dtype=torch.long, device=device)
        self.length = torch.zeros(slots, dtype=torch.long, device=device)
        self.age = torch.zeros(slots, num_kv_heads, dtype=torch.long, device=device)
        self.anchor = torch.zeros(slots, num_q_heads, head_dim, device=device)
        self.keep = torch.zeros(slots, num_kv_heads, max_pages, dtype=torch.bool, device=device)

    @staticmethod
    def bytes_per_slot(num_q_heads, num_kv_heads, head_dim, max_pages) -> int:
        return 16 + 8 * num_kv_heads + 4 * num_q_heads * head_dim + num_kv_heads * max_pages

    def invalidate_written(self, slot_mapping: torch.Tensor, block_size: int) -> None:
        """Drop states under pages whose first slot is written now (new occupant)."""
        slots = slot_mapping.to(torch.long)
        first = (slots >= 0) & (slots % block_size == 0)
        pages = torch.where(first, slots // block_size, torch.full_like(slots, -2))
        hashed = pages.clamp(min=0) % self.slots
        self._clear(hashed, first & (self.page[hashed] == pages))

    def _clear(self, slot: torch.Tensor, flag: torch.Tensor) -> None:
        """Empty the slots whose flag is set. The flags are reduced per slot
        first: a scatter of per-row values onto repeated slots would race."""
        hit = torch.zeros(self.slots, dtype=torch.long, device=slot.device)
        hit.scatter_reduce_(0, slot, flag.to(torch.long), "amax")
        self.page.masked_fill_(hit.bool(), -1)

    def _pages(self, block_table, seq_lens, block_size):
        lens = seq_lens.to(torch.long)
        table = block_table.to(torch.long)
        last = (lens - 1) // block_size
        cur = table.gather(1, last[:, None]).squeeze(1)
        prev_idx = ((lens - 2).clamp(min=0) // block_size)[:, None]
        prev = table.gather(1, prev_idx).squeeze(1)
        crossing = ((lens - 1) % block_size == 0) & (lens > 1)
        return lens, cur, prev, crossing

    def lookup(self, block_table, seq_lens, block_size) -> tuple[torch.Tensor, torch.Tensor]:
        """(slot [N] long, valid [N] bool): where each row's state from its previous
        step is, and whether there is one."""
        lens, cur, prev, crossing = self._pages(block_table, seq_lens, block_size)
        key = torch.where(crossing, prev, cur)
        slot = key % self.slots
        valid = (self.page[slot] == key) & (self.length[slot] == lens - 1)
        return slot, valid

    def decide(self, query, slot, valid, cfg: ReuseConfig) -> torch.Tensor:
        """[N, Hkv] bool: reuse the stored selection (similar query, young enough)."""
        num_rows, num_q_heads, head_dim = query.shape
        num_kv_heads = self.age.shape[1]
        cos = torch.nn.functional.cosine_similarity(
            query.to(torch.float32), self.anchor[slot], dim=-1
        )  # [N, Hq]
        similar = cos.view(num_rows, num_kv_heads, -1).amin(-1) >= cfg.tau
        return valid[:, None] & similar & (self.age[slot] < cfg.max_age)

    def stored_keep(self, slot, num_slots: int) -> torch.Tensor:
        """[N, Hkv, num_slots] the stored (dilated) selections of the rows' slots.

        Slots past the state's width (vLLM may pad block tables beyond
        max_model_len's pages) hold no context: they read as False."""
        stored = self.keep[slot, :, :num_slots]
        extra = num_slots - stored.shape[-1]
        return torch.nn.functional.pad(stored, (0, extra)) if extra > 0 else stored

    def store(self, query, block_table, seq_lens, block_size, slot_old, reuse, keep, score,
              cap, cfg: ReuseConfig) -> None:  # fmt: skip
        """Write this step's state under each row's current page.

        Args:
            query: [N, Hq, D]; slot_old: [N] from ``lookup``; reuse: [N, Hkv];
            keep: [N, Hkv, M] this step's keep; score: [N, Hkv, M] page masses
            that ranked it; cap: [N] long budget cap in pages.
        """
        num_rows, num_kv_heads, num_slots = keep.shape
        lens, cur, prev, crossing = self._pages(block_table, seq_lens, block_size)
        new = cur % self.slots
        # The old slot of a crossing row is vacated first (it may be its new one).
        old_page = torch.where(crossing, prev, torch.full_like(prev, -3))
        self._clear(slot_old, crossing & (self.page[slot_old] == old_page))
        # One winner per slot: the highest row index.
        rows = torch.arange(num_rows, device=keep.device)
        winner = torch.full((self.slots,), -1, dtype=torch.long, device=keep.device)
        candidates = torch.where(lens > 1, rows, torch.full_like(rows, -1))
        winner.scatter_reduce_(0, new, candidates, "amax")
        old_anchor = self.anchor[slot_old].view(num_rows, num_kv_heads, -1, query.shape[-1])
        old_keep = self.stored_keep(slot_old, num_slots)
        old_age = self.age[slot_old]
        top_m = torch.clamp((cap.to(torch.float32) * cfg.top_m).round().to(torch.long), min=1)
        grown = dilate(keep, score, top_m, cfg.radius)
        q = query.to(torch.float32).view(num_rows, num_kv_heads, -1, query.shape[-1])
        anchor = torch.where(reuse[:, :, None, None], old_anchor, q).flatten(1, 2)
        stored = torch.where(reuse[:, :, None], old_keep, grown)
        age = torch.where(reuse, old_age + 1, torch.zeros_like(old_age))
        self._put(new, winner[new], cur, lens, age, anchor, stored)

    def _put(self, slot, winner, page, length, age, anchor, keep) -> None:
        """Write each slot's winning row. Every row writes its slot, with the
        winner's values (or, without a winner, what the slot holds): repeated
        indices then carry identical values, so the writes cannot race, and only
        N rows are touched (no copy of the whole state).

        slot, winner: [N] long (winner -1: no row may write that slot)."""
        has = winner >= 0
        src = winner.clamp(min=0)

        def put(dst: torch.Tensor, rows: torch.Tensor) -> None:
            mask = has.view(-1, *([1] * (rows.dim() - 1)))
            dst[slot] = torch.where(mask, rows[src], dst[slot])

        put(self.page, page)
        put(self.length, length)
        put(self.age, age)
        put(self.anchor, anchor)
        width, num_slots = self.keep.shape[-1], keep.shape[-1]
        full = torch.zeros((keep.shape[0], *self.keep.shape[1:]), dtype=torch.bool,
                           device=keep.device)  # fmt: skip
        used = min(width, num_slots)
        full[..., :used] = keep[..., :used]
        put(self.keep, full)


def dilate(keep, score, top_m, radius) -> torch.Tensor:
    """keep [N, H, M] plus +-radius pages around each row's top_m [N] kept pages
    by score [N, H, M]."""
    num_slots = keep.shape[-1]
    # On CUDA the largest m would need a host sync: take every page, then mask.
    m = num_slots if keep.is_cuda else min(num_slots, int(top_m.max().item()))
    ranked = torch.where(keep, score, torch.full_like(score, -1.0))
    best = ranked.topk(max(m, 1), dim=-1)
    within = (
        torch.arange(best.indices.shape[-1], device=keep.device)[None, None, :]
        < top_m[:, None, None]
    )
    take = within & (best.values >= 0)
    grown = keep.clone()
    for off in range(-radius, radius + 1):
        idx = (best.indices + off).clamp(0, num_slots - 1)
        grown.scatter_(-1, idx, take | grown.gather(-1, idx))
    return grown
