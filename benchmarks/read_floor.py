"""What a plain streaming read or copy of N bytes reaches in ops_sparse_decode's
timing (graph replays queued behind a busy-wait, several calls a graph over
buffers beyond L2), as % of the copy ceiling: the yardstick for a kernel that
must read N bytes in one call, where launch, ramp-up and drain do not amortise.

    python3 benchmarks/read_floor.py --mb 33.5 67 134.2 268.4 536.9 2147 \\
        --out benchmarks/results/read_floor_h100.json

"read": torch.sum over a bf16 buffer of N bytes (float32 accumulation).
"copy": Tensor.copy_ of N / 2 bytes (N bytes of traffic, half read, half written).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ops_sparse_decode import time_graph, timing_note  # noqa: E402


def buffer_count(nbytes: int, l2_bytes: int) -> int:
    """Buffers of nbytes a graph cycles through: together at least 4x L2, and
    at least 2, so that no call reads what the one before left in L2."""
    return max(2, -(-4 * l2_bytes // nbytes))


def buffers(nbytes: int, l2_bytes: int) -> list[torch.Tensor]:
    """buffer_count distinct bf16 CUDA buffers of nbytes each."""
    count = buffer_count(nbytes, l2_bytes)
    return [torch.ones(nbytes // 2, dtype=torch.bfloat16, device="cuda") for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, nargs="+", default=[67.1, 134.2, 268.4, 2147.0])
    parser.add_argument("--replays", type=int, default=50)
    parser.add_argument("--ceiling-tbs", type=float, default=3.04, help="copy ceiling, TB/s")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("read_floor.py needs a CUDA GPU")
    props = torch.cuda.get_device_properties(0)
    l2_bytes = getattr(props, "L2_cache_size", 50 << 20)
    rows = []
    print(f"{props.name}, L2 {l2_bytes >> 20} MB")
    print(f"{'op':5} {'MB':>8} {'calls':>5} {'ms':>8} {'GB/s':>7} {'% ceil':>6}")
    for mb in args.mb:
        nbytes = int(mb * 1e6) // 16 * 16
        for op in ("read", "copy"):
            if op == "read":
                bufs = buffers(nbytes, l2_bytes)
                calls = [lambda b=b: torch.sum(b, dtype=torch.float32) for b in bufs]
            else:
                bufs = buffers(nbytes // 2, l2_bytes)
                pairs = list(zip(bufs, bufs[1:] + bufs[:1], strict=True))
                calls = [lambda d=d, s=s: d.copy_(s) for d, s in pairs]
            ms = time_graph(calls, args.replays)
            gb_s = nbytes / (ms * 1e-3) / 1e9
            pct = 100 * gb_s / (args.ceiling_tbs * 1e3)
            print(f"{op:5} {nbytes / 1e6:8.1f} {len(calls):5d} {ms:8.4f} {gb_s:7.0f} {pct:6.1f}")
            rows.append({"op": op, "bytes": nbytes, "calls_per_graph": len(calls),
                         "time_ms": ms, "gb_s": gb_s, "pct_ceiling": pct})  # fmt: skip
            del bufs, calls
            torch.cuda.empty_cache()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "gpu": props.name,
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "timing": timing_note(),
            "torch": torch.__version__,
            "ceiling_tb_s": args.ceiling_tbs,
            "results": rows,
        }
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
