"""The prhs CPU backend classes driven step by step without an engine.

Like vLLM's tests/v1/attention/test_attention_backends.py: a minimal VllmConfig,
hand-built CommonAttentionMetadata, a fake layer, and per step
``do_kv_cache_update`` then ``forward``. vLLM's plain CPU_ATTN impl runs beside
ours on the same inputs (its own KV cache), and an fp32 SDPA over each
request's contiguous K/V is the reference.
"""

from __future__ import annotations

import copy
import json
import types
from dataclasses import dataclass, field

import pytest
import torch
from tolerances import tol
from vllm.config import CacheConfig, ModelConfig, VllmConfig, set_current_vllm_config
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackendImpl,
    CPUAttentionMetadataBuilder,
    _get_attn_isa,
)
from vllm.v1.kv_cache_interface import FullAttentionSpec

from prhs_vllm import metrics
from prhs_vllm.backend.common import PrhsMetadata, layer_selection_params
from prhs_vllm.backend.cpu import PrhsCpuAttentionImpl, PrhsCpuAttentionMetadataBuilder
from prhs_vllm.config import PrhsConfigError
from prhs_vllm.ops import select_pages

BLOCK_SIZE = 32
NUM_HEADS = 8
NUM_KV_HEADS = 2  # GQA groups of 4
HEAD_DIM = 64
SCALE = HEAD_DIM**-0.5
MAX_MODEL_LEN = 4096
NUM_PAGES = 200
TABLE_WIDTH = MAX_MODEL_LEN // BLOCK_SIZE  # wider than any context, like vLLM's
LAYER_INDEX = 5
LAYER_NAME = f"model.layers.{LAYER_INDEX}.self_attn.attn"

FULL_BUDGET = {"budget": 1.0, "delta": 0.0, "min_context": 0, "dense_layers": []}
SPARSE = {
    "budget": 0.25,
    "delta": 0.05,
    "over_budget": "cap",
    "sink_tokens": 32,
    "local_tokens": 64,
    "min_context": 256,
    "dense_layers": [],
}
NO_SPARSE_ROWS = {**SPARSE, "min_context": 10**9}
DENSE_LAYER = {**SPARSE, "dense_layers": [1, LAYER_INDEX]}

REUSE = {**SPARSE, "reuse_tau": 0.9, "reuse_max_age": 4, "reuse_slots": 64}
DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float32, id="fp32")]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------- engine-less setup


@pytest.fixture(scope="module")
def base_configs(tmp_path_factory):
    """{dtype: VllmConfig} of a tiny LLaMA (config.json only, no weights)."""
    model_dir = tmp_path_factory.mktemp("tiny-llama")
    (model_dir / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_size": NUM_HEADS * HEAD_DIM,
                "head_dim": HEAD_DIM,
                "intermediate_size": 1024,
                "num_attention_heads": NUM_HEADS,
                "num_key_value_heads": NUM_KV_HEADS,
                "num_hidden_layers": 8,
                "vocab_size": 1024,
                "max_position_embeddings": MAX_MODEL_LEN,
                "rms_norm_eps": 1e-5,
                "torch_dtype": "bfloat16",
            }
        )
    )
    configs = {}
    for dtype in (torch.bfloat16, torch.float32):
        model_config = ModelConfig(
            model=str(model_dir), dtype=dtype, max_model_len=MAX_MODEL_LEN, skip_tokenizer_init=True
        )
        configs[dtype] = VllmConfig(
            model_config=model_config, cache_config=CacheConfig(block_size=BLOCK_SIZE)
        )
    return configs


def with_prhs(base: VllmConfig, prhs: dict) -> VllmConfig:
    """The same engine config with ``--additional-config '{"prhs": {...}}'``."""
    config = copy.copy(base)
    config.additional_config = {"prhs": dict(prhs)}
    return config


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op / OpenMP thread: the kernels here are small, and on a loaded
    2-core machine OpenMP barriers made the 2K-step test 30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fresh_stats(tmp_path, monkeypatch):
    """A fresh metrics accumulator per test, and stats files under tmp_path."""
    monkeypatch.setenv(metrics.STATS_DIR_ENV, str(tmp_path / "prhs-stats"))
    metrics._STATS = None
    yield
    metrics._STATS = None


def fake_layer(dtype, layer_name=LAYER_NAME):
    return types.SimpleNamespace(
        layer_name=layer_name,
        _k_scale_float=1.0,
        _v_scale_float=1.0,
        _k_scale=torch.tensor(1.0),
        _v_scale=torch.tensor(1.0),
        isa=_get_attn_isa(dtype, BLOCK_SIZE, HEAD_DIM),
    )


class Runner:
    """One impl + builder + KV cache [P, Hkv, bs, 2D], stepped like the model runner."""

    def __init__(self, impl_cls, builder_cls, vllm_config, dtype, layer_name=LAYER_NAME):
        spec = FullAttentionSpec(
            block_size=BLOCK_SIZE, num_kv_heads=NUM_KV_HEADS, head_size=HEAD_DIM, dtype=dtype
        )
        with set_current_vllm_config(vllm_config):
            self.impl = impl_cls(NUM_HEADS, HEAD_DIM, SCALE, NUM_KV_HEADS, None, None, "auto")
            self.builder = builder_cls(spec, [layer_name], vllm_config, torch.device("cpu"))
        self.layer = fake_layer(dtype, layer_name)
        self.kv_cache = torch.zeros(NUM_PAGES, NUM_KV_HEADS, BLOCK_SIZE, 2 * HEAD_DIM, dtype=dtype)
        self.metadata = []

    def step(self, batch: Batch) -> torch.Tensor:
        metadata = self.builder.build(0, batch.common)
        self.metadata.append(metadata)
        self.impl.do_kv_cache_update(
            self.layer, batch.key, batch.value, self.kv_cache, batch.common.slot_mapping
        )
        output = torch.full_like(batch.query, float("nan"))
        result = self.impl.forward(
            self.layer, batch.query, batch.key, batch.value, self.kv_cache, metadata, output
        )
        assert result is output or result.data_ptr() == output.data_ptr()
        return output


def prhs_runner(base_configs, dtype, prhs, layer_name=LAYER_NAME):
    return Runner(
        PrhsCpuAttentionImpl,
        PrhsCpuAttentionMetadataBuilder,
        with_prhs(base_configs[dtype], prhs),
        dtype,
        layer_name,
    )


def plain_runner(base_configs, dtype, layer_name=LAYER_NAME):
    return Runner(
        CPUAttentionBackendImpl, CPUAttentionMetadataBuilder, base_configs[dtype], dtype, layer_name
    )


# --------------------------------------------------------------------------- workloads


@dataclass
class Spec:
    """A named batch schedule: per step, (request, new tokens) rows in batch order."""

    name: str
    steps: list[list[tuple[str, int]]]
    alloc: str = "shuffled"  # page allocation: "shuffled" free list, or "in-order"
    pad_tokens: int = 0  # padding tokens after the real ones (slot -1)


@dataclass
class Row:
    request: str
    start: int  # first token of the row in the step's query
    num_new: int
    seq_len: int  # context length after this step (the new tokens included)


@dataclass
class Batch:
    query: torch.Tensor  # [T + pad, Hq, D]
    key: torch.Tensor  # [T + pad, Hkv, D]
    value: torch.Tensor
    common: CommonAttentionMetadata
    rows: list[Row]
    keys: dict[str, torch.Tensor]  # contiguous K/V of each row's request so far
    values: dict[str, torch.Tensor]
    pages: dict[str, list[int]]


@dataclass
class Workload:
    spec: Spec
    dtype: torch.dtype
    gen: torch.Generator
    keys: dict = field(default_factory=dict)
    values: dict = field(default_factory=dict)
    pages: dict = field(default_factory=dict)
    topics: dict = field(default_factory=dict)
    steady: bool = False  # each request's queries stay close to one direction
    bases: dict = field(default_factory=dict)

    def __post_init__(self):
        free = torch.arange(1, NUM_PAGES)  # page 0 is the null page: never handed out
        if self.spec.alloc == "shuffled":
            free = free[torch.randperm(len(free), generator=self.gen)]
        self.free = free.tolist()

    def _new_kv(self, request, start, count):
        """Keys drift with a per-page 'topic' so pages differ in attention mass."""
        topics = self.topics.setdefault(
            request, torch.randn(TABLE_WIDTH, NUM_KV_HEADS, HEAD_DIM, generator=self.gen)
        )
        pos = torch.arange(start, start + count)
        key = (
            torch.randn(count, NUM_KV_HEADS, HEAD_DIM, generator=self.gen)
            + topics[pos // BLOCK_SIZE]
        )
        value = torch.randn(count, NUM_KV_HEADS, HEAD_DIM, generator=self.gen)
        return key.to(self.dtype), value.to(self.dtype)

    def batches(self):
        for step in self.spec.steps:
            yield self._batch(step)

    def _batch(self, step):
        qs, ks, vs, slots, rows = [], [], [], [], []
        start = 0
        for request, num_new in step:
            old = self.keys.get(request, torch.empty(0, NUM_KV_HEADS, HEAD_DIM, dtype=self.dtype))
            seq_len = len(old) + num_new
            pages = self.pages.setdefault(request, [])
            while len(pages) < cdiv(seq_len, BLOCK_SIZE):
                pages.append(self.free.pop(0))
            key, value = self._new_kv(request, len(old), num_new)
            self.keys[request] = torch.cat([old, key])
            self.values[request] = torch.cat([self.values.get(request, old[:0]), value])
            pos = torch.arange(len(old), seq_len)
            slots.append(torch.tensor(pages)[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE)
            q = torch.randn(num_new, NUM_HEADS, HEAD_DIM, generator=self.gen)
            if self.steady:
                base = self.bases.setdefault(
                    request, 3 * torch.randn(NUM_HEADS, HEAD_DIM, generator=self.gen)
                )
                q = base + 0.05 * q
            qs.append(q.to(self.dtype))
            ks.append(key)
            vs.append(value)
            rows.append(Row(request, start, num_new, seq_len))
            start += num_new
        pad = self.spec.pad_tokens
        num_tokens = start
        query = torch.cat(qs + [torch.randn(pad, NUM_HEADS, HEAD_DIM).to(self.dtype)])
        key = torch.cat(ks + [torch.randn(pad, NUM_KV_HEADS, HEAD_DIM).to(self.dtype)])
        value = torch.cat(vs + [torch.randn(pad, NUM_KV_HEADS, HEAD_DIM).to(self.dtype)])
        slot_mapping = torch.cat(slots + [torch.full((pad,), -1)]).to(torch.int64)

        qsl = torch.tensor([0] + [r.start + r.num_new for r in rows], dtype=torch.int32)
        seq_lens = torch.tensor([r.seq_len for r in rows], dtype=torch.int32)
        table = torch.zeros(len(rows), TABLE_WIDTH, dtype=torch.int32)
        for i, r in enumerate(rows):
            table[i, : len(self.pages[r.request])] = torch.tensor(self.pages[r.request])
        common = CommonAttentionMetadata(
            query_start_loc=qsl,
            query_start_loc_cpu=qsl.clone(),
            seq_lens=seq_lens,
            num_reqs=len(rows),
            num_actual_tokens=num_tokens,
            max_query_len=max(r.num_new for r in rows),
            max_seq_len=int(seq_lens.max()),
            block_table_tensor=table,
            slot_mapping=slot_mapping,
        )
        return Batch(
            query,
            key,
            value,
            common,
            rows,
            keys={r.request: self.keys[r.request] for r in rows},
            values={r.request: self.values[r.request] for r in rows},
            pages={r.request: list(self.pages[r.request]) for r in rows},
        )


SPECS = [
    Spec(
        "pure-decode",
        [[("a", 700), ("b", 1000), ("c", 300)]] + [[("a", 1), ("b", 1), ("c", 1)]] * 3,
    ),
    Spec(
        "mixed-prefill-decode",
        [
            [("a", 600)],
            [("a", 1), ("b", 300)],
            [("b", 1), ("a", 1), ("c", 45)],
            [("c", 1), ("a", 1), ("b", 1)],
        ],
        pad_tokens=3,
    ),
    Spec(
        "chunked-prefill",
        [
            [("a", 384), ("b", 500)],  # first chunk of a's 700-token prompt
            [("a", 316), ("b", 1)],  # second chunk
            [("a", 1), ("b", 1)],
            [("a", 1), ("b", 1)],
        ],
    ),
    Spec(
        "unaligned-context",  # 257, 319, 511: decodes cross into new pages
        [[("a", 257), ("b", 319), ("c", 511)]] + [[("a", 1), ("b", 1), ("c", 1)]] * 3,
    ),
    Spec(
        "in-order-pages",
        [[("a", 450), ("b", 800)]] + [[("a", 1), ("b", 1)]] * 3,
        alloc="in-order",
    ),
]
SPEC_PARAMS = [pytest.param(s, id=s.name) for s in SPECS]


# --------------------------------------------------------------------------- references


def reference(batch: Batch, row: Row, keep=None) -> torch.Tensor:
    """fp32 SDPA of one row over its request's contiguous K/V: causal for the new
    tokens; with ``keep`` [Hkv, M] only the kept pages' tokens."""
    length = row.seq_len
    query = batch.query[row.start : row.start + row.num_new].float().transpose(0, 1)
    group = NUM_HEADS // NUM_KV_HEADS
    keys = batch.keys[row.request][:length].float().repeat_interleave(group, 1).transpose(0, 1)
    values = batch.values[row.request][:length].float().repeat_interleave(group, 1).transpose(0, 1)
    q_pos = torch.arange(length - row.num_new, length)
    mask = (torch.arange(length)[None, :] <= q_pos[:, None])[None]  # [1, n, L]
    if keep is not None:
        page_kept = keep.repeat_interleave(group, 0)[:, torch.arange(length) // BLOCK_SIZE]
        mask = mask & page_kept[:, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, keys, values, attn_mask=mask, scale=SCALE
    )
    return out.transpose(0, 1)  # [n, Hq, D]


def sparse_rows(batch: Batch, min_context: int) -> list[Row]:
    return [r for r in batch.rows if r.num_new == 1 and r.seq_len >= max(min_context, 1)]


def expected_selection(runner: Runner, batch: Batch, row: Row):
    """select_pages for one sparse row, on the impl's own page summaries."""
    summaries = runner.impl._summaries
    cfg = runner.impl.prhs_config
    table = batch.common.block_table_tensor[batch.rows.index(row)][None]
    return select_pages(
        batch.query[row.start : row.start + 1],
        summaries.key_sum,
        summaries.key_min,
        summaries.key_max,
        table,
        torch.tensor([row.seq_len], dtype=torch.int32),
        layer_selection_params(
            cfg, runner.impl._layer_index, runner.impl._num_layers, BLOCK_SIZE, SCALE
        ),
    )


def check_summaries(runner: Runner, batch: Batch, dtype):
    """The impl's page summaries equal a recomputation from the requests' keys."""
    summaries = runner.impl._summaries
    assert summaries is not None
    for request, pages in batch.pages.items():
        keys = batch.keys[request].double()
        for j, page in enumerate(pages):
            chunk = keys[j * BLOCK_SIZE : (j + 1) * BLOCK_SIZE]
            torch.testing.assert_close(
                summaries.key_sum[page].double(), chunk.sum(0), atol=tol(dtype).sum_atol, rtol=0
            )
            assert torch.equal(summaries.key_min[page].double(), chunk.amin(0)), (request, j)
            assert torch.equal(summaries.key_max[page].double(), chunk.amax(0)), (request, j)


def rows_of(output: torch.Tensor, row: Row) -> torch.Tensor:
    return output[row.start : row.start + row.num_new]


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("dtype", DTYPES)
def test_split_kv_cache_returns_written_keys_and_values(base_configs, dtype, gen):
    """split_kv_cache must read back what CPU_ATTN's cache write stored."""
    runner = prhs_runner(base_configs, dtype, FULL_BUDGET)
    tokens = 70
    key = torch.randn(tokens, NUM_KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
    value = torch.randn(tokens, NUM_KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
    pages = [7, 3, 11]
    pos = torch.arange(tokens)
    slots = torch.tensor(pages)[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
    runner.impl.do_kv_cache_update(runner.layer, key, value, runner.kv_cache, slots)
    key_cache, value_cache = runner.impl.split_kv_cache(runner.kv_cache)
    read_k = key_cache[torch.tensor(pages)[pos // BLOCK_SIZE], :, pos % BLOCK_SIZE]
    read_v = value_cache[torch.tensor(pages)[pos // BLOCK_SIZE], :, pos % BLOCK_SIZE]
    isa = runner.layer.isa
    assert torch.equal(read_v, value), f"value layout (isa {isa})"
    assert torch.equal(read_k, key), f"key layout (isa {isa})"


@pytest.mark.parametrize("spec", SPECS[:2], ids=lambda s: s.name)
def test_fused_cache_write_stores_what_vllm_writes(base_configs, spec, gen, monkeypatch):
    """A platform that fuses the cache write with the summary update
    (``fused_cache_write``; the torch reference stands in for the csrc op
    here) leaves the cache bit for bit as vLLM's own write does, the same
    summaries and the same outputs, and the layer writes through it alone."""
    from prhs_vllm import ops
    from prhs_vllm.ops.ref import write_cache_and_summaries

    calls = []

    def reference_writer(key, value, key_cache, value_cache, slot_mapping, *summaries):
        def write(key, value, slot_mapping):
            calls.append(slot_mapping.shape[0])
            write_cache_and_summaries(key, value, key_cache, value_cache, slot_mapping, *summaries)

        return write

    monkeypatch.setattr(ops, "cache_writer", reference_writer)
    dtype = torch.bfloat16
    fused, plain = (prhs_runner(base_configs, dtype, SPARSE) for _ in range(2))
    fused.impl.fused_cache_write = True
    for batch in Workload(spec, dtype, gen).batches():
        got, want = fused.step(batch), plain.step(batch)
        assert torch.equal(fused.kv_cache, plain.kv_cache)
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)  # padding: nan
        for name in ("key_sum", "key_min", "key_max"):
            assert torch.equal(
                getattr(fused.impl._summaries, name), getattr(plain.impl._summaries, name)
            ), name
    assert len(calls) == len(spec.steps)
    assert any(m.sparse is not None for m in fused.metadata), "no sparse step ran"


def test_cache_writer_declines_what_its_op_does_not_serve(gen):
    """``ops.cache_writer`` is the csrc op or None: on CPU tensors (float32 or
    int8 summaries; the GPU tests cover int4 and a cache of another dtype than
    the rows) the layer falls back to the platform's write plus ``summary_updater``."""
    from prhs_vllm import ops
    from prhs_vllm.backend.common import PageSummaries

    key = torch.randn(4, NUM_KV_HEADS, HEAD_DIM, generator=gen).to(torch.bfloat16)
    cache = torch.zeros(NUM_PAGES, NUM_KV_HEADS, BLOCK_SIZE, 2 * HEAD_DIM, dtype=torch.bfloat16)
    caches = (cache[..., :HEAD_DIM], cache[..., HEAD_DIM:])
    slots = torch.arange(4)
    for dtype in ("float32", "int8"):
        s = PageSummaries(NUM_PAGES, NUM_KV_HEADS, HEAD_DIM, "cpu", dtype)
        sums = (s.key_sum, s.key_min, s.key_max)
        assert ops.cache_writer(key, key, *caches, slots, *sums) is None
        assert ops.cache_writer(key.float(), key.float(), *caches, slots, *sums) is None


def test_summaries_follow_a_reallocated_kv_cache(base_configs, gen):
    """vLLM allocates the KV cache twice (profiling, then for real): the summary
    update bound at a layer's first write must move to the summaries of the
    cache in use, and fold its keys exactly as the reference does."""
    from prhs_vllm.backend.common import PageSummaries
    from prhs_vllm.ops.ref import update_page_summaries

    runner = prhs_runner(base_configs, torch.float32, FULL_BUDGET)

    def write(kv_cache, tokens):
        key = torch.randn(tokens, NUM_KV_HEADS, HEAD_DIM, generator=gen)
        slots = torch.randperm(kv_cache.shape[0], generator=gen)[: -(-tokens // BLOCK_SIZE)]
        pos = torch.arange(tokens)
        slots = slots[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
        runner.impl.do_kv_cache_update(runner.layer, key, key, kv_cache, slots)
        return key, slots

    write(runner.kv_cache, 40)
    first = runner.impl._summaries
    num_pages = NUM_PAGES + 4
    for _ in range(2):  # a cache of a new size, then another cache of that size
        cache = torch.zeros(num_pages, *runner.kv_cache.shape[1:])
        key, slots = write(cache, 50)
        summaries = runner.impl._summaries
        assert summaries is not first and summaries.num_pages == num_pages
        expected = PageSummaries(num_pages, NUM_KV_HEADS, HEAD_DIM, "cpu")
        update_page_summaries(
            key, slots, BLOCK_SIZE, expected.key_sum, expected.key_min, expected.key_max
        )
        written = (slots // BLOCK_SIZE).unique()
        for name in ("key_sum", "key_min", "key_max"):
            assert torch.equal(getattr(summaries, name)[written], getattr(expected, name)[written])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", SPEC_PARAMS)
def test_full_budget_equals_dense(base_configs, spec, dtype, gen):
    """(a) budget 1, delta 0, min_context 0: every decode row runs the sparse path
    over all pages and matches the reference and vLLM's CPU_ATTN."""
    prhs = prhs_runner(base_configs, dtype, FULL_BUDGET)
    plain = plain_runner(base_configs, dtype)
    t = tol(dtype)
    num_sparse = 0
    for batch in Workload(spec, dtype, gen).batches():
        out = prhs.step(batch)
        out_plain = plain.step(batch)
        metadata = prhs.metadata[-1]
        assert isinstance(metadata, PrhsMetadata)
        expected_sparse = sparse_rows(batch, 0)
        planned = [] if metadata.sparse is None else metadata.sparse.token_idx.tolist()
        assert planned == [r.start for r in expected_sparse]
        num_sparse += len(planned)
        for row in batch.rows:
            got = rows_of(out, row).float()
            what = f"{row.request} (new {row.num_new}, len {row.seq_len})"
            torch.testing.assert_close(
                got,
                reference(batch, row),
                **t.close(),
                msg=lambda m, what=what: f"vs reference, {what}: {m}",
            )
            torch.testing.assert_close(
                got,
                rows_of(out_plain, row).float(),
                **t.close(),
                msg=lambda m, what=what: f"vs CPU_ATTN, {what}: {m}",
            )
    assert num_sparse > 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", SPEC_PARAMS)
def test_no_sparse_rows_is_bit_identical_to_cpu_attn(base_configs, spec, dtype, gen):
    """(b) min_context above every context: the step runs exactly CPU_ATTN."""
    prhs = prhs_runner(base_configs, dtype, NO_SPARSE_ROWS)
    plain = plain_runner(base_configs, dtype)
    for batch in Workload(spec, dtype, gen).batches():
        out = prhs.step(batch)
        out_plain = plain.step(batch)
        assert prhs.metadata[-1].sparse is None
        num_tokens = batch.common.num_actual_tokens
        assert torch.equal(out[:num_tokens], out_plain[:num_tokens])
    assert torch.equal(prhs.kv_cache, plain.kv_cache)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", SPEC_PARAMS)
def test_sparse_rows_equal_oracle_on_selected_pages(base_configs, spec, dtype, gen):
    """(c) budget 0.25, delta 0.05: sparse rows attend exactly to the pages that
    select_pages keeps; prefill and short decode rows are CPU_ATTN's, bit for bit.
    (e) the metrics accumulator counts the sparse rows."""
    prhs = prhs_runner(base_configs, dtype, SPARSE)
    plain = plain_runner(base_configs, dtype)
    t = tol(dtype)
    sparse_count = dense_decodes = sparse_steps = 0
    pages_kept = pages_total = dropped_any = 0
    for batch in Workload(spec, dtype, gen).batches():
        out = prhs.step(batch)
        out_plain = plain.step(batch)
        check_summaries(prhs, batch, dtype)
        sparse = sparse_rows(batch, SPARSE["min_context"])
        sparse_count += len(sparse)
        sparse_steps += bool(sparse)
        dense_decodes += sum(r.num_new == 1 for r in batch.rows) - len(sparse)
        for row in batch.rows:
            got = rows_of(out, row)
            what = f"{row.request} (new {row.num_new}, len {row.seq_len})"
            if row not in sparse:
                assert torch.equal(got, rows_of(out_plain, row)), f"dense row {what}"
                continue
            sel = expected_selection(prhs, batch, row)
            keep = sel.keep[0]
            num_pages = cdiv(row.seq_len, BLOCK_SIZE)
            pages_kept += int(keep.sum())
            pages_total += num_pages * NUM_KV_HEADS
            dropped_any += int(keep.sum()) < num_pages * NUM_KV_HEADS
            torch.testing.assert_close(
                got.float(),
                reference(batch, row, keep),
                **t.close(),
                msg=lambda m, what=what: f"sparse row {what}: {m}",
            )
    assert sparse_count > 0 and dropped_any > 0, "the spec must exercise page dropping"

    totals = metrics.process_stats().totals()
    assert totals["prhs_sparse_decode_tokens"] == sparse_count
    assert totals["prhs_dense_decode_tokens"] == dense_decodes
    assert totals["prhs_sparse_steps"] == sparse_steps
    assert totals["prhs_sparse_layer_rows"] == sparse_count
    assert totals["prhs_head_selections"] == sparse_count * NUM_KV_HEADS
    assert totals["prhs_context_pages"] == pages_total
    assert totals["prhs_pages_kept"] == pages_kept
    assert 0 < totals["prhs_est_dropped_mass_sum"] <= totals["prhs_head_selections"]
    # The certified bound is computed only with the certified stop rule or in audit mode.
    assert totals["prhs_certified_dropped_mass_sum"] == 0
    # A fixed budget of 1/4 binds on some selections, none reads every page.
    assert 0 < totals["prhs_capped_selections"] <= totals["prhs_head_selections"]
    assert totals["prhs_all_pages_selections"] == 0
    assert totals["prhs_est_dropped_mass_le_0.5"] <= totals["prhs_scored_selections"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", SPEC_PARAMS[:2])
def test_dense_layer_is_bit_identical_to_cpu_attn(base_configs, spec, dtype, gen):
    """(d) a layer listed in dense_layers runs CPU_ATTN even on sparse rows."""
    prhs = prhs_runner(base_configs, dtype, DENSE_LAYER)
    plain = plain_runner(base_configs, dtype)
    planned = 0
    for batch in Workload(spec, dtype, gen).batches():
        out = prhs.step(batch)
        out_plain = plain.step(batch)
        planned += prhs.metadata[-1].sparse is not None  # the builder still plans them
        num_tokens = batch.common.num_actual_tokens
        assert torch.equal(out[:num_tokens], out_plain[:num_tokens])
    assert planned > 0
    assert torch.equal(prhs.kv_cache, plain.kv_cache)
    assert metrics.process_stats().totals()["prhs_sparse_layer_rows"] == 0


def test_capture_metadata_is_dense_and_uncounted(base_configs, gen):
    """vLLM's full graphs are captured from build_for_cudagraph_capture: every
    row dense there (sparse steps never replay them), and no step counted."""
    prhs = prhs_runner(base_configs, torch.float32, SPARSE)
    batch = next(b for b in Workload(SPECS[0], torch.float32, gen).batches() if sparse_rows(b, 256))
    captured = prhs.builder.build_for_cudagraph_capture(batch.common)
    assert isinstance(captured, PrhsMetadata) and captured.sparse is None
    assert metrics.process_stats().totals()["prhs_dense_decode_tokens"] == 0
    assert prhs.builder.build(0, batch.common).sparse is not None  # the same batch, not captured


def test_graph_rows_equal_the_host_planned_rows(base_configs, gen, monkeypatch):
    """A step captured with its rows as device data (vLLM's full graphs,
    backend/full_graph.py) and then run with the rows a later build writes
    equals the host-planned step: sparse rows attend over the same pages,
    the others keep the dense kernel's result, and the device counters count
    the sparse rows. (vLLM's CPU kernel reads the full lengths here; the GPU
    test runs FlashAttention with the sparse rows at length 0.)"""
    from prhs_vllm.backend import common

    monkeypatch.setattr(common, "full_graph_refusal", lambda vllm_config: None)
    monkeypatch.setattr(common, "dense_rows_metadata", lambda base, lens: base)
    prhs = {**SPARSE, "min_context": 500, "full_graph_max_rows": 8}
    config = with_prhs(base_configs[torch.float32], prhs)
    config.scheduler_config.max_num_seqs = 8
    host = Runner(PrhsCpuAttentionImpl, PrhsCpuAttentionMetadataBuilder, config, torch.float32)
    stats_before = metrics.process_stats().totals()
    graph = Runner(PrhsCpuAttentionImpl, PrhsCpuAttentionMetadataBuilder, config, torch.float32)
    assert graph.builder._device_rows is not None
    spec = Spec(
        "decode", [[("a", 700), ("b", 300), ("c", 900)]] + [[("a", 1), ("b", 1), ("c", 1)]] * 3
    )
    graph_steps = sparse_seen = 0
    for batch in Workload(spec, torch.float32, gen).batches():
        want = host.step(batch)
        if batch.common.max_query_len > 1:
            graph.step(batch)
            continue
        captured = graph.builder.build_for_cudagraph_capture(batch.common)
        assert captured.graph_rows is not None
        graph.builder.build(0, batch.common)  # the replay's build writes the rows
        graph.impl.do_kv_cache_update(
            graph.layer, batch.key, batch.value, graph.kv_cache, batch.common.slot_mapping
        )
        got = torch.full_like(batch.query, float("nan"))
        graph.impl.forward(
            graph.layer, batch.query, batch.key, batch.value, graph.kv_cache, captured, got
        )
        graph_steps += 1
        sparse = sparse_rows(batch, 500)
        sparse_seen += len(sparse)
        for row in batch.rows:
            if row in sparse:
                torch.testing.assert_close(rows_of(got, row), rows_of(want, row))
            else:
                assert torch.equal(rows_of(got, row), rows_of(want, row)), row.request
    assert graph_steps == 3 and sparse_seen == 6  # a and c, three steps
    totals = metrics.process_stats().totals()
    # Both runners count into the process's stats: the host one as before, the
    # graph one on the device; together twice the sparse rows.
    assert totals["prhs_sparse_layer_rows"] - stats_before["prhs_sparse_layer_rows"] == 12
    assert totals["prhs_head_selections"] == 12 * NUM_KV_HEADS


@pytest.mark.parametrize("dtype", DTYPES)
def test_metrics_off_records_no_layer_stats(base_configs, dtype, gen):
    prhs = prhs_runner(base_configs, dtype, {**SPARSE, "metrics": False})
    for batch in Workload(SPECS[0], dtype, gen).batches():
        prhs.step(batch)
    totals = metrics.process_stats().totals()
    assert totals["prhs_sparse_decode_tokens"] == 3 * 3  # steps are still counted
    assert totals["prhs_sparse_layer_rows"] == 0


def test_incremental_summaries_over_2k_decode_steps(base_configs, gen):
    """A 2K-token context written one token per step (two requests interleaved,
    shuffled pages): summaries built incrementally equal a recomputation, and a
    sparse decode on top still matches the oracle on its selected pages."""
    dtype = torch.bfloat16
    prhs = prhs_runner(base_configs, dtype, SPARSE)
    workload = Workload(Spec("incremental", []), dtype, gen)
    steps = 2048
    batch = None
    for i in range(steps):
        rows = [("long", 1)] + ([("short", 1)] if i % 4 == 0 else [])
        batch = workload._batch(rows)
        prhs.impl.do_kv_cache_update(
            prhs.layer, batch.key, batch.value, prhs.kv_cache, batch.common.slot_mapping
        )
    assert batch.rows[0].seq_len == steps
    check_summaries(prhs, batch, dtype)

    # One decode step on top of the incrementally built cache.
    batch = workload._batch([("long", 1), ("short", 1)])
    out = prhs.step(batch)
    check_summaries(prhs, batch, dtype)
    assert prhs.metadata[-1].sparse.token_idx.tolist() == [0, 1]
    for row in batch.rows:
        sel = expected_selection(prhs, batch, row)
        assert int(sel.keep.sum()) < cdiv(row.seq_len, BLOCK_SIZE) * NUM_KV_HEADS
        expected = reference(batch, row, sel.keep[0])
        torch.testing.assert_close(rows_of(out, row).float(), expected, **tol(dtype).close())


def test_audit_mode_records_true_dropped_mass(base_configs, gen):
    """audit: true measures dense attention for every sparse step; with certified
    control and exact scoring of every page, no step drops more than delta and
    the certified bound holds."""
    dtype = torch.float32
    cfg = {**SPARSE, "budget": 1.0, "delta": 0.05, "delta_control": "certified",
           "rerank": 8.0, "audit": True}  # fmt: skip
    prhs = prhs_runner(base_configs, dtype, cfg)
    for batch in Workload(SPECS[0], dtype, gen).batches():
        prhs.step(batch)
    totals = metrics.process_stats().totals()
    audited = totals["prhs_audit_selections"]
    assert audited == totals["prhs_head_selections"] > 0
    assert totals["prhs_audit_over_delta"] == 0
    assert totals["prhs_audit_bound_violations"] == 0
    true = totals["prhs_audit_true_dropped_mass_sum"] / audited
    cert = totals["prhs_certified_dropped_mass_sum"] / audited
    assert 0 < true <= cert + 1e-6 and true <= 0.05
    assert "true_dropped=" in metrics.format_summary(totals)


def test_head_block_pages_must_match_the_kv_heads(base_configs):
    with pytest.raises(PrhsConfigError, match=r"head_block_pages\[3\] has 1 sizes"):
        prhs_runner(base_configs, torch.float32, {**SPARSE, "head_block_pages": {3: [2]}})
    with pytest.raises(PrhsConfigError, match="names layer 9, but the model has 8"):
        sizes = [1] * NUM_KV_HEADS
        prhs_runner(base_configs, torch.float32, {**SPARSE, "head_block_pages": {9: sizes}})


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param({"head_block_pages": {LAYER_INDEX: [1, 4]}}, id="per-head-blocks"),
        pytest.param({"psaw_start_layer": 0}, id="psaw"),
        pytest.param({"rerank": 1.5, "estimator": "quest"}, id="rerank"),
        pytest.param({"centroid_dtype": "int8"}, id="int8-centroids"),
        pytest.param({"centroid_dtype": "int4", "estimator": "centroid"}, id="int4-centroids"),
        pytest.param({**REUSE, "etf_start_layer": 0}, id="reuse-etf"),
    ],
)
def test_selectors_in_the_backend_equal_oracle_on_kept_pages(base_configs, gen, extra):
    """Each selector switched on in YAML runs through the backend, which still
    attends exactly over what it selected."""
    dtype = torch.float32
    prhs = prhs_runner(base_configs, dtype, {**SPARSE, **extra})
    for batch in Workload(SPECS[0], dtype, gen).batches():
        out = prhs.step(batch)
    params = prhs.impl._params
    assert params is not None
    if "head_block_pages" in extra:
        assert params.block_pages == (1, 4)
    if "psaw_start_layer" in extra:
        assert params.window_start > 0
    if "centroid_dtype" in extra:
        assert not params.exact_centroid
        assert prhs.impl._summaries.key_min.dtype == torch.bfloat16
    if "reuse_tau" in extra:
        check_kept_pages_attended(prhs, batch, out, dtype)
        return
    for row in sparse_rows(batch, SPARSE["min_context"]):
        summaries = prhs.impl._summaries
        key_cache, _ = prhs.impl.split_kv_cache(prhs.kv_cache)
        sel = select_pages(
            batch.query[row.start : row.start + 1], summaries.key_sum, summaries.key_min,
            summaries.key_max, batch.common.block_table_tensor[batch.rows.index(row)][None],
            torch.tensor([row.seq_len], dtype=torch.int32), params, key_cache=key_cache,
        )  # fmt: skip
        expected = reference(batch, row, sel.keep[0])
        torch.testing.assert_close(rows_of(out, row).float(), expected, **tol(dtype).close())


# --------------------------------------------------------------------------- time reuse


def decode_steps(names, steps):
    return [[(n, 1) for n in names]] * steps


def reused_total():
    return metrics.process_stats().totals()["prhs_reused_selections"]


def check_kept_pages_attended(runner, batch, out, dtype):
    layer_index, keep = runner.metadata[-1].last_keep
    assert layer_index == LAYER_INDEX
    for i, row in enumerate(sparse_rows(batch, SPARSE["min_context"])):
        expected = reference(batch, row, keep[i])
        torch.testing.assert_close(rows_of(out, row).float(), expected, **tol(dtype).close())


def test_reuse_engages_and_attends_over_what_it_kept(base_configs, gen):
    dtype = torch.float32
    prhs = prhs_runner(base_configs, dtype, REUSE)
    spec = Spec("steady", [[("a", 700), ("b", 1000)]] + decode_steps("ab", 10))
    counts = []
    for batch in Workload(spec, dtype, gen, steady=True).batches():
        out = prhs.step(batch)
        counts.append(reused_total())
        if batch.rows[0].num_new == 1:
            check_kept_pages_attended(prhs, batch, out, dtype)
    per_step = [b - a for a, b in zip(counts, counts[1:], strict=False)]
    heads = 2 * NUM_KV_HEADS
    assert per_step[0] == 0, "the first decode step has nothing to reuse"
    # max_age 4: of every 5 steps, 4 reuse.
    assert sum(per_step) >= 0.7 * heads * len(per_step) - heads


def permuted(batch: Batch, order: list[int]) -> Batch:
    """The same step with its rows in another order (query, K/V, metadata)."""
    rows, tokens, start = [], [], 0
    for i in order:
        r = batch.rows[i]
        tokens.append(torch.arange(r.start, r.start + r.num_new))
        rows.append(Row(r.request, start, r.num_new, r.seq_len))
        start += r.num_new
    idx = torch.cat(tokens)
    c = batch.common
    qsl = torch.tensor([0] + [r.start + r.num_new for r in rows], dtype=torch.int32)
    common = CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl.clone(),
        seq_lens=c.seq_lens[order], num_reqs=c.num_reqs, num_actual_tokens=c.num_actual_tokens,
        max_query_len=c.max_query_len, max_seq_len=c.max_seq_len,
        block_table_tensor=c.block_table_tensor[order], slot_mapping=c.slot_mapping[idx],
    )  # fmt: skip
    return Batch(batch.query[idx], batch.key[idx], batch.value[idx], common, rows,
                 batch.keys, batch.values, batch.pages)  # fmt: skip


def test_reuse_state_survives_batch_reordering(base_configs, gen):
    """Rows find their state by page, not batch index: a run whose rows are
    reordered every step reuses and outputs exactly as the ordered run."""
    dtype = torch.float32
    ordered = prhs_runner(base_configs, dtype, REUSE)
    shuffled = prhs_runner(base_configs, dtype, REUSE)
    spec = Spec("steady", [[("a", 700), ("b", 1000), ("c", 600)]] + decode_steps("abc", 8))
    total = 0.0
    reused_steps = 0
    for step, batch in enumerate(Workload(spec, dtype, gen, steady=True).batches()):
        out_a = ordered.step(batch)  # both runners count into one process total
        inc_a, total = reused_total() - total, reused_total()
        order = [(step + k) % 3 for k in (0, 2, 1)] if step % 2 else [2, 0, 1]
        moved = permuted(batch, order)
        out_b = shuffled.step(moved)
        inc_b, total = reused_total() - total, reused_total()
        assert inc_a == inc_b, f"step {step}: {inc_a} reused in order, {inc_b} reordered"
        reused_steps += inc_a > 0
        for row in batch.rows:
            other = next(r for r in moved.rows if r.request == row.request)
            assert torch.equal(rows_of(out_a, row), rows_of(out_b, other)), (step, row.request)
    assert reused_steps >= 4


def test_reuse_never_crosses_requests_or_survives_recompute(base_configs, gen):
    """A finished request's pages go to a new request with the very same query
    direction: its first decode step must score afresh. A preempted request
    recomputed into new pages starts afresh too."""
    dtype = torch.float32
    prhs = prhs_runner(base_configs, dtype, REUSE)
    wl = Workload(Spec("manual", []), dtype, gen, steady=True)
    prhs.step(wl._batch([("a", 700)]))
    for _ in range(3):
        prhs.step(wl._batch([("a", 1)]))
    assert reused_total() > 0
    # "a" finishes; "b" takes its pages (same order) with the same query
    # direction and length, so only the page's new occupant tells them apart.
    freed = wl.pages.pop("a")
    wl.free[:0] = freed
    wl.bases["b"] = wl.bases["a"]
    prhs.step(wl._batch([("b", len(wl.keys["a"]))]))
    before = reused_total()
    prhs.step(wl._batch([("b", 1)]))
    assert reused_total() == before, "b reused a's selection"
    prhs.step(wl._batch([("b", 1)]))
    # "b" is preempted and recomputed into the same pages.
    wl.free[:0] = wl.pages.pop("b")
    length = len(wl.keys.pop("b"))
    wl.values.pop("b")
    prhs.step(wl._batch([("b", length)]))
    before = reused_total()
    prhs.step(wl._batch([("b", 1)]))
    assert reused_total() == before, "b reused state from before its recompute"
    prhs.step(wl._batch([("b", 1)]))
    assert reused_total() > before, "reuse resumes on the next step"


def test_reuse_with_prefix_shared_pages(base_configs, gen):
    """Two requests share their first pages (prefix caching): each keeps its own
    state, keyed by the page it writes, and both reuse independently."""
    dtype = torch.float32
    prhs = prhs_runner(base_configs, dtype, REUSE)
    wl = Workload(Spec("manual", []), dtype, gen, steady=True)
    prhs.step(wl._batch([("a", 700)]))
    shared = 20  # full pages of a's prompt that b maps too
    wl.pages["b"] = list(wl.pages["a"][:shared])
    wl.keys["b"] = wl.keys["a"][: shared * BLOCK_SIZE].clone()
    wl.values["b"] = wl.values["a"][: shared * BLOCK_SIZE].clone()
    prhs.step(wl._batch([("b", 90)]))
    increments, total = [], reused_total()
    for _ in range(4):
        batch = wl._batch([("a", 1), ("b", 1)])
        out = prhs.step(batch)
        increments.append(reused_total() - total)
        total = reused_total()
        check_kept_pages_attended(prhs, batch, out, dtype)
    assert increments[0] == 0, "nothing to reuse on the first decode step"
    assert increments[1:] == [2 * NUM_KV_HEADS] * 3, increments
