"""How many ATen ops that launch a kernel on the GPU the metrics of one sparse
layer cost: ``metrics.layer_row_stats`` and the step graphs' add into their
device counters (backend/step.py). Each such op is one node of the layer's CUDA
graph, ~1-2 us of GPU time on an H100 at these sizes. Counted on the CPU (the
ops dispatched are the same), so it runs anywhere:

  python benchmarks/metrics_launches.py [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from prhs_vllm import metrics

# Ops that only make a view or read metadata: no kernel.
VIEW_OPS = {
    "view", "_unsafe_view", "expand", "slice", "select", "t", "transpose", "unsqueeze",
    "squeeze", "as_strided", "alias", "detach", "permute", "reshape", "lift_fresh",
    "empty", "empty_strided",
}  # fmt: skip


class CountLaunches(TorchDispatchMode):
    """Counts the ATen ops dispatched under it that launch a kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in VIEW_OPS:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def metrics_tail(reuse: bool, audit: bool, rows: int = 16, heads: int = 8) -> Counter[str]:
    """The ops of one layer's metrics on ``rows`` x ``heads`` selections."""
    gen = torch.Generator().manual_seed(0)
    keep_counts = torch.randint(0, 200, (rows, heads), generator=gen)
    num_pages = torch.full((rows,), 2048, dtype=torch.int32)
    est = torch.rand(rows, heads, generator=gen)
    certified = torch.rand(rows, heads, generator=gen)
    true = torch.rand(rows, heads, generator=gen) if audit else None
    reused = torch.rand(rows, heads, generator=gen) < 0.5 if reuse else None
    totals = torch.zeros(metrics.num_device_fields(), dtype=torch.float64)
    row_weight = torch.ones(rows, dtype=torch.float64)
    with CountLaunches() as counter:
        row_stats = metrics.layer_row_stats(
            keep_counts, num_pages, est, certified, true, 0.05, reused
        )
        _add_to_totals(totals, row_stats, row_weight)
    return counter.ops


def _add_to_totals(totals, row_stats, row_weight) -> None:
    """The step graphs' add into their counters (``step.add_row_stats``; trees
    older than it inlined the product and sum below)."""
    try:
        from prhs_vllm.backend.step import add_row_stats
    except ImportError:
        totals.add_((row_stats * row_weight[:, None]).sum(0))
        return
    add_row_stats(totals, row_stats, row_weight)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="write the counts here (JSON)")
    args = parser.parse_args()
    here = Path(__file__).resolve().parent

    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], capture_output=True, text=True, cwd=here).stdout

    commit = git("rev-parse", "--short", "HEAD").strip()
    if git("status", "--porcelain", "--untracked-files=no").strip():
        commit += "+changes"  # the working tree differs from the commit
    result = {"commit": commit, "cases": {}}
    for reuse in (False, True):
        for audit in (False, True):
            ops = metrics_tail(reuse, audit)
            case = f"reuse={'on' if reuse else 'off'} audit={'on' if audit else 'off'}"
            result["cases"][case] = {
                "launches": sum(ops.values()),
                "ops": dict(sorted(ops.items())),
            }
            print(f"{case}: {sum(ops.values())} launches  {dict(sorted(ops.items()))}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
