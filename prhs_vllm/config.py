"""PrHS sparsity configuration: schema, YAML loading and startup resolution.

This module is deliberately cheap to import: it depends only on pydantic and
PyYAML (never on torch or vLLM), so the plugin entry point, the CLI helpers and
the tests can read and validate a configuration without loading an engine.

Where the configuration comes from at startup (see :func:`resolve_config`):

1. ``--additional-config '{"prhs": {...}}'``: the ``prhs`` dict may name a YAML
   file (``"config": PATH`` or ``"config": NAME``) and/or give field values
   inline; inline values win over the file's. When the ``prhs`` key is present
   the environment variable is not consulted.
2. Otherwise the YAML file named by the ``PRHS_CONFIG`` environment variable
   (a path or a name), when it is set and non-empty.
3. Otherwise the defaults of :class:`PrhsConfig`.

A NAME is one of the configs shipped with the package (the repository's
``configs/``, installed as ``prhs_vllm/configs/``): ``default`` is
``configs/default.yaml``. A value that contains a path separator or ends in
``.yaml`` / ``.yml`` is a path (relative to the working directory); any other
is a name (:func:`config_file`).

Every error is a :class:`PrhsConfigError` whose message names the source, the
field and the allowed values.

``python -m prhs_vllm.config`` prints the configuration reference (a markdown
table generated from the field descriptions) that the README embeds.
"""

from __future__ import annotations

import json
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import annotated_types
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

__all__ = [
    "CONFIG_ENV_VAR",
    "PrhsConfig",
    "PrhsConfigError",
    "config_file",
    "config_names",
    "config_reference_markdown",
    "depth_fraction",
    "load_config",
    "load_config_file",
    "resolve_config",
]

CONFIG_ENV_VAR = "PRHS_CONFIG"
"""Environment variable naming a YAML config file, by path or by name (used when
``--additional-config`` has no ``prhs`` key)."""

_ADDITIONAL_CONFIG_KEY = "prhs"
"""Key of the PrHS section in vLLM's ``--additional-config`` dict, and the optional
top-level key of a YAML config file."""

_FILE_KEY = "config"
"""Key inside ``additional_config["prhs"]`` that names a YAML config file."""


class PrhsConfigError(ValueError):
    """An invalid PrHS configuration (bad value, unknown key, unreadable file)."""


class PrhsConfig(BaseModel):
    """Sparsity configuration of the ``prhs`` attention backend.

    Immutable; unknown fields are rejected. Build it with :func:`load_config_file`
    or :func:`resolve_config` to get :class:`PrhsConfigError` messages, or directly
    (``PrhsConfig(budget=0.25)``) to get pydantic's ``ValidationError``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    budget: float = Field(
        default=1.0,
        gt=0,
        le=1,
        strict=True,
        allow_inf_nan=False,
        description=(
            "Cost ceiling: the largest fraction of the context's KV pages that one "
            "(request, KV head) reads sparsely in a decode step, sinks and the recent "
            "window included (those are always kept, even if they alone exceed it). "
            "What happens when delta needs more is `over_budget`'s choice."
        ),
    )
    """Ceiling on the fraction of KV pages read per (request, KV head) in a sparse step."""

    delta: float = Field(
        default=0.05,
        ge=0,
        lt=1,
        strict=True,
        allow_inf_nan=False,
        description=(
            "The contract: pages are added by rank until the estimated dropped attention "
            "mass is at most delta (see `dropped_weight`), unless the budget binds first. "
            "0 means: fill up to the budget (needs `over_budget: cap`)."
        ),
    )
    """Target dropped attention mass (0 = fill up to the budget cap)."""

    over_budget: Literal["dense", "cap"] = Field(
        default="dense",
        description=(
            "When the budget binds before the estimated dropped mass reaches delta: "
            "`dense` reads every page of that (request, KV head) instead (exact: the "
            "contract holds, the saving is lost); `cap` keeps the capped selection and "
            "drops more than delta (the fixed-budget profile, for speed). Either way it is "
            "counted on /metrics and the log warns when it is frequent."
        ),
    )
    """What a (request, KV head) does when the budget binds before delta is met."""

    dropped_weight: float = Field(
        default=0.1,
        ge=0,
        le=1,
        strict=True,
        allow_inf_nan=False,
        description=(
            "How the delta rule estimates a left-out page's mass: its log-mass is taken "
            "this far from the key centroid's (a lower bound) toward the page's upper "
            "bound, against the centroid mass of the whole context. 0 = the centroid "
            "alone (underestimates pages with spikes: 72% of SmolLM2's selections within "
            "delta 0.05); 0.1 (measured: >= 97% on SmolLM2 2.5-8K and Gemma-3 8K)."
        ),
    )
    """Weight of the upper bound in the delta rule's estimate of a dropped page's mass."""

    sink_tokens: int = Field(
        default=64,
        ge=0,
        strict=True,
        description="First tokens of the context that are always kept (rounded up to whole pages).",
    )
    """First tokens always kept (rounded up to whole pages)."""

    local_tokens: int = Field(
        default=256,
        ge=0,
        strict=True,
        description=(
            "Most recent tokens that are always kept (rounded up to whole pages, "
            "the page being written included)."
        ),
    )
    """Most recent tokens always kept (whole pages, the page being written included)."""

    block_pages: Literal[1, 2, 4, 8] = Field(
        default=1,
        description=(
            "Logical selection block, in KV pages (vLLM pages of `--block-size` tokens "
            "each): pages are selected in aligned groups of this many."
        ),
    )
    """Logical selection block in KV pages (vLLM pages, ``--block-size`` tokens each)."""

    min_context: int = Field(
        default=2048,
        ge=0,
        strict=True,
        description=(
            "Decode steps of requests whose context (seq_len) is shorter than this "
            "run dense with vLLM's own attention kernel."
        ),
    )
    """Requests with a shorter context (seq_len) decode dense with vLLM's own kernel."""

    dense_layers: tuple[Annotated[int, Field(ge=0, strict=True)], ...] = Field(
        default=(0, 1),
        description=(
            "Layer indices that always run dense, as in vLLM's layer names "
            "(`model.layers.N.self_attn.attn` -> N)."
        ),
    )
    """Layer indices (``model.layers.N.self_attn.attn`` -> N) that always run dense."""

    estimator: Literal["centroid", "quest", "bound", "hybrid"] = Field(
        default="hybrid",
        description=(
            "How pages are ranked by attention mass: `centroid` (key centroid; a lower "
            "bound), `quest` (Quest's per-channel min/max upper bound), `bound` (the "
            "tighter upper bound from the min/max box and the centroid together) or "
            "`hybrid` (per page the larger of the centroid's and the bound's normalized "
            "mass: keeps what either ranks high)."
        ),
    )
    """Page ranking: centroid, Quest bound, mean-constrained bound, or the larger of the two."""

    delta_control: Literal["estimate", "certified"] = Field(
        default="estimate",
        description=(
            "What stops the fill before the cap: `estimate` when the estimated kept mass "
            "reaches 1 - delta; `certified` when the certified upper bound on the dropped "
            "mass is <= delta (never above delta unless the cap binds; keeps more pages)."
        ),
    )
    """Stop rule: estimated kept mass >= 1 - delta, or certified dropped-mass bound <= delta."""

    rerank: float = Field(
        default=0.0,
        ge=0,
        le=8,
        strict=False,
        allow_inf_nan=False,
        description=(
            "Exact rerank: shortlist `rerank` x the budget cap of pages by the estimator, "
            "then score them exactly from their keys (reads their keys once more). "
            "0 turns it off."
        ),
    )
    """Shortlist factor for exact rescoring from the keys (0 = off)."""

    centroid_dtype: Literal["float32", "int8", "int4"] = Field(
        default="float32",
        description=(
            "Storage of each page's key centroid. `float32`: the key sum with float32 "
            "min/max boxes, 12 D bytes per page and KV head (19% of a 16-token bf16 page). "
            "`int8` / `int4`: codes inside the page's min/max box (stored in bfloat16, "
            "rounded outward), 5 D / 4.5 D bytes (7.8% / 7.0%); certified bounds then use "
            "the box alone. Counted against the KV budget either way. On CUDA the int8 "
            "update and its scoring are csrc kernels (the update fused into the KV cache "
            "write), int4 Triton kernels. At batch 12 x 32K with a 1/16 budget on an H100, "
            "int8 decodes faster than float32 (684 vs 595 tok/s, dense 525; "
            "docs/results.md)."
        ),
    )
    """Centroid storage: float32 sums, or int8 / int4 codes in the page's box."""

    head_block_pages: dict[Annotated[int, Field(ge=0)], tuple[Literal[1, 2, 4, 8], ...]] = Field(
        default_factory=dict,
        description=(
            "Per-head block sizes (AB-Sparse): layer index -> one size in pages per KV "
            "head. Layers not listed use `block_pages`. Written by `prhs-calibrate`."
        ),
    )
    """Per-(layer, KV head) block sizes in pages; unlisted layers use ``block_pages``."""

    psaw_start_layer: int | None = Field(
        default=None,
        ge=0,
        description=(
            "PSAW (depth axis): from this layer on, pages wholly before "
            "(1 - psaw_phi^(psaw_alpha (l - start) / (L - start))) x context are not "
            "candidates (sinks excepted). null turns it off."
        ),
    )
    """First layer of the progressive sliding window (None = off)."""

    psaw_phi: float = Field(
        default=0.5,
        gt=0,
        lt=1,
        allow_inf_nan=False,
        description=(
            "PSAW base phi in (0, 1): the deepest layer drops the first "
            "(1 - phi^alpha) of its candidates."
        ),
    )
    """PSAW base phi: the deepest layer drops the first (1 - phi^alpha) of the context."""

    psaw_alpha: float = Field(
        default=1.0,
        gt=0,
        le=16,
        allow_inf_nan=False,
        description=(
            "PSAW exponent scale alpha: larger values shrink deeper layers' windows faster."
        ),
    )
    """PSAW exponent scale alpha."""

    etf_start_layer: int | None = Field(
        default=None,
        ge=0,
        description=(
            "ETF (layer axis): from this layer on, optional pages wholly before "
            "(1 - etf_psi^(etf_gamma (l - start) / (L - start))) x context keep the "
            "previous sparse layer's decision instead of being scored. null turns it off."
        ),
    )
    """First layer that freezes early pages to the previous layer's selection (None = off)."""

    etf_psi: float = Field(
        default=0.5,
        gt=0,
        lt=1,
        allow_inf_nan=False,
        description=(
            "ETF base psi in (0, 1): the deepest layer freezes the first "
            "(1 - psi^gamma) of the context."
        ),
    )
    """ETF base psi."""

    etf_gamma: float = Field(
        default=1.0,
        gt=0,
        le=16,
        allow_inf_nan=False,
        description=(
            "ETF exponent scale gamma: larger values freeze more of the context in deeper layers."
        ),
    )
    """ETF exponent scale gamma."""

    reuse_tau: float | None = Field(
        default=None,
        gt=0,
        le=1,
        allow_inf_nan=False,
        description=(
            "Time axis: a (request, KV head) reuses its last scored selection while every "
            "query head of its group has cosine similarity >= reuse_tau to the query that "
            "produced it. null turns reuse off."
        ),
    )
    """Cosine-similarity threshold for reusing the previous selection (None = off)."""

    reuse_max_age: int = Field(
        default=8, ge=1, le=1024, description="Steps a selection may be reused before rescoring."
    )
    """Steps a selection may be reused before it is scored again."""

    reuse_top_m: float = Field(
        default=1 / 3,
        gt=0,
        le=1,
        allow_inf_nan=False,
        description=(
            "Fraction of the budget cap: how many of the reused selection's best pages are dilated."
        ),
    )
    """Fraction of the cap (best kept pages) dilated when a selection is reused."""

    reuse_radius: int = Field(
        default=1, ge=0, le=8, description="Pages added on each side of the dilated pages."
    )
    """Pages added on each side of each dilated page."""

    reuse_slots: int = Field(
        default=1024,
        ge=1,
        le=65536,
        description=(
            "Reuse state slots per layer (hashed by the page a request writes); memory is "
            "taken from the KV budget. More slots than running requests avoids collisions."
        ),
    )
    """Hashed reuse-state slots per layer (memory counted against the KV budget)."""

    audit: bool = Field(
        default=False,
        strict=True,
        description=(
            "Also compute dense attention mass for every sparse step and export the true "
            "dropped mass next to the estimate and the certified bound (slow: for "
            "measurement, not for serving)."
        ),
    )
    """Measure the true dropped mass of every sparse step (slow)."""

    metrics: bool = Field(
        default=True,
        strict=True,
        description="Export counters (Prometheus on /metrics, and periodic log lines).",
    )
    """Export counters (Prometheus on /metrics and logs)."""

    log_interval_s: float = Field(
        default=30.0,
        ge=0,
        strict=True,
        allow_inf_nan=False,
        description="Seconds between stats log lines (0 = never log).",
    )
    """Seconds between stats log lines (0 = never log)."""

    cuda_graphs: bool = Field(
        default=True,
        strict=True,
        description=(
            "On CUDA, capture each layer's sparse decode step (scoring, selection, attention) "
            "in a CUDA graph per batch-size and context bucket; launching it op by op costs "
            "far more host time than the GPU work."
        ),
    )
    """Capture the sparse decode step in CUDA graphs (CUDA only)."""

    full_graph_max_rows: int = Field(
        default=0,
        ge=0,
        le=1024,
        strict=True,
        description=(
            "Experimental, CUDA with cuda_graphs on: vLLM's full CUDA graphs of decode "
            "batches up to this many requests also hold the sparse step, so a decode step "
            "with sparse rows replays one graph instead of launching attention layer by "
            "layer; larger decode batches with sparse rows run piecewise. 0 = never (the "
            "default: +13% / +10% decode throughput measured at batch 4 / 8 x 32K, level "
            "at 12, but 11% slower in one run at 1 x 130K)."
        ),
    )
    """Largest decode batch whose full CUDA graph holds the sparse step (0 = none)."""

    @field_validator("block_pages", mode="before")
    @classmethod
    def _block_pages_exact_int(cls, value: Any) -> Any:
        # Literal validation would otherwise accept True (== 1) and 2.0 (== 2).
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(
                f"Input should be 1, 2, 4 or 8 (an integer, not {type(value).__name__})"
            )
        return value

    @model_validator(mode="after")
    def _fill_needs_cap(self) -> PrhsConfig:
        if self.delta == 0 and self.over_budget == "dense" and self.budget < 1:
            raise ValueError(
                "delta 0 fills every selection up to the budget, which over_budget 'dense' "
                "turns into reading every page: set over_budget: cap (a fixed budget) or "
                "delta > 0"
            )
        return self

    @field_validator("dense_layers")
    @classmethod
    def _dense_layers_unique(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        seen: set[int] = set()
        dups = sorted({i for i in value if i in seen or seen.add(i)})
        if dups:
            raise ValueError(f"duplicate layer indices {dups} (each layer may be listed once)")
        return value

    def describe(self) -> str:
        """One-line summary for logs."""
        layers = ",".join(str(i) for i in self.dense_layers) or "none"
        return (
            f"prhs: budget={self.budget:g} delta={self.delta:g} "
            f"over_budget={self.over_budget} dropped_weight={self.dropped_weight:g} "
            f"sink_tokens={self.sink_tokens} local_tokens={self.local_tokens} "
            f"block_pages={self.block_pages} min_context={self.min_context} "
            f"dense_layers=[{layers}] estimator={self.estimator} "
            f"delta_control={self.delta_control} rerank={self.rerank:g} "
            f"centroid_dtype={self.centroid_dtype} "
            f"head_block_pages={len(self.head_block_pages)} layers "
            f"psaw_start_layer={self.psaw_start_layer} etf_start_layer={self.etf_start_layer} "
            f"reuse_tau={self.reuse_tau} audit={'on' if self.audit else 'off'} "
            f"metrics={'on' if self.metrics else 'off'} log_interval_s={self.log_interval_s:g} "
            f"cuda_graphs={'on' if self.cuda_graphs else 'off'} "
            f"full_graph_max_rows={self.full_graph_max_rows}"
        )


def depth_fraction(
    start: int | None, base: float, power: float, layer: int, num_layers: int
) -> float:
    """PSAW / ETF fraction of the context for ``layer``: 1 - base^(power (l - s) / (L - s)),
    0 before ``start`` (or when ``start`` is None)."""
    if start is None or layer < start or num_layers <= start:
        return 0.0
    return 1.0 - base ** (power * (layer - start) / (num_layers - start))


# --------------------------------------------------------------------------- validation


def _field_names() -> list[str]:
    return list(PrhsConfig.model_fields)


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _format_validation_error(source: str, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        msg = err["msg"]
        if err["type"] == "value_error" and "error" in err.get("ctx", {}):
            msg = str(err["ctx"]["error"])
        if not err["loc"]:  # a rule across fields: its message names them
            parts.append(msg)
            continue
        parts.append(f"field '{_format_loc(err['loc'])}': {msg} (got {err['input']!r})")
    return f"prhs config {source}: " + "; ".join(parts)


def _check_keys(source: str, data: Mapping[Any, Any], extra_allowed: tuple[str, ...] = ()) -> None:
    allowed = _field_names() + list(extra_allowed)
    unknown = [k for k in data if k not in allowed]
    if unknown:
        names = ", ".join(repr(str(k)) if isinstance(k, str) else repr(k) for k in unknown)
        noun = "field" if len(unknown) == 1 else "fields"
        raise PrhsConfigError(
            f"prhs config {source}: unknown {noun} {names} (allowed: {', '.join(allowed)})"
        )


def _validate(source: str, data: Mapping[Any, Any]) -> PrhsConfig:
    _check_keys(source, data)
    try:
        return PrhsConfig.model_validate(dict(data))
    except ValidationError as exc:
        raise PrhsConfigError(_format_validation_error(source, exc)) from None


# --------------------------------------------------------------------------- loading


def _read_yaml_mapping(path: Path) -> dict[Any, Any]:
    """Read ``path`` and return its field mapping (un-nesting a top-level ``prhs:``)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PrhsConfigError(f"prhs config {path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PrhsConfigError(f"prhs config {path}: cannot read file: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PrhsConfigError(f"prhs config {path}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise PrhsConfigError(
            f"prhs config {path}: the YAML top level must be a mapping of field names to "
            f"values (optionally under a top-level '{_ADDITIONAL_CONFIG_KEY}:' key), "
            f"got {type(data).__name__}"
        )
    if _ADDITIONAL_CONFIG_KEY in data:
        if len(data) != 1:
            others = ", ".join(repr(k) for k in data if k != _ADDITIONAL_CONFIG_KEY)
            raise PrhsConfigError(
                f"prhs config {path}: a top-level '{_ADDITIONAL_CONFIG_KEY}:' key must be the "
                f"only top-level key (also found: {others})"
            )
        data = data[_ADDITIONAL_CONFIG_KEY]
        if not isinstance(data, dict):
            raise PrhsConfigError(
                f"prhs config {path}: '{_ADDITIONAL_CONFIG_KEY}:' must hold a mapping of field "
                f"names to values, got {type(data).__name__}"
            )
    return data


def _abs_path(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.abspath(os.fspath(path)))


def load_config_file(path: str | os.PathLike[str]) -> PrhsConfig:
    """Load and validate a YAML config file.

    The top level must be a mapping: either the fields directly, or a single
    top-level ``prhs:`` key holding them. A relative path is resolved against
    the current working directory. Raises :class:`PrhsConfigError`.
    """
    return _validate(str(path), _read_yaml_mapping(_abs_path(path)))


_CONFIG_SUFFIXES = (".yaml", ".yml")


def _configs_dir() -> Path:
    """The shipped configs: ``prhs_vllm/configs/`` in an installed wheel (setup.py
    copies the repository's ``configs/`` there), else ``configs/`` of the checkout
    this package is imported from (an editable install or the source tree)."""
    package = Path(__file__).resolve().parent
    packaged = package / "configs"
    return packaged if packaged.is_dir() else package.parent / "configs"


def config_names() -> list[str]:
    """Names of the shipped configs (their file names without ``.yaml``), sorted."""
    root = _configs_dir()
    if not root.is_dir():
        return []
    return sorted(p.stem for p in root.iterdir() if p.suffix in _CONFIG_SUFFIXES)


def _is_path(value: str) -> bool:
    seps = {os.sep, "/"} | ({os.altsep} if os.altsep else set())
    return any(sep in value for sep in seps) or value.lower().endswith(_CONFIG_SUFFIXES)


def config_file(value: str | os.PathLike[str]) -> Path:
    """The YAML file a ``config`` value (or ``PRHS_CONFIG``) names.

    A path-like object, or a string that contains a path separator or ends in
    ``.yaml`` / ``.yml``, is a path (returned as given: relative paths resolve
    against the working directory when read). Any other string is the name of a
    shipped config (:func:`config_names`); an unknown name raises
    :class:`PrhsConfigError` listing the known ones.
    """
    if not isinstance(value, str) or _is_path(value):
        return Path(value)
    root = _configs_dir()
    for suffix in _CONFIG_SUFFIXES:
        if (root / (value + suffix)).is_file():
            return root / (value + suffix)
    names = ", ".join(config_names()) or "none found in " + str(root)
    raise PrhsConfigError(
        f"prhs config {value!r}: not a shipped config name (available: {names}); "
        "a path must contain a '/' or end in .yaml / .yml"
    )


def load_config(value: str | os.PathLike[str]) -> PrhsConfig:
    """Load a config by path or by shipped name (:func:`config_file`)."""
    return load_config_file(config_file(value))


def resolve_config(
    additional_config: Mapping[str, Any] | None,
    env: Mapping[str, str] | None = None,
) -> PrhsConfig:
    """Resolve the effective configuration at startup.

    ``additional_config`` is vLLM's ``--additional-config`` dict. If it has a
    ``"prhs"`` key, its value must be a dict holding an optional ``"config"``
    (a YAML file's path or a shipped config's name, :func:`config_file`) and/or
    inline field values, which win over the file's; the environment is then not
    consulted. Otherwise, if ``env[CONFIG_ENV_VAR]`` (``env`` defaults to
    ``os.environ``) is set and non-empty, that file (path or name) is loaded.
    Otherwise the defaults are returned. Raises :class:`PrhsConfigError`.
    """
    if env is None:
        env = os.environ

    if additional_config is not None and _ADDITIONAL_CONFIG_KEY in additional_config:
        section = additional_config[_ADDITIONAL_CONFIG_KEY]
        source = f"--additional-config '{_ADDITIONAL_CONFIG_KEY}'"
        if not isinstance(section, Mapping):
            raise PrhsConfigError(
                f"prhs config {source}: must be a dict of field values and/or "
                f"'{_FILE_KEY}': PATH or NAME, got {type(section).__name__}"
            )
        _check_keys(source, section, extra_allowed=(_FILE_KEY,))
        inline = {k: v for k, v in section.items() if k != _FILE_KEY}
        if _FILE_KEY in section:
            path = section[_FILE_KEY]
            if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
                raise PrhsConfigError(
                    f"prhs config {source}: field '{_FILE_KEY}': must be a non-empty path "
                    f"to a YAML file or a shipped config's name (got {path!r})"
                )
            base = load_config(path)
        else:
            base = PrhsConfig()
        if not inline:
            return base
        return _validate(source, {**base.model_dump(), **inline})

    env_value = env.get(CONFIG_ENV_VAR, "")
    if env_value:
        return load_config(env_value)
    return PrhsConfig()


# --------------------------------------------------------------------------- reference


def _type_text(annotation: Any, metadata: list[Any]) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(f"`{json.dumps(a)}`" for a in typing.get_args(annotation))
    if origin is tuple:
        inner = typing.get_args(annotation)[0]
        inner_meta: list[Any] = []
        if typing.get_origin(inner) is Annotated:
            inner, *extras = typing.get_args(inner)
            for extra in extras:
                inner_meta.extend(getattr(extra, "metadata", [extra]))
        return f"list of ({_type_text(inner, inner_meta)})"
    name = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    if isinstance(annotation, types.GenericAlias):
        name = str(annotation)
    bounds = []
    for m in metadata:
        for attr, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            if isinstance(m, getattr(annotated_types, attr.capitalize())):
                bounds.append(f"{op} {getattr(m, attr)}")
    return f"{name}, {', '.join(bounds)}" if bounds else name


def _default_text(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    return f"`{json.dumps(value)}`"


def config_reference_markdown() -> str:
    """Markdown table (field | type/allowed | default | description) of :class:`PrhsConfig`."""
    lines = [
        "| field | type / allowed | default | description |",
        "| --- | --- | --- | --- |",
    ]
    for name, info in PrhsConfig.model_fields.items():
        type_text = _type_text(info.annotation, list(info.metadata))
        if name == "dense_layers":
            type_text += ", no duplicates"
        elif name == "head_block_pages":
            type_text = "map: layer index (int >= 0) -> list of 1, 2, 4 or 8 (one per KV head)"
        type_text = type_text.replace("|", "\\|")
        desc = (info.description or "").replace("|", "\\|")
        default = info.get_default(call_default_factory=True)
        lines.append(f"| `{name}` | {type_text} | {_default_text(default)} | {desc} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(config_reference_markdown(), end="")
