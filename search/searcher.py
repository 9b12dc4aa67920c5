"""Ray's OptunaSearch, with the one fix multi-objective pruning sweeps need: a trial that errored
(or whose loss became NaN) or stopped before its last epoch is told to Optuna as FAIL or PRUNED,
never as COMPLETE with the under-trained values of its last epoch (what the stock searcher does)."""
from __future__ import annotations

from typing import Any, Callable

import optuna
from ray.tune.search.optuna import OptunaSearch

__all__ = ["ParetoOptunaSearch", "make_sampler", "OBJECTIVES", "MODES", "FINAL_KEY"]

OBJECTIVES, MODES = ["accuracy", "macs"], ["max", "min"]
#: Only a trial's last report carries this metric; its presence marks a finished trial.
FINAL_KEY = "test_accuracy"


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=8)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"sampler: unknown sampler {name!r}; valid: tpe, nsga2, random")


class ParetoOptunaSearch(OptunaSearch):
    def __init__(self, space: Callable, sampler: optuna.samplers.BaseSampler, seed: int):
        super().__init__(space=space, metric=OBJECTIVES, mode=MODES, sampler=sampler, seed=seed)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        if error or (result is not None and result.get("nonfinite")):
            result, error = None, True  # told FAIL, whatever its last epoch reported
        elif result is not None and FINAL_KEY not in result:
            result = None  # stopped early: told PRUNED
        super().on_trial_complete(trial_id, result=result, error=error)
