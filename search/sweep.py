"""The sweep: start or join Ray, open the MLflow parent run, make sure the dense base model exists
(trained once, on a worker), run Tune with the Pareto Optuna searcher, then record the front.

``run_sweep(config)`` starts a new sweep in ``storage_path/<name>-<timestamp>``;
``resume_sweep(dir)`` continues an interrupted one with the same parent run. ``storage_path`` (and so
the sweep directory) is a local/NFS folder or an object-store URI (``s3://bucket/prefix``, see
``trainables.storage``): the state file, Tune's experiment state, the checkpoints, the base models and
a copy of the front go there; the driver keeps only temporary files on its own disk.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from methods.errors import ConfigError, MissingFileError, PruneTuneError
from trainables import storage

from .config import SweepConfig, config_from_dict
from .interrupts import Interrupts
from .reaper import Reaper

__all__ = ["run_sweep", "resume_sweep", "settings_from_config", "SweepResult", "SweepInterrupted", "STATE_FILE"]

log = logging.getLogger(__name__)
STATE_FILE = "prunetune_sweep.json"


class SweepInterrupted(PruneTuneError):
    """SIGINT or SIGTERM stopped the sweep: Tune saved its state, the parent run is KILLED, no front
    was recorded. ``prunetune resume experiment_dir`` continues it."""

    def __init__(self, signum: int, experiment_dir: str):
        super().__init__(f"interrupted: continue with prunetune resume {experiment_dir}")
        self.signum, self.experiment_dir = signum, experiment_dir


@dataclass
class SweepResult:
    experiment_dir: Path | str  # a Path for a local/NFS sweep directory, the URI string for an object store
    parent_run_id: str
    finished: int
    failed: int
    hypervolume: float
    front: list = field(default_factory=list)
    base_metrics: dict[str, Any] = field(default_factory=dict)
    objective: str | None = "macs"  # the config's shorthand (None for an objectives list that has none)
    objectives: tuple = ("accuracy", "macs")  # the config's: the front's objectives
    stopped: int = 0     # trials stopped early (search.early_stopping)
    infeasible: int = 0  # finished trials outside the config's constraints (kept off the front)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per platform part (see _RayNode)


def settings_from_config(cfg: SweepConfig):
    from trainables.settings import TrialSettings

    return TrialSettings(
        model=cfg.model, dataset=cfg.dataset, data_dir=cfg.data_dir, download=cfg.download,
        image_size=cfg.image_size, model_kwargs=dict(cfg.model_kwargs), seed=cfg.seed,
        base=cfg.base, finetune=cfg.finetune, latency_batch_size=cfg.latency_batch_size,
        calibration_batches=cfg.calibration_batches, compile=cfg.compile, base_dir=storage.join(cfg.storage_path, "base_models"),
        use_gpu=cfg.resources_per_trial.gpu > 0,
    )


#: Ray settings of an embedded node. No idle workers started when the driver connects: Ray starts
#: one per CPU then, with no runtime environment, and Tune's trial actors never take them (Tune
#: gives every trial actor one: ``env_vars``), so on a small machine they only take CPU from the
#: driver's start (the actors' own workers start when Tune asks for them, as before).
EMBEDDED_SYSTEM_CONFIG = {"prestart_worker_first_driver": False}


def _init_ray(cfg: SweepConfig) -> Reaper | bool:
    """Join ``cfg.address`` or start an embedded local Ray. Falsy if Ray was running already; True
    after joining a cluster; for an embedded node the ``Reaper`` that ends its processes with this
    driver (``stop`` it after ``ray.shutdown``)."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if cfg.address:
        log.info("joining Ray cluster at %s", cfg.address)
        ray.init(address=cfg.address, log_to_driver=False)
        return True
    # "local" always starts a fresh embedded node (a stale cluster file cannot redirect it), bound
    # to loopback: nothing outside this machine needs to reach it. Ray replaces a loopback
    # _node_ip_address with the machine's address unless clusters are off (its setting for
    # laptops); with 127.0.0.1 as the node's address, its gRPC servers and agents bind there.
    from ray._private import ray_constants

    reaper = Reaper.start()
    clusters = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(address="local", include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
                 _system_config=EMBEDDED_SYSTEM_CONFIG)
    except BaseException:
        reaper.stop()
        raise
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = clusters
    return reaper


def _tune_location(exp_dir: str) -> tuple[str, dict[str, Any]]:
    """(path, storage kwargs) for Tune. A URI is resolved here and handed over as the bare path plus
    ``storage_filesystem``, so its query options (endpoint, scheme, region) never pass through Ray's
    own URI parsing; the filesystem pickles without credentials (each process resolves its own)."""
    if not storage.is_uri(exp_dir):
        return exp_dir, {}
    fs, path = storage.resolve(exp_dir)
    return path, {"storage_filesystem": fs}


def _record_front(client, parent: str, exp_dir: str, dense_macs, objective, constraints=None, runs=None) -> dict:
    """``record_front`` writes the CSV and PNG into a folder and logs them to MLflow; for an object
    store that folder is temporary and its files are also copied to ``exp_dir/front``."""
    from .fronts import record_front

    local = storage.local_path(exp_dir)
    if local is not None:
        return record_front(client, parent, local / "front", dense_macs=dense_macs, objective=objective,
                            constraints=constraints, runs=runs)
    with tempfile.TemporaryDirectory(prefix="prunetune-front-") as tmp:
        summary = record_front(client, parent, Path(tmp), dense_macs=dense_macs, objective=objective,
                               constraints=constraints, runs=runs)
        storage.upload_dir(tmp, storage.join(exp_dir, "front"))
    return summary


def _run(cfg: SweepConfig, exp_dir: str, parent_run_id: str | None, restore: bool, warm: list = ()) -> SweepResult:
    """Start Ray (in a thread, ``_RayNode``) and, meanwhile, open (or reopen) the parent run; then
    ``_sweep``. However it ends, the parent run says how: FINISHED (with the front), KILLED
    (SIGINT/SIGTERM: resumable, no front) or FAILED (the reason in its ``failure_reason`` tag);
    children still RUNNING are closed as KILLED. Ray is stopped on every path."""
    from .store import open_client
    from .tracking import open_parent_run

    interrupts = Interrupts()
    with interrupts:
        node = _RayNode(cfg)
        try:
            t0 = time.perf_counter()
            client = open_client(cfg.tracking_uri)
            parent = open_parent_run(client, cfg.name, parent_run_id, _flatten(cfg.to_dict()),
                                     {"prunetune.experiment_dir": str(exp_dir)})
            node.timings["tracking"] = time.perf_counter() - t0
            return _run_parent(cfg, exp_dir, client, parent, parent_run_id, restore, interrupts, warm, node)
        finally:
            node.stop()


def _run_parent(cfg: SweepConfig, exp_dir: str, client, parent: str, parent_run_id: str | None, restore: bool,
                interrupts: Interrupts, warm, node: "_RayNode") -> SweepResult:
    try:
        if parent_run_id:  # resumed: what ended the previous driver no longer describes the run
            tags = client.get_run(parent).data.tags
            for key in ("prunetune.interrupted", "failure_reason"):
                if key in tags:
                    client.delete_tag(parent, key)
        state = {"parent_run_id": parent, "tracking_uri": cfg.tracking_uri, "config": cfg.to_dict()}
        storage.write_text(storage.join(exp_dir, STATE_FILE), json.dumps(state, indent=1))
        log.info("MLflow parent run %s in experiment %r (%s)", parent, cfg.name, cfg.tracking_uri)
        return _sweep(cfg, exp_dir, client, parent, restore, interrupts, warm, node)
    except KeyboardInterrupt:
        signum = interrupts.signum or signal.SIGINT
        log.warning("%s: stopping the sweep; the parent run %s is KILLED", signal.Signals(signum).name, parent)
        _close(client, parent, "KILLED", {"prunetune.interrupted": signal.Signals(signum).name})
        raise SweepInterrupted(signum, str(exp_dir)) from None
    except BaseException as exc:
        _close(client, parent, "FAILED", {"failure_reason": _reason(exc)})
        raise


class _RayNode:
    """Ray for one sweep, started (``_init_ray``) in a thread of its own at once, so the driver opens
    MLflow and prepares the dense base model meanwhile. ``wait()`` blocks until Ray is up and raises
    the start's error, if any. ``release()`` has the same thread stop Ray (``_end_ray``) while the
    driver goes on (with the front: it needs MLflow only); ``stop()`` (idempotent, on every path)
    releases it if that has not happened yet and waits until Ray is stopped and the thread ended.
    The thread lives until then: Ray starts its GCS and raylet with ``PR_SET_PDEATHSIG``, which kills
    them when the *thread* that forked them ends. A start that failed while the driver was failing
    for another reason is logged as its own line. ``timings``: seconds per start-up part, for the
    log line and ``SweepResult.timings`` (``ray_stop_wait``: what ``stop()`` waited for)."""

    def __init__(self, cfg: SweepConfig) -> None:
        self.timings: dict[str, float] = {}
        self._started: Reaper | bool = False
        self._error: BaseException | None = None
        self._ready, self._release = threading.Event(), threading.Event()
        self._raised = self._stopped = False
        self._thread = threading.Thread(target=self._own, args=(cfg,), name="prunetune-ray", daemon=True)
        self._thread.start()

    def _own(self, cfg: SweepConfig) -> None:
        t0 = time.perf_counter()
        ray_log, quiet = logging.getLogger("ray._private.worker"), _NotMainThread()
        ray_log.addFilter(quiet)
        try:
            self._started = _init_ray(cfg)
        except BaseException as exc:  # noqa: BLE001  (handed to wait() / stop())
            self._error = exc
        finally:
            ray_log.removeFilter(quiet)
            self.timings["ray_start"] = time.perf_counter() - t0
            self._ready.set()
        self._release.wait()
        if self._error is None and self._started:
            t0 = time.perf_counter()
            try:
                _end_ray(self._started)
            except Exception:  # noqa: BLE001  (never masks how the sweep ended)
                log.warning("stopping Ray failed", exc_info=True)
            self.timings["ray_stop"] = time.perf_counter() - t0

    def wait(self) -> None:
        t0 = time.perf_counter()
        try:
            self._ready.wait()
        finally:
            self.timings["ray_wait"] = self.timings.get("ray_wait", 0.0) + time.perf_counter() - t0
        if self._error is not None:
            self._raised = True
            raise self._error

    def release(self) -> None:
        """Stop Ray in the background: nothing may use it after this."""
        self._release.set()

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        t0 = time.perf_counter()
        self._ready.wait()
        if self._error is not None and not self._raised:
            log.error("Ray start failed as well: %s", _reason(self._error))
        self._release.set()
        self._thread.join()
        if self._error is None and self._started:
            self.timings["ray_stop_wait"] = time.perf_counter() - t0


def _end_ray(started: Reaper | bool) -> None:
    """``ray.shutdown`` and, for an embedded node, its reaper; the node's helper processes are asked
    to end first (``_end_helpers``)."""
    import ray

    embedded = hasattr(started, "stop")
    if embedded:
        _end_helpers()
    ray.shutdown()
    if embedded:
        started.stop()


#: An embedded node's processes that no sweep needs once Tune is done.
_HELPERS = ("monitor", "dashboard", "log_monitor")


def _end_helpers() -> None:
    """SIGKILL the embedded node's autoscaler monitor, dashboard and log monitor now (they hold
    nothing a sweep needs). ``ray.shutdown`` stops one process after the other, each given a second
    after its SIGTERM; it reaches the monitor after the GCS is gone, and the monitor then spends its
    whole second and is SIGKILLed (most of a 1.1-1.6 s shutdown). Not SIGTERM: a monitor asked to end
    while the GCS still answers reports "The autoscaler failed ... Terminated with signal 15" and its
    traceback to the driver's output. ``ray.shutdown`` still stops the rest. Best effort: Ray's
    private node handle."""
    try:
        from ray._private import worker

        node = worker._global_node
        infos = [info for kind in _HELPERS for info in (node.all_processes.get(kind, ()) if node else ())]
        for info in infos:
            if info.process.poll() is None:
                info.process.kill()
    except Exception:  # noqa: BLE001  (ray.shutdown does it all anyway)
        log.debug("could not signal Ray's helper processes", exc_info=True)


class _NotMainThread(logging.Filter):
    """Drops ``ray.init``'s warning that it set no SIGTERM handler off the main thread (the sweep's
    own handlers, ``search.interrupts``, are in place)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("SIGTERM handler is not set")


def _close(client, parent: str, status: str, tags: dict[str, str]) -> None:
    """End the parent run (and any child left RUNNING) with ``status``; best effort, never masks the
    error that got us here."""
    from .tracking import close_open_children

    try:
        for key, value in tags.items():
            client.set_tag(parent, key, value)
        close_open_children(client, parent)
        client.set_terminated(parent, status=status)
    except Exception:  # noqa: BLE001  (the store itself may be what failed)
        log.warning("could not mark the parent run %s %s", parent, status, exc_info=True)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:4000]


def _sweep(cfg: SweepConfig, exp_dir: str, client, parent: str, restore: bool, interrupts: Interrupts,
           warm: list, node: _RayNode) -> SweepResult:
    from methods.cost import profile
    from trainables.base_model import build_model
    from trainables.workspace import keep_data, load_data

    from . import model_logs
    from .progress import tune_environment, tune_verbosity
    from .tracking import child_runs

    timings = node.timings
    try:
        if cfg.address:  # a cluster: Ray first (the base model trains there); then its resources are
            import ray   # known (an embedded node's were checked in preflight)

            from .preflight import check_workers_fit

            node.wait()
            total = ray.cluster_resources()
            check_workers_fit(cfg.resources_per_trial, total.get("CPU", 0), total.get("GPU", 0), "the Ray cluster")
        settings = settings_from_config(cfg)
        t0 = time.perf_counter()
        base_metrics = _base_model(cfg, settings, client, parent)  # embedded: here, while Ray starts
        data = load_data(settings)
        keep_data(settings)  # digits as arrays beside the base: no trial's worker imports scikit-learn
        dense = profile(build_model(settings), tuple(data.input_shape))
        timings["base"] = time.perf_counter() - t0
        _import_tune_modules()  # ~1 s of imports, also while Ray starts
        node.wait()
        interrupts.install()  # again: ray.init may have put its own SIGTERM handler in place
        t0 = time.perf_counter()
        tuner = _tuner(cfg, settings, exp_dir, parent, restore, _input_example(data), warm)
        with interrupts.tune_running(), tune_environment(cfg.checkpoint_period_s, tune_verbosity()):
            try:
                tuner.fit()
            finally:  # Tune ends its callbacks with this too (on_experiment_end), but not on every path
                model_logs.drain()  # no trial's model is still on its way to MLflow past here
        timings["tune"] = time.perf_counter() - t0
        if interrupts.signum is not None:  # Tune stopped on the signal and saved its state
            raise KeyboardInterrupt
        node.release()  # Ray stops in its thread while the front is recorded (MLflow only)
        t0 = time.perf_counter()
        children = child_runs(client, parent)  # read once: the counts here and the front
        failed = sum(1 for r in children if r.info.status == "FAILED")
        stopped = sum(1 for r in children if "prunetune.stopped_at_rung" in r.data.tags)
        summary = _record_front(client, parent, exp_dir, {"dense_macs": dense.macs, "dense_params": dense.params},
                                cfg.objectives, cfg.constraints, children)
        client.set_terminated(parent, status="FINISHED")
        timings["front"] = time.perf_counter() - t0
        log.info("sweep done: %d finished, %d failed; front of %d, hypervolume %.4g",
                 summary["trials"], failed, len(summary["front"]), summary["hypervolume"])
        result = SweepResult(exp_dir if storage.is_uri(exp_dir) else Path(exp_dir), parent, summary["trials"], failed,
                             summary["hypervolume"], summary["front"], base_metrics, cfg.objective, cfg.objectives,
                             stopped, summary.get("infeasible", 0), timings)
    finally:
        node.stop()
    log.info("platform time: %s", ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    return result


def _import_tune_modules() -> None:
    """What ``_tuner`` imports (Ray Tune, the trainable, the searcher), imported before Ray is up,
    and what the MLflow logger's first pt2 model needs: ``torch.export`` imports ``torch._dynamo``
    only when it first runs (1.5 s on a quiet 2-core machine, inside Tune's loop at the first
    finished trial otherwise)."""
    import ray.tune  # noqa: F401
    import torch._dynamo  # noqa: F401

    import trainables.tune_trainable  # noqa: F401

    from . import early_stopping, mlflow_model, searcher, tracking  # noqa: F401


def _base_model(cfg: SweepConfig, settings, client, parent: str) -> dict[str, Any]:
    """Train (once) or reuse the dense base model; its metrics, logged on the parent run."""
    import ray

    from trainables.base_model import ensure_base_model

    res = cfg.resources_per_trial
    log.info("dense base model: training or reusing %s on %s", cfg.model, cfg.dataset)
    t0 = time.perf_counter()
    if cfg.address:  # on a cluster: train where the trials' resources (GPUs) are
        # The same credential variables Tune forwards to its trial actors (an object-store base_dir).
        env = storage.forwarded_env()
        base_task = ray.remote(num_cpus=res.cpu, num_gpus=math.ceil(res.gpu),
                               **({"runtime_env": {"env_vars": env}} if env else {}))(ensure_base_model)
        _, base_metrics = ray.get(base_task.remote(settings))
    else:  # embedded: this process already has torch loaded; a new worker would import it again
        _, base_metrics = ensure_base_model(settings)
    log.info("dense base ready in %.1fs: val accuracy %.4f", time.perf_counter() - t0, base_metrics["accuracy"])
    logged = client.get_run(parent).data.metrics
    for key, value in (("base_accuracy", base_metrics["accuracy"]),
                       ("base_test_accuracy", base_metrics["test_accuracy"])):
        if key not in logged:  # a resumed sweep logged them already
            client.log_metric(parent, key, value)
    return base_metrics


def _tuner(cfg: SweepConfig, settings, exp_dir: str, parent: str, restore: bool, example=None, warm: list = ()):
    """``example``: the input example of every trial's MLflow model (see ``MLflowTrialLogger``);
    ``warm``: earlier sweeps' finished trials for the new study (``search.warm_start``)."""
    from ray import tune

    from .early_stopping import scheduler_and_callbacks
    from .progress import ProgressLines, tune_verbosity
    from .searcher import ParetoOptunaSearch, make_sampler
    from .space import make_space
    from .tracking import MLflowTrialLogger

    trainable = _trainable(cfg, settings, exp_dir)
    tune_path, tune_storage = _tune_location(exp_dir)
    if restore and not tune.Tuner.can_restore(tune_path, **tune_storage):
        log.warning("%s holds no Tune state yet (the driver stopped before Tune started): starting Tune afresh",
                    exp_dir)
        restore = False
    if restore:
        # Tuner.restore brings back the searcher (the Optuna study, pickled with its trials: a trial
        # that was running keeps its Tune trial id and so its Optuna trial), the callbacks (this
        # sweep's MLflowTrialLogger, pickled in tuner.pkl) and every trial: finished ones are kept,
        # unfinished ones continue from their last checkpoint. Errored trials stay errored: they
        # were told to Optuna as FAIL and recorded FAILED, and used up their retries already.
        return tune.Tuner.restore(tune_path, trainable=trainable, resume_unfinished=True,
                                  resume_errored=False, restart_errored=False, **tune_storage)
    scheduler, callbacks = scheduler_and_callbacks(cfg, parent)
    callbacks.append(ProgressLines(cfg.num_trials, scheduler))
    searcher = ParetoOptunaSearch(make_space(cfg.search_space()), make_sampler(cfg.sampler, cfg.seed, cfg.methods),
                                  objectives=cfg.objectives, constraints=cfg.constraints)
    if warm:
        searcher.add_trials(warm)  # earlier sweeps' finished trials, before the first suggestion
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=cfg.num_trials,
                                    max_concurrent_trials=cfg.max_concurrent_trials, reuse_actors=True),
        run_config=tune.RunConfig(
            name=os.path.basename(tune_path), storage_path=os.path.dirname(tune_path), **tune_storage,
            failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
            # 3: a periodic checkpoint and the final one never force a snapshot (search.progress)
            checkpoint_config=tune.CheckpointConfig(num_to_keep=3),
            callbacks=[MLflowTrialLogger(cfg.tracking_uri, parent, example, cfg.trial_models, cfg.objectives,
                                         cfg.constraints), *callbacks], verbose=tune_verbosity()),
    )


def _trainable(cfg: SweepConfig, settings, exp_dir: str):
    """Tune's trainable with its resources. A data-parallel trial (``workers`` > 1) is a Tune trial
    that holds no CPU (``DRIVER_MEMORY`` only) and starts a Ray Train run of ``workers`` ranks with their own
    resources (``trainables.distributed``), keeping its checkpoints under ``storage_path``."""
    from ray import tune

    from trainables.tune_trainable import data_parallel_trial_fn, trial_fn

    from .early_stopping import all_rung_epochs

    res = cfg.resources_per_trial
    if res.workers == 1:
        return tune.with_resources(tune.with_parameters(trial_fn, settings=settings,
                                                        checkpoint_period_s=cfg.checkpoint_period_s,
                                                        wait_at=all_rung_epochs(cfg)),
                                   {"cpu": res.cpu, "gpu": res.gpu})
    from trainables.distributed import DataParallel

    parallel = DataParallel(res.workers, cpu=res.cpu, gpu=res.gpu, backend=res.comm_backend,
                            storage_path=storage.join(exp_dir, "ddp_runs"))
    return tune.with_resources(tune.with_parameters(data_parallel_trial_fn, settings=settings, parallel=parallel,
                                                    checkpoint_period_s=cfg.checkpoint_period_s),
                               {"cpu": 0, "memory": DRIVER_MEMORY})


#: All a data-parallel trial's own Tune actor holds: it only waits for its ranks, and Tune refuses
#: a trial that asks for nothing. Its ranks hold the CPUs and GPUs.
DRIVER_MEMORY = 1 << 20


def _input_example(data, n: int = 4):
    """A few test images (numpy, batch > 1 so an exported program keeps a dynamic batch): the input
    example of every trial's MLflow model."""
    import torch

    return torch.stack([data.test[i][0] for i in range(min(n, len(data.test)))]).numpy()


def run_sweep(cfg: SweepConfig) -> SweepResult:
    from .preflight import preflight
    from .store import absolute_uri

    preflight(cfg)  # environment problems are one clear line before Ray or MLflow start
    # Recorded absolute in the state file, so resume, fronts and promote work from any directory.
    cfg = dataclasses.replace(cfg, tracking_uri=absolute_uri(cfg.tracking_uri))
    warm = []
    if cfg.warm_start:  # refused in one line (other model or dataset) before Ray or the new run start
        from .space import make_space
        from .warm_start import warm_start_trials

        warm = warm_start_trials(cfg, make_space(cfg.search_space()))
    exp_dir = storage.join(cfg.storage_path, f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    return _run(cfg, exp_dir if storage.is_uri(exp_dir) else str(Path(exp_dir).resolve()), None, restore=False,
                warm=warm)


def resume_sweep(experiment_dir: str | os.PathLike) -> SweepResult:
    """Continue the sweep in ``experiment_dir``: a local/NFS folder or a URI (``s3://bucket/prefix/name-...``)."""
    exp_dir = str(experiment_dir) if storage.is_uri(experiment_dir) else str(Path(experiment_dir).resolve())
    state_path = storage.join(exp_dir, STATE_FILE)
    try:
        text = storage.read_text(state_path)
    except FileNotFoundError:
        raise MissingFileError(f"{experiment_dir} is not a prunetune sweep directory ({STATE_FILE} missing)") from None
    except (OSError, ValueError) as exc:  # unreachable object store, bad credentials, unknown URI scheme
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"experiment_dir: cannot read {state_path} ({first})") from None
    state = json.loads(text)
    cfg = dataclasses.replace(config_from_dict(state["config"]), tracking_uri=_recorded_uri(state["tracking_uri"]))
    return _run(cfg, exp_dir, state["parent_run_id"], restore=True)


def _recorded_uri(uri: str) -> str:
    """The sweep's tracking URI from its state file, checked before anything is touched: its SQLite
    database must still be where it was (a relative one, from older sweeps, is read against the
    current directory)."""
    from .store import absolute_uri, sqlite_path

    db = sqlite_path(uri)
    if db is None:
        return uri
    if not db.is_absolute() and not db.is_file():
        raise ConfigError(f"tracking_uri: the sweep recorded the relative database {uri}; run resume from the "
                          "directory the sweep was started in")
    if not db.is_file():
        raise ConfigError(f"tracking_uri: the sweep's MLflow database {db} no longer exists (moved or deleted?)")
    return absolute_uri(uri)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out
