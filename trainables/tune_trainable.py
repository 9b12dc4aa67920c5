"""The Ray Tune function trainable: one call per trial, reporting metrics (and a checkpoint when
one is due) every epoch, from a thread of its own (``trainables.report_thread``), and resuming
from ``ray.tune.get_checkpoint()`` after a failure or a driver restart.

The trial config holds ``method`` and that method's hyperparameters as ``"<method>.<name>"`` keys
(the Optuna space names them so, because each method declares its own ranges).
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

from ray import tune

from .report_thread import ReportThread
from .settings import TrialSettings
from .trial import run_trial

__all__ = ["trial_fn", "data_parallel_trial_fn", "method_hparams", "epoch_reporter", "REPORTS_AHEAD"]

log = logging.getLogger(__name__)
#: Reports a trial may have queued beyond the one Tune holds: how long the driver may be busy
#: elsewhere (e.g. a first pt2 export, ~3 s) before a trial of sub-second epochs waits for it.
REPORTS_AHEAD = 8


def method_hparams(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Split a trial config into the method name and its own hyperparameters."""
    method = config["method"]
    prefix = method + "."
    return method, {k[len(prefix):]: v for k, v in config.items() if k.startswith(prefix)}


def trial_fn(config: dict[str, Any], settings: TrialSettings, checkpoint_period_s: float = 0.0,
             wait_at: Iterable[int] = ()) -> None:
    """Entry point Tune calls (wrapped with ``tune.with_parameters(trial_fn, settings=...)``).

    Every epoch reports its metrics; a checkpoint goes with the report when ``checkpoint_period_s``
    (0: every epoch) has passed since the trial's last one, and always with its final result (the
    model MLflow logs). Sub-second epochs would otherwise checkpoint every epoch, and with Tune's
    ``num_to_keep`` every few checkpoints force an experiment-state snapshot (Ray's "snapshotting
    has been triggered multiple times" warning; ``search.progress`` says why a trial's periodic and
    final checkpoints no longer do).

    Reports go to Tune from a thread of their own (``trainables.report_thread``): the trial trains
    its next epoch while the driver handles the last one. ``wait_at``: the fine-tune epochs
    (early-stopping rungs) whose report the trial waits on, since the scheduler may stop it there."""
    method, hparams = method_hparams(config)
    # Ray starts workers with a thread count of its own choosing; use the CPUs this trial holds.
    import torch

    cpus = int(tune.get_context().get_trial_resources().required_resources.get("CPU", 1) or 1)
    torch.set_num_threads(max(1, cpus))

    reporter = ReportThread(_send, ahead=REPORTS_AHEAD)
    try:
        _run(settings, method, hparams, epoch_reporter(reporter, checkpoint_period_s, wait_at))
    except BaseException:
        reporter.close(check=False)  # the reports made so far still reach Tune, before the error
        raise
    reporter.close()


def epoch_reporter(reporter: ReportThread, checkpoint_period_s: float = 0.0, wait_at: Iterable[int] = ()):
    """The ``report(metrics, save)`` a trial calls after each epoch (``trainables.trial.Reporter``):
    writes a checkpoint when one is due (``save`` runs here, in the trial's thread, so it holds the
    state as of this epoch however long Tune takes to persist it), then hands both to ``reporter``;
    the reports of the fine-tune epochs in ``wait_at`` wait for Tune's answer."""
    wait_at = frozenset(wait_at)
    last_saved = [time.monotonic()]

    def report(metrics: dict[str, Any], save) -> None:
        checkpoint, now = None, time.monotonic()
        if "test_accuracy" in metrics or now - last_saved[0] >= checkpoint_period_s:
            last_saved[0] = now
            checkpoint = tempfile.TemporaryDirectory(prefix="prunetune-ckpt-")
            save(Path(checkpoint.name))
            if not any(Path(checkpoint.name).iterdir()):
                checkpoint.cleanup()
                checkpoint = None
        reporter.put(metrics, checkpoint, wait=metrics.get("finetune_epoch") in wait_at)

    return report


def _send(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
    tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)


def _run(settings: TrialSettings, method: str, hparams: dict[str, Any], report) -> None:
    """The trial, fresh or from Tune's checkpoint of it."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        run_trial(settings, method, hparams, report)
        return
    with checkpoint.as_directory() as ckpt_dir:
        log.info("trial %s restarts from %s", os.environ.get("TUNE_TRIAL_ID", "?"), ckpt_dir)
        run_trial(settings, method, hparams, report, resume_from=Path(ckpt_dir))


def data_parallel_trial_fn(config: dict[str, Any], settings: TrialSettings, parallel,
                           checkpoint_period_s: float = 0.0) -> None:
    """Entry point of a data-parallel trial (``parallel``: a ``trainables.distributed.DataParallel``):
    this Tune trial runs a Ray Train TorchTrainer whose ranks run the trial, and reports what rank 0
    reports, with its checkpoints (copied into Tune's trial folder), as ``trial_fn`` would."""
    from .distributed import fit_data_parallel
    from .train import NonFiniteLossError

    method, hparams = method_hparams(config)

    def report(metrics: dict[str, Any], checkpoint) -> None:
        if checkpoint is None:
            tune.report(metrics)
            return
        tune.report(metrics, checkpoint=tune.Checkpoint(checkpoint.path, filesystem=checkpoint.filesystem))

    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        log.info("trial %s restarts from %s", os.environ.get("TUNE_TRIAL_ID", "?"), checkpoint.path)
    try:
        fit_data_parallel(settings, method, hparams, parallel, report, resume_from=checkpoint,
                          checkpoint_period_s=checkpoint_period_s)
    except NonFiniteLossError as exc:  # recorded FAILED, not retried (see _Trial.failed)
        log.warning("%s: %s", method, exc)
        tune.report(exc.failure)
