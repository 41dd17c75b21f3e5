"""Build hook. The package is pure Python today; the CUDA sparse decode kernel
(csrc/) joins here when CUDA torch and nvcc are present (see issue: GPU kernels)."""

from setuptools import setup

setup()
