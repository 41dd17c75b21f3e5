"""What a user sees at start-up: the front-end check of the prhs config (before
any engine process starts), the warning for a prhs section without
`--attention-backend prhs`, and the start-up config line."""

from __future__ import annotations

import json
import logging
import sys
from types import SimpleNamespace

import pytest
from vllm.config import VllmConfig
from vllm.config.attention import AttentionConfig
from vllm.engine.arg_utils import EngineArgs

from prhs_vllm import _compat, metrics, plugin
from prhs_vllm.config import PrhsConfigError

BAD = {"prhs": {"budget": 7}}


@pytest.fixture
def registered(tmp_path, monkeypatch):
    """The plugin registered, its stats directory under tmp_path, the
    excepthook restored after the test."""
    monkeypatch.setenv(metrics.STATS_DIR_ENV, str(tmp_path / "stats"))
    monkeypatch.delenv("PRHS_CONFIG", raising=False)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    plugin.register()
    return plugin


def engine_config(backend: str | None, additional: dict | None = None) -> VllmConfig:
    """A VllmConfig as `--attention-backend BACKEND --additional-config ...` makes it."""
    selection = None if backend is None else AttentionConfig.validate_backend_before(backend)
    return VllmConfig(
        attention_config=AttentionConfig(backend=selection), additional_config=additional or {}
    )


def prhs_warnings(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.name == "vllm.prhs"
    ]


# --------------------------------------------------------------------------- prhs selected


def test_invalid_config_raises_naming_the_field(registered):
    with pytest.raises(PrhsConfigError, match="field 'budget'") as info:
        plugin.check_engine_config(engine_config("prhs", BAD))
    assert "(got 7)" in str(info.value)


def test_valid_config_passes_and_creates_the_stats_directory(registered, tmp_path):
    stats = tmp_path / "stats"
    assert not stats.exists()
    plugin.check_engine_config(engine_config("prhs", {"prhs": {"budget": 0.25}}))
    # /metrics has the prhs series from start-up (zeros until a worker writes).
    assert stats.is_dir()
    assert metrics.read_totals()["prhs_sparse_decode_tokens"] == 0.0


def test_metrics_off_creates_no_stats_directory(registered, tmp_path):
    plugin.check_engine_config(engine_config("prhs", {"prhs": {"metrics": False}}))
    assert not (tmp_path / "stats").exists()
    assert metrics.read_totals() is None


def test_prhs_without_a_section_checks_the_environment_config(registered, tmp_path, monkeypatch):
    bad_file = tmp_path / "bad.yaml"
    bad_file.write_text("delta: 2\n")
    monkeypatch.setenv("PRHS_CONFIG", str(bad_file))
    with pytest.raises(PrhsConfigError, match="field 'delta'"):
        plugin.check_engine_config(engine_config("prhs"))


def test_an_uncaught_config_error_prints_one_line(registered, capsys):
    """vLLM's CLI has no handler for start-up errors: the raised error must end
    the process as one line, not a traceback; other errors keep the old hook."""
    seen = []
    sys.excepthook = lambda *args: seen.append(args[0])
    with pytest.raises(PrhsConfigError) as info:
        plugin.check_engine_config(engine_config("prhs", BAD))
    sys.excepthook(PrhsConfigError, info.value, info.tb)
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("ERROR: invalid prhs config --additional-config 'prhs': field 'budget'")
    assert seen == []
    sys.excepthook(ValueError, ValueError("other"), None)
    assert seen == [ValueError]
    # Raising again wraps the hook no second time.
    hook = sys.excepthook
    with pytest.raises(PrhsConfigError):
        plugin.check_engine_config(engine_config("prhs", BAD))
    assert sys.excepthook is hook


# --------------------------------------------------------------------------- prhs not selected


@pytest.mark.parametrize("backend", [None, "CPU_ATTN"], ids=["auto", "cpu-attn"])
def test_section_without_the_flag_warns_once_and_starts(registered, caplog, tmp_path, backend):
    additional = {"prhs": {"config": "configs/default.yaml"}}
    with caplog.at_level("WARNING", logger="vllm.prhs"):
        plugin.check_engine_config(engine_config(backend, additional))
    (warning,) = prhs_warnings(caplog)
    assert "the section is ignored" in warning
    assert "Add --attention-backend prhs" in warning
    assert ("auto" if backend is None else "CPU_ATTN") in warning
    assert "invalid" not in warning
    assert not (tmp_path / "stats").exists()  # a dense server: no prhs series


def test_invalid_section_without_the_flag_warns_and_says_it_is_invalid(registered, caplog):
    with caplog.at_level("WARNING", logger="vllm.prhs"):
        plugin.check_engine_config(engine_config(None, BAD))  # must not raise
    (warning,) = prhs_warnings(caplog)
    assert "Add --attention-backend prhs" in warning
    assert "It is also invalid: prhs config --additional-config 'prhs': field 'budget'" in warning


def test_no_section_no_flag_is_silent(registered, caplog, tmp_path):
    with caplog.at_level("WARNING", logger="vllm.prhs"):
        plugin.check_engine_config(engine_config(None, {"other_plugin": {"x": 1}}))
    assert prhs_warnings(caplog) == []
    assert not (tmp_path / "stats").exists()


# --------------------------------------------------------------------------- the hook


def test_create_engine_config_is_checked_once_wrapped(registered, monkeypatch):
    """Registration wraps EngineArgs.create_engine_config (the front end's one
    call per engine), once; the wrapper checks the config it returns."""
    assert getattr(EngineArgs.create_engine_config, "_prhs_wrapped", False)
    wrapped = EngineArgs.create_engine_config
    assert _compat.check_engine_configs(plugin.check_engine_config)
    assert EngineArgs.create_engine_config is wrapped

    made = SimpleNamespace(attention_config=None, additional_config={})
    monkeypatch.setattr(EngineArgs, "create_engine_config", lambda self, *a, **k: made)
    checked = []
    _compat.check_engine_configs(checked.append)
    assert EngineArgs.create_engine_config(object(), usage_context=None) is made
    assert checked == [made]


def test_engine_args_reject_a_bad_config_before_any_engine(registered, monkeypatch):
    """The path of `vllm serve`: EngineArgs from the flags, then
    create_engine_config, in the front-end process (a real model config)."""
    from prhs_vllm.models import prepare_smollm2

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = str(prepare_smollm2())
    common = {"model": model, "max_model_len": 2048, "block_size": 32, "enforce_eager": True}
    args = EngineArgs(**common, attention_backend="prhs", additional_config=BAD)
    with pytest.raises(PrhsConfigError, match="field 'budget'"):
        args.create_engine_config()
    good = {"prhs": {"config": "configs/default.yaml"}}
    args = EngineArgs(**common, attention_backend="prhs", additional_config=good)
    config = args.create_engine_config()
    assert _compat.is_prhs_selection(config.attention_config.backend)
    assert json.loads(json.dumps(config.additional_config)) == good


# --------------------------------------------------------------------------- start-up line


def test_startup_line_marks_cuda_only_switches_on_cpu(registered, caplog):
    from prhs_vllm.backend import common

    common._resolve_cached.cache_clear()
    additional = {"prhs": {"cuda_graphs": True, "full_graph_max_rows": 8}}
    try:
        with caplog.at_level("INFO", logger="vllm.prhs"):
            common._resolve_cached(json.dumps(additional))
    finally:
        common._resolve_cached.cache_clear()
    (line,) = [r.getMessage() for r in caplog.records if "budget=" in r.getMessage()]
    assert "cuda_graphs=on (CUDA only: unused on CPU)" in line
    assert "full_graph_max_rows=8 (CUDA only: unused on CPU)" in line
