"""Ops used by the backend. Each op has a pure-torch reference in ``ref/`` with
the same signature; accelerated versions dispatch from here once they exist."""

from prhs_vllm.ops.ref import (
    Selection,
    SelectionParams,
    dropped_mass_upper_bound,
    select_pages,
    sparse_paged_decode,
    update_page_summaries,
)

__all__ = [
    "Selection",
    "SelectionParams",
    "dropped_mass_upper_bound",
    "select_pages",
    "sparse_paged_decode",
    "update_page_summaries",
]
