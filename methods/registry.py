"""Method registry: ``@register_method`` fills it; ``methods/__init__.py`` imports every method
module explicitly so each Ray worker sees the same registry."""
from __future__ import annotations

from typing import Any, Callable, TypeVar

from .base import PruningMethod
from .errors import ArgumentError, ConfigError

__all__ = ["register_method", "create_method", "list_methods", "get_method_class", "markdown_table"]

_REGISTRY: dict[str, type[PruningMethod]] = {}
T = TypeVar("T", bound=type[PruningMethod])


def register_method(name: str) -> Callable[[T], T]:
    def decorate(cls: T) -> T:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ArgumentError(f"method {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        missing = [attr for attr in ("paper", "summary") if not getattr(cls, attr, "")]
        if missing:
            raise ArgumentError(f"method {name!r} ({cls.__qualname__}) declares no {' or '.join(missing)}: "
                                f"one line each, for `prunetune methods` and the README's table")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def list_methods() -> list[str]:
    return sorted(_REGISTRY)


def get_method_class(name: str) -> type[PruningMethod]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; valid methods: {', '.join(list_methods())}") from None


def create_method(name: str, **hparams: Any) -> PruningMethod:
    return get_method_class(name)(**hparams)


def markdown_table() -> str:
    """The README's method table (``prunetune methods --markdown``), one row per registered method."""
    lines = ["| name | method | what it does |", "| --- | --- | --- |"]
    for name in list_methods():
        cls = _REGISTRY[name]
        summary = cls.summary.replace("|", "\\|")  # a literal bar inside a table cell
        lines.append(f"| `{name}` | {cls.paper} | {summary} |")
    return "\n".join(lines)
