"""Selection, compaction and the dropped-estimate log-sum-exp as one op: the
contract of the fused Triton kernel (``ops/triton/selection.py``), written
with the reference ops it must match.

The fused op covers the serving path without exact reranking and without the
certified stop rule (both need more than the page log-masses of one row);
``unsupported_reason`` names what keeps a layer on ``select_from_logits``.
"""

import dataclasses

import torch

from prhs_vllm.ops.ref.selection import (
    PageLogits,
    Selection,
    SelectionParams,
    select_from_logits,
)
from prhs_vllm.ops.ref.sparse_decode_indexed import compact_keep


def unsupported_reason(params: SelectionParams) -> str | None:
    """Why ``select_compact`` cannot serve ``params`` (None if it can)."""
    if params.rerank > 0:
        return "exact rerank reads the key cache"
    if params.delta > 0 and params.delta_control == "certified":
        return "the certified stop rule"
    return None


def require_supported(params: SelectionParams) -> None:
    """Raises ValueError naming what ``select_compact`` does not cover in ``params``."""
    reason = unsupported_reason(params)
    if reason is not None:
        raise ValueError(f"select_compact does not cover {reason}")


def select_compact(
    logits: PageLogits,
    seq_lens: torch.Tensor,
    params: SelectionParams,
    prev_keep: torch.Tensor | None = None,
    with_bound: bool = True,
) -> Selection:
    """``select_from_logits`` plus what the attention and the metrics read next.

    Args:
        logits: PageLogits, each [N, Hkv, G, M] float32.
        seq_lens: [N] int context lengths.
        params: selection knobs (``unsupported_reason(params)`` is None).
        prev_keep: [N, Hkv, >=M] bool, the previous layer's keep (ETF).
        with_bound: compute dropped_est_lse (the metrics' estimate of the
            dropped mass, with the attention's kept log-sum-exp).
    Returns:
        Selection with keep [N, Hkv, M], est_kept_mass, over_budget, num_pages,
        kept_slots [N, Hkv, M] int32 and num_kept [N, Hkv] int32
        (``compact_keep(keep)``), dropped_est_lse [N, Hkv, G] float32 (None
        without with_bound); bound_logits None.
    Raises:
        ValueError: params this op does not cover.
    """
    require_supported(params)
    selection = select_from_logits(logits, seq_lens, params, prev_keep=prev_keep)
    kept_slots, num_kept = compact_keep(selection.keep)
    return dataclasses.replace(
        selection,
        bound_logits=None,
        kept_slots=kept_slots,
        num_kept=num_kept,
        dropped_est_lse=selection.dropped_est_lse if with_bound else None,
    )
