"""Page scoring on CUDA: Triton ``page_logits`` + ``group_page_mass`` vs the torch reference.

Times one selection's scoring (est and bound logits of every page slot, then the
group-mean softmax of est) per decode step, with ``triton.testing.do_bench``
(median, L2 flushed between runs). The scoring reads every page summary once:
3 * 4 * Hkv * D bytes per page (float32 sum, min, max), so the kernel is
bandwidth bound; GB/s counts those summary bytes only and is compared with the
device copy ceiling (3.04 TB/s on H100 SXM unless --ceiling-gbs says otherwise).

Example (H100, LLaMA-3-8B shapes):
  python benchmarks/ops_scoring.py --out benchmarks/results/ops_scoring_h100.json
  python benchmarks/ops_scoring.py --batch 32 --context 131072 --sweep
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prhs_vllm.ops.ref import page_logits as ref_page_logits  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 32])
    parser.add_argument(
        "--context", type=int, nargs="+", default=[4096, 16384, 32768, 65536, 131072]
    )
    parser.add_argument("--heads", type=int, default=32, help="query heads")
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--ceiling-gbs", type=float, default=3040.0, help="copy ceiling, GB/s")
    parser.add_argument("--no-ref", action="store_true", help="skip the torch reference")
    parser.add_argument(
        "--skip-frac",
        type=float,
        default=0.0,
        help="also time page_logits with this random share of (row, KV head) pairs skipped",
    )
    parser.add_argument(
        "--sweep", action="store_true", help="also time page_logits over BLOCK_M x num_warps"
    )
    parser.add_argument("--rep", type=int, default=100, help="do_bench rep (ms)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    return parser.parse_args()


def make_inputs(batch, context, heads, kv_heads, head_dim, block_size, device="cuda"):
    """Summaries of batch * ceil(context / bs) distinct pages in a shuffled pool.

    Returns (query [B, Hq, D] bf16, (sum, min, max) [P, Hkv, D] float32,
    block_table [B, M] int32, seq_lens [B] int32, num_slots M).
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    num_slots = -(-context // block_size)
    num_pages = batch * num_slots + 1
    shape = (num_pages, kv_heads, head_dim)
    center = torch.randn(shape, device=device, generator=gen)
    spread = torch.rand(shape, device=device, generator=gen)
    key_min, key_max = center - spread, center + spread
    key_sum = center * block_size
    pages = torch.randperm(num_pages - 1, device=device, generator=gen) + 1
    block_table = pages.view(batch, num_slots).to(torch.int32)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    query = torch.randn(batch, heads, head_dim, device=device, generator=gen).to(torch.bfloat16)
    return query, (key_sum, key_min, key_max), block_table, seq_lens, num_slots


def bench(fn, rep):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def copy_bandwidth_gbs(rep) -> float:
    """Measured device copy bandwidth (read + write bytes) of a 1 GiB buffer."""
    src = torch.empty(2**28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), rep)
    return 2 * src.numel() * 4 / ms / 1e6


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("ops_scoring.py needs a CUDA GPU")
    import triton

    from prhs_vllm.ops.triton import group_page_mass, page_logits
    from prhs_vllm.ops.triton.scoring import _page_logits, _page_logits_config

    scale = args.head_dim**-0.5
    group = args.heads // args.kv_heads
    page_bytes = 3 * 4 * args.kv_heads * args.head_dim
    rows = []
    header = (
        f"{'batch':>5} {'context':>7} {'pages':>8} {'MB read':>8} {'triton us':>9} "
        f"{'logits us':>9} {'mass us':>8} {'GB/s':>7} {'% ceil':>6} {'logits GB/s':>11} "
        f"{'torch us':>9} {'speedup':>7}"
    )
    print(header)
    for batch in args.batch:
        for context in args.context:
            query, summaries, table, seq_lens, num_slots = make_inputs(
                batch, context, args.heads, args.kv_heads, args.head_dim, args.block_size
            )
            call = (query, *summaries, table, seq_lens, args.block_size, scale, num_slots)
            pages = batch * num_slots
            summary_bytes = pages * page_bytes

            def triton_scoring(call=call):
                est = page_logits(*call).est
                return group_page_mass(est)

            def torch_scoring(call=call):
                est = ref_page_logits(*call).est
                return torch.softmax(est, dim=-1).mean(dim=2)

            row = {
                "batch": batch,
                "context": context,
                "pages": pages,
                "summary_bytes": summary_bytes,
            }
            est, bound, _ = page_logits(*call)
            mass = group_page_mass(est)
            row["triton_ms"] = bench(triton_scoring, args.rep)
            row["page_logits_ms"] = bench(lambda call=call: page_logits(*call), args.rep)
            if args.skip_frac > 0:  # reused (row, head) pairs read nothing
                skip = torch.rand(batch, args.kv_heads, device="cuda") < args.skip_frac
                row["skip_frac"] = args.skip_frac
                row["page_logits_skip_ms"] = bench(
                    lambda call=call, skip=skip: page_logits(*call, skip=skip), args.rep
                )
            row["group_page_mass_ms"] = bench(lambda est=est: group_page_mass(est), args.rep)
            # Summary bytes over the whole scoring time (est / bound / mass traffic is
            # ~2% more at G = 4, D = 128), and over page_logits alone.
            row["gbs"] = summary_bytes / row["triton_ms"] / 1e6
            row["page_logits_gbs"] = summary_bytes / row["page_logits_ms"] / 1e6
            row["pct_ceiling"] = 100.0 * row["gbs"] / args.ceiling_gbs
            row["torch_ms"] = None
            if not args.no_ref:
                try:
                    want_est, want_bound, _ = ref_page_logits(*call)
                    torch.testing.assert_close(est, want_est, atol=1e-4, rtol=1e-5)
                    torch.testing.assert_close(bound, want_bound, atol=1e-4, rtol=1e-5)
                    want_mass = torch.softmax(want_est, dim=-1).mean(dim=2)
                    torch.testing.assert_close(mass, want_mass, atol=1e-5, rtol=1e-4)
                    del want_est, want_bound, want_mass
                    row["torch_ms"] = bench(torch_scoring, args.rep)
                except torch.cuda.OutOfMemoryError:
                    row["torch_ms"] = "oom"
                torch.cuda.empty_cache()
            if args.sweep:
                row["sweep"] = {}
                for block_m in (8, 16, 32, 64):
                    for num_warps in (2, 4, 8):
                        ms = bench(
                            lambda bm=block_m, nw=num_warps, call=call: _page_logits(
                                *call, block_m=bm, num_warps=nw
                            ),
                            args.rep,
                        )
                        row["sweep"][f"m{block_m}_w{num_warps}"] = ms
                best = min(row["sweep"], key=row["sweep"].get)
                row["sweep_best"] = best
            rows.append(row)
            torch_ms = row["torch_ms"]
            torch_us = f"{1e3 * torch_ms:9.1f}" if isinstance(torch_ms, float) else f"{'-':>9}"
            speedup = (
                f"{torch_ms / row['triton_ms']:6.1f}x" if isinstance(torch_ms, float) else " " * 7
            )
            print(
                f"{batch:5d} {context:7d} {pages:8d} {summary_bytes / 1e6:8.1f} "
                f"{1e3 * row['triton_ms']:9.1f} {1e3 * row['page_logits_ms']:9.1f} "
                f"{1e3 * row['group_page_mass_ms']:8.1f} {row['gbs']:7.0f} "
                f"{row['pct_ceiling']:6.1f} {row['page_logits_gbs']:11.0f} {torch_us} {speedup}"
                + (f"  best {row['sweep_best']}" if args.sweep else "")
            )
            del query, summaries, table, seq_lens, est, bound, mass
            torch.cuda.empty_cache()

    copy_gbs = copy_bandwidth_gbs(args.rep)
    print(f"measured copy bandwidth: {copy_gbs:.0f} GB/s (ceiling used: {args.ceiling_gbs:.0f})")
    print(
        f"page_logits launch config at head_dim {args.head_dim}: "
        f"BLOCK_M, num_warps = {_page_logits_config(args.head_dim)}"
    )
    if args.out:
        result = {
            "benchmark": "ops_scoring",
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "gpu": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "triton": triton.__version__,
            "cuda": torch.version.cuda,
            "host": platform.node(),
            "shape": {
                "heads": args.heads,
                "kv_heads": args.kv_heads,
                "head_dim": args.head_dim,
                "block_size": args.block_size,
                "group": group,
            },
            "bytes_per_page": page_bytes,
            "ceiling_gbs": args.ceiling_gbs,
            "measured_copy_gbs": copy_gbs,
            "timing": "triton.testing.do_bench median, ms",
            "rows": rows,
        }
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
