"""Evaluation: prompt builders and scorers (importing this package loads no vLLM
or torch), and the offline audit submodules capture, replay and audit (they
use torch; import them explicitly)."""

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
