"""MLflow records, written by the driver only: one parent run per sweep, one child run per trial.

``MLflowTrialLogger`` is a Ray Tune callback: per-epoch metrics land in the trial's child run as
they arrive (step = epoch), and at the end the child gets the final metrics, the pruned model's
weights + spec as artifacts, the same model as an MLflow pt2 model (a LoggedModel carrying the trial's
metrics, so it can be registered from the UI; when the logger has an input example), and status
FINISHED or FAILED (with the reason as a tag). Children are named ``<method>-<trial id>`` and tagged
``method`` and ``sweep`` (the parent run's name), so the runs table reads without a column picker. A child is
found again by its ``prunetune.trial_id`` tag, so a restarted trial or a resumed sweep keeps one
run per trial.

A trial's epochs are written together, at most every ``METRICS_EVERY_S`` seconds, and at once
when the trial checkpoints, ends or fails, and when Tune's run ends.

Resuming after a driver fault: Tune restores the trials as they were in its last experiment-state
snapshot, which lags the kill by up to its checkpoint period, while MLflow saw every epoch up to
the trial's last checkpoint (sent before Tune registers it) or later. So (1) a step already in a
run's metric history is never logged again (a trial restarted from an older checkpoint re-reports
those epochs); (2) a run already FINISHED or FAILED is not touched
again; (3) at the first step after a restore, a child whose trial is not among Tune's trials (it was
created after the snapshot; Tune will create a different trial in its place) is deleted, and a
child whose trial Tune has as finished or errored is given that status.
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray.tune import Callback

from methods.errors import ConfigError

from . import model_logs
from .store import absolute_uri, open_client, sqlite_path  # noqa: F401  (re-exported)

__all__ = ["MLflowTrialLogger", "open_parent_run", "child_runs", "open_client", "absolute_uri", "sqlite_path",
           "close_open_children", "TRIAL_TAG", "PARENT_TAG", "SWEEP_TAG", "LOGGED_METRICS", "LOGGED_TAGS"]

log = logging.getLogger(__name__)
TRIAL_TAG, PARENT_TAG, SWEEP_TAG = "prunetune.trial_id", "mlflow.parentRunId", "prunetune.sweep"
#: Set on every finished trial of a sweep with constraints: "true" inside them, "false" outside
#: (then VIOLATED_TAG names the broken ones).
FEASIBLE_TAG, VIOLATED_TAG = "prunetune.feasible", "prunetune.violated"
LOGGED_METRICS = ("loss", "train_accuracy", "accuracy", "val_loss", "macs", "params", "epoch_seconds",
                  "test_accuracy", "latency_ms", "dense_latency_ms", "latency_ratio", "dense_macs", "macs_reduction",
                  "removed_nothing", "latency_bn_folded")
#: A trial's epochs are written to MLflow together, at most this often (and when it ends): one
#: SQLite transaction per epoch cost the driver ~6 ms of CPU and ~19 ms of wall time each.
METRICS_EVERY_S = 2.0
#: On a finished trial's run until its model is logged (in the driver's model-logging thread); a
#: resumed sweep logs the models of runs that still carry it.
MODEL_PENDING_TAG = "prunetune.model_pending"
#: String results (not metrics in MLflow): logged as tags of the trial's child run.
LOGGED_TAGS = ("stage", "latency_model", "latency_device")


def close_open_children(client: MlflowClient, parent_run_id: str, status: str = "KILLED") -> int:
    """Give every child run still RUNNING ``status`` (an interrupted or failed sweep); their count."""
    n = 0
    for run in child_runs(client, parent_run_id):
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status=status)
            n += 1
    return n


def _param_value(v: Any) -> str:
    return str(v)[:6000]


def artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps its artifacts. With SQLite, MLflow's default is ``./mlruns``
    in whatever directory the driver runs from; keep them beside the database instead. Servers
    choose their own (None)."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    db = Path(tracking_uri[len(prefix):]).resolve()
    return (db.parent / "mlartifacts" / experiment).as_uri()


def open_parent_run(client: MlflowClient, experiment: str, parent_run_id: str | None, params: dict[str, Any],
                    tags: dict[str, str]) -> str:
    """Reuse ``parent_run_id`` if given (a resumed sweep), else create the sweep's parent run."""
    try:
        exp = client.get_experiment_by_name(experiment)
    except MlflowException as exc:
        # The sweep's first request to the store. A URL whose /health answers (all the preflight can
        # ask without credentials) may still be no MLflow server (another app, a proxy) or refuse this
        # driver: one line naming the field, before Ray or storage is touched, not a traceback.
        text = str(exc).strip()
        first = text.splitlines()[0][:300] if text else type(exc).__name__
        raise ConfigError(f"tracking_uri: {client.tracking_uri} is not an MLflow tracking server or refused this "
                          f"driver ({first})") from None
    exp_id = exp.experiment_id if exp else client.create_experiment(
        experiment, artifact_location=artifact_location(client.tracking_uri, experiment))
    if parent_run_id:
        client.update_run(parent_run_id, status="RUNNING")
        return parent_run_id
    run = client.create_run(exp_id, run_name=f"sweep-{time.strftime('%Y%m%d-%H%M%S')}", tags={SWEEP_TAG: "true", **tags})
    client.log_batch(run.info.run_id, params=[Param(k, _param_value(v)) for k, v in params.items()])
    return run.info.run_id


def child_runs(client: MlflowClient, parent_run_id: str) -> list:
    """Every trial run of a sweep (any status)."""
    exp_id = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs([exp_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                              max_results=50000)


class MLflowTrialLogger(Callback):
    """``example``: a small input batch (numpy) of the sweep's data; with it a finished trial's model
    is also logged as a pt2 MLflow model (``search.mlflow_model``): every trial's (``models="all"``),
    or (``"front"``) those of the trials that are on the front of the feasible trials finished so far
    when they finish: a superset of the final front (a point dominated when it finishes stays
    dominated), without the ~0.6 s of driver CPU each other trial's export costs (the weights and
    spec are logged either way, and ``promote`` logs the pt2 model of any trial it promotes)."""

    def __init__(self, tracking_uri: str, parent_run_id: str, example=None, models: str = "all",
                 objectives: Sequence[str] = ("accuracy", "macs"), constraints=None):
        self.tracking_uri = tracking_uri
        self.parent_run_id = parent_run_id
        self.example = example
        self.models, self.objectives, self.constraints = models, tuple(objectives), constraints
        self._front: list[list[float]] = []  # objective values of the front of the feasible finished trials
        self._client: MlflowClient | None = None
        self._runs: dict[str, str] = {}
        self._done: set[str] = set()
        self._killed: set[str] = set()
        self._model_pending: set[str] = set()  # FINISHED runs whose model an earlier driver did not log
        self._steps: dict[str, dict[str, set[int]]] = {}  # run id -> metric -> steps already logged
        self._unsent: dict[str, tuple[list[Metric], dict[str, RunTag], float]] = {}  # run id -> (metrics, tags, since)
        self._reconciled = False

    # Tune pickles callbacks into its experiment state; the client is rebuilt on demand.
    def __getstate__(self):
        return {"tracking_uri": self.tracking_uri, "parent_run_id": self.parent_run_id, "example": self.example,
                "models": self.models, "objectives": self.objectives, "constraints": self.constraints}

    def __setstate__(self, state):
        self.__init__(state["tracking_uri"], state["parent_run_id"], state.get("example"), state.get("models", "all"),
                      state.get("objectives", ("accuracy", "macs")), state.get("constraints"))

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = open_client(self.tracking_uri)
            for run in child_runs(self._client, self.parent_run_id):
                tid = run.data.tags.get(TRIAL_TAG)
                if tid:
                    self._runs[tid] = run.info.run_id
                    if run.info.status in ("FINISHED", "FAILED"):
                        self._done.add(tid)
                        if run.data.tags.get(MODEL_PENDING_TAG):
                            self._model_pending.add(tid)
                    elif run.info.status == "KILLED":  # the sweep was interrupted while it ran
                        self._killed.add(tid)
        return self._client

    def _logged_steps(self, run_id: str) -> dict[str, set[int]]:
        """Steps per metric already in a run (read once from MLflow for a run made before)."""
        if run_id not in self._steps:
            self._steps[run_id] = {key: {m.step for m in self.client.get_metric_history(run_id, key)}
                                   for key in LOGGED_METRICS}
        return self._steps[run_id]

    def on_step_begin(self, iteration, trials, **info):
        if not self._reconciled:
            self._reconciled = True
            self._reconcile(trials)

    def _reconcile(self, trials) -> None:
        """Match the children left by an earlier driver with the trials Tune restored."""
        by_id = {t.trial_id: t for t in trials}
        _ = self.client  # reads the children already recorded for this sweep
        for tid, run_id in list(self._runs.items()):
            trial = by_id.get(tid)
            if trial is None:
                log.warning("trial %s is not in the restored Tune state (started after its last snapshot): "
                            "deleting its MLflow run %s", tid, run_id)
                self.client.set_tag(run_id, "prunetune.orphaned", "not in the restored Tune experiment state")
                self.client.delete_run(run_id)
                del self._runs[tid]
                self._done.discard(tid)
            elif tid not in self._done and trial.status == "TERMINATED":
                self.on_trial_complete(iteration=0, trials=trials, trial=trial)
            elif tid not in self._done and trial.status == "ERROR":
                self.on_trial_error(iteration=0, trials=trials, trial=trial)
            elif tid in self._model_pending:  # the driver stopped before it logged this trial's model
                self._submit_model(run_id, trial)
            elif tid in self._killed:  # interrupted with the sweep; Tune continues it now
                self.client.update_run(run_id, status="RUNNING")
                self._killed.discard(tid)

    def _run_for(self, trial) -> str:
        client = self.client
        tid = trial.trial_id
        if tid not in self._runs:
            parent = client.get_run(self.parent_run_id)
            method = trial.config.get("method", "?")
            run = client.create_run(parent.info.experiment_id, run_name=f"{method}-{tid}", tags={
                PARENT_TAG: self.parent_run_id, TRIAL_TAG: tid, "method": method,
                "sweep": parent.info.run_name or self.parent_run_id})
            prefix = method + "."
            params = [Param("method", method)] + [
                Param(k[len(prefix):], _param_value(v)) for k, v in sorted(trial.config.items()) if k.startswith(prefix)]
            client.log_batch(run.info.run_id, params=params)
            self._runs[tid] = run.info.run_id
            self._steps[run.info.run_id] = {}
        return self._runs[tid]

    def on_trial_start(self, iteration, trials, trial, **info):
        self._run_for(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self._run_for(trial)
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        now = int(time.time() * 1000)
        logged = self._logged_steps(run_id)
        # A step already logged is an epoch re-run after a restart from an older checkpoint: the
        # history keeps its first record of each epoch.
        metrics = [Metric(k, float(result[k]), now, step) for k in LOGGED_METRICS
                   if isinstance(result.get(k), (int, float)) and math.isfinite(float(result[k]))
                   and step not in logged.get(k, ())]
        tags = [RunTag(k, str(result[k])) for k in LOGGED_TAGS if result.get(k) is not None]
        unsent_metrics, unsent_tags, since = self._unsent.setdefault(run_id, ([], {}, time.monotonic()))
        unsent_metrics.extend(metrics)
        unsent_tags.update((t.key, t) for t in tags)
        for m in metrics:
            logged.setdefault(m.key, set()).add(step)
        if time.monotonic() - since >= METRICS_EVERY_S:
            self._send(run_id)

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        # Before Tune registers the checkpoint (and any experiment snapshot names it): a trial
        # restored from it re-reports only the epochs after it, so those up to it must be in MLflow.
        if trial.trial_id in self._runs:
            self._send(self._runs[trial.trial_id])

    def _send(self, run_id: str) -> None:
        """Write the run's epochs not yet in MLflow (one ``log_batch``)."""
        metrics, tags, _ = self._unsent.pop(run_id, ([], {}, 0.0))
        for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics a batch
            self.client.log_batch(run_id, metrics=metrics[i:i + 1000], tags=list(tags.values()) if i == 0 else [])
        if tags and not metrics:
            self.client.log_batch(run_id, tags=list(tags.values()))

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self._run_for(trial)
        self._send(run_id)
        if trial.trial_id in self._done:
            return
        result = trial.last_result or {}
        if result.get("nonfinite"):
            self._fail(trial, run_id, str(result.get("failure_reason", "non-finite loss")))
            return
        self._done.add(trial.trial_id)
        if trial.checkpoint is not None:  # until the model-logging thread has logged it
            self.client.set_tag(run_id, MODEL_PENDING_TAG, "true")
        self.client.set_terminated(run_id, status="FINISHED")
        self._submit_model(run_id, trial, export=self._exports(result))
        log.info("trial %s (%s) finished: accuracy %.4f, MACs %.3g, latency ratio %.3f (%s)", trial.trial_id,
                 trial.config.get("method"), result.get("accuracy", float("nan")), result.get("macs", float("nan")),
                 result.get("latency_ratio", float("nan")), result.get("latency_device", "?"))

    def on_experiment_end(self, trials, **info):
        for run_id in list(self._unsent):
            self._send(run_id)
        model_logs.drain()

    def _exports(self, result: dict) -> bool:
        """Whether this finished trial's model becomes a pt2 MLflow model (see the class docstring)."""
        if self.models == "all":
            return True
        from .constraints import feasible
        from .objectives import directions, metrics
        from .pareto import front

        if self.constraints is not None and not feasible(self.constraints, result):
            return False
        # On the front of every feasible trial so far iff on the front of the front so far and itself.
        points = self._front + [[float(result.get(m, math.nan)) for m in metrics(self.objectives)]]
        kept = front(points, directions(self.objectives))
        self._front = [points[i] for i in kept]
        return len(points) - 1 in kept

    def _submit_model(self, run_id: str, trial, export: bool = True) -> None:
        """Log the trial's model in the model-logging thread (``search.model_logs``: the only one
        that exports or logs models; torch.export and MLflow's fluent tracking URI are process-wide)."""
        if trial.checkpoint is not None:
            model_logs.submit(self._log_model_job, run_id, trial.trial_id, trial.config.get("method", "?"),
                              trial.checkpoint, dict(trial.last_result or {}), export)

    def _log_model_job(self, run_id: str, trial_id: str, method: str, checkpoint, result: dict,
                       export: bool = True) -> None:
        client = open_client(self.tracking_uri)
        try:
            self._log_model(client, run_id, trial_id, method, checkpoint, result, export)
        except Exception as exc:  # a missing artifact must not lose the run's metrics
            log.warning("could not log the model of trial %s: %s", trial_id, exc)
        client.delete_tag(run_id, MODEL_PENDING_TAG)

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self._run_for(trial)
        self._send(run_id)
        self._fail(trial, run_id, _error_text(trial))

    def _fail(self, trial, run_id: str, reason: str) -> None:
        self.client.set_tag(run_id, "failure_reason", reason[-4000:])
        self.client.set_terminated(run_id, status="FAILED")
        self._done.add(trial.trial_id)
        log.warning("trial %s (%s) failed: %s", trial.trial_id, trial.config.get("method"), reason.strip().splitlines()[-1] if reason.strip() else "?")

    def _log_model(self, client: MlflowClient, run_id: str, trial_id: str, method: str, checkpoint,
                   result: dict, export: bool = True) -> None:
        if checkpoint is None:
            return
        with tempfile.TemporaryDirectory(prefix="prunetune-art-") as tmp:
            local = Path(checkpoint.to_directory(os.path.join(tmp, "ckpt")))
            if (local / "model").is_dir():
                client.log_artifacts(run_id, str(local / "model"), "model")
                if self.example is not None and export:
                    self._log_mlflow_model(client, local / "model", run_id, result, f"{method}-{trial_id}")

    def _log_mlflow_model(self, client: MlflowClient, directory: Path, run_id: str, result: dict, name: str) -> None:
        from trainables.model_io import load_model

        from .mlflow_model import log_pt2_model

        model, _ = load_model(directory)
        # validate=False: loading the program back to run the example again costs ~2 s a trial
        info, seconds = log_pt2_model(client, run_id, model, self.example, result, validate=False, name=name)
        log.info("trial run %s: pt2 model %s logged in %.1fs", run_id, info.model_id, seconds)


def _error_text(trial) -> str:
    try:
        path = trial.error_file
        if path and os.path.exists(path):
            return Path(path).read_text()
    except Exception:
        pass
    return str(getattr(trial, "error_msg", "") or "unknown error")
