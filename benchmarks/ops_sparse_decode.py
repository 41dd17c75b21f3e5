"""Times the CUDA sparse paged decode (torch.ops.prhs.sparse_paged_decode)
against dense FlashAttention-3 at LLaMA-3-8B decode shapes (32 query heads,
8 KV heads, head_dim 128, page size 16, bf16, vLLM's FlashAttention cache
layout), and writes the table as JSON.

    python3 setup.py build_ext --inplace
    python3 benchmarks/ops_sparse_decode.py --out ops_sparse_decode_h100.json

Each measurement replays a CUDA graph of several calls that read different
pages of a pool several times the L2 size, so the bytes come from HBM as in a
real decode step (where the other layers evict this one's pages); the time is
the median over replays divided by the calls per graph. Each replay is queued
behind a GPU busy-wait, so the host's launch of the graph (several us)
overlaps it and the events time the GPU's work alone: kernels and the gaps
between them, as in a model's graph (--time-host-launch counts the launch in).
"bytes" counts only what must be read: the kept (sparse) or all (dense) K and
V pages.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prhs_vllm.ops import cuda as cuda_ops  # noqa: E402

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16
ELEMENT_BYTES = 2
MAX_CALLS_PER_GRAPH = 256
# GPU clock cycles of busy-wait queued before each timed replay (~1 ms): longer
# than the host takes to launch the graph behind it.
HIDE_LAUNCH_CYCLES = 2_000_000
TIMING = {"hide_launch": True}  # --time-host-launch clears it


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="JSON file to write")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 32])
    parser.add_argument(
        "--contexts", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536, 131072]
    )
    parser.add_argument(
        "--budgets", type=int, nargs="+", default=[8, 16, 32], help="keep 1/B of the pages"
    )
    parser.add_argument(
        "--splits",
        type=int,
        nargs="+",
        default=[0],
        help="split-K factors to time (0: the kernel's own plan)",
    )
    parser.add_argument(
        "--stages",
        type=int,
        nargs="+",
        default=[0],
        choices=[0, 3, 4],
        help="cp.async ring depths to time (0: the kernel's own plan)",
    )
    parser.add_argument(
        "--pad-slots",
        action="store_true",
        help="kept_slots as wide as the row's pages, -1 padded (what the fused selection "
        "hands the kernel), instead of exactly the kept count",
    )
    parser.add_argument(
        "--kernel-times",
        action="store_true",
        help="also print each CUDA kernel's mean time per call (torch profiler)",
    )
    parser.add_argument(
        "--active-rows",
        type=int,
        default=None,
        help="only the first N rows keep pages (the others keep none), as when the step "
        "graphs run N rows in a larger row bucket; bytes count the active rows",
    )
    parser.add_argument("--replays", type=int, default=30)
    parser.add_argument(
        "--time-host-launch",
        action="store_true",
        help="start the events with the GPU idle, so each replay's time includes the host's "
        "launch of the graph (the older timing)",
    )
    parser.add_argument("--ceiling-tbs", type=float, default=3.04, help="copy ceiling, TB/s")
    parser.add_argument("--no-dense", action="store_true", help="skip FlashAttention-3")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def load_flash_attn():
    """vLLM's FA3 entry point, or (None, why not)."""
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func
    except Exception as exc:  # vLLM missing or built without FA: report, don't fail
        return None, f"{type(exc).__name__}: {exc}"
    return flash_attn_varlen_func, None


def time_graph(calls, replays: int) -> float:
    """Median ms per call of a CUDA graph that runs every callable in `calls`."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if TIMING["hide_launch"]:
            torch.cuda._sleep(HIDE_LAUNCH_CYCLES)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return statistics.median(times) / len(calls)


def timing_note() -> str:
    """How time_graph timed, for the JSON reports."""
    if TIMING["hide_launch"]:
        return "GPU time of graph replays queued behind a busy-wait (host launch hidden)"
    return "graph replays started on an idle GPU (host launch included)"


def kernel_times(calls) -> dict[str, float]:
    """Mean GPU ms per call of each CUDA kernel that `calls` launch (profiled,
    eager: one launch after another, so gaps between kernels are not counted)."""
    for call in calls:
        call()
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for call in calls:
            call()
        torch.cuda.synchronize()
    times = {}
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.count:
            times[event.key] = event.device_time_total / 1e3 / len(calls)
    return times


def calls_for(bytes_per_call: int, l2_bytes: int) -> int:
    """Calls per graph so that one replay touches ~4x the L2 size."""
    return max(1, min(MAX_CALLS_PER_GRAPH, math.ceil(4 * l2_bytes / bytes_per_call)))


class Shape:
    """Decode inputs for `batch` rows of `context` tokens over a page pool."""

    def __init__(self, batch: int, context: int, l2_bytes: int, gen: torch.Generator):
        self.batch, self.context = batch, context
        self.pages_per_row = context // BLOCK_SIZE
        page_bytes = BLOCK_SIZE * NUM_KV_HEADS * 2 * HEAD_DIM * ELEMENT_BYTES
        pool = max(batch * self.pages_per_row, math.ceil(8 * l2_bytes / page_bytes)) + 1
        self.pool = pool
        # vLLM FlashAttention cache: physical [P, bs, Hkv, 2D], K then V per head.
        kv = torch.randn(pool, BLOCK_SIZE, NUM_KV_HEADS, 2 * HEAD_DIM, dtype=DTYPE, device="cuda")
        self.kv = kv
        self.fa_key, self.fa_value = kv[..., :HEAD_DIM], kv[..., HEAD_DIM:]
        logical = kv.permute(0, 2, 1, 3)  # [P, Hkv, bs, 2D]
        self.key, self.value = logical[..., :HEAD_DIM], logical[..., HEAD_DIM:]
        self.query = torch.randn(batch, NUM_Q_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
        self.seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
        self.gen = gen

    def block_table(self) -> torch.Tensor:
        """[batch, pages_per_row] int32: distinct random pages of the pool (never 0)."""
        pages = torch.randperm(self.pool - 1, device="cuda", generator=self.gen)
        pages = pages[: self.batch * self.pages_per_row] + 1
        return pages.view(self.batch, self.pages_per_row).to(torch.int32)

    def kept_slots(self, kept: int, pad: bool = False) -> torch.Tensor:
        """[batch, Hkv, kept] int32: a random sorted subset of each row's slots
        (pad: [batch, Hkv, pages_per_row], -1 after the kept ones)."""
        scores = torch.rand(
            self.batch, NUM_KV_HEADS, self.pages_per_row, device="cuda", generator=self.gen
        )
        slots = scores.topk(kept, dim=-1).indices.sort(dim=-1).values.to(torch.int32)
        if pad:
            slots = torch.nn.functional.pad(slots, (0, self.pages_per_row - kept), value=-1)
        return slots


def bench_sparse(
    shape: Shape,
    budget: int,
    l2_bytes: int,
    replays: int,
    splits: int = 0,
    stages: int = 0,
    pad: bool = False,
    profile: bool = False,
    active_rows: int | None = None,
) -> dict:
    kept = max(1, shape.pages_per_row // budget)
    width = shape.pages_per_row if pad else kept
    active = shape.batch if active_rows is None else min(active_rows, shape.batch)
    nbytes = active * NUM_KV_HEADS * kept * BLOCK_SIZE * HEAD_DIM * 2 * ELEMENT_BYTES
    num_calls = calls_for(nbytes, l2_bytes)
    num_kept = torch.full((shape.batch, NUM_KV_HEADS), kept, dtype=torch.int32, device="cuda")
    num_kept[active:] = 0
    # Ring depth only when asked: gpu_run.sh's A/B runs this script against
    # trees from before the argument existed.
    asked = {"stages": stages} if stages else {}
    plan = cuda_ops.split_plan(
        shape.batch, NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, width, DTYPE, "cuda",
        splits, **asked,
    )  # fmt: skip
    workspace = torch.empty(plan["workspace_bytes"], dtype=torch.uint8, device="cuda")
    out = torch.empty_like(shape.query)
    lse = torch.empty(shape.batch, NUM_Q_HEADS, device="cuda")
    scale = HEAD_DIM**-0.5

    def call(table, slots):
        return lambda: cuda_ops.sparse_paged_decode_indexed(
            shape.query,
            shape.key,
            shape.value,
            table,
            shape.seq_lens,
            slots,
            num_kept,
            scale,
            out,
            lse=lse,
            workspace=workspace,
            num_splits=splits,
            **asked,
        )

    calls = [call(shape.block_table(), shape.kept_slots(kept, pad)) for _ in range(num_calls)]
    kernels = kernel_times(calls) if profile else None
    return {
        "kernel_ms": kernels,
        "kernel": "prhs_sparse",
        "budget": f"1/{budget}",
        "kept_pages": kept,
        "active_rows": active,
        "slots_width": width,
        "splits_asked": splits,
        "num_splits": plan["num_splits"],
        "stages_asked": stages,
        "stages": plan.get("stages", 3),
        "calls_per_graph": num_calls,
        "time_ms": time_graph(calls, replays),
        "bytes": nbytes,
    }


def bench_dense(shape: Shape, flash_attn, l2_bytes: int, replays: int) -> dict:
    nbytes = shape.batch * shape.context * NUM_KV_HEADS * HEAD_DIM * 2 * ELEMENT_BYTES
    num_calls = calls_for(nbytes, l2_bytes)
    cu_seqlens_q = torch.arange(shape.batch + 1, dtype=torch.int32, device="cuda")
    out = torch.empty_like(shape.query)

    def call(table):
        return lambda: flash_attn(
            q=shape.query,
            k=shape.fa_key,
            v=shape.fa_value,
            max_seqlen_q=1,
            cu_seqlens_q=cu_seqlens_q,
            max_seqlen_k=shape.context,
            seqused_k=shape.seq_lens,
            softmax_scale=HEAD_DIM**-0.5,
            causal=True,
            block_table=table,
            out=out,
            fa_version=3,
        )

    calls = [call(shape.block_table()) for _ in range(num_calls)]
    return {
        "kernel": "fa3_dense",
        "budget": "1",
        "kept_pages": shape.pages_per_row,
        "num_splits": None,
        "stages": None,
        "calls_per_graph": num_calls,
        "time_ms": time_graph(calls, replays),
        "bytes": nbytes,
    }


def main() -> None:
    args = parse_args()
    TIMING["hide_launch"] = not args.time_host_launch
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    if not cuda_ops.is_available():
        sys.exit("prhs_vllm._C is not built: run `python3 setup.py build_ext --inplace`")
    props = torch.cuda.get_device_properties(0)
    l2_bytes = getattr(props, "L2_cache_size", 50 << 20)
    flash_attn, why_not = (None, "--no-dense") if args.no_dense else load_flash_attn()
    if flash_attn is None:
        print(f"dense FlashAttention-3 skipped: {why_not}")
    gen = torch.Generator("cuda").manual_seed(args.seed)
    ceiling = args.ceiling_tbs * 1e12

    rows = []
    header = (
        f"{'kernel':12} {'batch':>5} {'context':>7} {'budget':>6} {'pages':>5} {'splits':>6} "
        f"{'ring':>4} {'ms':>8} {'MB read':>8} {'GB/s':>7} {'% ceil':>6} {'vs FA3':>6}"
    )
    print(f"{props.name}, {props.multi_processor_count} SMs, L2 {l2_bytes >> 20} MB")
    print(header)
    for batch in args.batches:
        for context in args.contexts:
            shape = Shape(batch, context, l2_bytes, gen)
            results = []
            if flash_attn is not None:
                results.append(bench_dense(shape, flash_attn, l2_bytes, args.replays))
            for budget in args.budgets:
                for splits in args.splits:
                    for stages in args.stages:
                        results.append(
                            bench_sparse(
                                shape,
                                budget,
                                l2_bytes,
                                args.replays,
                                splits=splits,
                                stages=stages,
                                pad=args.pad_slots,
                                profile=args.kernel_times,
                                active_rows=args.active_rows,
                            )  # fmt: skip
                        )
            dense_ms = results[0]["time_ms"] if flash_attn is not None else None
            for r in results:
                r.update(batch=batch, context=context)
                r["gb_s"] = r["bytes"] / (r["time_ms"] * 1e-3) / 1e9
                r["pct_ceiling"] = 100 * r["gb_s"] * 1e9 / ceiling
                r["speedup_vs_fa3"] = dense_ms / r["time_ms"] if dense_ms else None
                speedup = f"{r['speedup_vs_fa3']:6.2f}" if dense_ms else f"{'-':>6}"
                splits = r["num_splits"] if r["num_splits"] is not None else "-"
                ring = r["stages"] if r["stages"] is not None else "-"
                print(
                    f"{r['kernel']:12} {batch:5d} {context:7d} {r['budget']:>6} "
                    f"{r['kept_pages']:5d} {splits:>6} {ring:>4} {r['time_ms']:8.4f} "
                    f"{r['bytes'] / 1e6:8.1f} {r['gb_s']:7.0f} {r['pct_ceiling']:6.1f} {speedup}"
                )
                rows.append(r)
                for name, ms in (r.get("kernel_ms") or {}).items():
                    print(f"    {ms:8.4f} ms  {name[:110]}")
            del shape
            torch.cuda.empty_cache()

    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "gpu": props.name,
            "sm_count": props.multi_processor_count,
            "l2_bytes": l2_bytes,
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "timing": timing_note(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "shape": {
                "num_q_heads": NUM_Q_HEADS,
                "num_kv_heads": NUM_KV_HEADS,
                "head_dim": HEAD_DIM,
                "block_size": BLOCK_SIZE,
                "dtype": str(DTYPE),
            },
            "ceiling_tb_s": args.ceiling_tbs,
            "dense_skipped": why_not if flash_attn is None else None,
            "results": rows,
        }
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
