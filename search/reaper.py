"""The embedded Ray node's processes end with the driver, even a SIGKILLed one.

Ray ties its GCS and raylet to the driver that started them, but the raylet's agents
(``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``) notice a dead raylet only after trying, for a
minute, to tell the GCS (dead too) about it. So before ``ray.init`` the driver puts a token of its
own in its environment (every Ray process it starts inherits it) and starts this watcher in a
session of its own: ``python -m search.reaper PID STARTTIME TOKEN``. While the driver lives the
watcher notes its descendants; when it is gone the watcher SIGKILLs those (by PID, checked against
their start time) and every process that carries the token, and exits; when the driver shuts
its Ray down normally it stops the watcher itself (``Reaper.stop``). Nothing without the token is
touched (the watcher, a child of the driver itself, leaves itself out).
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

__all__ = ["Reaper", "TOKEN_ENV"]

log = logging.getLogger(__name__)
TOKEN_ENV = "PRUNETUNE_RAY_OWNER"
POLL_S = 0.5


def _start_time(pid: int) -> str | None:
    """The process's start time (field 22 of /proc/PID/stat), or None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] == "Z" else fields[19]


def _carriers(token: str) -> list[int]:
    needle = f"{TOKEN_ENV}={token}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


class Reaper:
    """Start with ``Reaper.start()`` just before ``ray.init``; ``stop()`` after ``ray.shutdown``."""

    def __init__(self, proc: subprocess.Popen | None, token: str):
        self.proc, self.token = proc, token

    @classmethod
    def start(cls) -> "Reaper":
        token = uuid.uuid4().hex
        start = _start_time(os.getpid())
        proc = None
        if start is not None:  # Linux /proc; elsewhere Ray's own fate sharing is all there is
            env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
            proc = subprocess.Popen([sys.executable, "-m", "search.reaper", str(os.getpid()), start, token],
                                    env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True,
                                    cwd=str(Path(__file__).resolve().parents[1]))
        os.environ[TOKEN_ENV] = token  # inherited by the GCS, the raylet, its agents and workers
        return cls(proc, token)

    def stop(self) -> None:
        if os.environ.get(TOKEN_ENV) == self.token:
            del os.environ[TOKEN_ENV]
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _descendants(root: int) -> dict[int, str]:
    """pid -> start time of every live descendant of ``root``."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        children.setdefault(int(stat[stat.rindex(")") + 2:].split()[1]), []).append(int(entry.name))
    out, todo = {}, [p for p in children.get(root, []) if p != os.getpid()]
    while todo:
        pid = todo.pop()
        start = _start_time(pid)
        if start is not None:
            out[pid] = start
        todo.extend(children.get(pid, []))
    return out


def watch(pid: int, start: str, token: str) -> int:
    """Wait for process ``pid`` (started at ``start``) to end, then kill its processes: every
    descendant seen while it lived (re-parented since; matched by start time, so a reused PID is
    spared) and whatever still carries ``token`` in its environment (a process that renames itself,
    like Ray's agents, may overwrite that, hence the tree too)."""
    known: dict[int, str] = {}
    while _start_time(pid) == start:
        known.update(_descendants(pid))
        time.sleep(POLL_S)
    for _ in range(20):  # a few rounds: a process may be mid-fork when the first round looks
        victims = [p for p, t in known.items() if _start_time(p) == t] + _carriers(token)
        if not victims:
            break
        for p in set(victims):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.25)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sys.exit(watch(int(sys.argv[1]), sys.argv[2], sys.argv[3]))
