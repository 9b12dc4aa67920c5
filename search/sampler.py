"""TPE with a designed start-up: its first trials cover every method once and the MACs axis evenly.

With many methods and a small budget (the quickstart: eight methods, 16 trials), TPE's start-up
trials are independent random draws: a method can be missed entirely and the cheap end of
``prune_ratio`` (where most of the hypervolume lies) left to luck, and which method TPE then
exploits follows from that luck. Here the first ``n_startup_trials`` trials (by trial number) take
their ``method`` from a seeded permutation of the methods (each once per round of them) and their
``prune_ratio`` from a Latin-hypercube design over its range (each of ``n_startup_trials`` bins
once, in a seeded order); every other parameter is drawn as TPE's start-up draws it (at random).
After the start-up, plain TPE.

The bins are equal in log(1 - prune_ratio), the log of the MACs fraction kept, not in prune_ratio:
each halving of the cost gets the same share of the design. With ``[0.5, 0.98]`` that puts 4 of 8
trials below 10% of the dense MACs (equal bins in prune_ratio put 1 there), where fronts differ
most and where one good cheap model holds the most hypervolume (a model at 3% of the MACs with 95%
accuracy covers the whole axis above it); a range that reaches 1.0 (nothing kept) is binned evenly."""
from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution

__all__ = ["DesignedStartTPE", "STRATIFIED"]

#: The parameter whose range the start-up spreads evenly: the front's own axis (shared by every
#: method under this name, or one method's own ``<method>.prune_ratio``).
STRATIFIED = "prune_ratio"


class DesignedStartTPE(optuna.samplers.TPESampler):
    """``methods``: the sweep's methods (the ``method`` parameter's choices); ``n_startup_trials``:
    the designed trials (default: 8, or one per method if there are more)."""

    def __init__(self, methods: Sequence[str], seed: int, n_startup_trials: int | None = None, **tpe: Any):
        n = n_startup_trials if n_startup_trials is not None else max(8, len(methods))
        with warnings.catch_warnings():  # `group` is marked experimental; we rely on it knowingly
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            super().__init__(seed=seed, n_startup_trials=n, **tpe)
        rng = np.random.RandomState(seed)
        self._methods = sorted(methods)
        self._method_order = [self._methods[i] for i in rng.permutation(len(self._methods))]
        self._bins = [int(b) for b in rng.permutation(n)]
        self._design_rng = rng

    def sample_independent(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        k = trial.number
        if k < self._n_startup_trials:
            if (param_name == "method" and isinstance(param_distribution, CategoricalDistribution)
                    and sorted(param_distribution.choices) == self._methods):
                return self._method_order[k % len(self._method_order)]
            if ((param_name == STRATIFIED or param_name.endswith("." + STRATIFIED))
                    and isinstance(param_distribution, FloatDistribution) and param_distribution.step is None):
                return self._stratified(param_distribution, self._bins[k])
        return super().sample_independent(study, trial, param_name, param_distribution)

    def _stratified(self, dist: FloatDistribution, bin_index: int) -> float:
        u = (bin_index + self._design_rng.uniform()) / len(self._bins)
        if dist.high < 1.0:  # log of the kept fraction: 1 - low (most kept) down to 1 - high
            kept = math.exp(math.log(1.0 - dist.low) + u * (math.log(1.0 - dist.high) - math.log(1.0 - dist.low)))
            return float(min(dist.high, max(dist.low, 1.0 - kept)))
        return float(min(dist.high, dist.low + u * (dist.high - dist.low)))
