"""Data-parallel trials through Ray Train: the Tune trial (or any driver) runs a
``ray.train.torch.TorchTrainer`` whose workers are the ranks of one trial
(``trainables.data_parallel.DataParallelTrial``).

Reports: every rank calls ``ray.train.report`` once per epoch (Ray Train's report is a barrier);
rank 0 alone carries the metrics and, when one is due (``checkpoint_period_s``, and always with the
final result), the checkpoint, which Ray Train persists under ``DataParallel.storage_path``. A Ray
Train callback on the controller forwards (metrics, checkpoint) through a queue to the driver,
which hands them to ``on_report`` (in a Tune trial: ``tune.report(metrics, checkpoint=...)``, so
Tune keeps its own copy, the scheduler, the searcher and MLflow see the trial as they see a
one-process one) and then deletes Ray Train's copy. Resuming: the driver passes the checkpoint it
resumes from (Tune's) to every rank, which starts from it exactly as ``run_trial`` does.

A non-finite loss on any rank ends the worker group; the driver raises ``NonFiniteLossError`` with
the failure metrics the one-process trial would have reported (``failure`` attribute).
"""
from __future__ import annotations

import logging
import tempfile
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from ray.train import UserCallback

from methods.errors import PruneTuneError

from .settings import TrialSettings
from .train import NonFiniteLossError

__all__ = ["DataParallel", "fit_data_parallel", "BACKENDS"]

log = logging.getLogger(__name__)
BACKENDS = ("gloo", "nccl")
#: (metrics, checkpoint or None): what the driver receives per epoch.
OnReport = Callable[[dict[str, Any], Any], None]


@dataclass(frozen=True)
class DataParallel:
    """``workers`` ranks with ``cpu`` CPUs and ``gpu`` GPUs each, talking over ``backend``;
    ``storage_path``: a folder (or URI) every node reaches, where Ray Train persists rank 0's
    checkpoints until the driver has taken them."""

    workers: int
    cpu: float = 1
    gpu: float = 0
    backend: str = "gloo"
    storage_path: str | None = None


def fit_data_parallel(settings: TrialSettings, method_name: str, hparams: dict[str, Any], parallel: DataParallel,
                      on_report: OnReport, resume_from: Any = None, checkpoint_period_s: float = 0.0) -> None:
    """Run one trial on ``parallel.workers`` ranks; ``on_report(metrics, checkpoint)`` per epoch.
    ``resume_from``: a ``ray.train.Checkpoint`` (e.g. ``tune.get_checkpoint()``) to continue from."""
    import ray
    from ray.util.queue import Queue

    queue, stop = Queue(actor_options={"num_cpus": 0}), Queue(actor_options={"num_cpus": 0})
    with _run_storage(parallel.storage_path) as (path, filesystem):
        trainer = _trainer(settings, method_name, hparams, parallel, (queue, stop), resume_from,
                           checkpoint_period_s, path, filesystem)
        try:
            with ThreadPoolExecutor(1, thread_name_prefix="prunetune-ddp") as pool:
                done = pool.submit(trainer.fit)
                try:
                    _forward(queue, done, on_report)
                except BaseException:  # e.g. Tune stopping the trial (SystemExit in tune.report)
                    stop.put(True)  # the ranks stop at their next report; leaving the pool waits for it
                    raise
                _result(done)
        finally:
            ray.kill(queue.actor)
            ray.kill(stop.actor)


def _trainer(settings, method_name, hparams, parallel: DataParallel, queues, resume_from, period, path, filesystem):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = {"CPU": parallel.cpu, **({"GPU": parallel.gpu} if parallel.gpu else {})}
    return TorchTrainer(
        _worker_loop,
        train_loop_config={"settings": settings, "method": method_name, "hparams": hparams,
                           "resume_from": resume_from, "period": period, "threads": max(1, int(parallel.cpu))},
        scaling_config=ScalingConfig(num_workers=parallel.workers, use_gpu=parallel.gpu > 0,
                                     resources_per_worker=resources),
        torch_config=TorchConfig(backend=parallel.backend),
        run_config=RunConfig(name=f"prunetune-ddp-{uuid.uuid4().hex[:12]}", storage_path=path,
                             storage_filesystem=filesystem, callbacks=[_ToDriver(*queues)],
                             failure_config=FailureConfig(max_failures=0),  # Tune retries the trial
                             checkpoint_config=CheckpointConfig(num_to_keep=None)),  # the driver deletes them
    )


@contextmanager
def _run_storage(location: str | None) -> Iterator[tuple[str, Any]]:
    """(path, filesystem) for Ray Train's run folder: under ``location`` (a shared folder or a URI),
    or a temporary local folder (one node); removed at the end."""
    from . import storage

    if location is None:
        with tempfile.TemporaryDirectory(prefix="prunetune-ddp-") as tmp:
            yield tmp, None
        return
    filesystem, path = storage.resolve(storage.join(location, f"ddp-{uuid.uuid4().hex[:12]}"))
    try:
        yield path, filesystem
    finally:
        try:
            filesystem.delete_dir(path)
        except (FileNotFoundError, OSError):
            log.debug("no Ray Train run folder to remove at %s", path)


def _forward(queue, done: Future, on_report: OnReport) -> None:
    """Hand every report to ``on_report`` (this thread: Tune's function thread) until fit ends."""
    from ray.util.queue import Empty

    while True:
        try:
            metrics, checkpoint = queue.get(timeout=0.5)
        except Empty:
            if done.done() and queue.empty():
                return
            continue
        on_report(metrics, checkpoint)
        if checkpoint is not None:  # the driver has its copy now
            checkpoint.filesystem.delete_dir(checkpoint.path)


def _result(done: Future) -> None:
    """Re-raise a rank's NonFiniteLossError as ours (with its failure metrics); else fit's outcome."""
    from ray.train import TrainingFailedError

    try:
        done.result()
    except TrainingFailedError as exc:
        for error in (getattr(exc, "worker_failures", None) or {}).values():
            if isinstance(error, NonFiniteLossError):
                raise error from None
        raise


class StoppedByDriver(PruneTuneError):
    """The driver stopped taking reports (Tune stopped the trial): the run ends."""


class _ToDriver(UserCallback):
    """On the Ray Train controller: rank 0's metrics and the persisted checkpoint, to the driver;
    once the driver has put anything in ``stop``, the run ends instead (raising here ends it)."""

    def __init__(self, queue, stop):
        self.queue, self.stop = queue, stop

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if not self.stop.empty():
            raise StoppedByDriver("the driver stopped the trial")
        self.queue.put((metrics[0], checkpoint))


# ---- on every rank ------------------------------------------------------------------------------------
def _worker_loop(config: dict[str, Any]) -> None:
    """One rank: the trial, reporting through ``ray.train.report`` (metrics and checkpoint from rank 0)."""
    import torch
    import torch.distributed as dist

    from .data_parallel import DataParallelTrial
    from .trial import run_started

    torch.set_num_threads(config["threads"])
    report = _rank_reporter(dist.get_rank(), config["period"])
    with _local(config["resume_from"]) as resume_from:
        trial = DataParallelTrial.start_rank(config["settings"], config["method"], config["hparams"], report,
                                             resume_from)
    run_started(trial)


@contextmanager
def _local(checkpoint) -> Iterator[Path | None]:
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as directory:
        yield Path(directory)


def _rank_reporter(rank: int, period: float):
    """The trial's ``report(metrics, save)`` on one rank: every rank reports (a barrier); rank 0 with
    its metrics and, when due, a checkpoint written by ``save``."""
    import ray.train

    last_saved = [time.monotonic()]

    def report(metrics: dict[str, Any], save) -> None:
        now = time.monotonic()
        if rank != 0:
            ray.train.report({})
            return
        if not ("test_accuracy" in metrics or now - last_saved[0] >= period):
            ray.train.report(metrics)
            return
        last_saved[0] = now
        with tempfile.TemporaryDirectory(prefix="prunetune-ckpt-") as tmp:
            save(Path(tmp))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    return report
