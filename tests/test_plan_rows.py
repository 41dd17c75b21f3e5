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


class DeviceLens:
    """A device seq_lens stand-in whose host copy is counted (each one
    waits for the device on CUDA)."""

    def __init__(self, values) -> None:
        self.values = torch.tensor(values, dtype=torch.int32)
        self.copies = 0

    def __getitem__(self, index):
        return self

    def cpu(self):
        self.copies += 1
        return self.values


def host_lens_metadata(device_lens, exact_host=None, upper_bound=None):
    common = types.SimpleNamespace(num_reqs=3, seq_lens=DeviceLens(device_lens))
    if exact_host is not None:
        common._seq_lens_cpu = torch.tensor(exact_host, dtype=torch.int32)
    if upper_bound is not None:
        common.seq_lens_cpu_upper_bound = torch.tensor(upper_bound, dtype=torch.int32)
    return common


@pytest.mark.parametrize(
    "exact_host, upper_bound, exact, want, copies",
    [
        ([5, 6, 7], [8, 9, 10], False, [5, 6, 7], 0),  # v1 runner: its host copy
        (None, [8, 9, 10], False, [8, 9, 10], 0),  # v2 runner, 0.32: the host bound
        (None, [8, 9, 10], True, [1, 2, 3], 1),  # speculative decoding: exact lengths
        (None, None, False, [1, 2, 3], 1),  # nothing on the host: the copy
    ],
    ids=["v1-host-copy", "v2-upper-bound", "exact-asked", "device-only"],
)
def test_host_lengths_do_not_wait_for_the_device(exact_host, upper_bound, exact, want, copies):
    """The v2 runner gives no `_seq_lens_cpu`: the plan reads vLLM's host
    upper bound instead of copying the device tensor (which made every long
    step wait for the previous step's forward), unless exact lengths are asked."""
    from prhs_vllm import _compat

    common = host_lens_metadata([1, 2, 3], exact_host, upper_bound)
    got = _compat.seq_lens_host(common, exact=exact)
    assert got.tolist() == want
    assert common.seq_lens.copies == copies


@pytest.mark.parametrize("exact_lens", [False, True])
def test_plan_decides_on_the_lengths_it_is_given(exact_lens):
    """A row whose host upper bound reaches min_context but whose real length
    does not: sparse on the bound, dense when exact lengths are asked."""
    gen = torch.Generator().manual_seed(0)
    common = common_metadata([1, 1], [MIN_CONTEXT - 2, 300], "cpu", gen)
    del common._seq_lens_cpu
    common.seq_lens_cpu_upper_bound = torch.tensor([MIN_CONTEXT + 1, 300], dtype=torch.int32)
    stats = CountingStats()
    config = types.SimpleNamespace(min_context=MIN_CONTEXT)
    rows = plan_sparse_rows(common, config, stats, BLOCK_SIZE, exact_lens=exact_lens)
    assert stats.steps == ([(1, 1)] if exact_lens else [(2, 0)])
    assert rows.all_sparse == (not exact_lens)
