"""End to end on the CPU: `vllm serve` SmolLM2-135M-Instruct with and without
`--attention-backend prhs`, talked to with the `openai` client.

(a) Short prompts decode dense under prhs and give the same greedy text as a
    plain server. (b) A pass key hidden in a ~4K-token prompt is found while
    sparse decode is engaged, proven by the backend's counters on /metrics.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.e2e_server import scrape_metrics, vllm_server

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
SHORT_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Water boils at a temperature of",
]
PASSKEY_TOKENS = 4000
PASSKEYS = 3
COMMON_ARGS = [
    "--max-model-len",
    "8192",
    "--dtype",
    "bfloat16",
    "--max-num-seqs",
    "4",
    "--block-size",
    "32",
    "--enforce-eager",
]
SERVER_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2", "PRHS_STATS_FLUSH_S": "0"}


@pytest.fixture(scope="module")
def model_dir() -> Path:
    from prhs_vllm.models import prepare_smollm2

    target = os.environ.get("PRHS_SMOLLM2_DIR") or str(
        Path.home() / ".cache" / "prhs-vllm" / "smollm2-135m-instruct"
    )
    return prepare_smollm2(target)


@pytest.fixture(scope="module")
def passkey_prompts(model_dir: Path) -> list[tuple[str, str]]:
    from transformers import AutoTokenizer

    from prhs_vllm.eval.passkey import make_passkey_prompt, random_passkey

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    prompts = []
    for seed in range(PASSKEYS):
        key = random_passkey(seed)
        depth = (seed + 0.5) / PASSKEYS
        prompts.append((key, make_passkey_prompt(tokenizer, PASSKEY_TOKENS, key, depth, seed)))
    return prompts


def _complete(base: str, model: str, prompt: str, max_tokens: int) -> str:
    from openai import OpenAI

    client = OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=600)
    result = client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0
    )
    return result.choices[0].text


@pytest.fixture(scope="module")
def dense_short_outputs(model_dir: Path, tmp_path_factory) -> list[str]:
    log = tmp_path_factory.mktemp("dense") / "server.log"
    with vllm_server(model_dir, COMMON_ARGS, log, SERVER_ENV) as base:
        return [_complete(base, str(model_dir), p, 24) for p in SHORT_PROMPTS]


def test_prhs_serve_short_prompts_match_dense_and_passkey_found_sparse(
    model_dir: Path, passkey_prompts, dense_short_outputs, tmp_path: Path
):
    config = {"prhs": {"config": str(REPO / "configs" / "default.yaml")}}
    args = COMMON_ARGS + ["--attention-backend", "prhs", "--additional-config", json.dumps(config)]
    with vllm_server(model_dir, args, tmp_path / "server.log", SERVER_ENV) as base:
        short = [_complete(base, str(model_dir), p, 24) for p in SHORT_PROMPTS]
        before = scrape_metrics(base)
        answers = [(key, _complete(base, str(model_dir), p, 8)) for key, p in passkey_prompts]
        after = scrape_metrics(base)

    assert short == dense_short_outputs, "short prompts must decode dense, identical to vLLM"
    # Short prompts never reach min_context: no sparse step yet.
    assert before.get("prhs_sparse_decode_tokens_total", 0.0) == 0.0
    assert before["prhs_dense_decode_tokens_total"] > 0

    sparse_tokens = after["prhs_sparse_decode_tokens_total"]
    assert sparse_tokens >= PASSKEYS, f"sparse decode not engaged: {after}"
    kept = after["prhs_pages_kept_total"] / after["prhs_context_pages_total"]
    assert 0.0 < kept < 1.0, f"kept fraction {kept}: not sparse"
    found = [key in text for key, text in answers]
    assert all(found), f"pass keys not found: {answers} (kept fraction {kept:.3f})"
