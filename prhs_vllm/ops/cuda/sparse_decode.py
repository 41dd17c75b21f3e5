"""Sparse paged decode on CUDA: ``torch.ops.prhs.sparse_paged_decode``
(csrc/sparse_decode) behind the signature of
``prhs_vllm.ops.ref.sparse_decode_indexed.sparse_paged_decode_indexed``.

The op allocates nothing: besides ``out`` and ``lse`` it takes a split-K
workspace. For CUDA graphs, size one with ``alloc_workspace`` for the largest
batch before capture and pass it on every call.

A workspace starts with arrival counters (the last split of a KV head to finish
merges the others' partials). They must be zero before its first call, and
every call leaves them zero: ``alloc_workspace`` returns them zeroed, and a
workspace this module has not seen is zeroed on its first call.
"""

from __future__ import annotations

import functools
import importlib
import weakref

import torch

_BUILD_HINT = (
    "build it on a machine with nvcc and CUDA torch: `python setup.py build_ext --inplace` "
    "or `pip install --no-build-isolation -e .`"
)


@functools.cache
def _load_error() -> str | None:
    """None once prhs_vllm._C is loaded (it registers torch.ops.prhs), else why not."""
    try:
        importlib.import_module("prhs_vllm._C")
    except ImportError as exc:
        return str(exc)
    # The ops mutate their arguments and return nothing: tracing needs no shapes.
    for op in ("prhs::sparse_paged_decode", "prhs::update_page_summaries", "prhs::page_logits"):
        torch.library.register_fake(op)(lambda *args: None)
    return None


def is_available() -> bool:
    """A CUDA device is visible and the extension prhs_vllm._C loads."""
    return torch.cuda.is_available() and _load_error() is None


def _ops():
    error = _load_error()
    if error is not None:
        raise RuntimeError(f"prhs CUDA kernels are not available ({error}); {_BUILD_HINT}")
    return torch.ops.prhs


def _device_index(device: torch.device | str | int) -> int:
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    return device.index if device.index is not None else torch.cuda.current_device()


def workspace_size(
    max_num_rows: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    max_kept: int,
    dtype: torch.dtype,
    device: torch.device | str | int,
) -> int:
    """Workspace bytes enough for any batch of 1..max_num_rows rows of this
    shape (max_kept: K, the width of kept_slots)."""
    return _ops().sparse_paged_decode_workspace_size(
        max_num_rows,
        num_q_heads,
        num_kv_heads,
        head_dim,
        block_size,
        max_kept,
        dtype,
        _device_index(device),
    )


def alloc_workspace(
    max_num_rows: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    max_kept: int,
    dtype: torch.dtype,
    device: torch.device | str | int,
) -> torch.Tensor:
    """A zero-filled uint8 workspace of workspace_size(...) bytes on `device`."""
    size = workspace_size(
        max_num_rows, num_q_heads, num_kv_heads, head_dim, block_size, max_kept, dtype, device
    )
    index = _device_index(device)
    return _zeroed_workspace(size, torch.device("cuda", index))


def split_plan(
    num_rows: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    max_kept: int,
    dtype: torch.dtype,
    device: torch.device | str | int,
    num_splits: int = 0,
    stages: int = 0,
) -> dict[str, int]:
    """How one call is cut up: query heads per CTA, CTAs per KV head group,
    split-K factor, workspace bytes, whether the last split merges the
    partials (else a second kernel does), the bytes of the workspace's
    leading arrival counters, whether the kernel is a programmatic
    dependent launch (Hopper; PRHS_SPARSE_DECODE_PDL=0 turns it off), and the
    depth of its cp.async ring (3: 4 CTAs an SM, 4: 3 CTAs; the plan picks the
    one whose busiest SM reads the fewest pages)
    (num_splits > 0 / stages > 0: the plan that asks for that split-K factor
    / ring depth, as ``sparse_paged_decode_indexed`` takes them)."""
    group_max, head_chunks, splits, nbytes, merge_in_split, counter_bytes, dependent, depth = _plan(
        num_rows,
        num_q_heads,
        num_kv_heads,
        head_dim,
        block_size,
        max_kept,
        dtype,
        _device_index(device),
        num_splits,
        stages,
    )
    return {
        "heads_per_cta": group_max,
        "head_chunks": head_chunks,
        "num_splits": splits,
        "workspace_bytes": nbytes,
        "merge_in_split": bool(merge_in_split),
        "counter_bytes": counter_bytes,
        "dependent_launch": bool(dependent),
        "stages": depth,
    }


@functools.lru_cache(maxsize=4096)
def _plan(
    num_rows: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    max_kept: int,
    dtype: torch.dtype,
    device_index: int,
    num_splits: int = 0,
    stages: int = 0,
) -> tuple[int, ...]:
    """The plan depends only on shapes and the device (never on data), so one
    op call per distinct shape is enough: later calls are a dict lookup."""
    plan = _ops().sparse_paged_decode_plan(
        num_rows, num_q_heads, num_kv_heads, head_dim, block_size, max_kept, dtype, device_index,
        num_splits, stages,
    )  # fmt: skip
    return tuple(int(x) for x in plan)


class SparseDecodeArgumentError(ValueError):
    """An argument the CUDA sparse decode cannot take (checked in Python,
    before any call into the extension)."""


_DTYPES = (torch.bfloat16, torch.float16)
_HEAD_DIMS = (64, 128, 256)
_SEGMENT = 16  # tokens per kept segment: block_size must be a multiple
_ALIGN = 16  # bytes: the kernels use 16-byte vector loads and stores
_VECTOR = 8  # elements of 16 bits in 16 bytes: row strides must be multiples
_MAX_SPLITS = 256  # kMaxSplits in csrc/sparse_decode/sparse_decode_kernel.cuh
_STAGES = (0, 3, 4)  # the plan's; kShallowStages, kDeepStages (sparse_decode_kernel.cuh)
# The device type the kernels run on; tests of the checks on CPU tensors patch it.
_KERNEL_DEVICE_TYPE = "cuda"


def _fail(message: str) -> None:
    raise SparseDecodeArgumentError(f"sparse_paged_decode: {message}")


def _check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_dims(t: torch.Tensor, name: str, dims: int, layout: str) -> None:
    if t.dim() != dims:
        _fail(f"{name} must have {dims} dims {layout}, got shape {tuple(t.shape)}")


def _check_int32(t: torch.Tensor, name: str, dims: int, layout: str) -> None:
    _check_tensor(t, name)
    if t.dtype != torch.int32:
        _fail(f"{name} must be int32, got {t.dtype}")
    _check_dims(t, name, dims, layout)


def _misaligned(t: torch.Tensor) -> bool:
    """t's data does not start on a 16-byte boundary. Unknown (False) for
    tensors without data: fake tensors while tracing."""
    if torch.compiler.is_compiling():
        return False
    try:
        return t.data_ptr() % _ALIGN != 0
    except RuntimeError:
        return False


def _check_vectors(t: torch.Tensor, name: str) -> None:
    """16-byte vector accesses: contiguous last dim, 16-byte aligned start,
    other strides whole vectors."""
    if t.stride(-1) != 1:
        _fail(f"{name} must be contiguous in its last dim, got strides {t.stride()}")
    if _misaligned(t):
        _fail(f"{name} must be {_ALIGN}-byte aligned (data_ptr {t.data_ptr():#x})")
    for d in range(t.dim() - 1):
        if t.stride(d) % _VECTOR:
            _fail(
                f"{name} stride {d} must be a multiple of {_VECTOR} elements, "
                f"got strides {t.stride()}"
            )


def check_arguments(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    kept_slots: torch.Tensor,
    num_kept: torch.Tensor,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> None:
    """Everything the CUDA op checks about its tensors except the workspace
    size, without calling into the extension; raises SparseDecodeArgumentError.
    Tensor metadata only (no device sync, no kernel)."""
    _check_tensor(query, "query")
    if query.dtype not in _DTYPES:
        _fail(f"query must be bfloat16 or float16, got {query.dtype}")
    _check_dims(query, "query", 3, "[N, Hq, D]")
    device = query.device
    if device.type != _KERNEL_DEVICE_TYPE:
        _fail(f"query must be a CUDA tensor, got device {device}")
    num_rows, num_q_heads, head_dim = query.shape
    if head_dim not in _HEAD_DIMS:
        _fail(f"head_dim (query.shape[2]) must be 64, 128 or 256, got {head_dim}")

    _check_tensor(key_cache, "key_cache")
    _check_dims(key_cache, "key_cache", 4, "[P, Hkv, block_size, D]")
    _, num_kv_heads, block_size, kv_head_dim = key_cache.shape
    if key_cache.dtype != query.dtype:
        _fail(f"key_cache must have query's dtype {query.dtype}, got {key_cache.dtype}")
    if kv_head_dim != head_dim:
        _fail(f"key_cache head_dim {kv_head_dim} differs from query's {head_dim}")
    if num_kv_heads <= 0 or num_q_heads % num_kv_heads:
        _fail(
            f"num_q_heads {num_q_heads} (query) is not a multiple of num_kv_heads "
            f"{num_kv_heads} (key_cache)"
        )
    if block_size <= 0 or block_size % _SEGMENT:
        _fail(f"block_size (key_cache.shape[2]) must be a multiple of 16, got {block_size}")
    _check_tensor(value_cache, "value_cache")
    if value_cache.dtype != query.dtype:
        _fail(f"value_cache must have query's dtype {query.dtype}, got {value_cache.dtype}")
    if value_cache.shape != key_cache.shape:
        _fail(
            f"value_cache must have key_cache's shape {tuple(key_cache.shape)}, "
            f"got {tuple(value_cache.shape)}"
        )
    if value_cache.stride() != key_cache.stride():
        _fail(
            f"value_cache must have key_cache's strides {key_cache.stride()}, "
            f"got {value_cache.stride()}"
        )

    _check_int32(block_table, "block_table", 2, "[N, M]")
    if block_table.shape[0] != num_rows or block_table.stride(1) != 1:
        _fail(
            f"block_table must be [N={num_rows}, M] with contiguous rows, got shape "
            f"{tuple(block_table.shape)} strides {block_table.stride()}"
        )
    _check_int32(seq_lens, "seq_lens", 1, "[N]")
    if seq_lens.shape[0] != num_rows or not seq_lens.is_contiguous():
        _fail(f"seq_lens must be contiguous [N={num_rows}], got shape {tuple(seq_lens.shape)}")
    _check_int32(kept_slots, "kept_slots", 3, "[N, Hkv, K]")
    if tuple(kept_slots.shape[:2]) != (num_rows, num_kv_heads) or not kept_slots.is_contiguous():
        _fail(
            f"kept_slots must be contiguous [N={num_rows}, Hkv={num_kv_heads}, K], got shape "
            f"{tuple(kept_slots.shape)} strides {kept_slots.stride()}"
        )
    _check_int32(num_kept, "num_kept", 2, "[N, Hkv]")
    if tuple(num_kept.shape) != (num_rows, num_kv_heads) or not num_kept.is_contiguous():
        _fail(
            f"num_kept must be contiguous [N={num_rows}, Hkv={num_kv_heads}], got shape "
            f"{tuple(num_kept.shape)} strides {num_kept.stride()}"
        )

    tensors = [
        ("key_cache", key_cache),
        ("value_cache", value_cache),
        ("block_table", block_table),
        ("seq_lens", seq_lens),
        ("kept_slots", kept_slots),
        ("num_kept", num_kept),
    ]
    if out is not None:
        _check_tensor(out, "out")
        if out.dtype != query.dtype:
            _fail(f"out must have query's dtype {query.dtype}, got {out.dtype}")
        if out.shape != query.shape:
            _fail(f"out must be [N, Hq, D] {tuple(query.shape)}, got {tuple(out.shape)}")
        tensors.append(("out", out))
    if lse is not None:
        _check_tensor(lse, "lse")
        if lse.dtype != torch.float32:
            _fail(f"lse must be float32, got {lse.dtype}")
        if tuple(lse.shape) != (num_rows, num_q_heads):
            _fail(f"lse must be [N, Hq] {(num_rows, num_q_heads)}, got {tuple(lse.shape)}")
        tensors.append(("lse", lse))
    for name, t in tensors:
        if t.device != device:
            _fail(f"{name} is on {t.device}, query on {device}: all tensors must share a device")

    _check_vectors(query, "query")
    _check_vectors(key_cache, "key_cache")
    _check_vectors(value_cache, "value_cache")
    if out is not None:
        _check_vectors(out, "out")


def check_workspace(workspace: torch.Tensor, device: torch.device, need: int) -> None:
    """A caller's workspace: on `device`, contiguous, >= need bytes, aligned."""
    _check_tensor(workspace, "workspace")
    if workspace.device != device:
        _fail(f"workspace is on {workspace.device}, query on {device}")
    if not workspace.is_contiguous():
        _fail("workspace must be contiguous")
    nbytes = workspace.numel() * workspace.element_size()
    if nbytes < need:
        _fail(
            f"workspace holds {nbytes} bytes, this call needs {need} "
            "(size it with alloc_workspace / workspace_size for the largest batch)"
        )
    if need > 0 and _misaligned(workspace):
        _fail(f"workspace must be {_ALIGN}-byte aligned (data_ptr {workspace.data_ptr():#x})")


def _call_plan(
    query, key_cache, kept_slots, num_splits: int = 0, stages: int = 0
) -> dict[str, int]:
    num_rows, num_q_heads, head_dim = query.shape
    return split_plan(
        num_rows,
        num_q_heads,
        key_cache.shape[1],
        head_dim,
        key_cache.shape[2],
        kept_slots.shape[-1],
        query.dtype,
        query.device,
        num_splits,
        stages,
    )


_workspaces: dict[torch.device, torch.Tensor] = {}
# id(workspace) -> weak reference, for workspaces whose counters are known to
# be zero: zero-filled here, or zeroed on their first call outside capture.
_counted_workspaces: dict[int, weakref.ref] = {}


def _remember_zeroed(workspace: torch.Tensor) -> None:
    key = id(workspace)
    _counted_workspaces[key] = weakref.ref(
        workspace, lambda _, key=key: _counted_workspaces.pop(key, None)
    )


def _zeroed_workspace(nbytes: int, device: torch.device) -> torch.Tensor:
    workspace = torch.zeros(nbytes, dtype=torch.uint8, device=device)
    _remember_zeroed(workspace)
    return workspace


def _zero_counters_once(workspace: torch.Tensor, counter_bytes: int) -> None:
    """Zeroes the arrival counters of a workspace this module has not seen
    (a caller's torch.empty). Inside graph capture the zeroing is captured too,
    and repeats on every replay, since the capture itself runs nothing."""
    ref = _counted_workspaces.get(id(workspace))
    if ref is not None and ref() is workspace:
        return
    workspace.view(torch.uint8).view(-1)[:counter_bytes].zero_()
    on_kernel_device = workspace.device.type == _KERNEL_DEVICE_TYPE
    if not (on_kernel_device and torch.cuda.is_current_stream_capturing()):
        _remember_zeroed(workspace)


def _shared_workspace(device: torch.device, need: int) -> torch.Tensor:
    """A per-device workspace of >= need bytes, grown on demand outside graph capture."""
    workspace = _workspaces.get(device)
    if workspace is None or workspace.numel() < need:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "sparse_paged_decode needs a larger workspace during CUDA graph capture: "
                "pass workspace=alloc_workspace(max_num_rows, ...) allocated before capture"
            )
        workspace = _zeroed_workspace(need, device)
        _workspaces[device] = workspace
    return workspace


def sparse_paged_decode_indexed(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    kept_slots: torch.Tensor,
    num_kept: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    *,
    lse: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
    num_splits: int = 0,
    stages: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CUDA version of the reference of the same name (same arguments, same
    results up to float32 summation order).

    Args:
        query: [N, Hq, D] bf16/fp16, D in {64, 128, 256}, last dim contiguous.
        key_cache, value_cache: [P, Hkv, bs, D], query's dtype, bs a multiple
            of 16; any strides (equal for both) with a contiguous last dim.
        block_table: [N, M] int32 (contiguous rows).
        seq_lens: [N] int32.
        kept_slots: [N, Hkv, K] int32 contiguous, ascending, -1 padded. The
            split-K factor depends on K, so K is best the real upper bound of
            num_kept (e.g. the page budget), not M.
        num_kept: [N, Hkv] int32 contiguous.
        scale: softmax scale.
        out: optional [N, Hq, D] output (query's dtype, last dim contiguous).
        lse: optional [N, Hq] float32 output.
        workspace: optional uint8 tensor from alloc_workspace; without one a
            per-device workspace is used (and grown outside graph capture).
        num_splits: 0 lets the plan pick the split-K factor; > 0 (at most 256)
            asks for that many (benchmarks: the workspace must fit that plan).
        stages: 0 lets the plan pick the kernel's cp.async ring depth; 3 or 4
            asks for that one (benchmarks, tests; same workspace caveat).
    Returns:
        (out [N, Hq, D], lse [N, Hq] float32; 0 and -inf where nothing is visible).
    Raises:
        SparseDecodeArgumentError (a ValueError): an argument the kernel cannot
        take; checked in Python on tensor metadata before the extension is called.
    """
    # Every argument is checked here, before any call into the extension: a bad
    # one raises SparseDecodeArgumentError (a ValueError) naming it.
    check_arguments(
        query, key_cache, value_cache, block_table, seq_lens, kept_slots, num_kept, out, lse
    )
    if not 0 <= num_splits <= _MAX_SPLITS:
        _fail(f"num_splits must be in [0, {_MAX_SPLITS}], got {num_splits}")
    if stages not in _STAGES:
        _fail(f"stages must be 0 (the plan's), 3 or 4, got {stages}")
    plan = _call_plan(query, key_cache, kept_slots, num_splits, stages)
    need = plan["workspace_bytes"]
    if workspace is not None:
        check_workspace(workspace, query.device, need)
    ops = _ops()
    num_rows, num_q_heads, head_dim = query.shape
    if out is None:
        out = torch.empty((num_rows, num_q_heads, head_dim), dtype=query.dtype, device=query.device)
    if lse is None:
        lse = torch.empty((num_rows, num_q_heads), dtype=torch.float32, device=query.device)
    if workspace is None:
        workspace = _shared_workspace(query.device, need)
    if plan["merge_in_split"]:
        _zero_counters_once(workspace, plan["counter_bytes"])
    ops.sparse_paged_decode(
        query,
        key_cache,
        value_cache,
        block_table,
        seq_lens,
        kept_slots,
        num_kept,
        float(scale),
        out,
        lse,
        workspace,
        num_splits,
        stages,
    )
    return out, lse
