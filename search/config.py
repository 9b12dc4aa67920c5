"""The sweep config: YAML -> frozen dataclasses, validated completely before Ray starts.

``load_config(path, overrides)`` reads a YAML mapping, applies ``--set key=value`` overrides (dotted
keys for nesting, values parsed as YAML) and returns a :class:`SweepConfig`. Building a
``SweepConfig`` (directly, through ``config_from_dict`` or ``dataclasses.replace``) validates every
field; a bad one raises :class:`methods.errors.ConfigError` with one line that names the field and
the value received.

The ``space`` section narrows the declared search space of the selected methods:

* ``param: [low, high]`` (numbers), a list of choices (categorical) or a single value (fixed)
  applies to EVERY selected method that declares ``param``, and must lie inside each one's range;
* ``method: {param: ...}`` narrows one method only (``--set space.slimming.phase_epochs=[1,4]``);
  it takes precedence over a plain entry for the same parameter.

Local paths (``data_dir``, ``storage_path``, ``model_kwargs.weights``) are stored absolute: Ray
trial workers run in their own working directories, so relative paths would break there.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping
from urllib.parse import urlparse

import yaml

import methods as _methods_package  # noqa: F401  (importing it fills the method registry)
from methods.errors import ConfigError
from methods.hyperparameters import Hyperparameter
from methods.registry import get_method_class, list_methods
from trainables.settings import TrainSettings

from . import objectives as _objectives
from .constraints import ConstraintsConfig, narrow_space

__all__ = ["SweepConfig", "TrainConfig", "ResourcesConfig", "EarlyStoppingConfig", "load_config", "config_from_dict", "SAMPLERS",
           "OBJECTIVES", "COST_METRICS", "check_objective"]

log = logging.getLogger(__name__)

SAMPLERS = ("tpe", "nsga2", "random")
TRIAL_MODELS = ("all", "front")
#: The ``objective`` shorthand (``search.objectives.SHORTHANDS``): ``macs`` (batch 1, counted) is
#: ``objectives: [accuracy, macs]``; ``latency`` (pruned / dense latency, measured interleaved on the
#: trial's device at the end of the trial) is ``objectives: [accuracy, latency_ratio]``.
OBJECTIVES = tuple(_objectives.SHORTHANDS)
#: The trial metric of each shorthand's cost.
COST_METRICS = {k: v[1] for k, v in _objectives.SHORTHANDS.items()}


def check_objective(objective: str) -> str:
    """``objective`` itself if it is one of ``OBJECTIVES``; else ConfigError naming the field."""
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective: expected one of {', '.join(OBJECTIVES)}, got {objective!r}")
    return objective


def _checked_objectives(objective: Any, objectives: Any) -> tuple[str | None, tuple[str, ...]]:
    """(shorthand or None, the objectives list). ``objectives``, when given, wins over ``objective``."""
    if objectives is None:
        check_objective(objective)
        return objective, _objectives.SHORTHANDS[objective]
    names = _objectives.check_names(objectives)
    shorthand = next((k for k, v in _objectives.SHORTHANDS.items() if v == names), None)
    if objective is not None and objective != shorthand:
        log.info("objectives %s given: it replaces objective: %s", list(names), objective)
    return shorthand, names


#: Upper bounds that catch a typo (``num_trials: 1000000000000``) before any work; generous for real use.
MAX_TRIALS, MAX_CONCURRENT, MAX_EPOCHS, MAX_BATCH = 100_000, 10_000, 100_000, 1 << 16
MAX_IMAGE_SIZE, MAX_CALIBRATION_BATCHES, MAX_FAILURES = 8192, 100_000, 1000
MAX_WORKERS = 4096
#: ``resources_per_trial.backend`` values (``auto``: nccl with GPUs, else gloo).
BACKENDS = ("auto", "gloo", "nccl")
#: ``name`` names the sweep directory ``<name>-YYYYmmdd-HHMMSS``: a file name is at most 255 bytes.
MAX_NAME_BYTES = 255 - len("-YYYYmmdd-HHMMSS")

_FALLBACK_DATASETS = ("cifar10", "cifar100", "digits", "imagefolder")
_DIR_DATASETS = ("cifar10", "cifar100", "imagefolder")
_CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
# create_model arguments that the trainable derives from the data, not from the config.
_DERIVED_MODEL_KWARGS = ("num_classes", "in_channels")


# ---- small validators (each names the field and the value received) -----------------------------------
def _fmt(value: Any) -> str:
    return repr(value)


def _int(value: Any, name: str, minimum: int, maximum: int | None = None) -> int:
    """An int (an integral float is accepted) within [minimum, maximum]."""
    ok = not isinstance(value, bool) and (
        isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    )
    if ok and maximum is not None and value > maximum:
        raise ConfigError(f"{name}: must be an integer <= {maximum:_}, got {_fmt(value)}")
    if not ok or value < minimum:
        raise ConfigError(f"{name}: must be an integer >= {minimum}, got {_fmt(value)}")
    return int(value)


def _float(value: Any, name: str, *, gt: float | None = None, ge: float | None = None,
           lt: float | None = None) -> float:
    """A finite number within the bounds given. Numeric strings like ``'5e-4'`` are accepted: YAML 1.1
    (PyYAML) reads an exponent float without a dot in the mantissa as a string."""
    bounds = [f"{op} {b}" for op, b in ((">", gt), (">=", ge), ("<", lt)) if b is not None]
    error = ConfigError(f"{name}: must be a number{' ' + ' and '.join(bounds) if bounds else ''}, got {_fmt(value)}")
    number = _numeric(value)
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
        raise error
    if (gt is not None and not number > gt) or (ge is not None and not number >= ge) or (
            lt is not None and not number < lt):
        raise error
    return float(number)


def _numeric(value: Any) -> Any:
    """``value`` as a float if it is a string that spells a number (``'1e-3'``), else unchanged."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _str(value: Any, name: str, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip():
        want = "a non-empty string or null" if optional else "a non-empty string"
        raise ConfigError(f"{name}: must be {want}, got {_fmt(value)}")
    return value


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name}: must be true or false, got {_fmt(value)}")
    return value


def _abspath(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def _is_uri(path: str) -> bool:
    return "://" in path


def _check_keys(mapping: Mapping, valid: Iterable[str], where: str) -> None:
    """Raise on the first unknown key; ``where`` is the section ('' for the top level)."""
    valid = sorted(valid)
    for key in mapping:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            prefix = f"{where}: " if where else ""
            raise ConfigError(f"{prefix}unknown key {key!r}{hint}; valid keys: {', '.join(valid)}")


def _freeze(value: Any) -> Any:
    """Lists become tuples, recursively (space entries are stored immutable)."""
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, Mapping):
        return {k: _freeze(v) for k, v in value.items()}
    return value


def _plain(value: Any) -> Any:
    """Tuples become lists, recursively (what ``yaml.safe_dump`` and JSON accept)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _dataset_names() -> list[str]:
    try:
        from trainables.data import list_datasets
    except Exception:  # noqa: BLE001  (the data module may be mid-edit; fall back to the documented names)
        log.debug("trainables.data unavailable; using the documented dataset names", exc_info=True)
        return list(_FALLBACK_DATASETS)
    return list(list_datasets())


def _model_names() -> list[str]:
    from trainables.models import list_models

    return list(list_models())


def _model_kwarg_names() -> list[str]:
    from trainables.models import create_model

    params = inspect.signature(create_model).parameters
    return sorted(n for n, p in params.items()
                  if n not in ("name", *_DERIVED_MODEL_KWARGS)
                  and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))


# ---- nested sections ------------------------------------------------------------------------------------
#: The ``base`` and ``finetune`` sections ARE the trials' settings type (one type: the driver hands
#: them to the trials as they are, never copied field by field); validated by :func:`_validated_train`.
TrainConfig = TrainSettings


def _validated_train(section: TrainSettings, where: str) -> TrainSettings:
    """A normalised copy of an SGD schedule, or ConfigError naming ``where.field``."""
    return TrainSettings(
        epochs=_int(section.epochs, f"{where}.epochs", 0, MAX_EPOCHS),
        lr=_float(section.lr, f"{where}.lr", gt=0),
        momentum=_float(section.momentum, f"{where}.momentum", ge=0, lt=1),
        weight_decay=_float(section.weight_decay, f"{where}.weight_decay", ge=0),
        batch_size=_int(section.batch_size, f"{where}.batch_size", 1, MAX_BATCH),
    )


@dataclass(frozen=True)
class ResourcesConfig:
    """Ray resources per trial; ``gpu`` may be fractional (0.5: two trials share a GPU).

    ``workers`` > 1 makes a trial data-parallel (``trainables.distributed``): that many ranks, each
    with ``cpu`` CPUs and ``gpu`` (0 or 1) GPUs, every batch size in the config per worker (global
    batch = batch_size x workers); ``backend``: ``auto`` (nccl with GPUs, else gloo), ``gloo`` or
    ``nccl`` (GPUs only)."""

    cpu: float = 1
    gpu: float = 0
    workers: int = 1
    backend: str = "auto"

    def validated(self, where: str) -> "ResourcesConfig":
        cpu = _float(self.cpu, f"{where}.cpu", gt=0)
        gpu = _float(self.gpu, f"{where}.gpu", ge=0)
        if gpu > 1 and not gpu.is_integer():
            raise ConfigError(f"{where}.gpu: a GPU share above 1 must be a whole number (Ray's rule), got {self.gpu!r}")
        workers = _int(self.workers, f"{where}.workers", 1, MAX_WORKERS)
        if workers > 1 and gpu not in (0, 1):
            raise ConfigError(f"{where}.gpu: a data-parallel trial (workers: {workers}) runs one rank per GPU: "
                              f"gpu must be 0 or 1 per worker, got {self.gpu!r}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"{where}.backend: expected one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.backend == "nccl" and gpu == 0:
            raise ConfigError(f"{where}.backend: nccl needs a GPU per worker (gpu: 1), got gpu: {self.gpu!r}; "
                              "use gloo or auto on CPUs")
        # Keep whole numbers as ints: Ray and the YAML round trip read nicer that way.
        return ResourcesConfig(cpu=int(cpu) if cpu.is_integer() else cpu, gpu=int(gpu) if gpu.is_integer() else gpu,
                               workers=workers, backend=self.backend)

    @property
    def comm_backend(self) -> str:
        """The torch.distributed backend of a data-parallel trial."""
        return ("nccl" if self.gpu else "gloo") if self.backend == "auto" else self.backend


@dataclass(frozen=True)
class EarlyStoppingConfig:
    """``successive_halving``: multi-objective successive halving (``search.early_stopping``) with
    rungs at ``grace_epochs``, ``grace_epochs * reduction_factor``, ... fine-tune epochs; ``none``:
    every trial runs its whole budget."""

    type: str = "none"
    grace_epochs: int = 1
    reduction_factor: float = 2

    def validated(self, where: str) -> "EarlyStoppingConfig":
        if self.type not in EARLY_STOPPING:
            raise ConfigError(f"{where}.type: expected one of {', '.join(EARLY_STOPPING)}, got {self.type!r}")
        rf = _float(self.reduction_factor, f"{where}.reduction_factor", gt=1)
        return EarlyStoppingConfig(type=self.type, grace_epochs=_int(self.grace_epochs, f"{where}.grace_epochs", 1),
                                   reduction_factor=int(rf) if rf.is_integer() else rf)

    @property
    def enabled(self) -> bool:
        return self.type != "none"


EARLY_STOPPING = ("none", "successive_halving")
_BASE_DEFAULT = TrainSettings(epochs=15, lr=0.1)
_FINETUNE_DEFAULT = TrainSettings(epochs=5, lr=0.01)


# ---- the sweep ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SweepConfig:
    """Everything ``prunetune run`` needs. Validated on construction (see the module docstring).

    Treat ``space`` and ``model_kwargs`` as read-only: they are plain dicts so the config pickles
    (to Ray workers) and compares by value.
    """

    name: str = "quickstart"
    model: str = "resnet20"
    dataset: str = "digits"
    data_dir: str | None = None
    methods: tuple[str, ...] = field(default_factory=lambda: tuple(list_methods()))
    space: dict[str, Any] = field(default_factory=dict)
    num_trials: int = 24
    max_concurrent_trials: int = 2
    resources_per_trial: ResourcesConfig = field(default_factory=ResourcesConfig)
    sampler: str = "tpe"
    seed: int = 0
    base: TrainSettings = _BASE_DEFAULT
    finetune: TrainSettings = _FINETUNE_DEFAULT
    address: str | None = None
    tracking_uri: str = "sqlite:///mlflow.db"
    storage_path: str = "./ray_results"
    image_size: int | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    max_failures: int = 1
    checkpoint_period_s: float = 10
    #: Which finished trials get a pt2 MLflow model (the UI's Register button): ``all``, or ``front``:
    #: those on the front when they finish (a superset of the final front; ``promote`` logs any other).
    trial_models: str = "all"
    latency_batch_size: int = 1
    download: bool = False
    calibration_batches: int = 4
    #: torch.compile each pruned model for its fine-tune (pays on GPUs; slow to compile on CPUs).
    compile: bool = False
    objective: str | None = "macs"
    objectives: tuple[str, ...] | None = None
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    constraints: ConstraintsConfig = field(default_factory=ConstraintsConfig)
    warm_start: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass)
        name = _str(self.name, "name")
        if "/" in name or "\\" in name:
            raise ConfigError(f"name: must not contain a path separator (it names a directory), got {name!r}")
        if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
            raise ConfigError(f"name: at most {MAX_NAME_BYTES} bytes in UTF-8 (it names the sweep directory), got "
                              f"{len(name.encode('utf-8', 'surrogatepass'))} bytes ({name[:20]!r}...)")
        set_("name", name)

        models = _model_names()
        if self.model not in models:
            raise ConfigError(f"model: unknown model {self.model!r}; valid models: {', '.join(models)}")
        datasets = _dataset_names()
        if self.dataset not in datasets:
            raise ConfigError(f"dataset: unknown dataset {self.dataset!r}; valid datasets: {', '.join(datasets)}")
        set_("download", _bool(self.download, "download"))
        set_("data_dir", self._checked_data_dir())

        set_("methods", self._checked_methods())
        set_("constraints", _section(ConstraintsConfig, self.constraints, "constraints", ConstraintsConfig()))
        if self.space is None:  # `space:` with every entry commented out
            set_("space", {})
        if not isinstance(self.space, Mapping):
            raise ConfigError(f"space: must be a mapping of hyperparameter -> range, got {self.space!r}")
        set_("space", _freeze(dict(self.space)))
        self.search_space()  # validates every space entry

        set_("num_trials", _int(self.num_trials, "num_trials", 1, MAX_TRIALS))
        set_("max_concurrent_trials", _int(self.max_concurrent_trials, "max_concurrent_trials", 1, MAX_CONCURRENT))
        set_("resources_per_trial", _section(ResourcesConfig, self.resources_per_trial, "resources_per_trial",
                                             ResourcesConfig()))
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampler: unknown sampler {self.sampler!r}; valid samplers: {', '.join(SAMPLERS)}")
        if self.trial_models not in TRIAL_MODELS:
            raise ConfigError(f"trial_models: unknown value {self.trial_models!r}; valid: {', '.join(TRIAL_MODELS)}")
        shorthand, names = _checked_objectives(self.objective, self.objectives)
        set_("objective", shorthand)
        set_("objectives", names)
        set_("warm_start", _checked_warm_start(self.warm_start))
        set_("early_stopping", _section(EarlyStoppingConfig, self.early_stopping, "early_stopping",
                                        EarlyStoppingConfig()))
        set_("seed", _int(self.seed, "seed", 0, 2**32 - 1))
        set_("base", _section(TrainSettings, self.base, "base", _BASE_DEFAULT, _validated_train))
        set_("finetune", _section(TrainSettings, self.finetune, "finetune", _FINETUNE_DEFAULT, _validated_train))
        set_("address", _str(self.address, "address", optional=True))
        set_("tracking_uri", _checked_tracking_uri(self.tracking_uri))
        storage = _str(self.storage_path, "storage_path")
        set_("storage_path", storage if _is_uri(storage) else _abspath(storage))
        if self.image_size is not None:
            set_("image_size", _int(self.image_size, "image_size", 1, MAX_IMAGE_SIZE))
        set_("model_kwargs", self._checked_model_kwargs())
        period = _float(self.checkpoint_period_s, "checkpoint_period_s", ge=0)
        set_("checkpoint_period_s", int(period) if period.is_integer() else period)
        set_("max_failures", _int(self.max_failures, "max_failures", -1, MAX_FAILURES))  # -1: retry forever (Ray)
        set_("latency_batch_size", _int(self.latency_batch_size, "latency_batch_size", 1, MAX_BATCH))
        set_("calibration_batches", _int(self.calibration_batches, "calibration_batches", 1, MAX_CALIBRATION_BATCHES))
        set_("compile", _bool(self.compile, "compile"))
        if self.compile and self.resources_per_trial.workers > 1:
            raise ConfigError(f"compile: not supported for data-parallel trials (resources_per_trial.workers: "
                              f"{self.resources_per_trial.workers}); set compile: false or workers: 1")

    # ---- field checks ---------------------------------------------------------------------------------
    def _checked_data_dir(self) -> str | None:
        data_dir = _str(self.data_dir, "data_dir", optional=True)
        if self.dataset not in _DIR_DATASETS:
            return _abspath(data_dir) if data_dir is not None else None  # digits: unused
        cifar = self.dataset in _CIFAR_FOLDERS
        if data_dir is None:
            where = "the folder to download into or " if cifar else ""
            raise ConfigError(f"data_dir: dataset {self.dataset!r} needs data_dir ({where}the data set's root), got null")
        path = Path(_abspath(data_dir))
        if cifar and self.download:
            if path.exists() and not path.is_dir():
                raise ConfigError(f"data_dir: {data_dir} is not a directory")
            return str(path)  # torchvision creates it and downloads into it
        if not path.is_dir():
            hint = "; set download: true to fetch it" if cifar else ""
            raise ConfigError(f"data_dir: {data_dir} does not exist or is not a directory{hint}")
        if cifar and not (path / _CIFAR_FOLDERS[self.dataset]).is_dir():
            raise ConfigError(f"data_dir: {data_dir} has no {_CIFAR_FOLDERS[self.dataset]}/ folder; "
                              "set download: true to fetch it")
        if self.dataset == "imagefolder":
            for sub in ("train", "val"):
                if not (path / sub).is_dir():
                    raise ConfigError(f"data_dir: {data_dir} has no {sub}/ folder "
                                      "(imagefolder expects DATA_DIR/train/<class>/ and DATA_DIR/val/<class>/)")
        return str(path)

    def _checked_methods(self) -> tuple[str, ...]:
        value = self.methods
        if isinstance(value, str):
            value = (value,)
        if not isinstance(value, (list, tuple)) or not value:
            raise ConfigError(f"methods: must be a non-empty list of method names, got {self.methods!r}")
        valid = list_methods()
        seen: set[str] = set()
        for i, name in enumerate(value):
            if name not in valid:
                raise ConfigError(f"methods[{i}]: unknown method {name!r}; valid methods: {', '.join(valid)}")
            if name in seen:
                raise ConfigError(f"methods[{i}]: {name!r} is listed twice")
            seen.add(name)
        return tuple(value)

    def _checked_model_kwargs(self) -> dict[str, Any]:
        kwargs = self.model_kwargs if self.model_kwargs is not None else {}
        if not isinstance(kwargs, Mapping):
            raise ConfigError(f"model_kwargs: must be a mapping, got {kwargs!r}")
        kwargs = dict(kwargs)
        for key in kwargs:
            if key in _DERIVED_MODEL_KWARGS:
                raise ConfigError(f"model_kwargs.{key}: set from the dataset, not the config (got {kwargs[key]!r})")
        _check_keys(kwargs, _model_kwarg_names(), "model_kwargs")
        if "width_mult" in kwargs:
            kwargs["width_mult"] = _float(kwargs["width_mult"], "model_kwargs.width_mult", gt=0)
        if kwargs.get("weights") is not None:
            weights = _str(kwargs["weights"], "model_kwargs.weights")
            if not Path(_abspath(weights)).is_file():
                raise ConfigError(f"model_kwargs.weights: {weights} does not exist or is not a file")
            kwargs["weights"] = _abspath(weights)
        return kwargs

    # ---- the search space ---------------------------------------------------------------------------
    def search_space(self) -> dict[str, dict[str, Hyperparameter]]:
        """For each selected method (in order), its declared hyperparameters narrowed by ``space``."""
        declared = {m: {hp.name: hp for hp in get_method_class(m).hyperparameters} for m in self.methods}
        all_names = sorted({n for hps in declared.values() for n in hps})
        owners = {n: [m for m in self.methods if n in declared[m]] for n in all_names}
        differs = {n: len({_range_of(declared[m][n]) for m in owners[n]}) > 1 for n in all_names}
        plain: dict[str, Any] = {}
        scoped: dict[str, dict[str, Any]] = {}
        for key, spec in self.space.items():
            if key == "method":
                raise ConfigError(f"space.method: choose methods with the top-level 'methods' list, not in space "
                                  f"(got {spec!r})")
            registered = {m: {hp.name: hp for hp in get_method_class(m).hyperparameters} for m in list_methods()}
            if key in registered and isinstance(spec, Mapping):
                for name in spec:
                    if name not in registered[key]:
                        raise ConfigError(f"space.{key}.{name}: not a hyperparameter of {key} "
                                          f"(valid: {', '.join(sorted(registered[key]))})")
                if key in declared:
                    scoped[key] = dict(spec)
                else:  # kept valid, so `--set methods=[...]` can drop a method a config narrows
                    for name, value in spec.items():
                        _narrow(registered[key][name], value, f"space.{key}.{name}", key, False)
                    log.info("space.%s: %s is not in methods; its entry is ignored", key, key)
            elif key in owners:
                plain[key] = spec
            elif any(key in hps for hps in registered.values()):
                log.info("space.%s: no selected method declares it; ignored", key)
            else:
                valid = sorted({n for hps in registered.values() for n in hps})
                raise ConfigError(f"space.{key}: not a hyperparameter of any method (valid: {', '.join(valid)})")
        out: dict[str, dict[str, Hyperparameter]] = {}
        for m in self.methods:
            hps = dict(declared[m])
            for name, spec in plain.items():
                if name in hps and name not in scoped.get(m, {}):
                    hps[name] = _narrow(hps[name], spec, f"space.{name}", m, differs[name])
            for name, spec in scoped.get(m, {}).items():
                hps[name] = _narrow(hps[name], spec, f"space.{m}.{name}", m, False)
            out[m] = hps
        return narrow_space(out, self.constraints)  # prune_ratio >= 1 - constraints.max_macs_fraction

    # ---- serialisation ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain dicts and lists (YAML/JSON ready); ``config_from_dict`` rebuilds an equal config."""
        return _plain(dataclasses.asdict(self))


def _narrow(hp: Hyperparameter, spec: Any, where: str, method: str, shared: bool) -> Hyperparameter:
    """``hp.narrowed(spec)`` with the error re-worded to name the config field and, when ``shared``
    (methods declare the name with different ranges), the method whose declared range refused it."""
    spec = list(spec) if isinstance(spec, tuple) else spec
    if hp.kind != "categorical":  # '1e-3' is a string to PyYAML
        spec = [_numeric(v) for v in spec] if isinstance(spec, list) else _numeric(spec)
    try:
        return hp.narrowed(spec)
    except ConfigError as err:
        detail = str(err).split(": ", 1)[1] if ": " in str(err) else str(err)
        hint = ""
        if shared:
            hint = (f" (declared by {method}; narrow one method with "
                    f"space.{method}.{hp.name} instead)")
        raise ConfigError(f"{where}: {detail}{hint}") from None


def _range_of(hp: Hyperparameter) -> tuple:
    return (hp.kind, hp.low, hp.high, hp.choices)


def _section(cls: type, value: Any, where: str, default: Any, validate=None) -> Any:
    """A nested section from a dataclass instance or a partial mapping merged over ``default``,
    validated by ``validate(section, where)`` (default: the section's own ``validated``)."""
    validate = validate or (lambda section, where: section.validated(where))
    if isinstance(value, cls):
        return validate(value, where)
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: must be a mapping, got {value!r}")
    _check_keys(value, [f.name for f in dataclasses.fields(cls)], where)
    return validate(dataclasses.replace(default, **value), where)


def _checked_warm_start(value: Any) -> tuple[str, ...]:
    """Sweep directories (made absolute) or MLflow experiment names, checked when the sweep starts."""
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ConfigError(f"warm_start: must be a list of sweep directories or experiment names, got {value!r}")
    out = []
    for i, item in enumerate(value):
        item = _str(item, f"warm_start[{i}]")
        out.append(_abspath(item) if not _is_uri(item) and Path(_abspath(item)).is_dir() else item)
    return tuple(out)


def _checked_tracking_uri(uri: Any) -> str:
    uri = _str(uri, "tracking_uri")
    scheme = urlparse(uri).scheme
    if uri == "databricks":
        return uri
    if scheme in ("", "file") or len(scheme) == 1:  # a plain path, file:..., or a Windows drive letter
        raise ConfigError(f"tracking_uri: {uri!r} is a file store, which MLflow >= 3.13 refuses; "
                          "use sqlite:///mlflow.db or a server URL such as http://HOST:5000")
    return uri


# ---- entry points ---------------------------------------------------------------------------------------
_FIELDS = tuple(f.name for f in dataclasses.fields(SweepConfig))


def config_from_dict(d: Mapping[str, Any]) -> SweepConfig:
    """Build and validate a config from a (possibly partial) mapping; missing keys take defaults,
    and a partial ``base``/``finetune``/``resources_per_trial`` is merged over its default."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"config: expected a mapping of keys, got {type(d).__name__}")
    _check_keys(d, _FIELDS, "")
    return SweepConfig(**dict(d))


def _apply_override(data: dict[str, Any], override: str) -> None:
    if not isinstance(override, str) or "=" not in override:
        raise ConfigError(f"--set {override!r}: expected key=value (dotted keys for nesting, e.g. base.epochs=3)")
    key, _, text = override.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {override!r}: malformed key {key!r}")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"--set {override!r}: value is not valid YAML ({problem})") from None
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif isinstance(child, Mapping):
            child = node[part] = dict(child)
        else:
            raise ConfigError(f"--set {override!r}: {'.'.join(parts[:depth + 1])} is {child!r}, not a mapping")
        node = child
    node[parts[-1]] = value


def load_config(path: str | os.PathLike, overrides: Iterable[str] = ()) -> SweepConfig:
    """Read the YAML file at ``path``, apply ``key=value`` overrides in order, validate."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except OSError as err:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {err.strerror or err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        raise ConfigError(f"config file {str(path)!r} must hold a YAML mapping of keys, got {got}")
    if isinstance(overrides, str):
        overrides = [overrides]
    for override in overrides:
        _apply_override(data, override)
    cfg = config_from_dict(data)
    log.debug("loaded config %s: %s", path, cfg)
    return cfg
