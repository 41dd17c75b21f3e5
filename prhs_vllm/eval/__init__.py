"""Evaluation helpers (prompt builders and scorers); they import no vLLM or torch."""

from prhs_vllm.eval.passkey import (
    PASSKEY_DEPTHS,
    make_passkey_prompt,
    passkey_cases,
    passkey_found,
    random_passkey,
)

__all__ = [
    "PASSKEY_DEPTHS",
    "make_passkey_prompt",
    "passkey_cases",
    "passkey_found",
    "random_passkey",
]
