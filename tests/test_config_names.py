"""Shipped configs by name: ``"config": "default"`` / ``PRHS_CONFIG=default`` load
``configs/default.yaml``; paths still work; a build copies configs/ into the
package (prhs_vllm/configs/), where an installed wheel finds them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from prhs_vllm.config import (
    CONFIG_ENV_VAR,
    PrhsConfig,
    PrhsConfigError,
    config_file,
    config_names,
    load_config,
    load_config_file,
    resolve_config,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def test_names_are_the_repository_configs():
    names = config_names()
    assert names == sorted(p.stem for p in CONFIGS.glob("*.yaml"))
    assert {"default", "fixed-budget", "full-budget"} <= set(names)


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.yaml")))
def test_every_name_loads_its_file(name):
    assert config_file(name).resolve() == (CONFIGS / f"{name}.yaml").resolve()
    assert load_config(name) == load_config_file(CONFIGS / f"{name}.yaml")


def test_additional_config_by_name():
    fixed = load_config_file(CONFIGS / "fixed-budget.yaml")
    assert resolve_config({"prhs": {"config": "fixed-budget"}}, env={}) == fixed
    assert resolve_config({"prhs": {"config": "default"}}, env={}) == PrhsConfig()
    # Inline fields still win over the named file's.
    cfg = resolve_config({"prhs": {"config": "fixed-budget", "budget": 0.25}}, env={})
    assert cfg.budget == 0.25 and cfg.over_budget == fixed.over_budget


def test_env_var_by_name(monkeypatch):
    fixed = load_config_file(CONFIGS / "fixed-budget.yaml")
    assert resolve_config(None, env={CONFIG_ENV_VAR: "fixed-budget"}) == fixed
    monkeypatch.setenv(CONFIG_ENV_VAR, "default")
    assert resolve_config(None) == PrhsConfig()


@pytest.mark.parametrize("source", ["additional", "env"])
def test_unknown_name_lists_the_names(source):
    with pytest.raises(PrhsConfigError) as exc:
        if source == "env":
            resolve_config(None, env={CONFIG_ENV_VAR: "defualt"})
        else:
            resolve_config({"prhs": {"config": "defualt"}}, env={})
    msg = str(exc.value)
    assert "'defualt'" in msg and "not a shipped config name" in msg
    assert all(name in msg for name in config_names())


def test_paths_still_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text("budget: 0.5\nover_budget: cap\n")
    (tmp_path / "mine.yml").write_text("budget: 0.75\nover_budget: cap\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "cfg").write_text("min_context: 7\n")
    # Ends in .yaml / .yml: a path (relative to the working directory).
    assert resolve_config({"prhs": {"config": "mine.yaml"}}, env={}).budget == 0.5
    assert resolve_config(None, env={CONFIG_ENV_VAR: "mine.yml"}).budget == 0.75
    # Holds a separator: a path, whatever its suffix.
    assert resolve_config({"prhs": {"config": "sub/cfg"}}, env={}).min_context == 7
    assert resolve_config({"prhs": {"config": "./mine.yaml"}}, env={}).budget == 0.5
    # The repository's paths, relative and absolute.
    monkeypatch.chdir(REPO)
    assert resolve_config({"prhs": {"config": "configs/default.yaml"}}, env={}) == PrhsConfig()
    assert load_config(CONFIGS / "full-budget.yaml").delta == 0.0  # a PathLike is a path


def test_bare_word_is_a_name_even_if_a_file_has_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "default").write_text("budget: 0.5\nover_budget: cap\n")
    assert resolve_config({"prhs": {"config": "default"}}, env={}) == PrhsConfig()


def test_missing_path_is_not_looked_up_as_a_name(tmp_path):
    with pytest.raises(PrhsConfigError, match="file not found"):
        resolve_config({"prhs": {"config": str(tmp_path / "default.yaml")}}, env={})
    with pytest.raises(PrhsConfigError, match="file not found"):
        load_config("nowhere/default")


def test_build_copies_configs_into_the_package(tmp_path):
    """setup.py's build_py puts configs/*.yaml in prhs_vllm/configs/ (what the wheel
    holds), and the built package resolves names there. Built from a copy of the
    tree, so the checkout's egg-info is left alone."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(CONFIGS, src / "configs")
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "configs")
    shutil.copytree(REPO / "prhs_vllm", src / "prhs_vllm", ignore=ignore)
    out = tmp_path / "lib"
    env = {**os.environ, "PRHS_BUILD_CUDA": "0"}
    cmd = [sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(out)]
    proc = subprocess.run(cmd, cwd=src, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    shipped = sorted(p.name for p in (out / "prhs_vllm" / "configs").iterdir())
    assert shipped == sorted(p.name for p in CONFIGS.glob("*.yaml"))
    assert not (out / "configs").exists()

    # The built package, not the checkout's, answers by name.
    probe = (
        "import prhs_vllm.config as c; "
        "print(c.config_file('fixed-budget')); print(c.load_config('fixed-budget').budget)"
    )
    env = {**os.environ, "PYTHONPATH": str(out)}
    proc = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    path, budget = proc.stdout.split()
    assert Path(path) == out / "prhs_vllm" / "configs" / "fixed-budget.yaml"
    assert float(budget) == load_config_file(CONFIGS / "fixed-budget.yaml").budget
