"""Where the sparse attention kernel's time goes, CTA by CTA: needs the
extension built with -DPRHS_SD_TIMELINE (benchmarks/results/h100-session13/
timeline.patch adds the stamps), which makes thread 0 of each CTA record
%globaltimer (ns, one clock for the GPU) and %clock64 (cycles of its SM) at:

  0 entry, 1 after griddepcontrol.wait, 2 segment table ready, 3 first K/V
  chunk landed, 4 main loop done, 5 partials written, 6 merge counted (exit of
  every split but the last), 7 merge done (the last split of a row-head only)

and then its SM (%smid), into the workspace's tail. Each call runs behind a
GPU busy-wait, over a fresh random block table and selection of a page pool 8x
the L2 (as ops_sparse_decode.py). Prints, per stamp, the spread over CTAs of
the time since the earliest entry, and the cycles each interval takes inside
a CTA. Per call it also splits the spread of "main loop
done" into its part between SMs (the mean over each SM's CTAs) and within an
SM, and keeps every CTA's SM and loop-done time in the JSON.

`--analyze FILE` (no GPU) reads such a JSON and prints, per call, when the
main loop would have ended had the pages been shared out by each CTA's
measured speed: among the CTAs of a row-head (work stealing inside a
row-head), or among all CTAs (balancing across row-heads).

    python3 benchmarks/attn_timeline.py --batch 16 --context 32768 --budget 16
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ops_sparse_decode import (  # noqa: E402
    BLOCK_SIZE,
    DTYPE,
    HEAD_DIM,
    HIDE_LAUNCH_CYCLES,
    NUM_KV_HEADS,
    NUM_Q_HEADS,
    Shape,
)

from prhs_vllm.ops import cuda as cuda_ops  # noqa: E402

SLOTS = 18  # per CTA: 8 globaltimer stamps, 8 clock64 stamps, SM id, spare
STAMPS = ("entry", "waited", "table", "first_chunk", "loop_done", "partials", "counted", "merged")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--budget", type=int, default=16, help="keep 1/B of the pages")
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--out", type=Path)
    p.add_argument("--analyze", type=Path, help="a JSON this script wrote: balance bounds only")
    return p.parse_args()


def split_pages(kept: int, split: int, splits: int) -> int:
    """Kept pages of split `split` of a row-head (the kernel's round robin)."""
    return (kept - split + splits - 1) // splits if kept > split else 0


def balance_bounds(
    loop_done_us: list[float], batch: int, splits: int, kept: int, start_us: float
) -> dict[str, float]:
    """When the main loop ends, measured and if pages were shared by speed.

    Args:
        loop_done_us: [CTAs] each CTA's loop end (us since the first entry), in
            CTA order (blockIdx.y * gridDim.x + blockIdx.x, gridDim.x = batch *
            splits: a row's splits are neighbours).
        kept: kept pages of every row-head; start_us: when streaming starts.

    Each CTA streams at its measured rate, pages / (loop_done - start). Shared
    inside a row-head, the row-head ends at start + kept / (its CTAs' rates);
    shared among all CTAs, every CTA ends at start + all pages / (all rates).
    """
    grid_x = batch * splits
    rates: dict[tuple[int, int], float] = {}
    total_pages, total_rate = 0, 0.0
    for c, done in enumerate(loop_done_us):
        x, y = c % grid_x, c // grid_x
        pages = split_pages(kept, x % splits, splits)
        rate = pages / max(done - start_us, 1e-9)
        unit = (x // splits, y)
        rates[unit] = rates.get(unit, 0.0) + rate
        total_rate += rate
        total_pages += pages
    row_head = max(start_us + kept / r for r in rates.values())
    return {
        "measured_max": round(max(loop_done_us), 3),
        "row_head_balanced_max": round(row_head, 3),
        "all_balanced": round(start_us + total_pages / total_rate, 3),
    }


def analyze(path: Path) -> list[dict[str, float]]:
    """balance_bounds of every call in a JSON this script wrote (streaming taken
    to start at the call's median first-chunk stamp)."""
    report = json.loads(path.read_text())
    budget = int(report["budget"].split("/")[1])
    kept = report["context"] // BLOCK_SIZE // budget
    bounds = []
    for call in report["calls"]:
        start = call["us_since_first_entry"]["first_chunk"][2]
        bounds.append(
            balance_bounds(
                call["cta_loop_done_us"], report["batch"], report["num_splits"], kept, start
            )
        )
        print(f"main loop end, us: {bounds[-1]}")
    return bounds


def percentiles(x: torch.Tensor) -> list[float]:
    q = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    return [round(v, 3) for v in torch.quantile(x.double(), q).tolist()]


def main() -> None:
    args = parse_args()
    if args.analyze:
        analyze(args.analyze)
        return
    props = torch.cuda.get_device_properties(0)
    gen = torch.Generator("cuda").manual_seed(0)
    shape = Shape(args.batch, args.context, props.L2_cache_size, gen)
    kept = shape.pages_per_row // args.budget
    plan = cuda_ops.split_plan(
        args.batch, NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, kept, DTYPE, "cuda"
    )
    splits = plan["num_splits"]
    ctas = args.batch * NUM_KV_HEADS * plan["head_chunks"] * splits
    # The stamps follow the counters and the partials (run() in sparse_decode_dispatch.cuh).
    partial_end = plan["counter_bytes"] + splits * args.batch * NUM_Q_HEADS * (HEAD_DIM + 1) * 4
    start = (partial_end + 15) // 16 * 16
    if plan["workspace_bytes"] < start + ctas * SLOTS * 8:
        sys.exit("the extension was built without -DPRHS_SD_TIMELINE (no timeline room)")
    workspace = torch.zeros(plan["workspace_bytes"], dtype=torch.uint8, device="cuda")
    num_kept = torch.full((args.batch, NUM_KV_HEADS), kept, dtype=torch.int32, device="cuda")
    out = torch.empty_like(shape.query)
    lse = torch.empty(args.batch, NUM_Q_HEADS, device="cuda")
    sm_ghz = props.clock_rate / 1e6 if hasattr(props, "clock_rate") else None

    def call(table, slots):
        cuda_ops.sparse_paged_decode_indexed(
            shape.query, shape.key, shape.value, table, shape.seq_lens, slots, num_kept,
            HEAD_DIM**-0.5, out, lse=lse, workspace=workspace,
        )  # fmt: skip

    runs = []
    for i in range(args.calls + 1):
        table, slots = shape.block_table(), shape.kept_slots(kept)
        torch.cuda.synchronize()
        workspace[start:].zero_()
        torch.cuda._sleep(HIDE_LAUNCH_CYCLES)
        call(table, slots)
        torch.cuda.synchronize()
        stamps = workspace[start : start + ctas * SLOTS * 8].view(torch.int64)
        stamps = stamps.view(ctas, SLOTS).cpu()
        if i == 0:
            continue  # warm-up (module load, first launch)
        wall = stamps[:, :8].double()
        cycles = stamps[:, 8:16].double()
        sm = stamps[:, 16]
        t0 = wall[:, 0].min()
        since = {}
        for k, name in enumerate(STAMPS):
            valid = wall[:, k] > 0
            since[name] = percentiles((wall[valid, k] - t0) / 1e3)  # us
        steps = {}
        for k in range(1, 7):
            valid = (cycles[:, k] > 0) & (cycles[:, k - 1] > 0)
            steps[f"{STAMPS[k - 1]}->{STAMPS[k]}"] = percentiles(
                cycles[valid, k] - cycles[valid, k - 1]
            )
        last = wall[:, 7] > 0
        steps["counted->merged"] = percentiles(cycles[last, 7] - cycles[last, 6])
        span = (wall[:, 6].max().item() - t0.item(), wall[last, 7].max().item() - t0.item())
        loop_done = (wall[:, 4] - t0) / 1e3
        per_sm = {int(i): loop_done[sm == i] for i in sm.unique()}
        sm_mean = torch.tensor([v.mean().item() for v in per_sm.values()])
        within = torch.cat([v - v.mean() for v in per_sm.values()])
        split = {
            "sms": len(per_sm),
            "ctas_per_sm": sorted({len(v) for v in per_sm.values()}),
            "between_sm_std_us": round(sm_mean.std().item(), 3),
            "within_sm_std_us": round(within.std().item(), 3),
            "sm_mean_min_max_us": [round(sm_mean.min().item(), 3), round(sm_mean.max().item(), 3)],
        }
        runs.append(
            {
                "us_since_first_entry": since,
                "cycles": steps,
                "span_us": span,
                "loop_done_by_sm": split,
                "cta_sm": sm.tolist(),
                "cta_loop_done_us": [round(v, 3) for v in loop_done.tolist()],
            }
        )
        print(f"call {i}: kernel span {max(span) / 1e3:.2f} us (entry of the first CTA to the "
              "last stamp)")  # fmt: skip
        print(f"  loop done, spread between SMs / within an SM: {split}")
        for name, q in since.items():
            print(f"  {name:12} us since first entry, min/p10/p50/p90/max: {q}")
        for name, q in steps.items():
            print(f"  {name:22} cycles min/p10/p50/p90/max: {q}")
    report = {
        "gpu": props.name,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "batch": args.batch,
        "context": args.context,
        "budget": f"1/{args.budget}",
        "num_splits": splits,
        "ctas": ctas,
        "sm_clock_ghz": sm_ghz,
        "calls": runs,
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
        print("wrote", args.out)


if __name__ == "__main__":
    main()
