"""``plan_sparse_rows``: the step's sparse decode rows, on the device of vLLM's
metadata, for a batch where every row runs sparse (slices, no copy) and for a
mixed one (host indices copied without waiting for the device: pinned memory
on CUDA). Runs on the CPU, and on the GPU where there is one."""

from __future__ import annotations

import types

import pytest
import torch

from prhs_vllm.backend.common import plan_sparse_rows

BLOCK_SIZE = 16
MIN_CONTEXT = 100
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class CountingStats:
    def __init__(self) -> None:
        self.steps = []

    def record_step(self, num_sparse: int, num_dense_decodes: int) -> None:
        self.steps.append((num_sparse, num_dense_decodes))


def common_metadata(query_lens, seq_lens, device, gen):
    """vLLM's CommonAttentionMetadata fields that the plan reads (block table
    rows filled with distinct page ids, so a row taken twice or out of order shows)."""
    qsl = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.tensor(query_lens, dtype=torch.int32).cumsum(0)
    seq = torch.tensor(seq_lens, dtype=torch.int32)
    table = torch.randperm(len(seq_lens) * 40, generator=gen).view(len(seq_lens), 40)
    return types.SimpleNamespace(
        num_reqs=len(query_lens),
        query_start_loc_cpu=qsl,
        query_start_loc=qsl.to(device),
        max_seq_len=int(seq.max()),
        _seq_lens_cpu=seq,
        seq_lens=seq.to(device),
        block_table_tensor=table.to(torch.int32).to(device),
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "query_lens, seq_lens",
    [
        ([1, 1, 1], [300, 101, 640]),  # every row sparse
        ([1, 7, 1, 1, 30, 1], [300, 500, 99, 640, 40, 100]),  # prefills, a short decode
        ([5, 1], [100, 100]),  # one sparse row at the end
    ],
    ids=["all-sparse", "mixed", "last-row"],
)
def test_rows_match_the_host_plan(device, query_lens, seq_lens):
    gen = torch.Generator().manual_seed(0)
    common = common_metadata(query_lens, seq_lens, device, gen)
    stats = CountingStats()
    rows = plan_sparse_rows(
        common, types.SimpleNamespace(min_context=MIN_CONTEXT), stats, BLOCK_SIZE
    )
    pairs = enumerate(zip(query_lens, seq_lens, strict=True))
    want = [i for i, (q, s) in pairs if q == 1 and s >= MIN_CONTEXT]
    decodes = sum(q == 1 for q in query_lens)
    assert stats.steps == [(len(want), decodes - len(want))]
    qsl = common.query_start_loc_cpu
    assert rows.all_sparse == (len(want) == len(query_lens))
    for name in ("token_idx", "seq_lens", "block_table"):
        assert getattr(rows, name).device.type == device, name
    assert rows.token_idx.dtype == torch.long
    assert rows.token_idx.cpu().tolist() == [int(qsl[i]) for i in want]
    assert rows.seq_lens.cpu().tolist() == [seq_lens[i] for i in want]
    assert torch.equal(rows.block_table.cpu(), common.block_table_tensor.cpu()[want])
    assert rows.max_pages == -(-max(seq_lens[i] for i in want) // BLOCK_SIZE)


@pytest.mark.parametrize("device", DEVICES)
def test_no_rows_when_every_context_is_short(device):
    gen = torch.Generator().manual_seed(0)
    common = common_metadata([1, 3], [60, 99], device, gen)
    stats = CountingStats()
    config = types.SimpleNamespace(min_context=MIN_CONTEXT)
    assert plan_sparse_rows(common, config, stats, BLOCK_SIZE) is None
    assert stats.steps == [(0, 1)]
