"""Tolerances of the tests, one row per input dtype.

Every comparison in tests/ takes its tolerance from ``tol(dtype)``. The rows
say how far a result computed from inputs of that dtype may be from an fp64
oracle fed the same (already rounded) inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tol:
    atol: float
    """Attention outputs (returned in the input dtype): absolute."""
    rtol: float
    """Attention outputs: relative."""
    lse_atol: float
    """Log-sum-exp of the scaled logits (always float32)."""
    sum_atol: float
    """Page key sums (float32 accumulation of at most one page of keys)."""
    mass_atol: float
    """Estimated attention masses (float32 softmax), e.g. for ranking ties."""
    bound_rtol: float
    """Certified dropped-mass bound vs the true dropped mass (float32 logits)."""

    def close(self) -> dict[str, float]:
        """Keyword arguments for torch.testing.assert_close on outputs."""
        return {"atol": self.atol, "rtol": self.rtol}


# bf16 outputs are rounded to 8 significant bits (relative error <= 2**-9) after
# float32 math; two independent bf16 results may differ by a couple of ulps.
_BF16 = Tol(atol=1e-2, rtol=1.6e-2, lse_atol=1e-4, sum_atol=1e-4, mass_atol=1e-6, bound_rtol=1e-3)
# float32: summation order only.
_FP32 = Tol(atol=2e-5, rtol=1e-4, lse_atol=1e-4, sum_atol=1e-4, mass_atol=1e-6, bound_rtol=1e-3)

TOLERANCES: dict[torch.dtype, Tol] = {
    torch.float32: _FP32,
    torch.bfloat16: _BF16,
}


def tol(dtype: torch.dtype) -> Tol:
    return TOLERANCES[dtype]
