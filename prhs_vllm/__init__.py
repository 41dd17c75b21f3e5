"""prhs-vllm: a vLLM attention backend that decodes long contexts sparsely.

Importing this package is cheap: vLLM, torch and pydantic are imported only by
the modules that need them.
"""

__version__ = "0.1.0"

BACKEND_NAME = "PRHS"

# A child of vLLM's logger, so prhs messages appear in vLLM's log with its format.
LOGGER_NAME = "vllm.prhs"
