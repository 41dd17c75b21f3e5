"""vLLM general-plugin entry point (`vllm.general_plugins` -> `prhs`).

vLLM calls ``register()`` in every process it starts, before it parses
`--attention-backend`. Registration only names class paths: nothing heavy is
imported until vLLM asks for the backend class. In the front-end process it
also has every engine config checked as it is created (``check_engine_config``),
before the engine starts.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import Any

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
    _compat.check_engine_configs(check_engine_config)
    metrics.ensure_stats_dir_env()
    metrics.register_collector()
    _registered = True


def check_engine_config(vllm_config: Any) -> None:
    """Check the prhs part of an engine config in the front end, before the
    engine starts (``_compat.check_engine_configs`` calls it).

    With `--attention-backend prhs`: resolve the config (`--additional-config`,
    ``PRHS_CONFIG`` or the defaults) and raise ``PrhsConfigError`` naming the
    field if it is invalid (an uncaught one prints as one line:
    ``_print_config_errors_in_one_line``); with its metrics on, create the
    stats directory so that ``/metrics`` has the prhs series from start-up.
    Without it, a ``prhs`` section in `--additional-config` is ignored: one
    warning says so, names the flag to add, and says whether the section is
    also invalid.
    """
    from prhs_vllm import _compat, metrics
    from prhs_vllm.config import PrhsConfigError, resolve_config

    additional = getattr(vllm_config, "additional_config", None) or {}
    attention = getattr(vllm_config, "attention_config", None)
    backend = getattr(attention, "backend", None)
    if _compat.is_prhs_selection(backend):
        try:
            config = resolve_config(additional)
        except PrhsConfigError:
            _print_config_errors_in_one_line()
            raise
        if config.metrics:
            metrics.prepare_stats_dir()
        return
    if not isinstance(additional, Mapping) or "prhs" not in additional:
        return
    try:
        resolve_config(additional)
        invalid = ""
    except PrhsConfigError as exc:
        invalid = f" It is also invalid: {exc}"
    name = "auto (vLLM's choice)" if backend is None else getattr(backend, "name", backend)
    logger.warning(
        "prhs: --additional-config has a 'prhs' section, but the attention backend is %s, "
        "not prhs: the section is ignored and vLLM runs its own attention. Add "
        "--attention-backend prhs to use it.%s", name, invalid,
    )  # fmt: skip


def _print_config_errors_in_one_line() -> None:
    """Have an uncaught ``PrhsConfigError`` printed as its message alone.

    vLLM's CLI has no handler for start-up errors: the error would end the
    process as a Python traceback through uvloop and vLLM's entry points
    (~40 lines) for what is one wrong value. Installed only when the front end
    is about to raise one; every other exception goes to the previous hook.
    """
    from prhs_vllm.config import PrhsConfigError

    previous = sys.excepthook
    if getattr(previous, "_prhs_one_line", False):
        return

    def excepthook(exc_type, exc, tb):
        if isinstance(exc, PrhsConfigError):
            print(f"ERROR: invalid {exc}", file=sys.stderr)
            return
        previous(exc_type, exc, tb)

    excepthook._prhs_one_line = True  # type: ignore[attr-defined]
    sys.excepthook = excepthook
