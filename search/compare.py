"""Compare accuracy-versus-cost fronts: several sweeps overlaid, or the methods of one sweep.

``prunetune fronts EXPERIMENT [EXPERIMENT ...]`` where EXPERIMENT is a sweep directory (it holds
``STATE_FILE``, which names the parent run and the tracking URI) or an MLflow experiment name (every
parent run tagged ``prunetune.sweep=true``, one series each, looked up under ``--tracking-uri``;
``--latest``: only the latest). The overlay is also recorded as an MLflow run (HTML, PNG and CSV,
``search.comparison_run``) whose URL is printed (two-objective sweeps).

With several experiments each sweep is one series; with ``--by-method`` or a single experiment each
method of each sweep is one. Every series' front is plotted in one PNG and printed as a table, with
its hypervolume against ONE reference shared by all series, so the numbers are comparable.

The objectives are the sweeps' (``objectives``, or the ``objective`` shorthand, from each sweep's
saved config, else its parent run's params; ``[accuracy, macs]`` for sweeps older than both); the
reference follows ``search.objectives``: zero accuracy, the largest dense-model MACs (and params) of
the sweeps, a latency ratio of 1. Sweeps that searched different objectives are not compared (one
error line).

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

from . import objectives as _obj
from .fronts import TrialPoint, front_of, plot_fronts, reference_point, sweep_points
from .pareto import hypervolume
from .sweep import STATE_FILE
from .store import open_client, sqlite_path
from .tracking import SWEEP_TAG, child_runs

__all__ = ["SweepRef", "FrontSeries", "resolve_sweep", "resolve_sweeps", "collect_fronts", "compare_fronts", "format_table",
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
    objective: str | None = "macs"  # the shorthand of ``objectives`` (None for other lists)
    objectives: tuple[str, ...] = _obj.DEFAULT  # the config's, else the parent run's params; old sweeps: accuracy, macs

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
    objective: str | None = "macs"
    objectives: tuple[str, ...] = _obj.DEFAULT
    parent_run_id: str = ""         # the sweep's parent run, in ``tracking_uri``
    tracking_uri: str = ""
    method: str | None = None       # the one method of a by-method series


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
                        *_objectives_of(config, run, text))

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
    return _ref_for_run(text, uri, runs[0], exp.name)


def _ref_for_run(label: str, uri: str, run, experiment_name: str) -> SweepRef:
    """The :class:`SweepRef` of a sweep's parent run found by experiment name (its state file, when
    its sweep directory is still there and names this run, gives the config)."""
    text = label
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
    return SweepRef(text, uri, run.info.run_id, experiment_name, exp_loc, config, *_objectives_of(config, run, text))


def resolve_sweeps(source: str | Path, tracking_uri: str | None = None, latest: bool = False) -> list[SweepRef]:
    """Like :func:`resolve_sweep`, but an experiment name means every sweep of the experiment, oldest
    first (labelled ``NAME@<sweep run name>`` when there are several); ``latest``: only its latest."""
    ref = resolve_sweep(source, tracking_uri)  # checks the argument, and is the answer for a directory
    text = str(source)
    if latest or storage.is_uri(text) or Path(text).expanduser().is_dir():  # a sweep directory is one sweep
        return [ref]
    client = ref.client()
    exp = client.get_experiment_by_name(ref.experiment_name)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = 'true'",
                              order_by=["attributes.start_time ASC"], max_results=10000)
    if len(runs) <= 1:
        return [ref]
    return [_ref_for_run(f"{ref.label}@{r.info.run_name or r.info.run_id[:8]}", ref.tracking_uri, r, exp.name)
            for r in runs]


def _objectives_of(config: dict[str, Any] | None, parent_run, source: str) -> tuple[str | None, tuple[str, ...]]:
    """(shorthand or None, objectives) of a sweep: its saved config's ``objectives``, else its
    ``objective`` shorthand, else the parent run's params of those names (every config field is
    one), else ``[accuracy, macs]`` (sweeps from before both fields)."""
    params = parent_run.data.params
    names = (config or {}).get("objectives") or _obj.parse_names(params.get("objectives"))
    if not names:
        value = (config or {}).get("objective") or params.get("objective") or "macs"
        if value not in _obj.SHORTHANDS:
            raise ConfigError(f"sweep {source!r}: unknown objective {value!r} "
                              f"(expected one of {', '.join(_obj.SHORTHANDS)})")
        names = _obj.SHORTHANDS[value]
    try:
        names = _obj.check_names(list(names))
    except ConfigError as exc:
        raise ConfigError(f"sweep {source!r}: {exc}") from None
    return next((k for k, v in _obj.SHORTHANDS.items() if v == names), None), names


def dense_macs(client: MlflowClient, parent_run_id: str) -> float:
    """The dense model's MACs as the sweep's trials recorded them (NaN if none did)."""
    return dense_values(client, parent_run_id)["dense_macs"]


def dense_values(client: MlflowClient, parent_run_id: str) -> dict[str, float]:
    """The dense model's values the references use (``dense_macs``, ``dense_params``): as the
    parent run recorded them with the front, else as the trials did (NaN if none did)."""
    parent = client.get_run(parent_run_id).data.metrics
    runs = None
    out = {}
    for key in sorted({o.dense_metric for o in _obj.OBJECTIVES.values() if o.dense_metric}):
        if math.isfinite(parent.get(key, math.nan)):
            out[key] = parent[key]
            continue
        runs = runs if runs is not None else child_runs(client, parent_run_id)
        values = [r.data.metrics[key] for r in runs if math.isfinite(r.data.metrics.get(key, math.nan))]
        out[key] = max(values) if values else math.nan
    return out


# ---- collecting and comparing -------------------------------------------------------------------------------
def _unique_labels(refs: Sequence[SweepRef]) -> list[str]:
    labels = [r.label for r in refs]
    return [f"{lab}@{r.parent_run_id[:8]}" if labels.count(lab) > 1 else lab for lab, r in zip(labels, refs)]


def collect_fronts(sources: Sequence[str | Path], by_method: bool = False, tracking_uri: str | None = None,
                   latest: bool = False) -> tuple[list[FrontSeries], tuple[float, ...]]:
    """Series (one per sweep, or per method) and the common hypervolume reference they were scored on.
    An experiment name stands for all its sweeps (``latest``: its latest one only)."""
    if not sources:
        raise ConfigError("fronts: give at least one experiment (a sweep directory or an MLflow experiment name)")
    refs = [ref for s in sources for ref in resolve_sweeps(s, tracking_uri, latest)]
    objectives = {r.objectives for r in refs}
    if len(objectives) > 1:
        which = ", ".join(f"{lab}: {'/'.join(r.objectives)}" for lab, r in zip(_unique_labels(refs), refs))
        raise ConfigError(f"fronts: the sweeps searched different objectives ({which}); compare sweeps of one objective")
    names = objectives.pop()
    shorthand = refs[0].objective
    split = by_method or len(refs) == 1
    raw: list[tuple[str, str, list[TrialPoint], SweepRef, str | None]] = []
    dense: list[dict[str, float]] = []
    for ref, label in zip(refs, _unique_labels(refs)):
        client = ref.client()
        points = sweep_points(client, ref.parent_run_id, names, feasible_only=True)
        if not points:
            log.warning("sweep %s (run %s) has no finished trial with %s", label, ref.parent_run_id,
                        " and ".join(_obj.get(n).label for n in names))
        dense.append(dense_values(client, ref.parent_run_id))
        if split:
            for method in sorted({p.method for p in points}):
                name = method if len(refs) == 1 else f"{label}/{method}"
                raw.append((name, label, [p for p in points if p.method == method], ref, method))
        else:
            raw.append((label, label, points, ref, None))
    largest = {}
    for key in {k for d in dense for k in d}:
        finite = [d[key] for d in dense if math.isfinite(d.get(key, math.nan))]
        if finite:
            largest[key] = max(finite)
    reference = reference_point(names, largest, [p for _, _, pts, *_ in raw for p in pts])
    series = [FrontSeries(name, sweep, pts, front_of(pts, names),
                          hypervolume([p.objectives for p in pts], reference, _obj.directions(names)) if pts else 0.0,
                          shorthand, names, ref.parent_run_id, ref.tracking_uri, method)
              for name, sweep, pts, ref, method in raw]
    return series, reference


def compare_fronts(sources: Sequence[str | Path], out: str | Path = "fronts.png", by_method: bool = False,
                   tracking_uri: str | None = None) -> dict[str, list[TrialPoint]]:
    """Plot the fronts of ``sources`` into ``out`` (PNG) and return each series' front (cheapest first)."""
    series, reference = collect_fronts(sources, by_method, tracking_uri)
    _plot(series, Path(out))
    for s in series:
        log.info("%s: %d trials, front of %d, hypervolume %.6g (reference %s)", s.label, len(s.points),
                 len(s.front), s.hypervolume, _describe_reference(s.objectives, reference))
    return {s.label: s.front for s in series}


def _plot(series: Sequence[FrontSeries], out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    names = series[0].objectives if series else None
    return plot_fronts({s.label: s.points for s in series}, out, highlight={s.label: s.front for s in series},
                       objective=names)


# ---- output ------------------------------------------------------------------------------------------------------
def _num(value: float, fmt: str) -> str:
    return format(value, fmt) if math.isfinite(value) else "nan"


def _describe_reference(names: Sequence[str], reference: Sequence[float]) -> str:
    """``accuracy 0, MACs 40,960``: each objective's label and reference coordinate."""
    return ", ".join(f"{_obj.get(n).label} {reference[i]:,.0f}" if n in ("macs", "params") else
                     f"{_obj.get(n).label} {reference[i]:g}" for i, n in enumerate(names))


def _columns(names: Sequence[str]) -> list[tuple[str, str, int, str]]:
    """(header, TrialPoint attribute, width, format) of the table: the objectives in order, then
    the pruned and dense latencies when the latency ratio is searched, then MACs, params and the
    test accuracy where not already shown."""
    cols = [(_obj.get(n).label, _obj.get(n).metric, 9 if n == "accuracy" else 13, _obj.get(n).fmt) for n in names]
    if "latency_ratio" in names:
        cols += [("latency ms", "latency_ms", 11, ".3f"), ("dense ms", "dense_latency_ms", 11, ".3f")]
    if "macs" not in names:
        cols.append(("MACs", "macs", 13, ",.0f"))
    if "params" not in names:
        cols.append(("params", "params", 11, ",.0f"))
    return cols + [("test acc", "test_accuracy", 9, ".4f")]


def format_table(series: Sequence[FrontSeries], reference: Sequence[float]) -> str:
    """The fronts as a fixed-width table (one row per front point, cheapest first; the run id is the
    last column), then each series' hypervolume. After label and method come the searched
    objectives in the sweep's order (``accuracy`` then ``MACs``, or ``latency_ratio`` followed by the
    pruned and dense latencies in ms), then MACs, params and the test accuracy where not shown yet."""
    names = series[0].objectives if series else _obj.DEFAULT
    cols = _columns(names)
    width = max([len("label")] + [len(s.label) for s in series])
    lines = [f"{'label':<{width}}  {'method':<10} " + " ".join(f"{h:>{w}}" for h, _, w, _ in cols) + "  run id"]
    for s in series:
        for p in s.front:
            cells = " ".join(f"{_num(getattr(p, attr), fmt):>{w}}" for _, attr, w, fmt in cols)
            lines.append(f"{s.label:<{width}}  {p.method:<10} {cells}  {p.run_id}")
    lines.append("")
    lines.append(f"hypervolume (reference: {_describe_reference(names, reference)}):")
    for s in series:
        lines.append(f"{s.label:<{width}}  {s.hypervolume:.6g}  "
                     f"({len(s.front)} on the front of {len(s.points)} trials)")
    return "\n".join(lines) + "\n"


def _cmd_fronts(args, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    from .comparison_run import log_comparison
    from .ui_links import ui_command

    series, reference = collect_fronts(args.experiments, args.by_method, args.tracking_uri, args.latest)
    png = _plot(series, Path(args.out))
    out.write(format_table(series, reference))
    out.write(f"\nplot: {png}\n")
    if series and series[0].objective is None:  # the recorded overlay draws accuracy against one cost
        return 0
    recorded = log_comparison(series, reference, png)
    if recorded:
        command = ui_command(recorded.tracking_uri)
        out.write(f"MLflow run: {recorded.run_id}{f' (serve the UI: {command})' if command else ''}\n"
                  f"  {recorded.url}\n  overlay (interactive): {recorded.html_url}\n")
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
    p.add_argument("--latest", action="store_true",
                   help="an experiment name means its latest sweep only (default: every sweep of it, one series each)")
    p.add_argument("--tracking-uri", default=None, metavar="URI",
                   help=f"MLflow tracking URI for experiment names (default: {DEFAULT_TRACKING_URI}); "
                        "a sweep directory names its own")
    p.set_defaults(func=_cmd_fronts)
    return p
