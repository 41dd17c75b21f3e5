"""Tests for prhs_vllm.config (schema, YAML loading, startup resolution)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from prhs_vllm.config import (
    CONFIG_ENV_VAR,
    PrhsConfig,
    PrhsConfigError,
    config_reference_markdown,
    load_config_file,
    resolve_config,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
FIELDS = [
    "budget",
    "delta",
    "over_budget",
    "dropped_weight",
    "sink_tokens",
    "local_tokens",
    "block_pages",
    "min_context",
    "dense_layers",
    "estimator",
    "delta_control",
    "rerank",
    "centroid_dtype",
    "head_block_pages",
    "psaw_start_layer",
    "psaw_phi",
    "psaw_alpha",
    "etf_start_layer",
    "etf_psi",
    "etf_gamma",
    "reuse_tau",
    "reuse_max_age",
    "reuse_top_m",
    "reuse_radius",
    "reuse_slots",
    "audit",
    "metrics",
    "log_interval_s",
    "cuda_graphs",
    "full_graph_max_rows",
]


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- schema


def test_defaults():
    cfg = PrhsConfig()
    assert cfg.budget == 1.0
    assert cfg.delta == 0.05
    assert cfg.over_budget == "dense" and cfg.dropped_weight == 0.1
    assert cfg.sink_tokens == 64
    assert cfg.local_tokens == 256
    assert cfg.block_pages == 1
    assert cfg.min_context == 2048
    assert cfg.dense_layers == (0, 1)
    assert cfg.estimator == "hybrid"
    assert cfg.delta_control == "estimate" and cfg.rerank == 0 and not cfg.audit
    assert cfg.reuse_tau is None and cfg.psaw_start_layer is None and cfg.etf_start_layer is None
    assert cfg.centroid_dtype == "float32" and cfg.head_block_pages == {}
    assert cfg.metrics is True
    assert cfg.log_interval_s == 30.0
    assert list(PrhsConfig.model_fields) == FIELDS


def test_every_field_has_default_and_description():
    for name, info in PrhsConfig.model_fields.items():
        assert not info.is_required(), name
        assert info.description and len(info.description) > 20, name


def test_frozen_and_extra_forbidden():
    cfg = PrhsConfig()
    with pytest.raises(ValidationError):
        cfg.budget = 0.5  # type: ignore[misc]
    with pytest.raises(ValidationError, match="budgett"):
        PrhsConfig(budgett=0.5)  # type: ignore[call-arg]


def test_describe_one_line():
    text = PrhsConfig(budget=0.25, dense_layers=()).describe()
    assert "\n" not in text
    assert "budget=0.25" in text
    assert "dense_layers=[none]" in text
    assert "estimator=hybrid" in text


def test_module_does_not_import_torch_or_vllm():
    code = "import sys, prhs_vllm.config; print('torch' in sys.modules, 'vllm' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["False", "False"]


def test_reference_markdown():
    md = config_reference_markdown()
    lines = md.strip().splitlines()
    assert lines[0] == "| field | type / allowed | default | description |"
    assert len(lines) == 2 + len(FIELDS)
    for name, line in zip(FIELDS, lines[2:], strict=True):
        assert line.startswith(f"| `{name}` |")
        assert PrhsConfig.model_fields[name].description in line
    assert "| `budget` | float, > 0, <= 1 | `1.0` |" in md
    # A `|` inside a cell (the type `int | None`) is escaped, or the row breaks.
    for line in lines:
        assert line.replace("\\|", "").count("|") == 5, line
    assert "one of `1`, `2`, `4`, `8`" in md
    assert '`"centroid"`' in md


def test_module_main_prints_reference():
    out = subprocess.run(
        [sys.executable, "-m", "prhs_vllm.config"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout == config_reference_markdown()


def test_readme_config_reference_is_generated():
    """The README's config table is `python -m prhs_vllm.config`'s output,
    verbatim, on the lines between its two markers."""
    start, end = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert text.count(start) == 1 and text.count(end) == 1
    between = text.split(start, 1)[1].split(end, 1)[0]
    assert between == config_reference_markdown()


# --------------------------------------------------------------------------- shipped files


def test_default_yaml_equals_defaults():
    assert load_config_file(CONFIGS / "default.yaml") == PrhsConfig()


def test_default_yaml_lists_every_field():
    import yaml

    data = yaml.safe_load((CONFIGS / "default.yaml").read_text())
    assert list(data) == FIELDS


def test_full_budget_yaml():
    cfg = load_config_file(CONFIGS / "full-budget.yaml")
    assert cfg.budget == 1.0
    assert cfg.delta == 0.0
    assert cfg.min_context == 0
    assert cfg.dense_layers == ()
    assert cfg.sink_tokens == 64  # unlisted fields keep defaults


# --------------------------------------------------------------------------- file loading


def test_nested_prhs_key(tmp_path):
    path = _write(tmp_path, "n.yaml", "prhs:\n  budget: 0.5\n  estimator: quest\n")
    cfg = load_config_file(path)
    assert cfg.budget == 0.5
    assert cfg.estimator == "quest"
    assert cfg.delta == 0.05


def test_nested_prhs_key_must_be_alone(tmp_path):
    path = _write(tmp_path, "n.yaml", "prhs:\n  budget: 0.5\nbudget: 0.25\n")
    with pytest.raises(PrhsConfigError, match="only top-level key"):
        load_config_file(path)


def test_relative_path_resolved_against_cwd(tmp_path, monkeypatch):
    _write(tmp_path, "rel.yaml", "budget: 0.75\n")
    monkeypatch.chdir(tmp_path)
    assert load_config_file("rel.yaml").budget == 0.75


def test_unknown_key_rejected(tmp_path):
    path = _write(tmp_path, "u.yaml", "budgett: 0.5\n")
    with pytest.raises(PrhsConfigError) as exc:
        load_config_file(path)
    msg = str(exc.value)
    assert str(path) in msg
    assert "unknown field 'budgett'" in msg
    assert "(allowed: " + ", ".join(FIELDS) + ")" in msg


@pytest.mark.parametrize(
    ("yaml_text", "field", "expected"),
    [
        ("budget: 1.5\n", "budget", "less than or equal to 1 (got 1.5)"),
        ("budget: 0\n", "budget", "greater than 0 (got 0"),
        ("delta: 1.0\n", "delta", "less than 1 (got 1.0)"),
        ("delta: -0.1\n", "delta", "greater than or equal to 0 (got -0.1)"),
        ("sink_tokens: -1\n", "sink_tokens", "greater than or equal to 0 (got -1)"),
        ("local_tokens: -5\n", "local_tokens", "greater than or equal to 0 (got -5)"),
        ("min_context: -1\n", "min_context", "greater than or equal to 0 (got -1)"),
        ("log_interval_s: -1\n", "log_interval_s", "greater than or equal to 0"),
        ("dense_layers: [0, -1]\n", "dense_layers[1]", "greater than or equal to 0 (got -1)"),
        (
            "estimator: exact\n",
            "estimator",
            "'centroid', 'quest', 'bound' or 'hybrid' (got 'exact')",
        ),
        ("delta_control: maybe\n", "delta_control", "(got 'maybe')"),
        ("centroid_dtype: int2\n", "centroid_dtype", "(got 'int2')"),
        ("reuse_tau: 1.5\n", "reuse_tau", "less than or equal to 1"),
        ("rerank: -1\n", "rerank", "greater than or equal to 0"),
        ("head_block_pages: {3: [1, 3]}\n", "head_block_pages[3][1]", "1, 2, 4 or 8"),
        ("metrics: maybe\n", "metrics", "valid boolean"),
        ("sink_tokens: 1.5\n", "sink_tokens", "valid integer"),
        ("budget: .nan\n", "budget", "finite number"),
        ("full_graph_max_rows: -1\n", "full_graph_max_rows", "greater than or equal to 0"),
        ("full_graph_max_rows: 2000\n", "full_graph_max_rows", "less than or equal to 1024"),
        ("full_graph_max_rows: 8.0\n", "full_graph_max_rows", "valid integer"),
    ],
)
def test_out_of_range_rejected(tmp_path, yaml_text, field, expected):
    path = _write(tmp_path, "bad.yaml", yaml_text)
    with pytest.raises(PrhsConfigError) as exc:
        load_config_file(path)
    msg = str(exc.value)
    assert msg.startswith(f"prhs config {path}: field '{field}': ")
    assert expected in msg


@pytest.mark.parametrize("value", ["3", "16", "0", "true", "2.0", '"2"'])
def test_block_pages_literal(tmp_path, value):
    path = _write(tmp_path, "b.yaml", f"block_pages: {value}\n")
    with pytest.raises(PrhsConfigError) as exc:
        load_config_file(path)
    msg = str(exc.value)
    assert "field 'block_pages'" in msg
    assert "1, 2, 4 or 8" in msg


@pytest.mark.parametrize("value", [1, 2, 4, 8])
def test_block_pages_allowed(tmp_path, value):
    path = _write(tmp_path, "b.yaml", f"block_pages: {value}\n")
    assert load_config_file(path).block_pages == value


def test_duplicate_dense_layers_rejected(tmp_path):
    path = _write(tmp_path, "d.yaml", "dense_layers: [0, 3, 1, 3, 0]\n")
    with pytest.raises(PrhsConfigError) as exc:
        load_config_file(path)
    msg = str(exc.value)
    assert "field 'dense_layers'" in msg
    assert "duplicate layer indices [0, 3]" in msg


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(PrhsConfigError) as exc:
        load_config_file(path)
    assert str(exc.value) == f"prhs config {path}: file not found"


def test_broken_yaml(tmp_path):
    path = _write(tmp_path, "broken.yaml", "budget: [0.5\ndelta: 0.1\n")
    with pytest.raises(PrhsConfigError) as exc:
        load_config_file(path)
    msg = str(exc.value)
    assert msg.startswith(f"prhs config {path}: invalid YAML: ")
    assert "line" in msg  # the YAML error's position is passed on


@pytest.mark.parametrize(("text", "kind"), [("", "NoneType"), ("- 1\n- 2\n", "list")])
def test_top_level_must_be_mapping(tmp_path, text, kind):
    path = _write(tmp_path, "t.yaml", text)
    with pytest.raises(PrhsConfigError, match=f"top level must be a mapping.*got {kind}"):
        load_config_file(path)


# --------------------------------------------------------------------------- resolve_config


def test_resolve_defaults():
    assert resolve_config(None, env={}) == PrhsConfig()
    assert resolve_config({}, env={}) == PrhsConfig()
    assert resolve_config({"other_plugin": {"x": 1}}, env={CONFIG_ENV_VAR: ""}) == PrhsConfig()


def test_resolve_env_when_no_additional_config(tmp_path):
    path = _write(tmp_path, "env.yaml", "budget: 0.3\n")
    assert resolve_config(None, env={CONFIG_ENV_VAR: str(path)}).budget == 0.3
    assert resolve_config({"other": 1}, env={CONFIG_ENV_VAR: str(path)}).budget == 0.3


def test_resolve_env_defaults_to_os_environ(tmp_path, monkeypatch):
    path = _write(tmp_path, "env.yaml", "delta: 0.2\n")
    monkeypatch.setenv(CONFIG_ENV_VAR, str(path))
    assert resolve_config(None).delta == 0.2
    monkeypatch.delenv(CONFIG_ENV_VAR)
    assert resolve_config(None).delta == 0.05


def test_resolve_env_missing_file(tmp_path):
    path = tmp_path / "gone.yaml"
    with pytest.raises(PrhsConfigError, match="gone.yaml: file not found"):
        resolve_config(None, env={CONFIG_ENV_VAR: str(path)})


def test_resolve_precedence(tmp_path):
    env_file = _write(tmp_path, "env.yaml", "budget: 0.3\ndelta: 0.3\nsink_tokens: 3\n")
    file_ = _write(tmp_path, "file.yaml", "prhs:\n  budget: 0.2\n  delta: 0.2\n")
    env = {CONFIG_ENV_VAR: str(env_file)}

    # inline over file
    cfg = resolve_config({"prhs": {"config": str(file_), "budget": 0.1}}, env=env)
    assert cfg.budget == 0.1  # inline
    assert cfg.delta == 0.2  # file
    assert cfg.sink_tokens == 64  # default: the env file is not consulted

    # file over env
    cfg = resolve_config({"prhs": {"config": str(file_)}}, env=env)
    assert (cfg.budget, cfg.delta, cfg.sink_tokens) == (0.2, 0.2, 64)

    # inline only: over defaults, env not consulted
    cfg = resolve_config({"prhs": {"budget": 0.1}}, env=env)
    assert (cfg.budget, cfg.delta, cfg.sink_tokens) == (0.1, 0.05, 64)

    # env over defaults
    cfg = resolve_config(None, env=env)
    assert (cfg.budget, cfg.delta, cfg.sink_tokens) == (0.3, 0.3, 3)


def test_resolve_inline_list_becomes_tuple():
    cfg = resolve_config({"prhs": {"dense_layers": [2, 5], "block_pages": 4}}, env={})
    assert cfg.dense_layers == (2, 5)
    assert cfg.block_pages == 4


def test_resolve_relative_config_path(tmp_path, monkeypatch):
    _write(tmp_path, "rel.yaml", "min_context: 7\n")
    monkeypatch.chdir(tmp_path)
    assert resolve_config({"prhs": {"config": "rel.yaml"}}, env={}).min_context == 7


def test_resolve_unknown_key_in_additional_config():
    with pytest.raises(PrhsConfigError) as exc:
        resolve_config({"prhs": {"budget": 0.5, "confg": "x.yaml"}}, env={})
    msg = str(exc.value)
    assert "unknown field 'confg'" in msg
    assert "(allowed: " + ", ".join(FIELDS) + ", config)" in msg


def test_resolve_inline_value_error_names_field(tmp_path):
    file_ = _write(tmp_path, "file.yaml", "budget: 0.2\n")
    with pytest.raises(PrhsConfigError) as exc:
        resolve_config({"prhs": {"config": str(file_), "delta": 2}}, env={})
    msg = str(exc.value)
    assert "--additional-config" in msg
    assert "field 'delta': Input should be less than 1 (got 2)" in msg


def test_resolve_file_error_names_file(tmp_path):
    file_ = _write(tmp_path, "file.yaml", "budget: 2\n")
    with pytest.raises(PrhsConfigError) as exc:
        resolve_config({"prhs": {"config": str(file_), "delta": 0.1}}, env={})
    assert str(exc.value).startswith(f"prhs config {file_}: field 'budget': ")


@pytest.mark.parametrize("section", [None, "configs/default.yaml", [1]])
def test_resolve_prhs_section_must_be_dict(section):
    with pytest.raises(PrhsConfigError, match="must be a dict"):
        resolve_config({"prhs": section}, env={})


@pytest.mark.parametrize("path", ["", None, 3])
def test_resolve_bad_config_path(path):
    with pytest.raises(PrhsConfigError, match="field 'config': must be a non-empty path"):
        resolve_config({"prhs": {"config": path}}, env={})


def test_error_is_value_error():
    assert issubclass(PrhsConfigError, ValueError)


def test_fill_to_the_budget_needs_cap():
    """delta 0 under over_budget dense would read every page: refused, naming the fields."""
    with pytest.raises(PrhsConfigError, match="over_budget: cap"):
        resolve_config({"prhs": {"delta": 0.0, "budget": 0.25}})
    cfg = resolve_config({"prhs": {"delta": 0.0, "budget": 0.25, "over_budget": "cap"}})
    assert cfg.over_budget == "cap"
    assert resolve_config({"prhs": {"delta": 0.0, "budget": 1.0}}).delta == 0.0


@pytest.mark.parametrize(
    "field, value",
    [("over_budget", "drop"), ("dropped_weight", 1.5), ("dropped_weight", -0.1),
     ("dropped_weight", "0.1")],
)  # fmt: skip
def test_new_contract_fields_reject_bad_values(field, value):
    with pytest.raises(PrhsConfigError, match=f"field '{field}'"):
        resolve_config({"prhs": {field: value}})


def test_profiles_keep_what_they_promise():
    """default: delta is the contract (no ceiling, exact where it would bind);
    fixed-budget: a 1/16 cap that binds, int8 centroids."""
    default = load_config_file(CONFIGS / "default.yaml")
    assert default == PrhsConfig()
    fixed = load_config_file(CONFIGS / "fixed-budget.yaml")
    assert (fixed.budget, fixed.over_budget, fixed.centroid_dtype) == (0.0625, "cap", "int8")
