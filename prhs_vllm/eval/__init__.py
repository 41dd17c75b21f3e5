"""Evaluation helpers (prompt builders and scorers); they import no vLLM or torch."""

from prhs_vllm.eval.passkey import make_passkey_prompt, passkey_found, random_passkey

__all__ = ["make_passkey_prompt", "passkey_found", "random_passkey"]
