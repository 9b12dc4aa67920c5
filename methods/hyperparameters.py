"""Declared hyperparameters: each method lists its own, and the search space is built from them."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Sequence

from .errors import ConfigError

__all__ = ["Hyperparameter"]


@dataclass(frozen=True)
class Hyperparameter:
    """One searchable hyperparameter.

    ``kind`` is ``float``, ``int`` or ``categorical``. Numeric ones have an inclusive ``[low, high]``
    range (``log`` for a log-uniform search); categorical ones have ``choices``. ``default`` is used
    when a method is built without a value (and must be valid itself).
    """

    name: str
    default: Any
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple | None = None
    kind: str = "float"
    doc: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("float", "int", "categorical"):
            raise ConfigError(f"hyperparameter {self.name}: kind must be float, int or categorical, got {self.kind!r}")
        if self.kind == "categorical":
            if not self.choices:
                raise ConfigError(f"hyperparameter {self.name}: categorical needs choices")
        else:
            if self.low is None or self.high is None or not self.low <= self.high:
                raise ConfigError(f"hyperparameter {self.name}: need low <= high, got [{self.low}, {self.high}]")
            if self.log and self.low <= 0:
                raise ConfigError(f"hyperparameter {self.name}: a log range needs low > 0, got {self.low}")
        self.validate(self.default)

    def validate(self, value: Any, *, owner: str = "") -> Any:
        """Return ``value`` converted to this kind, or raise ConfigError naming the field."""
        field = f"{owner}.{self.name}" if owner else self.name
        if self.kind == "categorical":
            if value not in self.choices:
                raise ConfigError(f"{field}: {value!r} is not one of {list(self.choices)}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{field}: expected a number, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{field}: expected a finite number, got {value!r}")
        if self.kind == "int":
            if int(value) != value:
                raise ConfigError(f"{field}: expected an integer, got {value!r}")
            value = int(value)
        else:
            value = float(value)
        if not self.low <= value <= self.high:
            raise ConfigError(f"{field}: {value!r} is outside [{self.low}, {self.high}]")
        return value

    def narrowed(self, spec: Sequence | Any, *, owner: str = "") -> "Hyperparameter":
        """A copy restricted by a config entry: ``[low, high]`` for numbers, a list for categories,
        or one value to fix it. The narrowed range must lie inside the declared one."""
        field = f"{owner}.{self.name}" if owner else self.name
        if self.kind == "categorical":
            values = list(spec) if isinstance(spec, (list, tuple)) else [spec]
            for v in values:
                self.validate(v, owner=owner)
            return replace(self, choices=tuple(values), default=values[0])
        if isinstance(spec, (list, tuple)):
            if len(spec) != 2:
                raise ConfigError(f"space.{field}: expected [low, high], got {list(spec)!r}")
            low, high = (self.validate(v, owner=owner) for v in spec)
            if low > high:
                raise ConfigError(f"space.{field}: low {low} > high {high}")
            default = min(max(self.default, low), high)
            return replace(self, low=low, high=high, default=default)
        value = self.validate(spec, owner=owner)
        return replace(self, low=value, high=value, default=value)

    @property
    def fixed(self) -> bool:
        if self.kind == "categorical":
            return len(self.choices) == 1
        return self.low == self.high
