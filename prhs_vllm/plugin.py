"""vLLM general-plugin entry point (`vllm.general_plugins` -> `prhs`).

vLLM calls ``register()`` in every process it starts, before it parses
`--attention-backend`. Registration only names class paths: nothing heavy is
imported until vLLM asks for the backend class.
"""

from __future__ import annotations

import logging

from prhs_vllm import LOGGER_NAME

logger = logging.getLogger(LOGGER_NAME)

CUDA_BACKEND = "prhs_vllm.backend.cuda.PrhsFlashAttentionBackend"
CPU_BACKEND = "prhs_vllm.backend.cpu.PrhsCpuAttentionBackend"

_registered = False


def register() -> None:
    """Register the prhs attention backend with vLLM (idempotent)."""
    global _registered
    if _registered:
        return
    from vllm.platforms import current_platform

    from prhs_vllm import _compat, metrics

    try:
        _compat.check_supported_version()
    except RuntimeError as exc:
        # Refusing to load would stop every vLLM start on this machine, prhs
        # asked for or not; without registration `--attention-backend prhs`
        # fails in vLLM's own backend lookup, and this line says why.
        logger.error("prhs backend not registered: %s", exc)
        _registered = True
        return
    if current_platform.is_cpu():
        class_path = CPU_BACKEND
        _compat.route_cpu_platform_to_prhs(class_path)
    elif current_platform.is_cuda():
        class_path = CUDA_BACKEND
    else:
        logger.info("prhs: platform %s is not supported; not registering", current_platform)
        _registered = True
        return
    _compat.register_prhs_backend(class_path)
    metrics.ensure_stats_dir_env()
    metrics.register_collector()
    _registered = True
