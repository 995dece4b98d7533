"""Start an HTTP server in a subprocess, wait until it answers, stop it afterwards.

    with serve([sys.executable, "-m", "service", "--model", m], port, ready_path="/ready") as url:
        ...

The server's output goes to a log file whose tail is shown when it fails to start.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import httpx

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def repo_env(**extra: str) -> dict[str, str]:
    """The environment with this repository importable (engine, service, benchmarks)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


@contextlib.contextmanager
def serve(command: list[str], port: int, ready_path: str, timeout: float = 600.0,
          env: dict[str, str] | None = None) -> Iterator[str]:
    url = f"http://127.0.0.1:{port}"
    log_path = Path(tempfile.mkstemp(prefix="serving-bench-", suffix=".log")[1])
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, cwd=REPO, env=env or repo_env(), stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        wait_ready(proc, url + ready_path, timeout, log_path)
        yield url
    finally:
        stop(proc)
        if proc.returncode not in (0, -signal.SIGTERM, -signal.SIGKILL):
            print(f"  (server exited with {proc.returncode}; log: {log_path})")
        else:
            log_path.unlink(missing_ok=True)


def wait_ready(proc: subprocess.Popen, url: str, timeout: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text(errors='replace')[-3000:]}")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    stop(proc)
    raise TimeoutError(f"server not ready after {timeout:.0f}s:\n{log_path.read_text(errors='replace')[-3000:]}")


def stop(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
