"""Dagster processes on loopback for the end-to-end tests: free ports, waiting, and clean shutdown."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.5,
             process: subprocess.Popen | None = None, log: Path | None = None):
    """Poll ``predicate`` until it returns something truthy; fail with the process log if it never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if process is not None and process.poll() is not None:
            raise AssertionError(f"{what}: the process exited with {process.returncode}\n{tail(log)}")
        time.sleep(interval)
    raise AssertionError(f"Timed out after {timeout:.0f}s waiting for {what}\n{tail(log)}")


def tail(log: Path | None, lines: int = 60) -> str:
    if log is None or not log.exists():
        return ""
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def start(command: list[str], env: dict[str, str], log: Path, cwd: Path = REPO) -> subprocess.Popen:
    """Start ``command`` in its own process group (so stop() also ends its children: code servers, run workers)."""
    handle = open(log, "w")  # noqa: SIM115 (closed by the process object's lifetime)
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop(process: subprocess.Popen, timeout: float = 20) -> None:
    """SIGINT to the process group (Ctrl-C: how `dagster dev` and the daemon shut down cleanly), then SIGKILL what
    is left."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGINT)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # children that outlived the leader
    except ProcessLookupError:
        pass
    process.wait(5)


def http_ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def base_env(dagster_home: Path, lake: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POE_", "DAGSTER_", "MLFLOW_"))}
    env.update({"DAGSTER_HOME": str(dagster_home), "POE_DATA_LAKE": str(lake), "PYTHONUNBUFFERED": "1", **extra})
    return env
