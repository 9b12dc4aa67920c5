"""A real multi-node Ray cluster on loopback for fault tests and benchmarks: ``ray start --head``
plus ``ray start --address`` worker nodes (1 CPU each by default) in a private temp dir.

Every process of the cluster is found again by an environment marker, by the sessions of the
``ray start`` commands, or by a file it holds open under the private temp dir, and ``stop()``
ends exactly those by PID: nothing else on the machine is touched.

    with LoopbackCluster(workdir) as cluster:
        cluster.start_head()
        node = cluster.add_worker()
        ...  # run a driver with env=cluster.env and address=cluster.address
        os.kill(cluster.raylet_pid(node), signal.SIGKILL)   # the node dies
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

__all__ = ["LoopbackCluster", "free_port", "proc_info", "trial_results", "live_trial_results", "tune_state"]

MARK = "PRUNETUNE_TEST_CLUSTER_MARK"
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_info(pid: int) -> tuple[int, bytes, bytes] | None:
    """(ppid, cmdline, environ) of a live, non-zombie process, or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] == "Z":
            return None
        return int(fields[1]), Path(f"/proc/{pid}/cmdline").read_bytes(), Path(f"/proc/{pid}/environ").read_bytes()
    except (OSError, ValueError):
        return None


def _ray() -> list[str]:
    exe = shutil.which("ray")
    return [exe] if exe else [sys.executable, "-m", "ray.scripts.scripts"]


def _link(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


class LoopbackCluster:
    def __init__(self, workdir: Path, *, node_death_s: float = 3.0):
        self.workdir = Path(workdir)
        self.mark = uuid.uuid4().hex
        self.temp_dir = tempfile.mkdtemp(prefix="pt2n-", dir="/tmp")  # short: Ray's socket paths have a length limit
        self.port = free_port()
        self.sids: set[int] = set()
        pythonpath = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        # Same Ray settings for every process (README: Ray); Tune snapshots its state every second.
        self.env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled",
                        TUNE_GLOBAL_CHECKPOINT_S="1", PYTHONPATH=pythonpath, **{MARK: self.mark})
        # The GCS declares a node dead after failure_threshold missed health checks: seconds, not ~30 s.
        period = max(250, int(node_death_s * 1000 / 3))
        self._head_env = dict(self.env, RAY_health_check_period_ms=str(period), RAY_health_check_timeout_ms=str(period),
                              RAY_health_check_failure_threshold="3", RAY_health_check_initial_delay_ms="1000")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _common(self, num_cpus: int) -> list[str]:
        return ["--num-cpus", str(num_cpus), "--num-gpus", "0", "--temp-dir", self.temp_dir,
                "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]

    def _ray_start(self, args: list[str], env: dict) -> None:
        proc = subprocess.Popen(_ray() + ["start"] + args, env=env, cwd=self.workdir, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.sids.add(proc.pid)  # its daemons stay in its session
        out, _ = proc.communicate(timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"ray start {' '.join(args)} failed:\n{out.decode()[-3000:]}")

    def start_head(self, num_cpus: int = 1) -> None:
        self._ray_start(["--head", "--port", str(self.port), "--include-dashboard=false"] + self._common(num_cpus),
                        self._head_env)

    def add_worker(self, num_cpus: int = 1) -> int:
        """Start a worker node; returns its node-manager port, which names it for ``raylet_pid``."""
        nm_port = free_port()
        self._ray_start(["--address", self.address, "--node-manager-port", str(nm_port)] + self._common(num_cpus),
                        self.env)
        return nm_port

    def spawn(self, args: list[str], log) -> subprocess.Popen:
        """A process (a sweep driver, say) in the cluster's environment, stopped with the cluster."""
        proc = subprocess.Popen(args, env=self.env, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.sids.add(proc.pid)
        return proc

    def processes(self) -> list[int]:
        """PIDs of this cluster: those carrying its environment marker, those in the sessions of the
        commands it ran, and those with a file open under its private temp dir (Ray's agents rewrite
        their title over /proc/PID/environ, so the marker alone misses them)."""
        token = f"{MARK}={self.mark}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                stat = (entry / "stat").read_text()
                fields = stat[stat.rindex(")") + 2:].split()
                if fields[0] == "Z":
                    continue
                ours = int(fields[3]) in self.sids or token in (entry / "environ").read_bytes().split(b"\0")
                if not ours:
                    ours = any(_link(fd).startswith(self.temp_dir + "/") for fd in (entry / "fd").iterdir())
            except (OSError, ValueError):
                continue  # gone meanwhile, or not ours to read
            if ours:
                found.append(int(entry.name))
        return found

    def raylet_pid(self, node_manager_port: int) -> int | None:
        token = f"--node_manager_port={node_manager_port}".encode()
        for pid in self.processes():
            info = proc_info(pid)
            if info and b"raylet" in info[1].split(b"\0")[0] and token in info[1].split(b"\0"):
                return pid
        return None

    def kill_node(self, raylet: int) -> list[int]:
        """A lost machine: SIGKILL a node's raylet and, at the same moment, every process it started
        (its workers; alone, a raylet's death leaves them running until they notice, long enough
        for a short trial to finish where it was). Returns the PIDs killed."""
        victims = [raylet] + [pid for pid in self.processes() if (proc_info(pid) or (None,))[0] == raylet]
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return victims

    def stop(self, timeout: float = 20) -> list[int]:
        """SIGTERM then SIGKILL every process of the cluster; returns those still alive afterwards."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.processes():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            until = time.monotonic() + (timeout if sig == signal.SIGTERM else 5)
            while self.processes() and time.monotonic() < until:
                time.sleep(0.3)
        strays = self.processes()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return strays

    def __enter__(self) -> "LoopbackCluster":
        return self

    def __exit__(self, *exc) -> None:
        strays = self.stop()
        if strays and exc[0] is None:
            raise RuntimeError(f"processes of the loopback Ray cluster survived SIGKILL: {strays}")


def trial_results(exp_dir: Path) -> dict[str, list[dict]]:
    """Trial id -> the results Tune's driver wrote to the trial's result.json (complete lines only)."""
    out = {}
    for path in glob.glob(str(Path(exp_dir) / "*" / "result.json")):
        rows = []
        for line in Path(path).read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass  # being written
        if rows:
            out[rows[0]["trial_id"]] = rows
    return out


def live_trial_results(cluster: LoopbackCluster, storage: Path, name: str) -> dict[str, list[dict]]:
    """Results of a running sweep: Tune's driver writes result.json in a staging dir under the Ray
    session dir and syncs it to ``storage`` later, so look in both."""
    staging = glob.glob(os.path.join(cluster.temp_dir, "session_*", "artifacts", "*", f"{name}-*", "driver_artifacts"))
    out: dict[str, list[dict]] = {}
    for exp_dir in glob.glob(str(Path(storage) / f"{name}-*")) + staging:
        for tid, rows in trial_results(Path(exp_dir)).items():
            if len(rows) > len(out.get(tid, [])):
                out[tid] = rows
    return out


def tune_state(exp_dir: Path) -> dict[str, dict] | None:
    """Trial id -> {status, epoch} from the newest experiment state Tune has synced to the sweep dir."""
    files = sorted(glob.glob(str(exp_dir / "experiment_state-*.json")))
    if not files:
        return None
    try:
        data = json.loads(Path(files[-1]).read_text())
    except (OSError, ValueError):
        return None  # being written
    trials = {}
    for trial_json, meta in data["trial_data"]:
        trial = json.loads(trial_json)
        meta = json.loads(meta) if isinstance(meta, str) else meta
        epoch = (meta.get("last_result") or {}).get("epoch", 0)
        trials[trial["trial_id"]] = {"status": trial["status"], "epoch": epoch}
    return trials


def wait_mid_sweep(storage: Path, name: str, epochs: int, driver, timeout: float) -> tuple[Path, dict] | None:
    """Wait until Tune's synced state of the sweep ``storage/<name>-*`` holds a finished trial and a
    running one with a checkpoint (epoch 1..epochs-1); returns (sweep dir, that state), or None if
    the driver exits or ``timeout`` seconds pass first."""
    from search.sweep import STATE_FILE

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and driver.poll() is None:
        dirs = glob.glob(str(Path(storage) / f"{name}-*" / STATE_FILE))
        if dirs:
            exp_dir = Path(dirs[0]).parent
            snapshot = tune_state(exp_dir)
            if snapshot and any(t["status"] == "TERMINATED" for t in snapshot.values()) and any(
                    t["status"] == "RUNNING" and 1 <= t["epoch"] < epochs for t in snapshot.values()):
                return exp_dir, snapshot
        time.sleep(0.2)
    return None
