"""Accuracy-versus-cost fronts from MLflow records: collect a sweep's finished trials, tag the
non-dominated ones ``pareto=true``, and write the front as a table (CSV), a plot (PNG) and an
interactive page (HTML, ``search.front_html``) that MLflow shows inline.

The cost is the sweep's ``objective`` (its config; ``macs`` for sweeps older than the field): MACs,
or ``latency_ratio`` (the pruned model's latency over the dense model's, timed interleaved on the
trial's device). Hypervolumes use a fixed reference: zero accuracy and the dense model's cost (its
MACs, or a latency ratio of 1).
"""
from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from mlflow.tracking import MlflowClient

from .config import COST_METRICS, check_objective
from .pareto import front, hypervolume
from .tracking import child_runs

__all__ = ["TrialPoint", "sweep_points", "record_front", "write_csv", "plot_fronts", "DIRECTIONS",
           "reference_point", "cost_label", "COST_AXIS"]

log = logging.getLogger(__name__)
DIRECTIONS = ("max", "min")
#: The plot's x axis for each objective.
COST_AXIS = {"macs": "MACs (millions, batch 1)",
             "latency": "latency / dense latency (latency_ratio, on the trial's device)"}


def cost_label(objective: str) -> str:
    """The cost's name in tables and messages: ``MACs`` or ``latency_ratio``."""
    return "MACs" if objective == "macs" else COST_METRICS[objective]


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
    objective: str = "macs"  # which of macs / latency_ratio is the searched cost

    @property
    def cost(self) -> float:
        """The searched cost: ``macs`` or ``latency_ratio``."""
        return self.macs if self.objective == "macs" else self.latency_ratio

    @property
    def objectives(self) -> tuple[float, float]:
        return (self.accuracy, self.cost)


def sweep_points(client: MlflowClient, parent_run_id: str, objective: str = "macs") -> list[TrialPoint]:
    """Every FINISHED trial of the sweep that reported both objectives (and its MACs), cheapest first."""
    cost_key = COST_METRICS[check_objective(objective)]
    points = []
    for run in child_runs(client, parent_run_id):
        m = run.data.metrics
        if run.info.status != "FINISHED" or "accuracy" not in m or "macs" not in m or cost_key not in m:
            continue
        points.append(TrialPoint(run.info.run_id, run.data.tags.get("method", run.data.params.get("method", "?")),
                                 m["accuracy"], m["macs"], m.get("params", math.nan), m.get("test_accuracy", math.nan),
                                 m.get("latency_ms", math.nan), m.get("dense_latency_ms", math.nan),
                                 m.get("latency_ratio", math.nan), objective))
    return sorted(points, key=lambda p: p.cost)


def reference_point(objective: str, dense_macs: float | None = None,
                    points: Sequence[TrialPoint] = ()) -> tuple[float, float]:
    """The hypervolume reference: zero accuracy and the dense model's cost. For ``macs`` that is
    ``dense_macs`` (else 1.1 x the largest MACs of ``points``, else 1); for ``latency``, a latency
    ratio of 1 (the dense model's own)."""
    if check_objective(objective) == "latency":
        return (0.0, 1.0)
    if dense_macs and math.isfinite(dense_macs):
        return (0.0, float(dense_macs))
    finite = [p.macs for p in points if math.isfinite(p.macs)]
    return (0.0, 1.1 * max(finite) if finite else 1.0)


def record_front(client: MlflowClient, parent_run_id: str, out_dir: Path, dense_macs: float | None = None,
                 objective: str = "macs") -> dict:
    """Tag the front of (accuracy, the ``objective``'s cost), log its CSV, PNG and hypervolume to the
    parent run; return a summary."""
    points = sweep_points(client, parent_run_id, objective)
    on_front = set(front([p.objectives for p in points], DIRECTIONS)) if points else set()
    for i, p in enumerate(points):
        client.set_tag(p.run_id, "pareto", "true" if i in on_front else "false")
    best = [points[i] for i in sorted(on_front, key=lambda i: (points[i].cost, -points[i].accuracy))]
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = write_csv(best, out_dir / "pareto_front.csv")
    png_path = plot_fronts({"all trials": points}, out_dir / "pareto_front.png", highlight={"all trials": best},
                           objective=objective)
    client.log_artifact(parent_run_id, str(csv_path))
    client.log_artifact(parent_run_id, str(png_path))
    try:  # the interactive front: a plotting problem must not lose the sweep's records
        from .front_html import HTML_NAME, sweep_figure, write_html

        fig = sweep_figure(client, parent_run_id, objective, dense_macs, [p.run_id for p in best])
        client.log_artifact(parent_run_id, str(write_html(fig, out_dir / HTML_NAME)))
    except Exception as exc:  # noqa: BLE001
        log.warning("could not write the interactive front of sweep run %s: %s", parent_run_id, exc)
    summary = {"trials": len(points), "front_size": len(best), "hypervolume": math.nan, "objective": objective}
    if points:
        # A fixed reference makes sweeps of the same model comparable: zero accuracy, the dense cost.
        ref = reference_point(objective, dense_macs, points)
        summary["hypervolume"] = hypervolume([p.objectives for p in points], ref, DIRECTIONS)
        summary["reference"] = ref
        client.log_metric(parent_run_id, "hypervolume", summary["hypervolume"])
        client.log_metric(parent_run_id, "front_size", len(best))
    summary["front"] = best
    return summary


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
                highlight: dict[str, Sequence[TrialPoint]] | None = None, objective: str | None = None) -> Path:
    """Scatter every series (the cost on x, accuracy on y) and draw each one's front as a step line.

    ``objective`` defaults to that of the points (``macs`` when there are none)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if objective is None:
        objective = next((p.objective for pts in series.values() for p in pts), "macs")
    check_objective(objective)
    scale = 1e-6 if objective == "macs" else 1.0

    def x(p: TrialPoint) -> float:
        return (p.macs if objective == "macs" else p.latency_ratio) * scale

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, pts in series.items():
        if not pts:
            continue
        sc = ax.scatter([x(p) for p in pts], [p.accuracy for p in pts], s=18, alpha=0.5, label=label)
        best = (highlight or {}).get(label)
        if best is None:
            idx = front([p.objectives for p in pts], DIRECTIONS)
            best = sorted((pts[i] for i in idx), key=lambda p: p.cost)
        if best:
            ax.step([x(p) for p in best], [p.accuracy for p in best], where="post",
                    color=sc.get_facecolor()[0][:3], linewidth=1.8, label=f"{label} front")
    if objective == "latency":
        ax.axvline(1.0, color="0.5", linestyle=":", linewidth=1, label="dense model")
    ax.set_xlabel(COST_AXIS[objective])
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # a sweep with no finished trial plots nothing to label
        ax.legend(fontsize=8)
    fig.tight_layout()
    # The axes in the PNG's own text chunks too, so a reader (or a test) can tell which cost it shows.
    fig.savefig(path, dpi=120, metadata={"Title": f"validation accuracy vs {cost_label(objective)}",
                                         "Description": f"x: {COST_AXIS[objective]}; y: validation accuracy"})
    plt.close(fig)
    return path
