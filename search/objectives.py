"""The objectives a sweep can search, in one table: what each is called in a config, which trial
metric carries it, whether it is maximised or minimised, how tables and plots name it, and where
its hypervolume reference lies.

A sweep searches two or three of them (``objectives: [accuracy, macs]`` in the config); the
older ``objective: macs | latency`` key is a shorthand for ``[accuracy, macs]`` and
``[accuracy, latency_ratio]`` (``SHORTHANDS``).

Reference points (``reference``): accuracy 0; MACs and params the dense model's own (no pruned model
exceeds them), else 1.1 x the largest value seen; the latency ratio 1 (the dense model's).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from methods.errors import ConfigError

__all__ = ["Objective", "OBJECTIVES", "SHORTHANDS", "get", "resolve", "directions", "metrics", "reference",
           "parse_names", "DEFAULT"]


@dataclass(frozen=True)
class Objective:
    name: str           # as written in a config's ``objectives`` list
    metric: str         # the trial result / MLflow metric that carries it
    direction: str      # "max" or "min"
    label: str          # table column and message name
    axis: str           # plot axis label
    scale: float        # plot values are multiplied by this (MACs and params in millions)
    every_epoch: bool   # reported by every epoch (else only by a trial's final result)
    dense_metric: str | None  # the trial / parent metric holding the dense model's value (reference)
    fixed_reference: float | None  # a reference that needs no data (accuracy 0, latency ratio 1)
    fmt: str            # number format in tables

    def reference(self, dense: float | None = None, values: Iterable[float] = ()) -> float:
        """This objective's hypervolume reference coordinate (see the module docstring)."""
        if self.fixed_reference is not None:
            return self.fixed_reference
        if dense is not None and math.isfinite(dense) and dense > 0:
            return float(dense)
        finite = [v for v in values if math.isfinite(v)]
        return 1.1 * max(finite) if finite else 1.0

    def format(self, value: float) -> str:
        return format(value, self.fmt) if math.isfinite(value) else "nan"


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective("accuracy", "accuracy", "max", "accuracy", "validation accuracy", 1.0, True, None, 0.0, ".4f"),
    Objective("macs", "macs", "min", "MACs", "MACs (millions, batch 1)", 1e-6, True, "dense_macs", None, ",.0f"),
    Objective("params", "params", "min", "params", "parameters (millions)", 1e-6, True, "dense_params", None, ",.0f"),
    Objective("latency_ratio", "latency_ratio", "min", "latency_ratio",
              "latency / dense latency (latency_ratio, on the trial's device)", 1.0, False, None, 1.0, ".4f"),
)}
#: The ``objective:`` shorthand: each name and the objectives list it stands for.
SHORTHANDS: dict[str, tuple[str, ...]] = {"macs": ("accuracy", "macs"), "latency": ("accuracy", "latency_ratio")}
DEFAULT: tuple[str, ...] = SHORTHANDS["macs"]


def get(name: str) -> Objective:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ConfigError(f"objectives: unknown objective {name!r}; valid: {', '.join(OBJECTIVES)}") from None


def resolve(names: Sequence[str]) -> tuple[Objective, ...]:
    return tuple(get(n) for n in names)


def directions(names: Sequence[str]) -> tuple[str, ...]:
    return tuple(get(n).direction for n in names)


def metrics(names: Sequence[str]) -> list[str]:
    return [get(n).metric for n in names]


def reference(names: Sequence[str], dense: Mapping[str, float] | None = None,
              points: Sequence[Sequence[float]] = ()) -> tuple[float, ...]:
    """The hypervolume reference for ``names``; ``dense`` maps a ``dense_metric`` (``dense_macs``,
    ``dense_params``) to the dense model's value; ``points`` (rows in the order of ``names``) are
    the fallback for a missing dense value."""
    dense = dense or {}
    out = []
    for i, obj in enumerate(resolve(names)):
        value = dense.get(obj.dense_metric) if obj.dense_metric else None
        out.append(obj.reference(value, (float(p[i]) for p in points)))
    return tuple(out)


def check_names(value, field: str = "objectives") -> tuple[str, ...]:
    """A validated objectives list: 2 or 3 distinct known names; ConfigError naming ``field``."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ConfigError(f"{field}: must be a list of 2 or 3 of {', '.join(OBJECTIVES)}, got {value!r}")
    names = tuple(value)
    if not 2 <= len(names) <= 3:
        raise ConfigError(f"{field}: must name 2 or 3 objectives, got {len(names)}: {list(names)!r}")
    for i, name in enumerate(names):
        if name not in OBJECTIVES:
            raise ConfigError(f"{field}[{i}]: unknown objective {name!r}; valid: {', '.join(OBJECTIVES)}")
        if names.index(name) != i:
            raise ConfigError(f"{field}[{i}]: {name!r} is listed twice")
    return names


def parse_names(text: str | None) -> tuple[str, ...] | None:
    """An objectives list as MLflow stored it in a param (``"['accuracy', 'macs']"``), or None."""
    if not text:
        return None
    import ast

    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None
    return tuple(value) if isinstance(value, (list, tuple)) else None
