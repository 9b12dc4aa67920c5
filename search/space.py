"""The define-by-run Optuna search space: ``method`` is categorical and each method's own
hyperparameters (declared in ``methods/``, narrowed by the sweep config) are conditional on it."""
from __future__ import annotations

from typing import Any, Callable

from methods.hyperparameters import Hyperparameter

__all__ = ["make_space", "suggest"]


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


def make_space(space: dict[str, dict[str, Hyperparameter]]) -> Callable:
    """``space`` maps method -> {name: Hyperparameter}. Returns the define-by-run function
    ``OptunaSearch(space=...)`` wants; it returns the fixed values as constants so they reach the
    trial config too."""
    methods = sorted(space)

    def define(trial) -> dict[str, Any]:
        method = methods[0] if len(methods) == 1 else trial.suggest_categorical("method", methods)
        constants: dict[str, Any] = {"method": method} if len(methods) == 1 else {}
        for name, hp in space[method].items():
            key = f"{method}.{name}"
            value = suggest(trial, key, hp)
            if hp.fixed:
                constants[key] = value
        return constants

    return define
