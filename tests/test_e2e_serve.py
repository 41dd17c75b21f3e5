"""End to end on the CPU: `vllm serve` SmolLM2-135M-Instruct with and without
`--attention-backend prhs`, talked to with the `openai` client.

(a) Short prompts decode dense under prhs and give the same greedy text as a
    plain server. (b) Every needle of a fixed slice of the retrieval generator
    (prhs_vllm.eval.retrieval: pass key, magic word, and a key among distractor
    keys, 2.1K-4K tokens) that the plain server finds, prhs finds too, while
    sparse decode is engaged, proven by the backend's counters on /metrics.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e_server import scrape_metrics, smollm2_dir, vllm_server

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
SHORT_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Water boils at a temperature of",
]
#: (kind, prompt tokens, needle depth) of the needle cases, seed 0: a fixed design
#: (each kind at two depths; lengths just above the default min_context of 2048
#: and at 4K), not picked by outcome. Each costs ~10-20 s of CPU prefill.
RETRIEVAL_CASES = [
    ("number", 2100, 0.1),
    ("word", 2100, 0.5),
    ("multikey", 2500, 0.9),
    ("number", 2500, 0.5),
    ("word", 4000, 0.9),
    ("multikey", 4000, 0.1),
]
#: Enough for a 7-digit answer (a token per digit) and what follows it.
NEEDLE_MAX_TOKENS = 12
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
    return smollm2_dir()


@pytest.fixture(scope="module")
def needle_cases(model_dir: Path) -> list:
    from transformers import AutoTokenizer

    from prhs_vllm.eval.retrieval import retrieval_case

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return [retrieval_case(tokenizer, *spec, seed=0) for spec in RETRIEVAL_CASES]


def _complete(base: str, model: str, prompt: str, max_tokens: int) -> str:
    from openai import OpenAI

    client = OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=600)
    result = client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0
    )
    return result.choices[0].text


def _needles(base: str, model: str, cases: list) -> list[tuple[str, str]]:
    """(grade, completion) per case: "correct", "distractor" or "miss"."""
    from prhs_vllm.eval.retrieval import grade

    texts = [_complete(base, model, case.prompt, NEEDLE_MAX_TOKENS) for case in cases]
    return [(grade(case, text), text) for case, text in zip(cases, texts, strict=True)]


@pytest.fixture(scope="module")
def dense_outputs(model_dir: Path, needle_cases, tmp_path_factory):
    """(short-prompt texts, needle (grade, completion) per case) of a plain vLLM server."""
    log = tmp_path_factory.mktemp("dense") / "server.log"
    with vllm_server(model_dir, COMMON_ARGS, log, SERVER_ENV) as base:
        short = [_complete(base, str(model_dir), p, 24) for p in SHORT_PROMPTS]
        return short, _needles(base, str(model_dir), needle_cases)


def test_prhs_serve_short_prompts_match_dense_and_needles_found_sparse(
    model_dir: Path, needle_cases, dense_outputs, tmp_path: Path
):
    dense_short, dense_needles = dense_outputs
    config = {"prhs": {"config": str(REPO / "configs" / "default.yaml")}}
    args = COMMON_ARGS + ["--attention-backend", "prhs", "--additional-config", json.dumps(config)]
    with vllm_server(model_dir, args, tmp_path / "server.log", SERVER_ENV) as base:
        short = [_complete(base, str(model_dir), p, 24) for p in SHORT_PROMPTS]
        before = scrape_metrics(base)
        needles = _needles(base, str(model_dir), needle_cases)
        after = scrape_metrics(base)

    assert short == dense_short, "short prompts must decode dense, identical to vLLM"
    # Short prompts never reach min_context: no sparse step yet.
    assert before.get("prhs_sparse_decode_tokens_total", 0.0) == 0.0
    assert before["prhs_dense_decode_tokens_total"] > 0

    sparse_tokens = after["prhs_sparse_decode_tokens_total"]
    assert sparse_tokens >= len(needle_cases), f"sparse decode not engaged: {after}"
    kept = after["prhs_pages_kept_total"] / after["prhs_context_pages_total"]
    assert 0.0 < kept < 1.0, f"kept fraction {kept}: not sparse"
    dense_found = [g == "correct" for g, _ in dense_needles]
    assert sum(dense_found) >= 2, f"the dense model itself misses the needles: {dense_needles}"
    # Every needle dense finds, prhs finds with the same answer (correct = the case's answer).
    missed = [
        (spec, case.answer, d, s)
        for spec, case, d, s in zip(
            RETRIEVAL_CASES, needle_cases, dense_needles, needles, strict=True
        )
        if d[0] == "correct" and s[0] != "correct"
    ]
    assert not missed, f"prhs missed needles that dense found (kept {kept:.3f}): {missed}"
