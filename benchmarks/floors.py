"""Bytes floors of the speed targets: the fastest a step can be when
every byte it must read moves at the copy ceiling.

Two floors, for LLaMA-3-8B attention shapes (32 query / 8 KV heads, d = 128,
16-token bf16 pages) unless told otherwise:

- one layer's sparse step (`ops.py`'s whole step): the kept pages' K and V plus
  every page's summary, against the 0.07 ms target at 16 x 32K and 1/16;
- one decode step of the whole model end to end: the weights' GEMMs (as
  profiled), the dense layers' full KV, and each sparse layer's kept KV plus
  summaries, against 3x the measured dense throughput at 12 x 32K.

Nothing runs on a GPU: the inputs are shapes and measured numbers, passed as
arguments (defaults: an H100 profile's GEMM time and the dense throughput in
benchmarks/results/2026-11-h100-e2e-batch/). Prints a table; --out writes it as JSON.
--measured OPS_JSON sets each row of an ops.py result against the floor of its
shape (its bytes_min must be the floor's bytes; no whole step can beat it).

  python benchmarks/floors.py --out benchmarks/results/2026-11-h100-floors/floors.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prhs_vllm.ops.ref.quant import summary_bytes  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16, help="tokens a KV page")
    p.add_argument("--ceiling-gbs", type=float, default=3040.0, help="copy ceiling, GB/s")
    p.add_argument("--centroid-dtype", choices=("float32", "int8", "int4"), default="int8")
    p.add_argument("--budget", type=float, default=1 / 16, help="kept fraction of the pages")
    # The one-layer target.
    p.add_argument("--layer-batch", type=int, default=16)
    p.add_argument("--layer-context", type=int, default=32768)
    p.add_argument("--layer-target-ms", type=float, default=0.07)
    # The end-to-end target.
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--context", type=int, default=32768 + 64, help="tokens at the last step")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--dense-layers", type=int, default=2, help="config dense_layers (0, 1)")
    p.add_argument(
        "--gemm-ms", type=float, default=5.2, help="weights' GEMMs a step (H100 profile, 12 x 32K)"
    )
    p.add_argument(
        "--dense-tok-s", type=float, default=507.9, help="dense decode tok/s at 12 x 32K (H100)"
    )
    p.add_argument("--speedup-target", type=float, default=3.0)
    p.add_argument("--measured", default=None, help="an ops.py JSON to check against floors")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def page_bytes(args) -> tuple[int, int]:
    """(KV bytes, summary bytes) of one page and KV head."""
    kv = args.block_size * args.head_dim * 2 * 2  # K and V, bf16
    return kv, summary_bytes(args.head_dim, args.centroid_dtype)


def ms_at_ceiling(num_bytes: float, args) -> float:
    return num_bytes / (args.ceiling_gbs * 1e9) * 1e3


def page_heads(rows: int, context: int, args) -> int:
    """(page, KV head) pairs of `rows` rows of `context` tokens."""
    return rows * math.ceil(context / args.block_size) * args.kv_heads


def sparse_layer_bytes(rows: int, context: int, args) -> dict:
    """Bytes one sparse layer must read: kept K/V pages and every page's summary."""
    kv, summary = page_bytes(args)
    pairs = page_heads(rows, context, args)
    return {"kept_kv": args.budget * pairs * kv, "summaries": pairs * summary}


def layer_floor(args) -> dict:
    parts = sparse_layer_bytes(args.layer_batch, args.layer_context, args)
    floor_ms = ms_at_ceiling(sum(parts.values()), args)
    target_bytes = args.layer_target_ms * 1e-3 * args.ceiling_gbs * 1e9
    # The largest summary that would still fit the target next to the kept pages.
    summary_room = (target_bytes - parts["kept_kv"]) / page_heads(
        args.layer_batch, args.layer_context, args
    )
    return {
        "rows": args.layer_batch,
        "context": args.layer_context,
        "bytes": {k: int(v) for k, v in parts.items()},
        "floor_ms": round(floor_ms, 4),
        "target_ms": args.layer_target_ms,
        "summary_bytes_per_page_head": page_bytes(args)[1],
        "summary_bytes_that_fit_target": round(summary_room, 1),
        "summary_share_that_fits_target": round(summary_room / page_bytes(args)[0], 4),
    }


def step_floor(args) -> dict:
    kv, _ = page_bytes(args)
    sparse = sparse_layer_bytes(args.batch, args.context, args)
    sparse_ms = ms_at_ceiling(sum(sparse.values()), args)
    dense_bytes = page_heads(args.batch, args.context, args) * kv
    dense_ms = ms_at_ceiling(dense_bytes, args)
    sparse_layers = args.layers - args.dense_layers
    floor_ms = args.gemm_ms + args.dense_layers * dense_ms + sparse_layers * sparse_ms
    dense_step_ms = args.batch / args.dense_tok_s * 1e3
    return {
        "rows": args.batch,
        "context": args.context,
        "dense_step_ms": round(dense_step_ms, 2),
        "target_step_ms": round(dense_step_ms / args.speedup_target, 2),
        "gemm_ms": args.gemm_ms,
        "dense_layer_ms": round(dense_ms, 3),
        "sparse_layer_ms": round(sparse_ms, 4),
        "floor_ms": round(floor_ms, 2),
        "best_speedup": round(dense_step_ms / floor_ms, 2),
    }


def measured_rows(path, args) -> list[dict]:
    """Each row of an ops.py JSON against the one-layer floor of its own shape."""
    checked = []
    for row in json.loads(Path(path).read_text())["rows"]:
        shape = argparse.Namespace(**vars(args))
        shape.centroid_dtype = row["centroid_dtype"]
        shape.budget = 1 / int(row["budget"].split("/")[1])
        floor_bytes = int(sum(sparse_layer_bytes(row["batch"], row["context"], shape).values()))
        floor_ms = ms_at_ceiling(floor_bytes, shape)
        checked.append(
            {
                **{k: row[k] for k in ("batch", "context", "budget", "centroid_dtype")},
                "bytes_min": row["bytes_min"],
                "floor_bytes": floor_bytes,
                "whole_ms": row["whole_ms"],
                "floor_ms": round(floor_ms, 4),
                "below_floor": row["whole_ms"] < floor_ms,
            }
        )
    return checked


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = {
        "ceiling_gbs": args.ceiling_gbs,
        "centroid_dtype": args.centroid_dtype,
        "budget": args.budget,
        "layer": layer_floor(args),
        "step": step_floor(args),
    }
    layer, step = result["layer"], result["step"]
    print(
        f"one layer, {layer['rows']} x {layer['context']}: floor {layer['floor_ms']} ms "
        f"(target {layer['target_ms']}); summaries fitting the target: "
        f"<= {layer['summary_bytes_that_fit_target']} B a page-head "
        f"({100 * layer['summary_share_that_fits_target']:.1f}% of its KV), "
        f"{args.centroid_dtype} has {layer['summary_bytes_per_page_head']}"
    )
    print(
        f"end to end, {step['rows']} x {step['context']}: floor {step['floor_ms']} ms a step "
        f"(GEMMs {step['gemm_ms']}, {args.dense_layers} dense layers x "
        f"{step['dense_layer_ms']}, {args.layers - args.dense_layers} sparse x "
        f"{step['sparse_layer_ms']}) against {step['target_step_ms']} for "
        f"{args.speedup_target}x dense ({step['dense_step_ms']}): at best "
        f"{step['best_speedup']}x"
    )
    if args.measured:
        result["measured"] = measured_rows(args.measured, args)
        for m in result["measured"]:
            print(
                f"measured {m['batch']} x {m['context']} {m['budget']} {m['centroid_dtype']}: "
                f"{m['whole_ms']:.4f} ms, floor {m['floor_ms']} ms; bytes {m['bytes_min']} "
                f"(floor's {m['floor_bytes']})" + (" BELOW THE FLOOR" if m["below_floor"] else "")
            )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print("wrote", args.out)
    return result


if __name__ == "__main__":
    main()
