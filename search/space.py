"""The define-by-run Optuna search space: ``method`` is categorical and each method's own
hyperparameters (declared in ``methods/``, narrowed by the sweep config) are conditional on it."""
from __future__ import annotations

from typing import Any

from methods.hyperparameters import Hyperparameter

__all__ = ["make_space", "suggest", "DefineByRun", "distribution"]


def suggest(trial, name: str, hp: Hyperparameter) -> Any:
    """Ask an Optuna trial for one hyperparameter value (fixed ones are returned as constants)."""
    if hp.kind == "categorical":
        if len(hp.choices) == 1:
            return hp.choices[0]
        return trial.suggest_categorical(name, list(hp.choices))
    if hp.low == hp.high:
        return int(hp.low) if hp.kind == "int" else hp.low
    if hp.kind == "int":
        return trial.suggest_int(name, int(hp.low), int(hp.high), log=hp.log)
    return trial.suggest_float(name, hp.low, hp.high, log=hp.log)


def distribution(hp: Hyperparameter):
    """The Optuna distribution ``suggest`` samples ``hp`` from (None for a fixed value: a constant)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if hp.fixed:
        return None
    if hp.kind == "categorical":
        return CategoricalDistribution(list(hp.choices))
    if hp.kind == "int":
        return IntDistribution(int(hp.low), int(hp.high), log=hp.log)
    return FloatDistribution(hp.low, hp.high, log=hp.log)


class DefineByRun:
    """The define-by-run function ``OptunaSearch(space=...)`` wants, as a picklable object (Tune
    pickles the searcher into its experiment state). ``space`` maps method -> {name:
    Hyperparameter}; fixed values are returned as constants so they reach the trial config too."""

    def __init__(self, space: dict[str, dict[str, Hyperparameter]]):
        self.space = space
        self.methods = sorted(space)

    def __call__(self, trial) -> dict[str, Any]:
        single = len(self.methods) == 1
        method = self.methods[0] if single else trial.suggest_categorical("method", self.methods)
        constants: dict[str, Any] = {"method": method} if single else {}
        for name, hp in self.space[method].items():
            key = f"{method}.{name}"
            value = suggest(trial, key, hp)
            if hp.fixed:
                constants[key] = value
        return constants

    def distributions(self, method: str) -> dict[str, Any]:
        """Name -> Optuna distribution of everything a trial of ``method`` samples (what
        ``__call__`` asks for), e.g. to add an earlier trial to the study."""
        out: dict[str, Any] = {}
        if len(self.methods) > 1:
            from optuna.distributions import CategoricalDistribution

            out["method"] = CategoricalDistribution(self.methods)
        for name, hp in self.space[method].items():
            dist = distribution(hp)
            if dist is not None:
                out[f"{method}.{name}"] = dist
        return out


def make_space(space: dict[str, dict[str, Hyperparameter]]) -> DefineByRun:
    return DefineByRun(space)
