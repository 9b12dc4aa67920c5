"""Warm start: ``warm_start: [EXPERIMENT or sweep dir, ...]`` seeds a new sweep's Optuna study with
the finished trials of earlier sweeps, so it starts at their front instead of from nothing.

For each source (a sweep directory, or an MLflow experiment name looked up under the new sweep's
``tracking_uri``; see ``search.compare.resolve_sweep``):

* the source must have searched the same ``model`` and ``dataset``; otherwise the sweep is refused
  with one line naming ``warm_start[i]``, before Ray or the new MLflow run start;
* every trial that ran to its end (FINISHED with ``test_accuracy``: not stopped early, not failed)
  and that has every objective of the NEW sweep, and whose method and hyperparameters lie inside the
  new search space, becomes a COMPLETE Optuna trial (``optuna.trial.create_trial``) with the new
  sweep's objective values and, when the new sweep has budgets, their constraint values; trials
  outside the new space are skipped (counted in the log).

``run_sweep`` adds them with ``study.add_trials`` before the first suggestion. They exist only in
the study (user attribute ``prunetune.warm_start_run``: the source run), not as runs of the new sweep.
"""
from __future__ import annotations

import logging
import math
from typing import Any

from methods.errors import ArgumentError, ConfigError

from . import objectives as _obj
from .constraints import constraint_values

__all__ = ["warm_start_trials", "WARM_START_ATTR"]

log = logging.getLogger(__name__)
WARM_START_ATTR = "prunetune.warm_start_run"


def _source_setting(ref, key: str) -> Any:
    if ref.config and key in ref.config:
        return ref.config[key]
    return ref.client().get_run(ref.parent_run_id).data.params.get(key)


def _value(dist, text: str) -> Any:
    """An MLflow param (a string) as a value of ``dist``, or raise ValueError if it lies outside."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(dist, CategoricalDistribution):
        for choice in dist.choices:
            if str(choice) == text:
                return choice
        raise ArgumentError(text)
    value = int(text) if isinstance(dist, IntDistribution) else float(text)
    if not dist.low <= value <= dist.high:
        raise ArgumentError(text)
    return value


def _params(run, space) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(params, distributions) of an earlier trial in the new space, or None if it lies outside."""
    params_in = run.data.params
    method = run.data.tags.get("method") or params_in.get("method")
    if method not in space.space:
        return None
    dists = space.distributions(method)
    params: dict[str, Any] = {}
    for key, dist in dists.items():
        text = method if key == "method" else params_in.get(key.split(".", 1)[-1])
        if text is None:
            return None
        try:
            params[key] = _value(dist, text)
        except ValueError:
            return None
    for name, hp in space.space[method].items():  # a value the new sweep fixes must match it too
        if hp.fixed and params_in.get(name) is not None:
            fixed = hp.choices[0] if hp.kind == "categorical" else hp.low
            if str(params_in[name]) != str(fixed) and not _same_number(params_in[name], fixed):
                return None
    return params, dists


def _same_number(text: str, value: Any) -> bool:
    try:
        return math.isclose(float(text), float(value), rel_tol=1e-12)
    except (TypeError, ValueError):
        return False


def warm_start_trials(cfg, space) -> list:
    """The COMPLETE Optuna trials to add for ``cfg.warm_start`` (see the module docstring)."""
    import optuna
    from optuna.study._constrained_optimization import _CONSTRAINTS_KEY

    from .compare import resolve_sweep
    from .tracking import child_runs

    trials = []
    metrics = _obj.metrics(cfg.objectives)
    for i, source in enumerate(cfg.warm_start):
        try:
            ref = resolve_sweep(source, cfg.tracking_uri)
        except ConfigError as exc:
            raise ConfigError(f"warm_start[{i}]: {exc}") from None
        for key in ("model", "dataset"):
            theirs = _source_setting(ref, key)
            if theirs != getattr(cfg, key):
                raise ConfigError(f"warm_start[{i}]: sweep {ref.label!r} searched {key} {theirs!r}, this sweep "
                                  f"{key} {getattr(cfg, key)!r}; warm-start only from sweeps of the same model and "
                                  "dataset")
        added = skipped = 0
        for run in child_runs(ref.client(), ref.parent_run_id):
            m = run.data.metrics
            if run.info.status != "FINISHED" or "test_accuracy" not in m:
                continue
            values = [m.get(k) for k in metrics]
            fitted = _params(run, space)
            if fitted is None or not all(isinstance(v, float) and math.isfinite(v) for v in values):
                skipped += 1
                continue
            params, dists = fitted
            system_attrs = {}
            if cfg.constraints.active:  # Optuna's own keys, what Trial.set_constraint writes
                for name, v in zip(cfg.constraints.active, constraint_values(cfg.constraints, m)):
                    system_attrs[f"{_CONSTRAINTS_KEY}:{name}"] = v
            trials.append(optuna.trial.create_trial(
                state=optuna.trial.TrialState.COMPLETE, params=params, distributions=dists, values=values,
                user_attrs={WARM_START_ATTR: run.info.run_id}, system_attrs=system_attrs))
            added += 1
        log.info("warm start from %s: %d finished trials added, %d outside the new space or objectives skipped",
                 ref.label, added, skipped)
    return trials
