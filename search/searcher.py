"""Ray's OptunaSearch, with the fixes multi-objective pruning sweeps need:

* a trial that errored (or whose loss became NaN) or stopped before its last epoch is told to Optuna
  as FAIL or PRUNED, never as COMPLETE with the under-trained values of its last epoch (what the
  stock searcher does);
* the cost objective may be one that only a trial's final result carries (``latency_ratio``: the
  latency is measured once, after the last epoch).

Strict metric checking. Ray Tune (2.60, ``TuneController._validate_result_metrics``) checks EVERY
result a trial reports for every metric in ``search_alg.metric``, and raises if one is missing
(unless the process-wide ``TUNE_DISABLE_STRICT_METRIC_CHECKING=1``). The searcher, though, reads only
the final result (multi-objective Optuna takes no intermediate values). So :class:`ParetoOptunaSearch`
keeps the full objective list for Optuna (``objectives``, the study's directions from ``MODES``) and
exposes as ``metric``/``mode`` (what Tune checks per result, and what its ``ConcurrencyLimiter``
copies) only the objectives every epoch reports (``EVERY_EPOCH``: accuracy and MACs). Nothing is
reported that was not measured, and no global switch is flipped; a finished trial whose final result
lacks an objective, or has a non-finite one, is told FAIL.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Sequence

import optuna
from ray.tune.search.optuna import OptunaSearch

from methods.errors import ConfigError

from . import objectives as _objectives
from .constraints import ConstraintsConfig, constraint_values

__all__ = ["ParetoOptunaSearch", "make_sampler", "objectives", "MODES", "FINAL_KEY", "EVERY_EPOCH"]

log = logging.getLogger(__name__)
#: The directions of the default objectives (accuracy, MACs); a sweep's own come from ``search.objectives``.
MODES = list(_objectives.directions(_objectives.DEFAULT))
#: Only a trial's last report carries this metric; its presence marks a finished trial.
FINAL_KEY = "test_accuracy"
#: Metrics every epoch's result carries (the others, e.g. ``latency_ratio``, only the final one).
EVERY_EPOCH = tuple(o.metric for o in _objectives.OBJECTIVES.values() if o.every_epoch)


def objectives(objective: str = "macs") -> list[str]:
    """The metric names Optuna optimises for a config's ``objective`` shorthand: accuracy, then the cost."""
    return _objectives.metrics(_objectives.SHORTHANDS[objective])


def make_sampler(name: str, seed: int, methods: Sequence[str] = ()) -> optuna.samplers.BaseSampler:
    """The sampler. TPE starts from a design (``search.sampler``: every method once, the MACs axis
    spread evenly) before it models the trials. Budgets reach TPE and NSGA-II through each trial's
    constraint values (see ``ParetoOptunaSearch``): Optuna 5 reads ``FrozenTrial.constraints``
    whenever a trial has any, and deprecates ``constraints_func`` in favour of ``Trial.set_constraint``."""
    if name == "tpe":
        from .sampler import DesignedStartTPE

        return DesignedStartTPE(methods, seed=seed, multivariate=True, group=True)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ConfigError(f"sampler: unknown sampler {name!r}; valid: tpe, nsga2, random")


class ParetoOptunaSearch(OptunaSearch):
    """``objectives`` are the config's (names from ``search.objectives``, e.g. ``("accuracy",
    "macs")``; ``objective`` is the shorthand, ``macs`` or ``latency``, used when ``objectives`` is
    None): Optuna gets their metrics, in their directions, from each finished trial's final result."""

    def __init__(self, space: Callable, sampler: optuna.samplers.BaseSampler, objective: str = "macs",
                 objectives: Sequence[str] | None = None, constraints: ConstraintsConfig | None = None):
        self.constraints = constraints if constraints is not None and constraints.active else None
        names = tuple(objectives) if objectives is not None else _objectives.SHORTHANDS[objective]
        super().__init__(space=space, metric=_objectives.metrics(names), mode=list(_objectives.directions(names)),
                         sampler=sampler)  # the seed is the sampler's (OptunaSearch warns if given both)

    def add_trials(self, trials) -> None:
        """Add finished trials (``search.warm_start``) to the study before the first suggestion."""
        self._ot_study.add_trials(trials)

    @property
    def objectives(self) -> list[str]:
        """What Optuna optimises (in order, with ``MODES``)."""
        return list(self._metric)

    @property
    def metric(self) -> list[str]:
        """What Tune requires in every reported result: the objectives every epoch reports (see the
        module docstring). Derived from the objectives, so a searcher pickled by an older sweep
        (``[accuracy, macs]``) restores unchanged. Always a list: OptunaSearch then takes no
        intermediate values (multi-objective)."""
        return [m for m in self._metric if m in EVERY_EPOCH]

    @property
    def mode(self) -> list[str]:
        """The modes of ``metric`` (Tune's ``ConcurrencyLimiter`` copies both and checks that their
        lengths agree)."""
        return [mode for m, mode in zip(self._metric, self._mode) if m in EVERY_EPOCH]

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials:
            log.warning("trial %s completed twice; the second completion is ignored", trial_id)
            return
        ot_trial = self._ot_trials[trial_id]
        values, state = None, optuna.trial.TrialState.FAIL
        if error or (result is not None and result.get("nonfinite")):
            pass  # told FAIL, whatever its last epoch reported
        elif result is None or FINAL_KEY not in result:
            state = optuna.trial.TrialState.PRUNED  # stopped early
        else:
            raw = [result.get(m) for m in self.objectives]
            if all(isinstance(v, (int, float)) and math.isfinite(v) for v in raw):
                values, state = [float(v) for v in raw], optuna.trial.TrialState.COMPLETE
            else:
                log.warning("trial %s finished without finite %s (got %s): told FAIL", trial_id,
                            " and ".join(self.objectives), raw)
        constraints = getattr(self, "constraints", None)  # None in searchers pickled before the field
        if constraints is not None and result is not None and state != optuna.trial.TrialState.FAIL:
            # Optuna's constraints (<= 0 feasible), one per budget, set before tell: TPE and NSGA-II
            # read them from the finished trial (FrozenTrial.constraints) to learn the feasible region.
            for name, value in zip(constraints.active, constraint_values(constraints, result)):
                ot_trial.set_constraint(name, value)
        try:
            self._ot_study.tell(ot_trial, values, state=state)
        except (RuntimeError, ValueError) as exc:  # e.g. already finished in the study: keep the sweep going
            log.warning("could not tell Optuna the end of trial %s: %s", trial_id, exc)
        self._completed_trials.add(trial_id)
