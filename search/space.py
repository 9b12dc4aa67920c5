"""The define-by-run Optuna search space: ``method`` is categorical and each method's own
hyperparameters (declared in ``methods/``, narrowed by the sweep config) are conditional on it.

A hyperparameter that several methods declare with the same meaning and the same (narrowed) range,
``prune_ratio`` above all (the fraction of the dense MACs removed, the front's own axis), is ONE
Optuna parameter under its bare name: the sampler then learns from every trial, whatever its method,
where on that axis the front gains (with a per-method name, 16 trials over eight methods teach TPE
about each method's ``prune_ratio`` from two trials). Method-specific ones are ``"<method>.<name>"``.
Either way the trial config carries every value as ``"<method>.<name>"``."""
from __future__ import annotations

from collections import Counter
from typing import Any

from methods.hyperparameters import Hyperparameter

__all__ = ["make_space", "suggest", "DefineByRun", "distribution", "shared_names"]


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
        self.shared = shared_names(space)

    def key(self, method: str, name: str) -> str:
        """The Optuna parameter name of ``method``'s hyperparameter ``name``."""
        hp = self.space[method][name]
        return name if not hp.fixed and self.shared.get(name) == _range(hp) else f"{method}.{name}"

    def __call__(self, trial) -> dict[str, Any]:
        single = len(self.methods) == 1
        method = self.methods[0] if single else trial.suggest_categorical("method", self.methods)
        constants: dict[str, Any] = {"method": method} if single else {}
        for name, hp in self.space[method].items():
            key = self.key(method, name)
            value = suggest(trial, key, hp)
            if hp.fixed or key != f"{method}.{name}":
                constants[f"{method}.{name}"] = value
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
                out[self.key(method, name)] = dist
        return out


def shared_names(space: dict[str, dict[str, Hyperparameter]]) -> dict[str, tuple]:
    """Searched hyperparameters that at least two methods declare identically (same kind, range,
    scale and choices after the config's narrowing) -> that range: the methods declaring it so share
    one Optuna parameter (where ranges differ, the most common one is shared, the others stay the
    method's own)."""
    ranges: dict[str, Counter] = {}
    for hps in space.values():
        for name, hp in hps.items():
            if not hp.fixed:
                ranges.setdefault(name, Counter())[_range(hp)] += 1
    out = {}
    for name, counts in ranges.items():
        (common, n), = counts.most_common(1)
        if n > 1:
            out[name] = common
    return out


def _range(hp: Hyperparameter) -> tuple:
    return hp.kind, hp.low, hp.high, hp.log, hp.choices


def make_space(space: dict[str, dict[str, Hyperparameter]]) -> DefineByRun:
    return DefineByRun(space)
