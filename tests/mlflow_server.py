"""A real `mlflow server` for tests: SQLite backend, artifacts served from a folder, on 127.0.0.1 in its
own session; ``running_server`` waits for GET /health and, on exit, stops it by its PID (SIGTERM, then
SIGKILL to its process group) and checks that nothing of it survived."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import pytest

from helpers import live_processes
from loopback_cluster import free_port

START_TIMEOUT_S = 60.0


def _session_members(sid: int) -> list[str]:
    """Live (not zombie) processes in session ``sid``, as "pid cmdline"."""
    found = []
    for pid, entry, session in live_processes():
        try:
            if session == sid:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{pid} {cmd.strip()}")
        except OSError:
            continue  # exited while we looked
    return found


class Server:
    def __init__(self, root: Path, port: int, proc: subprocess.Popen, log_path: Path):
        self.root, self.port, self.proc, self.log_path = root, port, proc, log_path
        self.uri = f"http://127.0.0.1:{port}"
        self.artifacts = root / "artifacts"

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else "(no log)"

    def local_file(self, artifact_uri: str, *parts: str) -> Path:
        """Where the server keeps ``mlflow-artifacts:/<path>``: under its --artifacts-destination."""
        assert artifact_uri.startswith("mlflow-artifacts:"), artifact_uri
        return self.artifacts.joinpath(urlparse(artifact_uri).path.lstrip("/"), *parts)


@contextmanager
def running_server(root: Path, backend_store_uri: str | None = None) -> Iterator[Server]:
    """`mlflow server` (SQLite backend: ``root/server.db`` unless ``backend_store_uri`` names another;
    artifacts served from ``root/artifacts``) until the block ends."""
    port = free_port()
    log_path = root / "server.log"
    exe = Path(sys.executable).with_name("mlflow")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "mlflow"]
    cmd += ["server", "--backend-store-uri", backend_store_uri or f"sqlite:///{root}/server.db", "--artifacts-destination",
            str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    # The server's job runner (huey consumers, seven more processes) is not needed to track runs.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    server = Server(root, port, proc, log_path)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with code {proc.returncode} before answering; its log:\n"
                            f"{server.log_tail()}")
            try:
                with urllib.request.urlopen(f"{server.uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server on port {port} did not answer GET /health within {START_TIMEOUT_S:.0f} s; "
                            f"its log:\n{server.log_tail()}")
            time.sleep(0.25)
        yield server
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        try:  # the uvicorn worker is a child in the session the server started (pgid = its pid)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _session_members(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _session_members(proc.pid) == [], "mlflow server processes survived the teardown"
