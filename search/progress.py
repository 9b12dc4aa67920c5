"""What a sweep prints while it runs: one line per trial that finished or was stopped early, each
with the sweep's ``k/N done, r running``, instead of Tune's boxed status tables (those come back with
``prunetune -v``); the front is printed by the CLI at the end.

``tune_environment`` sets, for the run only and unless the environment already sets them:

* Tune's ``TUNE_GLOBAL_CHECKPOINT_S`` (its experiment-state snapshot period) to the config's
  ``checkpoint_period_s``, the same period at which trials save checkpoints
  (``trainables.tune_trainable.trial_fn``). Trials that checkpointed every sub-second epoch made Tune
  force a snapshot every ``num_to_keep`` checkpoints (its "snapshotting has been triggered multiple
  times" warnings); now a trial adds at most one periodic checkpoint between periodic snapshots,
  plus its final one, and the sweep keeps 3 per trial (``CheckpointConfig(num_to_keep=3)``,
  ``search.sweep``), so those two never force a snapshot (with 2 they did whenever no periodic
  snapshot fell between them: the warning in every sweep whose trials ran past one period).
* ``RAY_AIR_NEW_OUTPUT=0`` without ``-v``: Tune's new output engine prints its header box even at
  ``verbose=0``; the legacy one is silent there.
"""
from __future__ import annotations

import logging
import math
import os
from contextlib import contextmanager
from typing import Iterator

from ray.tune.callback import Callback

__all__ = ["ProgressLines", "tune_environment", "tune_verbosity", "trial_line"]

log = logging.getLogger(__name__)
_ENV = "TUNE_GLOBAL_CHECKPOINT_S"


@contextmanager
def tune_environment(checkpoint_period_s: float, verbose: int) -> Iterator[None]:
    """The Tune settings of the module docstring for the block (Tune reads them when the run starts)."""
    values = {}
    if checkpoint_period_s > 0:  # 0: Tune's own "auto" period
        values[_ENV] = f"{checkpoint_period_s:g}"
    if not verbose:
        values["RAY_AIR_NEW_OUTPUT"] = "0"
    added = [k for k in values if k not in os.environ]
    os.environ.update({k: values[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def tune_verbosity() -> int:
    """Tune's own reporter (status tables) only with debug logging (``prunetune -v``)."""
    return 1 if logging.getLogger("search").isEnabledFor(logging.DEBUG) else 0


def _num(value, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) and math.isfinite(value) else "nan"


def trial_line(trial_id: str, method: str, result: dict, stopped: tuple[int, int] | None) -> str:
    """``trial ab12 (l1_norm) finished: accuracy 0.9694, MACs 677,776 (59.1% removed), params
    79,554, latency ratio 0.643``, or ``... stopped at rung 1 (fine-tune epoch 1): ...``."""
    what = f"stopped at rung {stopped[0]} (fine-tune epoch {stopped[1]})" if stopped else "finished"
    parts = [f"accuracy {_num(result.get('accuracy'), '.4f')}", f"MACs {_num(result.get('macs'), ',.0f')}"]
    if isinstance(result.get("macs_reduction"), (int, float)):
        parts[-1] += f" ({100 * result['macs_reduction']:.1f}% removed)"
    parts.append(f"params {_num(result.get('params'), ',.0f')}")
    if not stopped:
        parts.append(f"latency ratio {_num(result.get('latency_ratio'), '.3f')}")
    return f"trial {trial_id} ({method}) {what}: {', '.join(parts)}"


class ProgressLines(Callback):
    """Logs ``[k/N done, r running] trial ... finished|stopped ...`` as each trial ends (a failed
    trial is reported by the MLflow logger's warning and counted here). ``scheduler`` (optional) is
    the early-stopping scheduler, whose ``stopped`` says which trials it stopped and where."""

    def __init__(self, num_trials: int, scheduler=None):
        self.num_trials = num_trials
        self.scheduler = scheduler

    def _counts(self, trials, ending) -> str:
        others = [t for t in trials if t is not ending]
        done = 1 + sum(t.status in ("TERMINATED", "ERROR") for t in others)
        running = sum(t.status == "RUNNING" for t in others)
        return f"[{done}/{self.num_trials} done, {running} running]"

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        if result.get("nonfinite"):
            log.info("%s trial %s (%s) failed", self._counts(trials, trial), trial.trial_id, trial.config.get("method"))
            return
        stopped = getattr(self.scheduler, "stopped", {}).get(trial.trial_id) if self.scheduler else None
        log.info("%s %s", self._counts(trials, trial),
                 trial_line(trial.trial_id, trial.config.get("method", "?"), result, stopped))

    def on_trial_error(self, iteration, trials, trial, **info):
        log.info("%s trial %s (%s) failed", self._counts(trials, trial), trial.trial_id, trial.config.get("method"))
