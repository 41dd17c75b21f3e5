"""The config loader under random input: every invalid config is a
PrhsConfigError that names what is wrong, never another exception."""

from __future__ import annotations

import string

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from prhs_vllm.config import PrhsConfig, PrhsConfigError, load_config_file, resolve_config  # noqa: E402

FIELDS = list(PrhsConfig.model_fields)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(alphabet=string.printable, max_size=12),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(SCALARS, inner, max_size=4),
    max_leaves=8,
)
KEYS = st.one_of(
    st.sampled_from(FIELDS), st.text(alphabet=string.ascii_lowercase + "_", max_size=10)
)
SECTIONS = st.dictionaries(KEYS, VALUES, max_size=5)


def _check(call):
    try:
        return call()
    except PrhsConfigError as exc:
        assert str(exc).startswith("prhs config"), exc
        return None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(section=SECTIONS)
def test_inline_sections_load_or_name_the_problem(section):
    config = _check(lambda: resolve_config({"prhs": section}, env={}))
    if config is None:
        return
    assert isinstance(config, PrhsConfig)
    assert all(key in FIELDS for key in section)


@settings(max_examples=200, deadline=None)
@given(field=st.sampled_from(FIELDS), value=VALUES)
def test_a_bad_value_names_its_field(field, value):
    try:
        resolve_config({"prhs": {field: value}}, env={})
    except PrhsConfigError as exc:
        message = str(exc)
        # A rule across fields (delta 0 with over_budget dense) names them in its text.
        assert f"field '{field}" in message or "over_budget" in message, message


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(document=st.one_of(VALUES, SECTIONS, st.text(max_size=40)))
def test_yaml_files_load_or_name_the_problem(tmp_path, document):
    path = tmp_path / "c.yaml"
    text = document if isinstance(document, str) else yaml.safe_dump(document)
    path.write_text(text, encoding="utf-8")
    _check(lambda: load_config_file(path))
