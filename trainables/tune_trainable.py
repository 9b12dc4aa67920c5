"""The Ray Tune function trainable: one call per trial, reporting metrics and a checkpoint every
epoch and resuming from ``ray.tune.get_checkpoint()`` after a failure or a driver restart.

The trial config holds ``method`` and that method's hyperparameters as ``"<method>.<name>"`` keys
(the Optuna space names them so, because each method declares its own ranges).
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from ray import tune

from .settings import TrialSettings
from .trial import run_trial

__all__ = ["trial_fn", "data_parallel_trial_fn", "method_hparams"]

log = logging.getLogger(__name__)


def method_hparams(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Split a trial config into the method name and its own hyperparameters."""
    method = config["method"]
    prefix = method + "."
    return method, {k[len(prefix):]: v for k, v in config.items() if k.startswith(prefix)}


def trial_fn(config: dict[str, Any], settings: TrialSettings, checkpoint_period_s: float = 0.0) -> None:
    """Entry point Tune calls (wrapped with ``tune.with_parameters(trial_fn, settings=...)``).

    Every epoch reports its metrics; a checkpoint goes with the report when ``checkpoint_period_s``
    (0: every epoch) has passed since the trial's last one, and always with its final result (the
    model MLflow logs). Sub-second epochs would otherwise checkpoint every epoch, and with Tune's
    ``num_to_keep`` each pair of checkpoints forces an experiment-state snapshot (Ray's "snapshotting
    has been triggered multiple times" warning)."""
    method, hparams = method_hparams(config)
    # Ray starts workers with a thread count of its own choosing; use the CPUs this trial holds.
    import torch

    cpus = int(tune.get_context().get_trial_resources().required_resources.get("CPU", 1) or 1)
    torch.set_num_threads(max(1, cpus))

    last_saved = [time.monotonic()]

    def report(metrics: dict[str, Any], save) -> None:
        now = time.monotonic()
        if not ("test_accuracy" in metrics or now - last_saved[0] >= checkpoint_period_s):
            tune.report(metrics)
            return
        last_saved[0] = now
        with tempfile.TemporaryDirectory(prefix="prunetune-ckpt-") as tmp:
            save(Path(tmp))
            has_files = any(Path(tmp).iterdir())
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp) if has_files else None)

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
