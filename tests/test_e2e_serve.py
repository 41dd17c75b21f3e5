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

    from prhs_vllm.eval.passkey import passkey_cases

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return passkey_cases(tokenizer, PASSKEY_TOKENS, PASSKEYS)


def _complete(base: str, model: str, prompt: str, max_tokens: int) -> str:
    from openai import OpenAI

    client = OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=600)
    result = client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0
    )
    return result.choices[0].text


def _passkeys_found(base: str, model: str, cases: list[tuple[str, str]]) -> list[bool]:
    from prhs_vllm.eval.passkey import passkey_found

    return [passkey_found(_complete(base, model, prompt, 8), key) for key, prompt in cases]


@pytest.fixture(scope="module")
def dense_outputs(model_dir: Path, passkey_prompts, tmp_path_factory):
    """(short-prompt texts, pass keys found) of a plain vLLM server."""
    log = tmp_path_factory.mktemp("dense") / "server.log"
    with vllm_server(model_dir, COMMON_ARGS, log, SERVER_ENV) as base:
        short = [_complete(base, str(model_dir), p, 24) for p in SHORT_PROMPTS]
        return short, _passkeys_found(base, str(model_dir), passkey_prompts)


def test_prhs_serve_short_prompts_match_dense_and_passkey_found_sparse(
    model_dir: Path, passkey_prompts, dense_outputs, tmp_path: Path
):
    dense_short, dense_found = dense_outputs
    config = {"prhs": {"config": str(REPO / "configs" / "default.yaml")}}
    args = COMMON_ARGS + ["--attention-backend", "prhs", "--additional-config", json.dumps(config)]
    with vllm_server(model_dir, args, tmp_path / "server.log", SERVER_ENV) as base:
        short = [_complete(base, str(model_dir), p, 24) for p in SHORT_PROMPTS]
        before = scrape_metrics(base)
        found = _passkeys_found(base, str(model_dir), passkey_prompts)
        after = scrape_metrics(base)

    assert short == dense_short, "short prompts must decode dense, identical to vLLM"
    # Short prompts never reach min_context: no sparse step yet.
    assert before.get("prhs_sparse_decode_tokens_total", 0.0) == 0.0
    assert before["prhs_dense_decode_tokens_total"] > 0

    sparse_tokens = after["prhs_sparse_decode_tokens_total"]
    assert sparse_tokens >= PASSKEYS, f"sparse decode not engaged: {after}"
    kept = after["prhs_pages_kept_total"] / after["prhs_context_pages_total"]
    assert 0.0 < kept < 1.0, f"kept fraction {kept}: not sparse"
    assert sum(dense_found) >= 2, f"the dense model itself misses the pass keys: {dense_found}"
    missed = [i for i, (d, s) in enumerate(zip(dense_found, found, strict=True)) if d and not s]
    assert not missed, f"prhs missed pass keys {missed} that dense found (kept {kept:.3f})"
