"""Pure-torch reference ops: the test oracle and the CPU path."""

from prhs_vllm.ops.ref.selection import (
    PageLogits,
    Selection,
    SelectionParams,
    dropped_mass_upper_bound,
    exact_page_logits,
    mean_constrained_bound,
    page_logits,
    select_pages,
)
from prhs_vllm.ops.ref.sparse_decode import sparse_paged_decode
from prhs_vllm.ops.ref.summaries import update_page_summaries, write_cache_and_summaries

__all__ = [
    "Selection",
    "PageLogits",
    "SelectionParams",
    "dropped_mass_upper_bound",
    "exact_page_logits",
    "mean_constrained_bound",
    "page_logits",
    "select_pages",
    "sparse_paged_decode",
    "update_page_summaries",
    "write_cache_and_summaries",
]
