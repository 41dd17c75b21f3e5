"""Latency of the whole sparse decode step of one layer -- scoring, selection,
compaction and attention, exactly as the backend runs them (`prhs_vllm.ops`)
-- and of each part, against dense FlashAttention-3 and FlashInfer decode.

LLaMA-3-8B attention (32 query / 8 KV heads, d=128, 16-token pages, bf16),
fixed-budget selection (delta=0: keep up to the cap), random keys. "selection"
is the fused Triton kernel (keep mask and compacted slot lists in one launch);
"scoring_triton" the Triton scoring, which serves what csrc does not. Each time is
the median over CUDA-graph replays (graphs hold several calls over distinct
page sets, so reads come from HBM; ``ops_sparse_decode.time_graph`` hides the
host's launch of each replay); "eager" re-times the whole step without a
graph, which is how it runs inside vLLM today (attention outside graphs).
Page summaries: float32 sum / min / max, or with ``--centroid-dtype int8|int4``
quantized centroid codes inside bf16 boxes (the backend's two layouts).

  python3 benchmarks/ops.py --out benchmarks/results/ops_h100.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ops_sparse_decode import (  # noqa: E402
    BLOCK_SIZE,
    DTYPE,
    HEAD_DIM,
    NUM_KV_HEADS,
    NUM_Q_HEADS,
    Shape,
    load_flash_attn,
    time_graph,
    timing_note,
)

from prhs_vllm import ops  # noqa: E402
from prhs_vllm.ops.ref.quant import (  # noqa: E402
    QuantizedCentroids,
    centroid_bits,
    encode_centroids,
    round_outward_bf16,
    summary_bytes,
)
from prhs_vllm.ops.ref.selection import SelectionParams  # noqa: E402
from prhs_vllm.ops.triton import select_compact  # noqa: E402

COPY_CEILING_GBS = 3040.0
CENTROID_DTYPES = ("float32", "int8", "int4")


def random_summaries(pool: int, gen: torch.Generator, centroid_dtype: str = "float32"):
    """(key_sum, key_min, key_max) of ``pool`` pages in the backend's layout:
    float32 sum / min / max, or quantized centroid codes in a bf16 box."""
    centroid = torch.randn(pool, NUM_KV_HEADS, HEAD_DIM, device="cuda", generator=gen)
    spread = torch.rand(pool, NUM_KV_HEADS, HEAD_DIM, device="cuda", generator=gen)
    if centroid_dtype == "float32":
        return centroid * BLOCK_SIZE, centroid - spread, centroid + spread
    bits = centroid_bits(centroid_dtype)
    centroid, spread = centroid.cpu(), spread.cpu()  # the reference's rounding, on the host
    lo, hi = round_outward_bf16(centroid - spread, centroid + spread)
    codes = encode_centroids(centroid, lo, hi, bits)
    return QuantizedCentroids(codes.cuda(), bits), lo.cuda(), hi.cuda()


def time_eager(fn, replays: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def flashinfer_decode(shape: Shape):
    """A FlashInfer paged decode closure for the shape, or None."""
    try:
        import flashinfer
    except Exception:
        return None
    table = shape.block_table()
    indptr = (
        torch.arange(0, shape.batch + 1, device="cuda", dtype=torch.int32) * shape.pages_per_row
    )
    workspace = torch.empty(128 * 1024 * 1024, dtype=torch.uint8, device="cuda")
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD")
    wrapper.plan(
        indptr,
        table.flatten(),
        torch.full((shape.batch,), BLOCK_SIZE, dtype=torch.int32, device="cuda"),
        NUM_Q_HEADS,
        NUM_KV_HEADS,
        HEAD_DIM,
        BLOCK_SIZE,
        q_data_type=DTYPE,
        kv_data_type=DTYPE,
    )
    kv = torch.stack([shape.fa_key, shape.fa_value], dim=1)  # [P, 2, bs, Hkv, D]
    return lambda: wrapper.run(shape.query, kv)


def bytes_min(batch: int, kept_pages: int, pages: int, centroid_dtype: str) -> int:
    """What the whole step must read: the kept pages' K and V (bf16) and every
    page's summary, for each row and KV head."""
    kept = batch * NUM_KV_HEADS * kept_pages * BLOCK_SIZE * HEAD_DIM * 2 * 2
    return kept + batch * NUM_KV_HEADS * pages * summary_bytes(HEAD_DIM, centroid_dtype)


def bench(
    batch: int, context: int, budget: int, l2: int, replays: int, gen, flash,
    centroid_dtype: str = "float32",
) -> dict:  # fmt: skip
    shape = Shape(batch, context, l2, gen)
    key_sum, key_min, key_max = random_summaries(shape.pool, gen, centroid_dtype)
    table = shape.block_table()
    pages = shape.pages_per_row
    params = SelectionParams(
        block_size=BLOCK_SIZE,
        scale=HEAD_DIM**-0.5,
        budget=1.0 / budget,
        delta=0.0,
        sink_tokens=64,
        local_tokens=256,
        exact_centroid=centroid_dtype == "float32",
    )
    q, seq = shape.query, shape.seq_lens

    scoring_args = (q, key_sum, key_min, key_max, table, seq, BLOCK_SIZE, params.scale, pages)

    def scoring():  # what the backend runs: csrc where it serves the summaries
        return ops.page_logits(*scoring_args)

    def scoring_triton():
        from prhs_vllm.ops.triton import page_logits

        return page_logits(*scoring_args)

    logits = scoring()

    def selection():  # fused: keep mask, compacted slot lists, kept mass, dropped bound
        return select_compact(logits, seq, params)

    sel = selection()
    keep, compact = sel.keep, (sel.kept_slots, sel.num_kept)

    def attention():
        return ops.sparse_decode(
            q, shape.key, shape.value, table, seq, keep, params.scale, compact=compact
        )

    def whole():
        sel = ops.select(q, key_sum, key_min, key_max, table, seq, params, pages)
        return ops.sparse_decode(
            q, shape.key, shape.value, table, seq, sel.keep, params.scale,
            compact=(sel.kept_slots, sel.num_kept),
        )  # fmt: skip

    row = {"batch": batch, "context": context, "budget": f"1/{budget}"}
    row["centroid_dtype"] = centroid_dtype
    row["kept_pages"] = int(keep.sum(-1).float().mean().item())
    for name, fn in [
        ("scoring", scoring),
        ("scoring_triton", scoring_triton),
        ("selection", selection),
        ("attention", attention),
        ("whole", whole),
    ]:
        row[f"{name}_ms"] = time_graph([fn], replays)
    row["whole_eager_ms"] = time_eager(whole, replays)
    cu = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    if flash is not None:
        row["fa3_dense_ms"] = time_graph(
            [
                lambda: flash(
                    q=q,
                    k=shape.fa_key,
                    v=shape.fa_value,
                    max_seqlen_q=1,
                    cu_seqlens_q=cu,
                    max_seqlen_k=context,
                    seqused_k=seq,
                    softmax_scale=params.scale,
                    causal=True,
                    block_table=table,
                    fa_version=3,
                )
            ],
            replays,
        )
    try:
        fi = flashinfer_decode(shape)
        if fi is not None:
            row["flashinfer_dense_ms"] = time_eager(fi, replays)
    except Exception as exc:  # API drift across FlashInfer versions: record, go on
        row["flashinfer_error"] = f"{type(exc).__name__}: {exc}"[:200]
    row["bytes_min"] = bytes_min(batch, row["kept_pages"], pages, centroid_dtype)
    row["whole_pct_ceiling"] = (
        100 * row["bytes_min"] / (row["whole_ms"] * 1e-3) / 1e9 / (COPY_CEILING_GBS)
    )
    if "fa3_dense_ms" in row:
        row["speedup_vs_fa3"] = row["fa3_dense_ms"] / row["whole_ms"]
    torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 32])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768, 131072])
    parser.add_argument("--budgets", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--centroid-dtype", choices=CENTROID_DTYPES, default="float32")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    flash, why = load_flash_attn()
    rows = []
    cols = ["scoring", "scoring_triton", "selection"]
    cols += ["attention", "whole", "whole_eager"]
    page_head = summary_bytes(HEAD_DIM, args.centroid_dtype)
    print(f"summaries: {args.centroid_dtype} ({page_head} B a page-head)")
    print("batch context budget kept " + " ".join(f"{c}_ms" for c in cols) + " fa3_ms fi_ms x_fa3")
    for batch in args.batches:
        for context in args.contexts:
            for budget in args.budgets:
                row = bench(
                    batch, context, budget, l2, args.replays, gen, flash, args.centroid_dtype
                )
                rows.append(row)
                print(
                    f"{batch:5d} {context:7d} {row['budget']:>6} {row['kept_pages']:4d} "
                    + " ".join(f"{row[c + '_ms']:.4f}" for c in cols)
                    + f" {row.get('fa3_dense_ms', float('nan')):.4f}"
                    + f" {row.get('flashinfer_dense_ms', float('nan')):.4f}"
                    + f" {row.get('speedup_vs_fa3', float('nan')):.2f}",
                    flush=True,
                )
    result = {
        "gpu": torch.cuda.get_device_name(),
        "command": " ".join(sys.argv),
        "timing": timing_note(),
        "flash_attn_unavailable": why,
        "rows": rows,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
