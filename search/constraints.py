"""Budgets as constraints: ``constraints: {max_macs_fraction, max_macs, max_latency_ratio, min_accuracy}``.

Each budget is a constraint value ``c`` with ``c <= 0`` feasible (Optuna's convention):

* ``max_macs_fraction f``: ``macs / dense_macs - f`` (the trial reports ``macs_reduction = 1 - macs /
  dense_macs`` every epoch);
* ``max_macs N``: ``(macs - N) / N``;
* ``max_latency_ratio R``: ``latency_ratio - R`` (measured at the end of a trial only);
* ``min_accuracy A``: ``A - accuracy`` (validation accuracy).

The searcher sets a finished (or pruned) trial's values with ``optuna.Trial.set_constraint`` (one
per budget, named after it) before telling Optuna; Optuna 5's TPE and NSGA-II samplers read them
from every trial that has them (``FrozenTrial.constraints``), so the sampler learns the feasible
region. (``constraints_func``, the older route, is deprecated since Optuna 5.0.) A value a trial did
not measure (a stopped trial's latency) counts as feasible (0).

``search.fronts.record_front`` tags every finished trial ``prunetune.feasible`` true/false from its
recorded metrics; infeasible ones never reach the front nor ``promote``.

``max_macs_fraction`` also narrows the space up front: ``prune_ratio`` is the fraction of the dense
MACs removed, so ``f`` means ``prune_ratio >= 1 - f`` (``narrow_space``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Mapping

from methods.errors import ConfigError

__all__ = ["ConstraintsConfig", "constraint_values", "feasible", "narrow_space"]


def _optional_number(value: Any, where: str, *, gt: float | None = None, ge: float | None = None,
                     le: float | None = None) -> float | None:
    if value is None:
        return None
    bounds = " and ".join(f"{op} {b:g}" for op, b in ((">", gt), (">=", ge), ("<=", le)) if b is not None)
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (
        (gt is None or value > gt) and (ge is None or value >= ge) and (le is None or value <= le))
    if not ok:
        raise ConfigError(f"{where}: must be a number {bounds} or null, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class ConstraintsConfig:
    """The sweep's budgets (None: no budget). See the module docstring."""

    max_macs_fraction: float | None = None
    max_macs: float | None = None
    max_latency_ratio: float | None = None
    min_accuracy: float | None = None

    def validated(self, where: str) -> "ConstraintsConfig":
        return ConstraintsConfig(
            max_macs_fraction=_optional_number(self.max_macs_fraction, f"{where}.max_macs_fraction", gt=0, le=1),
            max_macs=_optional_number(self.max_macs, f"{where}.max_macs", gt=0),
            max_latency_ratio=_optional_number(self.max_latency_ratio, f"{where}.max_latency_ratio", gt=0),
            min_accuracy=_optional_number(self.min_accuracy, f"{where}.min_accuracy", ge=0, le=1),
        )

    @property
    def active(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]


def constraint_values(cfg: ConstraintsConfig, metrics: Mapping[str, Any]) -> list[float]:
    """One value per active budget (in ``cfg.active`` order), ``<= 0`` when met; 0 where the
    metric it needs was not measured."""

    def metric(key: str) -> float | None:
        v = metrics.get(key)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None

    out = []
    for name in cfg.active:
        bound = getattr(cfg, name)
        if name == "max_macs_fraction":
            reduction = metric("macs_reduction")
            if reduction is None and metric("macs") is not None and metric("dense_macs"):
                reduction = 1.0 - metric("macs") / metric("dense_macs")
            out.append(0.0 if reduction is None else (1.0 - reduction) - bound)
        elif name == "max_macs":
            macs = metric("macs")
            out.append(0.0 if macs is None else (macs - bound) / bound)
        elif name == "max_latency_ratio":
            ratio = metric("latency_ratio")
            out.append(0.0 if ratio is None else ratio - bound)
        else:
            accuracy = metric("accuracy")
            out.append(0.0 if accuracy is None else bound - accuracy)
    return out


def feasible(cfg: ConstraintsConfig, metrics: Mapping[str, Any]) -> bool:
    return all(v <= 1e-12 for v in constraint_values(cfg, metrics))


def narrow_space(space: dict, cfg: ConstraintsConfig) -> dict:
    """``space`` (method -> {name: Hyperparameter}) with ``prune_ratio >= 1 - max_macs_fraction``;
    ConfigError naming the field when a method's range lies wholly below it."""
    if cfg.max_macs_fraction is None:
        return space
    floor = 1.0 - cfg.max_macs_fraction
    out = {}
    for method, hps in space.items():
        hps = dict(hps)
        hp = hps.get("prune_ratio")
        if hp is not None and hp.kind != "categorical" and hp.low < floor:
            if hp.high < floor:
                raise ConfigError(
                    f"constraints.max_macs_fraction: {cfg.max_macs_fraction:g} needs prune_ratio >= {floor:g}, "
                    f"but {method}'s prune_ratio range ends at {hp.high:g}")
            hps["prune_ratio"] = replace(hp, low=floor, default=min(max(hp.default, floor), hp.high))
        out[method] = hps
    return out
