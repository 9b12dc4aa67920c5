"""Fronts from MLflow records: collect a sweep's finished trials, tag the non-dominated ones
``pareto=true``, and write the front as a table (CSV), a plot (PNG) and, for the two-objective
sweeps, an interactive page (HTML, ``search.front_html``) that MLflow shows inline.

The objectives are the sweep's (``objectives`` in its config, see ``search.objectives``; the
``objective`` shorthand, or ``[accuracy, macs]`` for sweeps older than both): two or three of
accuracy, MACs, params and ``latency_ratio``. Hypervolumes use a fixed reference from the objective
table: zero accuracy, the dense model's MACs and params, a latency ratio of 1.

Only trials that ran to their end count (their final result carries ``test_accuracy``): a trial
stopped early by the scheduler, or one outside the sweep's constraints (tagged
``prunetune.feasible=false``), is never on the front.
"""
from __future__ import annotations

import csv
import itertools
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from mlflow.tracking import MlflowClient

from methods.errors import ArgumentError

from . import objectives as _obj
from .pareto import front, hypervolume
from .tracking import FEASIBLE_TAG, VIOLATED_TAG, child_runs

__all__ = ["TrialPoint", "sweep_points", "record_front", "write_csv", "plot_fronts", "DIRECTIONS",
           "reference_point", "cost_label", "COST_AXIS", "objective_names", "FEASIBLE_TAG"]

log = logging.getLogger(__name__)
#: The default objectives' directions (accuracy, MACs).
DIRECTIONS = _obj.directions(_obj.DEFAULT)
#: The plot's axis of each ``objective`` shorthand's cost.
COST_AXIS = {k: _obj.get(v[1]).axis for k, v in _obj.SHORTHANDS.items()}
#: Set to "false" on a trial run outside the sweep's constraints (see ``search.constraints``).


def objective_names(objectives: str | Sequence[str] | None) -> tuple[str, ...]:
    """An ``objective`` shorthand (``macs``, ``latency``), an objectives list or None -> the list."""
    if objectives is None:
        return _obj.DEFAULT
    if isinstance(objectives, str):
        if objectives not in _obj.SHORTHANDS:
            raise ArgumentError(f"unknown objective {objectives!r}; expected one of {', '.join(_obj.SHORTHANDS)}")
        return _obj.SHORTHANDS[objectives]
    return _obj.check_names(list(objectives))


def cost_label(objective: str | Sequence[str]) -> str:
    """The searched costs' names in tables and messages: ``MACs``, ``latency_ratio``, ``MACs and params``."""
    return " and ".join(_obj.get(n).label for n in objective_names(objective) if n != "accuracy")


@dataclass(frozen=True)
class TrialPoint:
    run_id: str
    method: str
    accuracy: float
    macs: float
    params: float
    test_accuracy: float
    latency_ms: float
    dense_latency_ms: float = math.nan
    latency_ratio: float = math.nan
    names: tuple[str, ...] = _obj.DEFAULT  # the sweep's objectives

    def value(self, name: str) -> float:
        return float(getattr(self, _obj.get(name).metric))

    @property
    def objectives(self) -> tuple[float, ...]:
        """The point in objective space (in the order of ``names``)."""
        return tuple(self.value(n) for n in self.names)

    @property
    def cost(self) -> float:
        """The first searched cost (the first objective that is not accuracy): the sort key."""
        return self.value(next(n for n in self.names if n != "accuracy")) if any(
            n != "accuracy" for n in self.names) else self.macs

    @property
    def objective(self) -> str | None:
        """The ``objective`` shorthand of ``names`` (None for other lists)."""
        return next((k for k, v in _obj.SHORTHANDS.items() if v == self.names), None)


def sweep_points(client: MlflowClient, parent_run_id: str, objective: str | Sequence[str] = "macs",
                 feasible_only: bool = False, runs: Sequence | None = None) -> list[TrialPoint]:
    """Every FINISHED trial of the sweep that ran to its end (its final result logged
    ``test_accuracy``) and reported every objective and its MACs, cheapest first. With
    ``feasible_only`` the trials tagged outside the constraints are left out. ``runs``: the sweep's
    child runs when the caller has read them already (else they are read here)."""
    names = objective_names(objective)
    needed = {"accuracy", "macs", "test_accuracy", *_obj.metrics(names)}
    points = []
    for run in runs if runs is not None else child_runs(client, parent_run_id):
        m = run.data.metrics
        if run.info.status != "FINISHED" or not needed <= set(m):
            continue
        if feasible_only and run.data.tags.get(FEASIBLE_TAG) == "false":
            continue
        points.append(TrialPoint(run.info.run_id, run.data.tags.get("method", run.data.params.get("method", "?")),
                                 m["accuracy"], m["macs"], m.get("params", math.nan), m.get("test_accuracy", math.nan),
                                 m.get("latency_ms", math.nan), m.get("dense_latency_ms", math.nan),
                                 m.get("latency_ratio", math.nan), names))
    return sorted(points, key=lambda p: p.cost)


def reference_point(objective: str | Sequence[str], dense_macs: float | Mapping[str, float] | None = None,
                    points: Sequence[TrialPoint] = ()) -> tuple[float, ...]:
    """The hypervolume reference from the objective table: zero accuracy, the dense model's MACs
    (``dense_macs``: a number, or a mapping with ``dense_macs`` / ``dense_params``) and params (else
    1.1 x the largest value of ``points``, else 1), a latency ratio of 1."""
    names = objective_names(objective)
    dense = dense_macs if isinstance(dense_macs, Mapping) else (
        {"dense_macs": dense_macs} if dense_macs is not None else {})
    return _obj.reference(names, dense, [p.objectives for p in points if len(p.names) == len(names)])


def front_of(points: Sequence[TrialPoint], names: Sequence[str]) -> list[TrialPoint]:
    """The non-dominated points, cheapest first (ties: most accurate first)."""
    idx = front([p.objectives for p in points], _obj.directions(names)) if points else []
    return sorted((points[i] for i in idx), key=lambda p: (p.cost, -p.accuracy))


def record_front(client: MlflowClient, parent_run_id: str, out_dir: Path,
                 dense_macs: float | Mapping[str, float] | None = None, objective: str | Sequence[str] = "macs",
                 constraints=None, runs: Sequence | None = None) -> dict:
    """Tag the front of the sweep's objectives (feasible trials only), log its CSV, PNG and
    hypervolume to the parent run; return a summary. With ``constraints`` (a
    ``search.constraints.ConstraintsConfig``) every finished trial is first tagged ``FEASIBLE_TAG``.
    The child runs are read once (or ``runs``, read by the caller, are used)."""
    names = objective_names(objective)
    runs = list(runs) if runs is not None else child_runs(client, parent_run_id)
    points = sweep_points(client, parent_run_id, names, runs=runs)
    if constraints is not None and constraints.active:
        _tag_feasibility(client, runs, constraints)
    feasible = {p.run_id for p in sweep_points(client, parent_run_id, names, feasible_only=True, runs=runs)}
    candidates = [p for p in points if p.run_id in feasible]
    best = front_of(candidates, names)
    on_front = {p.run_id for p in best}
    for p in points:
        client.set_tag(p.run_id, "pareto", "true" if p.run_id in on_front else "false")
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = write_csv(best, out_dir / "pareto_front.csv")
    png_path = plot_fronts({"all trials": points}, out_dir / "pareto_front.png", highlight={"all trials": best},
                           objective=names)
    client.log_artifact(parent_run_id, str(csv_path))
    client.log_artifact(parent_run_id, str(png_path))
    shorthand = next((k for k, v in _obj.SHORTHANDS.items() if v == names), None)
    if shorthand is not None:  # the interactive front draws accuracy against one cost
        try:  # a plotting problem must not lose the sweep's records
            from .front_html import HTML_NAME, sweep_figure, write_html

            dense_value = dense_macs.get("dense_macs") if isinstance(dense_macs, Mapping) else dense_macs
            fig = sweep_figure(client, parent_run_id, shorthand, dense_value, [p.run_id for p in best], runs)
            client.log_artifact(parent_run_id, str(write_html(fig, out_dir / HTML_NAME)))
        except Exception as exc:  # noqa: BLE001
            log.warning("could not write the interactive front of sweep run %s: %s", parent_run_id, exc)
    summary = {"trials": len(points), "front_size": len(best), "hypervolume": math.nan,
               "objective": shorthand, "objectives": names, "infeasible": len(points) - len(candidates)}
    if isinstance(dense_macs, Mapping):
        for key, value in dense_macs.items():
            if value is not None and math.isfinite(value):
                client.log_metric(parent_run_id, key, float(value))
    if candidates:
        # A fixed reference makes sweeps of the same model comparable: zero accuracy, the dense cost.
        ref = reference_point(names, dense_macs, candidates)
        summary["hypervolume"] = hypervolume([p.objectives for p in candidates], ref, _obj.directions(names))
        summary["reference"] = ref
        client.log_metric(parent_run_id, "hypervolume", summary["hypervolume"])
        client.log_metric(parent_run_id, "front_size", len(best))
    summary["front"] = best
    return summary


def _tag_feasibility(client: MlflowClient, runs: Sequence, constraints) -> None:
    """Tag every finished trial in MLflow and in ``runs`` (the caller's copies) alike."""
    from .constraints import constraint_values, feasible

    for run in runs:
        if run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics:
            ok = feasible(constraints, run.data.metrics)
            tags = {FEASIBLE_TAG: "true" if ok else "false"}
            if not ok:
                values = constraint_values(constraints, run.data.metrics)
                tags[VIOLATED_TAG] = ", ".join(name for name, v in zip(constraints.active, values) if v > 1e-12)
            for key, value in tags.items():
                client.set_tag(run.info.run_id, key, value)
                run.data.tags[key] = value


CSV_COLUMNS = ["run_id", "method", "accuracy", "macs", "params", "test_accuracy", "latency_ms", "dense_latency_ms",
               "latency_ratio"]


def write_csv(points: Sequence[TrialPoint], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for p in points:
            writer.writerow([p.run_id, p.method, p.accuracy, int(p.macs), int(p.params) if math.isfinite(p.params) else "",
                             p.test_accuracy, p.latency_ms, p.dense_latency_ms, p.latency_ratio])
    return path


def plot_fronts(series: dict[str, Sequence[TrialPoint]], path: Path,
                highlight: dict[str, Sequence[TrialPoint]] | None = None,
                objective: str | Sequence[str] | None = None) -> Path:
    """Scatter every series in each pair of objectives (one panel for two objectives, three for
    three: x the later objective, y the earlier, so accuracy against the cost) and mark each
    series' front: a step line with two objectives, ringed points with three.

    ``objective`` defaults to that of the points (``[accuracy, macs]`` when there are none)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if objective is None:
        objective = next((p.names for pts in series.values() for p in pts), _obj.DEFAULT)
    names = objective_names(objective)
    pairs = list(itertools.combinations(names, 2))
    fig, axes = plt.subplots(1, len(pairs), figsize=(7 if len(pairs) == 1 else 5 * len(pairs), 4.5), squeeze=False)
    fronts = {}
    for label, pts in series.items():
        best = (highlight or {}).get(label)
        fronts[label] = list(best) if best is not None else front_of(list(pts), names)
    for ax, (ny, nx) in zip(axes[0], pairs):
        oy, ox = _obj.get(ny), _obj.get(nx)
        for label, pts in series.items():
            if not pts:
                continue
            sc = ax.scatter([p.value(nx) * ox.scale for p in pts], [p.value(ny) * oy.scale for p in pts], s=18,
                            alpha=0.5, label=label)
            best = sorted(fronts[label], key=lambda p: p.value(nx))
            if best and len(names) == 2:
                ax.step([p.value(nx) * ox.scale for p in best], [p.value(ny) * oy.scale for p in best], where="post",
                        color=sc.get_facecolor()[0][:3], linewidth=1.8, label=f"{label} front")
            elif best:
                ax.scatter([p.value(nx) * ox.scale for p in best], [p.value(ny) * oy.scale for p in best], s=60,
                           facecolors="none", edgecolors=[sc.get_facecolor()[0][:3]], linewidths=1.5,
                           label=f"{label} front")
        if nx == "latency_ratio":
            ax.axvline(1.0, color="0.5", linestyle=":", linewidth=1, label="dense model")
        ax.set_xlabel(ox.axis)
        ax.set_ylabel(oy.axis)
        ax.grid(alpha=0.3)
    if axes[0][0].get_legend_handles_labels()[0]:  # a sweep with no finished trial plots nothing to label
        axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    # The axes in the PNG's own text chunks too, so a reader (or a test) can tell which objectives it shows.
    title = "; ".join(f"{_obj.get(a).axis} vs {_obj.get(b).label}" for a, b in pairs)
    describe = "; ".join(f"x: {_obj.get(b).axis}, y: {_obj.get(a).axis}" for a, b in pairs)
    fig.savefig(path, dpi=120, metadata={"Title": title, "Description": describe})
    plt.close(fig)
    return path
