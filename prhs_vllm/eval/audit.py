"""``prhs-audit``: measure every selector against dense attention on real text.

Runs a model (transformers, CPU) over essay windows, replays the backend's
selection on each attention layer's captured queries and keys
(``prhs_vllm.eval.replay``), and writes to ``--out``:

- ``ablation.md`` / ``ablation.json``: one row per selector configuration
  (each selector on and off): true dropped mass (mean, p99, share of steps
  <= delta), estimate, certified bound and its tightness, kept fraction,
  recall of the true top pages, reuse rate, bytes and FLOPs against dense;
- ``layers.md``: per-layer table of the default configuration;
- ``dropped_by_layer.png``, ``dropped_cdf.png``.

The backend's own ``audit: true`` measures the same quantities while serving.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from prhs_vllm.config import depth_fraction
from prhs_vllm.eval.replay import (
    ReuseParams,
    StepMeasures,
    measure,
    oracle_keep,
    page_window,
    replay_layer,
)
from prhs_vllm.ops.ref.selection import SelectionParams

__all__ = ["Variant", "VARIANTS", "run_audit", "summarize", "main"]

SUMMARY_BYTES_PER_PAGE = {0: 12 / 64, 8: 5 / 64, 4: 4.5 / 64}
"""Summary bytes of a 16-token page against its bf16 K and V (2 * 2 * 16 = 64 bytes
per channel): float32 sum/min/max 12, int8 codes + bf16 box 5, int4 4.5."""
SCORING_FLOPS_PER_PAGE = 3 * 2 / (4 * 16)
"""Three dot products per page and query head against 4 D FLOPs per token (QK and PV)."""


@dataclass(frozen=True)
class Variant:
    """One audited configuration: selection knobs over the base, or the oracle."""

    name: str
    knobs: dict = field(default_factory=dict)
    oracle: bool = False
    reuse: ReuseParams | None = None
    psaw: tuple[int, float, float] | None = None  # (start layer, phi, alpha)
    etf: tuple[int, float, float] | None = None  # (start layer, psi, gamma)
    centroid_bits: int = 0  # 0: float32 summaries; 8 / 4: quantized centroids


BASE = dict(block_size=16, budget=0.125, delta=0.0, sink_tokens=64, local_tokens=256)
"""Fixed budget 1/8 with the default sinks and recent window: the base of every row."""

DELTA = dict(budget=1.0, delta=0.05)
DEFAULT_PROFILE = dict(budget=1.0, delta=0.05, over_budget="dense", dropped_weight=0.1)
"""The default config's selection (``configs/default.yaml``)."""
FIXED_PROFILE = dict(budget=0.0625, delta=0.05, over_budget="cap", dropped_weight=0.0,
                     exact_centroid=False)  # fmt: skip
"""``configs/fixed-budget.yaml``'s selection (int8 centroids)."""
VARIANTS: tuple[Variant, ...] = (
    Variant("default profile (delta 0.05, dropped_weight 0.1, over budget: dense)",
            DEFAULT_PROFILE),
    Variant("default profile, budget 1/2 (over budget: dense)", dict(DEFAULT_PROFILE, budget=0.5)),
    Variant("default profile, int8 centroids", dict(DEFAULT_PROFILE, exact_centroid=False),
            centroid_bits=8),
    Variant("delta 0.05, centroid estimate (dropped_weight 0)", dict(DEFAULT_PROFILE,
                                                                     dropped_weight=0.0)),
    Variant("delta 0.05, dropped_weight 0.05", dict(DEFAULT_PROFILE, dropped_weight=0.05)),
    Variant("delta 0.05, dropped_weight 0.2", dict(DEFAULT_PROFILE, dropped_weight=0.2)),
    Variant("delta 0.02 (default otherwise)", dict(DEFAULT_PROFILE, delta=0.02)),
    Variant("fixed-budget profile (1/16, int8, cap)", FIXED_PROFILE, centroid_bits=8),
    Variant("oracle pages, budget 1/8", oracle=True),
    Variant("centroid, budget 1/8", dict(estimator="centroid")),
    Variant("quest bound, budget 1/8", dict(estimator="quest")),
    Variant("mean-constrained bound, budget 1/8", dict(estimator="bound")),
    Variant("hybrid, budget 1/8 (default)", dict(estimator="hybrid")),
    Variant("hybrid, budget 1/8, delta 0.05 (default config)", dict(delta=0.05)),
    Variant("hybrid + exact rerank x1.5, budget 1/8", dict(rerank=1.5)),
    Variant("hybrid + rerank x1.5, sinks 16 / local 64", dict(rerank=1.5, sink_tokens=16,
                                                              local_tokens=64)),
    Variant("oracle pages, sinks 16 / local 64", dict(sink_tokens=16, local_tokens=64),
            oracle=True),
    Variant("oracle pages, delta 0.05", DELTA, oracle=True),
    Variant("delta 0.05, estimate", DELTA),
    Variant("delta 0.05, estimate + rerank (cap 1/2)", dict(DELTA, budget=0.5, rerank=1.0)),
    Variant("delta 0.02, estimate + rerank (cap 1/2)", dict(budget=0.5, delta=0.02, rerank=1.0)),
    Variant("delta 0.05, certified (cap 1/2)", dict(DELTA, budget=0.5,
                                                    delta_control="certified")),
    Variant("delta 0.05, certified + full exact scoring", dict(DELTA, delta_control="certified",
                                                               rerank=8.0)),
    Variant("time reuse tau 0.8, budget 1/8", reuse=ReuseParams(tau=0.8)),
    Variant("time reuse tau 0.9, budget 1/8", reuse=ReuseParams(tau=0.9)),
    Variant("time reuse tau 0.6, age 16, budget 1/8", reuse=ReuseParams(tau=0.6, max_age=16)),
    Variant("time reuse tau 0.6, age 16, no dilation", reuse=ReuseParams(tau=0.6, max_age=16,
                                                                          radius=0)),
    Variant("time reuse tau 0.5, age 16, radius 2", reuse=ReuseParams(tau=0.5, max_age=16,
                                                                       radius=2)),
    Variant("int8 centroids, budget 1/8", centroid_bits=8, knobs=dict(exact_centroid=False)),
    Variant("int4 centroids, budget 1/8", centroid_bits=4, knobs=dict(exact_centroid=False)),
    Variant("int8 centroids, centroid estimator", centroid_bits=8,
            knobs=dict(exact_centroid=False, estimator="centroid")),
    Variant("int4 centroids, centroid estimator", centroid_bits=4,
            knobs=dict(exact_centroid=False, estimator="centroid")),
    Variant("PSAW from layer 2 (phi .5), budget 1/8", psaw=(2, 0.5, 1.0)),
    Variant("ETF from layer 2 (psi .5), budget 1/8", etf=(2, 0.5, 1.0)),
)  # fmt: skip


def _fraction(spec, layer: int, num_layers: int) -> float:
    return 0.0 if spec is None else depth_fraction(spec[0], spec[1], spec[2], layer, num_layers)


def run_audit(captures, variants=VARIANTS, dense_layers=(0, 1), progress=None):
    """Replay every variant on every sparse layer of every capture.

    Returns:
        {variant name: {layer: [StepMeasures per window]}}.
    """
    results: dict[str, dict[int, list[StepMeasures]]] = {v.name: {} for v in variants}
    for cap in captures:
        num_layers = len(cap.layers)
        windows: dict[int, dict] = {}
        for bits in sorted({v.centroid_bits for v in variants}):
            for li, lay in enumerate(cap.layers):
                if lay.sliding_window is None and li not in dense_layers:
                    windows.setdefault(bits, {})[li] = page_window(
                        lay.query, lay.key, lay.scale, BASE["block_size"], bits
                    )
        for v in variants:
            prev = None
            for li, win in windows[v.centroid_bits].items():
                params = SelectionParams(scale=win.scale, **{**BASE, **v.knobs})
                params = replace(
                    params,
                    window_start=_fraction(v.psaw, li, num_layers),
                    frozen_fraction=_fraction(v.etf, li, num_layers),
                )
                if v.oracle:
                    keep = oracle_keep(win, params)
                    none = torch.zeros(keep.shape[:2], dtype=torch.bool)
                    m = measure(win, keep, torch.ones(keep.shape[:2]), win.true_logits, none)
                else:
                    m = replay_layer(win, params, v.reuse, prev_keep=prev)
                prev = m.keep
                results[v.name].setdefault(li, []).append(m)
                if progress is not None:
                    progress.update(1)
    return results


def _cat(ms: list[StepMeasures], name: str) -> torch.Tensor:
    return torch.cat([getattr(m, name).flatten() for m in ms])


def summarize(variant: Variant, by_layer: dict[int, list[StepMeasures]], delta: float = 0.05):
    """One ablation row (dict of floats)."""
    ms = [m for layer in by_layer.values() for m in layer]
    true = _cat(ms, "true_dropped").double()
    est = _cat(ms, "est_dropped").double()
    cert = _cat(ms, "certified").double()
    kept = _cat(ms, "kept_fraction").double()
    oracle_kept = _cat(ms, "oracle_kept_fraction").double()
    reused = _cat(ms, "reused").double()
    knobs = {**BASE, **variant.knobs}
    scored = 1.0 - reused
    rerank = knobs.get("rerank", 0.0)
    reranked = min(1.0, rerank * knobs["budget"]) if rerank else 0.0
    summaries = 0.0 if variant.oracle else SUMMARY_BYTES_PER_PAGE[variant.centroid_bits]
    scoring = 0.0 if variant.oracle else SCORING_FLOPS_PER_PAGE
    bytes_rel = kept + scored * (summaries + 0.5 * reranked)
    flops_rel = kept + scored * (scoring + 0.5 * reranked)
    ok = ~torch.isnan(cert)
    return {
        "variant": variant.name,
        "true_dropped_mean": true.mean().item(),
        "true_dropped_p99": true.quantile(0.99).item(),
        "share_le_delta": (true <= delta).double().mean().item(),
        "est_dropped_mean": est.nanmean().item() if (~torch.isnan(est)).any() else math.nan,
        "certified_mean": cert[ok].mean().item() if ok.any() else math.nan,
        "bound_holds": (cert[ok] >= true[ok] - 1e-4).double().mean().item()
        if ok.any()
        else math.nan,
        "bound_minus_true": (cert[ok] - true[ok]).mean().item() if ok.any() else math.nan,
        "kept_fraction": kept.mean().item(),
        "kept_vs_oracle": kept.mean().item() / oracle_kept.mean().item(),
        "recall_top": _cat(ms, "recall").double().mean().item(),
        "reuse_rate": reused.mean().item(),
        "bytes_vs_dense": bytes_rel.mean().item(),
        "flops_vs_dense": flops_rel.mean().item(),
        "steps": true.numel(),
    }


_COLUMNS = (
    ("variant", "{}"),
    ("true_dropped_mean", "{:.4f}"),
    ("true_dropped_p99", "{:.3f}"),
    ("share_le_delta", "{:.3f}"),
    ("est_dropped_mean", "{:.4f}"),
    ("certified_mean", "{:.4f}"),
    ("bound_holds", "{:.3f}"),
    ("bound_minus_true", "{:.4f}"),
    ("kept_fraction", "{:.3f}"),
    ("kept_vs_oracle", "{:.3f}"),
    ("recall_top", "{:.3f}"),
    ("reuse_rate", "{:.2f}"),
    ("bytes_vs_dense", "{:.3f}"),
    ("flops_vs_dense", "{:.3f}"),
)


def markdown_table(rows: list[dict], columns=_COLUMNS) -> str:
    head = "| " + " | ".join(c for c, _ in columns) + " |"
    sep = "| " + " | ".join("---" for _ in columns) + " |"
    body = [
        "| " + " | ".join(fmt.format(r[c]) if r[c] == r[c] else "-" for c, fmt in columns) + " |"
        for r in rows
    ]
    return "\n".join([head, sep, *body]) + "\n"


def layer_rows(by_layer: dict[int, list[StepMeasures]]) -> list[dict]:
    rows = []
    for li, ms in sorted(by_layer.items()):
        row = summarize(Variant(f"layer {li}"), {li: ms})
        row["variant"] = str(li)
        rows.append(row)
    return rows


def _plots(results, out: Path, names: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name in names:
        layers = sorted(results[name])
        means = [_cat(results[name][li], "true_dropped").mean().item() for li in layers]
        ax.plot(layers, means, marker="o", ms=3, label=name)
    ax.set_xlabel("layer")
    ax.set_ylabel("mean true dropped mass")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "dropped_by_layer.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, by_layer in results.items():
        if "delta" not in name:
            continue
        true = torch.sort(_cat([m for v in by_layer.values() for m in v], "true_dropped")).values
        ax.plot(true.numpy(), torch.linspace(0, 1, true.numel()).numpy(), label=name)
    ax.axvline(0.05, color="k", lw=0.8, ls="--")
    ax.set_xlabel("true dropped mass per (step, layer, KV head)")
    ax.set_ylabel("CDF")
    ax.set_xlim(0, 0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "dropped_cdf.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """``prhs-audit --model smollm2 --out DIR``."""
    from prhs_vllm.eval.capture import DENSE_LAYERS, MODELS, capture_windows

    parser = argparse.ArgumentParser(prog="prhs-audit", description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    parser.add_argument("--tokens", type=int, default=4096, help="window length (tokens)")
    parser.add_argument("--windows", type=int, default=2, help="essay windows")
    parser.add_argument("--queries", type=int, default=32, help="decode steps per window")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--only", nargs="*", default=None,
        help="run only the variants whose name contains one of these strings",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    from tqdm import tqdm

    torch.manual_seed(args.seed)
    torch.set_grad_enabled(False)
    t0 = time.time()
    captures = capture_windows(args.model, args.tokens, args.windows, args.queries, args.seed)
    dense = DENSE_LAYERS[args.model]
    sparse_layers = [
        li for li, lay in enumerate(captures[0].layers)
        if lay.sliding_window is None and li not in dense
    ]  # fmt: skip
    variants = [
        v for v in VARIANTS if args.only is None or any(part in v.name for part in args.only)
    ]
    total = len(variants) * len(sparse_layers) * len(captures)
    with tqdm(total=total, desc="replay") as bar:
        results = run_audit(captures, variants, dense, bar)
    rows = [summarize(v, results[v.name]) for v in variants]
    args.out.mkdir(parents=True, exist_ok=True)
    command = "prhs-audit " + " ".join(argv if argv is not None else sys.argv[1:])
    header = (
        f"# prhs-audit: {args.model}, {args.windows} windows x {args.tokens} tokens, "
        f"last {args.queries} positions as decode steps, seed {args.seed}\n\n"
        f"Command: `{command}`  \nMachine: {platform.machine()} CPU, torch "
        f"{torch.__version__}; {time.time() - t0:.0f} s. Sparse layers: {sparse_layers}. "
        f"Pages of {BASE['block_size']} tokens; dropped mass = group mean per (step, layer, "
        f"KV head); bytes / FLOPs relative to dense attention over the same context.\n\n"
    )
    (args.out / "ablation.md").write_text(header + markdown_table(rows))
    (args.out / "ablation.json").write_text(json.dumps(rows) + "\n")
    default = variants[0].name
    (args.out / "layers.md").write_text(
        header + f"Per layer, `{default}`:\n\n" + markdown_table(layer_rows(results[default]))
    )
    _plots(results, args.out, [v.name for v in variants[:6]])
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
