"""Compare accuracy-versus-cost fronts: several sweeps overlaid, or the methods of one sweep.

``prunetune fronts EXPERIMENT [EXPERIMENT ...]`` where EXPERIMENT is a sweep directory (it holds
``STATE_FILE``, which names the parent run and the tracking URI) or an MLflow experiment name (its
latest parent run tagged ``prunetune.sweep=true``, looked up under ``--tracking-uri``).

With several experiments each sweep is one series; with ``--by-method`` or a single experiment each
method of each sweep is one. Every series' front is plotted in one PNG and printed as a table, with
its hypervolume against ONE reference shared by all series, so the numbers are comparable.

The cost is the sweeps' ``objective`` (from each sweep's saved config, else its parent run's params;
``macs`` for sweeps older than the field): MACs, reference = zero accuracy and the largest dense-model
MACs of the sweeps; or ``latency_ratio``, reference = zero accuracy and ratio 1 (the dense model).
Sweeps that searched different objectives are not compared (one error line).

``resolve_sweep`` (shared with ``search.promote``) turns an EXPERIMENT argument into a
:class:`SweepRef`.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, TextIO

from mlflow.tracking import MlflowClient

from methods.errors import ConfigError
from trainables import storage

from .config import OBJECTIVES
from .fronts import DIRECTIONS, TrialPoint, cost_label, plot_fronts, reference_point, sweep_points
from .pareto import front, hypervolume
from .sweep import STATE_FILE
from .store import open_client, sqlite_path
from .tracking import SWEEP_TAG, child_runs

__all__ = ["SweepRef", "FrontSeries", "resolve_sweep", "collect_fronts", "compare_fronts", "format_table",
           "add_fronts_command", "DEFAULT_TRACKING_URI"]

log = logging.getLogger(__name__)
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
EXPERIMENT_DIR_TAG = "prunetune.experiment_dir"


@dataclass(frozen=True)
class SweepRef:
    """Where one sweep's records live."""

    label: str                      # what the user typed, shortened: the directory's or experiment's name
    tracking_uri: str
    parent_run_id: str
    experiment_name: str
    experiment_dir: Path | str | None = None  # a URI string for an object-store sweep
    config: dict[str, Any] | None = None  # from STATE_FILE, when the sweep directory is known
    objective: str = "macs"  # the searched cost: the config's, else the parent run's param; macs for old sweeps

    def client(self) -> MlflowClient:
        return open_client(self.tracking_uri, create=False)


@dataclass(frozen=True)
class FrontSeries:
    """One plotted series: all its trials, their front (cheapest first) and its hypervolume."""

    label: str
    sweep: str
    points: list[TrialPoint] = field(default_factory=list)
    front: list[TrialPoint] = field(default_factory=list)
    hypervolume: float = math.nan
    objective: str = "macs"


# ---- resolving EXPERIMENT arguments -----------------------------------------------------------------------
def _read_state(directory: str | Path) -> dict[str, Any]:
    try:
        state = json.loads(storage.read_text(storage.join(str(directory), STATE_FILE)))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"sweep directory {str(directory)!r}: cannot read {STATE_FILE}: {exc}") from None
    for key in ("parent_run_id", "tracking_uri"):
        if not state.get(key):
            raise ConfigError(f"sweep directory {str(directory)!r}: {STATE_FILE} has no {key!r}")
    return state


def _is_sweep_dir(location: str) -> bool:
    try:
        return storage.is_file(storage.join(location, STATE_FILE))
    except (OSError, ValueError):  # unreachable store, malformed URI
        return False


def _state_client(text: str, uri: str) -> MlflowClient:
    """The client for a sweep directory's recorded tracking URI, or one line on what is wrong with it:
    a relative SQLite path (a sweep from before the URI was stored absolute) or a database that is
    no longer where the sweep recorded it."""
    db = sqlite_path(uri)
    if db is not None and not db.is_absolute():
        raise ConfigError(f"sweep directory {text!r}: its tracking URI {uri} is relative to the directory the sweep "
                          "was started from; run from there or pass the database with --tracking-uri")
    if db is not None and not db.is_file():
        raise ConfigError(f"sweep directory {text!r}: its MLflow database {db} no longer exists (moved or deleted?)")
    return open_client(uri, create=False)


def resolve_sweep(source: str | Path, tracking_uri: str | None = None) -> SweepRef:
    """A sweep directory (with ``STATE_FILE``) or an MLflow experiment name -> :class:`SweepRef`.

    For a sweep directory its own tracking URI wins (``tracking_uri`` is ignored); for an
    experiment name ``tracking_uri`` (default ``sqlite:///mlflow.db``) is searched for the latest
    parent run tagged ``prunetune.sweep=true``. Anything else raises ``ConfigError`` naming it.
    """
    text = str(source)
    path = Path(text).expanduser()
    if storage.is_uri(text) or path.is_dir():  # a sweep directory: local, NFS or an object store (s3://)
        location = text if storage.is_uri(text) else str(path.resolve())
        if not _is_sweep_dir(location):
            raise ConfigError(f"unknown experiment {text!r}: {location} has no {STATE_FILE} "
                              "(not a prunetune sweep directory)")
        state = _read_state(location)
        client = _state_client(text, state["tracking_uri"])
        try:
            run = client.get_run(state["parent_run_id"])
        except Exception as exc:  # noqa: BLE001  (MlflowException: the run is not in that store)
            raise ConfigError(f"sweep directory {text!r}: parent run {state['parent_run_id']} not found in "
                              f"{state['tracking_uri']} ({type(exc).__name__})") from None
        exp = client.get_experiment(run.info.experiment_id)
        config = state.get("config")
        return SweepRef(storage.name(location), state["tracking_uri"], state["parent_run_id"], exp.name,
                        Path(location) if storage.local_path(location) else location, config,
                        _objective(config, run, text))

    uri = tracking_uri or DEFAULT_TRACKING_URI
    db = sqlite_path(uri)
    if db is not None and not db.is_file():  # don't create an empty database just to find nothing
        raise ConfigError(f"unknown experiment {text!r}: not a sweep directory, and there is no MLflow database "
                          f"at {uri} (pass --tracking-uri)")
    client = open_client(uri, create=False)
    exp = client.get_experiment_by_name(text)
    if exp is None:
        raise ConfigError(f"unknown experiment {text!r}: not a sweep directory nor an MLflow experiment in {uri}")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = 'true'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise ConfigError(f"experiment {text!r} in {uri} has no prunetune sweep run (tag {SWEEP_TAG}=true)")
    run = runs[0]
    exp_dir = run.data.tags.get(EXPERIMENT_DIR_TAG)
    config = None
    if exp_dir and _is_sweep_dir(exp_dir):
        try:
            state = _read_state(exp_dir)
        except ConfigError:
            state = {}
        if state.get("parent_run_id") == run.info.run_id:
            config = state.get("config")
    exp_loc = (exp_dir if storage.is_uri(exp_dir) else Path(exp_dir)) if exp_dir else None
    return SweepRef(text, uri, run.info.run_id, exp.name, exp_loc, config, _objective(config, run, text))


def _objective(config: dict[str, Any] | None, parent_run, source: str) -> str:
    """The sweep's searched cost: its saved config's ``objective``, else the parent run's param of
    that name (every config field is one), else ``macs`` (sweeps from before the field)."""
    value = (config or {}).get("objective") or parent_run.data.params.get("objective") or "macs"
    if value not in OBJECTIVES:
        raise ConfigError(f"sweep {source!r}: unknown objective {value!r} (expected one of {', '.join(OBJECTIVES)})")
    return value


def dense_macs(client: MlflowClient, parent_run_id: str) -> float:
    """The dense model's MACs as the sweep's trials recorded them (NaN if none did)."""
    values = [r.data.metrics["dense_macs"] for r in child_runs(client, parent_run_id)
              if math.isfinite(r.data.metrics.get("dense_macs", math.nan))]
    return max(values) if values else math.nan


# ---- collecting and comparing -------------------------------------------------------------------------------
def _front_of(points: Sequence[TrialPoint]) -> list[TrialPoint]:
    idx = front([p.objectives for p in points], DIRECTIONS) if points else []
    return sorted((points[i] for i in idx), key=lambda p: (p.cost, -p.accuracy))


def _unique_labels(refs: Sequence[SweepRef]) -> list[str]:
    labels = [r.label for r in refs]
    return [f"{lab}@{r.parent_run_id[:8]}" if labels.count(lab) > 1 else lab for lab, r in zip(labels, refs)]


def collect_fronts(sources: Sequence[str | Path], by_method: bool = False,
                   tracking_uri: str | None = None) -> tuple[list[FrontSeries], tuple[float, float]]:
    """Series (one per sweep, or per method) and the common hypervolume reference they were scored on."""
    if not sources:
        raise ConfigError("fronts: give at least one experiment (a sweep directory or an MLflow experiment name)")
    refs = [resolve_sweep(s, tracking_uri) for s in sources]
    objectives = {r.objective for r in refs}
    if len(objectives) > 1:
        which = ", ".join(f"{lab}: {r.objective}" for lab, r in zip(_unique_labels(refs), refs))
        raise ConfigError(f"fronts: the sweeps searched different objectives ({which}); compare sweeps of one objective")
    objective = objectives.pop()
    split = by_method or len(refs) == 1
    raw: list[tuple[str, str, list[TrialPoint]]] = []
    dense: list[float] = []
    for ref, label in zip(refs, _unique_labels(refs)):
        client = ref.client()
        points = sweep_points(client, ref.parent_run_id, objective)
        if not points:
            log.warning("sweep %s (run %s) has no finished trial with accuracy and %s", label, ref.parent_run_id,
                        cost_label(objective))
        dense.append(dense_macs(client, ref.parent_run_id))
        if split:
            for method in sorted({p.method for p in points}):
                name = method if len(refs) == 1 else f"{label}/{method}"
                raw.append((name, label, [p for p in points if p.method == method]))
        else:
            raw.append((label, label, points))
    finite = [d for d in dense if math.isfinite(d)]
    reference = reference_point(objective, max(finite) if finite else None, [p for _, _, pts in raw for p in pts])
    series = [FrontSeries(name, sweep, pts, _front_of(pts),
                          hypervolume([p.objectives for p in pts], reference, DIRECTIONS) if pts else 0.0, objective)
              for name, sweep, pts in raw]
    return series, reference


def compare_fronts(sources: Sequence[str | Path], out: str | Path = "fronts.png", by_method: bool = False,
                   tracking_uri: str | None = None) -> dict[str, list[TrialPoint]]:
    """Plot the fronts of ``sources`` into ``out`` (PNG) and return each series' front (cheapest first)."""
    series, reference = collect_fronts(sources, by_method, tracking_uri)
    _plot(series, Path(out))
    for s in series:
        log.info("%s: %d trials, front of %d, hypervolume %.6g (reference accuracy %g, %s %.6g)",
                 s.label, len(s.points), len(s.front), s.hypervolume, reference[0], cost_label(s.objective), reference[1])
    return {s.label: s.front for s in series}


def _plot(series: Sequence[FrontSeries], out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return plot_fronts({s.label: s.points for s in series}, out, highlight={s.label: s.front for s in series})


# ---- output ------------------------------------------------------------------------------------------------------
def _num(value: float, fmt: str) -> str:
    return format(value, fmt) if math.isfinite(value) else "nan"


def format_table(series: Sequence[FrontSeries], reference: tuple[float, float]) -> str:
    """The fronts as a fixed-width table (one row per front point, cheapest first; the run id is the
    last column), then each series' hypervolume. The fourth column is the searched cost: ``MACs``,
    or ``latency_ratio`` (then followed by the pruned and dense latencies in ms and the MACs)."""
    objective = series[0].objective if series else "macs"
    width = max([len("label")] + [len(s.label) for s in series])
    if objective == "macs":
        lines = [f"{'label':<{width}}  {'method':<10} {'accuracy':>9} {'MACs':>13} {'params':>11} {'test acc':>9}  run id"]
    else:
        lines = [f"{'label':<{width}}  {'method':<10} {'accuracy':>9} {'latency_ratio':>13} {'latency ms':>11} "
                 f"{'dense ms':>11} {'MACs':>13} {'params':>11} {'test acc':>9}  run id"]
    for s in series:
        for p in s.front:
            if objective == "macs":
                cells = f"{_num(p.macs, ',.0f'):>13}"
            else:
                cells = (f"{_num(p.latency_ratio, '.4f'):>13} {_num(p.latency_ms, '.3f'):>11} "
                         f"{_num(p.dense_latency_ms, '.3f'):>11} {_num(p.macs, ',.0f'):>13}")
            lines.append(f"{s.label:<{width}}  {p.method:<10} {_num(p.accuracy, '.4f'):>9} {cells} "
                         f"{_num(p.params, ',.0f'):>11} {_num(p.test_accuracy, '.4f'):>9}  {p.run_id}")
    lines.append("")
    ref_cost = f"{reference[1]:,.0f}" if objective == "macs" else f"{reference[1]:g}"
    lines.append(f"hypervolume (reference: accuracy {reference[0]:g}, {cost_label(objective)} {ref_cost}):")
    for s in series:
        lines.append(f"{s.label:<{width}}  {s.hypervolume:.6g}  "
                     f"({len(s.front)} on the front of {len(s.points)} trials)")
    return "\n".join(lines) + "\n"


def _cmd_fronts(args, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    series, reference = collect_fronts(args.experiments, args.by_method, args.tracking_uri)
    png = _plot(series, Path(args.out))
    out.write(format_table(series, reference))
    out.write(f"\nplot: {png}\n")
    return 0


def add_fronts_command(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("fronts", help="overlay and compare the accuracy-vs-cost fronts of sweeps",
                              description="Overlay the Pareto fronts of sweeps (or of the methods of one sweep) "
                                          "in one PNG, accuracy against the sweeps' searched cost (MACs or the "
                                          "latency ratio), and print them as a table with each series' "
                                          "hypervolume against one common reference.")
    p.add_argument("experiments", nargs="+", metavar="EXPERIMENT",
                   help="a sweep directory (printed by `prunetune run`) or an MLflow experiment name")
    p.add_argument("--out", default="fronts.png", metavar="PNG", help="the plot to write (default: fronts.png)")
    p.add_argument("--by-method", action="store_true", help="one series per method of each sweep")
    p.add_argument("--tracking-uri", default=None, metavar="URI",
                   help=f"MLflow tracking URI for experiment names (default: {DEFAULT_TRACKING_URI}); "
                        "a sweep directory names its own")
    p.set_defaults(func=_cmd_fronts)
    return p
