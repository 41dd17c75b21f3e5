"""Launch-parameter sweeps of the scoring (Triton and csrc) and selection kernels at the
shapes the backend replays inside vLLM (rows x page slots of its step graphs:
a 32K + 64 token context is 2052 pages, scored over a 2560-slot bucket).

Each line is the median over CUDA-graph replays (``ops_sparse_decode.time_graph``),
one call per graph. Selection inputs are real page logits of random summaries.

  python3 benchmarks/kernel_sweep.py --out benchmarks/results/kernel_sweep_h100.jsonl
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ops import CENTROID_DTYPES, random_summaries  # noqa: E402
from ops_sparse_decode import BLOCK_SIZE, HEAD_DIM, NUM_Q_HEADS, time_graph  # noqa: E402

from prhs_vllm.ops.cuda import scoring as csrc_scoring  # noqa: E402
from prhs_vllm.ops.ref.selection import SelectionParams  # noqa: E402
from prhs_vllm.ops.triton.scoring import _page_logits  # noqa: E402
from prhs_vllm.ops.triton.selection import _select_compact  # noqa: E402

# (block_m, num_warps) of the Triton scoring kernel
SCORING_LAUNCHES = [(16, 4), (16, 8), (32, 4), (32, 8)]
# rounds of pages a block of the csrc scoring kernel scores (0: its own choice)
CSRC_SCORING_ITERS = [0, 2, 4, 8, 16, 32]


def inputs(batch: int, context: int, slots: int, gen: torch.Generator, centroid_dtype: str):
    pages = -(-context // BLOCK_SIZE)
    pool = batch * pages + 1
    summaries = random_summaries(pool, gen, centroid_dtype)
    table = torch.zeros(batch, slots, dtype=torch.int32, device="cuda")
    perm = torch.randperm(pool - 1, device="cuda", generator=gen)[: batch * pages] + 1
    table[:, :pages] = perm.view(batch, pages).to(torch.int32)
    query = torch.randn(batch, NUM_Q_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    return query, summaries, table, seq_lens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[12, 16])
    parser.add_argument("--warps", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument(
        "--search", type=int, nargs="+", default=[2],
        help="selection's threshold-search arities (powers of 2; 2 = bisection, the default)",
    )  # fmt: skip
    parser.add_argument(
        "--shapes", nargs="+", default=["32768:2048", "32832:2560"], help="context:slots"
    )
    parser.add_argument("--replays", type=int, default=30)
    parser.add_argument(
        "--kernels", nargs="+", choices=["scoring", "selection"], default=["scoring", "selection"]
    )
    parser.add_argument(
        "--centroid-dtypes", nargs="+", choices=CENTROID_DTYPES, default=["float32"],
        help="summary formats to score (selection runs on the first one's logits)",
    )  # fmt: skip
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    scale = HEAD_DIM**-0.5
    gpu = torch.cuda.get_device_name()

    def emit(row):  # written as it goes: a sweep cut short keeps its lines
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as fh:
                fh.write(json.dumps({**row, "gpu": gpu}) + "\n")

    for batch, shape in itertools.product(args.batch, args.shapes):
        context, slots = map(int, shape.split(":"))
        base = {"batch": batch, "context": context, "slots": slots}
        for dtype in args.centroid_dtypes if "scoring" in args.kernels else ():
            query, (k_sum, k_min, k_max), table, seq = inputs(batch, context, slots, gen, dtype)
            call = (query, k_sum, k_min, k_max, table, seq, BLOCK_SIZE, scale, slots)
            for block_m, warps in SCORING_LAUNCHES:
                scoring = functools.partial(_page_logits, *call, block_m=block_m, num_warps=warps)
                ms = round(time_graph([scoring], args.replays), 4)
                emit({**base, "kernel": "scoring", "centroid_dtype": dtype, "block_m": block_m,
                      "warps": warps, "ms": ms})  # fmt: skip
            if csrc_scoring.unsupported_reason(query, k_sum, k_min, k_max) is None:
                for iters in CSRC_SCORING_ITERS:
                    scoring = functools.partial(csrc_scoring.page_logits, *call, iters=iters)
                    ms = round(time_graph([scoring], args.replays), 4)
                    emit({**base, "kernel": "scoring_csrc", "centroid_dtype": dtype,
                          "iters": iters, "ms": ms})  # fmt: skip
        if "selection" not in args.kernels:
            continue
        query, (k_sum, k_min, k_max), table, seq = inputs(
            batch, context, slots, gen, args.centroid_dtypes[0]
        )
        logits = _page_logits(
            query, k_sum, k_min, k_max, table, seq, BLOCK_SIZE, scale, slots,
            block_m=16, num_warps=4,
        )  # fmt: skip
        for delta, bound, estimator, warps, search in itertools.product(
            (0.0, 0.05), (False, True), ("hybrid", "centroid"), args.warps, args.search
        ):
            params = SelectionParams(
                block_size=BLOCK_SIZE, scale=scale, budget=1 / 16, delta=delta,
                sink_tokens=64, local_tokens=256, estimator=estimator,
            )  # fmt: skip
            selection = functools.partial(
                _select_compact, logits, seq, params, with_bound=bound, search=search,
                num_warps=warps,
            )  # fmt: skip
            try:
                ms = round(time_graph([selection], args.replays), 4)
            except Exception as exc:  # a launch the kernel cannot take (registers)
                ms = f"{type(exc).__name__}: {str(exc)[:120]}"
            emit({**base, "kernel": "selection", "delta": delta, "with_bound": bound,
                  "estimator": estimator, "warps": warps, "search": search,
                  "ms": ms})  # fmt: skip


if __name__ == "__main__":
    main()
