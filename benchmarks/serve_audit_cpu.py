"""Serve SmolLM2 on the CPU with prhs in audit mode and report what /metrics says.

Starts ``vllm serve`` (the CPU build), sends pass-key prompts of ~4K tokens
through the OpenAI completions API, and reads the prhs counters: sparse
tokens, kept fraction, reused selections (time axis), and, from the audit,
the true dropped mass against the estimate and the certified bound.

    python benchmarks/serve_audit_cpu.py --config configs/reuse-int8.yaml \
        --out benchmarks/results/2026-11-cpu-serve-audit/reuse-int8.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from e2e_server import vllm_server  # noqa: E402

from prhs_vllm.eval.passkey import (  # noqa: E402
    make_passkey_prompt,
    passkey_found,
    random_passkey,
)
from prhs_vllm.models import prepare_smollm2  # noqa: E402


def metrics(base: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("prhs_") and " " in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def ratio(m: dict[str, float], name: str, count: float) -> float | None:
    return m.get(name, 0.0) / count if count else None


def complete(base: str, model: str, prompt: str, max_tokens: int) -> str:
    body = json.dumps(
        {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
    ).encode()
    req = urllib.request.Request(
        f"{base}/v1/completions", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=600) as resp:
        return json.loads(resp.read())["choices"][0]["text"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", required=True, help="prhs YAML (audit is switched on), or 'dense'"
    )
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=4000)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    model = str(prepare_smollm2())
    tokenizer = AutoTokenizer.from_pretrained(model)
    extra = ["--dtype", "bfloat16", "--max-model-len", "8192", "--block-size", "32"]
    if args.config != "dense":  # 'dense': vLLM's own backend, the pass-key baseline
        prhs = {"config": str(REPO / args.config), "audit": True, "log_interval_s": 0.0}
        extra += ["--attention-backend", "prhs", "--additional-config", json.dumps({"prhs": prhs})]
    log = Path(tempfile.mkdtemp()) / "server.log"
    t0 = time.time()
    answers = []
    with vllm_server(model, extra, log, env={"VLLM_CPU_KVCACHE_SPACE": "4"}) as base:
        for seed in range(args.prompts):
            key = random_passkey(seed)
            prompt = make_passkey_prompt(tokenizer, args.tokens, key, 0.5, seed=seed)
            text = complete(base, model, prompt, args.max_tokens)
            answers.append({"passkey": key, "found": passkey_found(text, key)})
        time.sleep(2.5)  # workers flush their counters at most once a second
        m = metrics(base)
    heads = m.get("prhs_head_selections_total", 0.0)
    scored = m.get("prhs_scored_selections_total", 0.0)
    audited = m.get("prhs_audit_selections_total", 0.0)
    result = {
        "config": args.config,
        "command": "python benchmarks/serve_audit_cpu.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()} CPU",
        "seconds": round(time.time() - t0, 1),
        "answers": answers,
        "sparse_decode_tokens": m.get("prhs_sparse_decode_tokens_total"),
        "kept_fraction": m.get("prhs_kept_fraction"),
        "reused_share": ratio(m, "prhs_reused_selections_total", heads),
        "est_dropped_mean": ratio(m, "prhs_est_dropped_mass_sum_total", scored),
        "certified_mean": ratio(m, "prhs_certified_dropped_mass_sum_total", scored),
        "true_dropped_mean": ratio(m, "prhs_audit_true_dropped_mass_sum_total", audited),
        "over_delta_share": ratio(m, "prhs_audit_over_delta_total", audited),
        "bound_violations": m.get("prhs_audit_bound_violations_total"),
        "metrics": m,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "metrics"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
