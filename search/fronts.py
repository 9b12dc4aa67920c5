"""Accuracy-versus-MACs fronts from MLflow records: collect a sweep's finished trials, tag the
non-dominated ones ``pareto=true``, and write the front as a table (CSV) and a plot (PNG)."""
from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from mlflow.tracking import MlflowClient

from .pareto import front, hypervolume
from .tracking import child_runs

__all__ = ["TrialPoint", "sweep_points", "record_front", "write_csv", "plot_fronts", "DIRECTIONS"]

log = logging.getLogger(__name__)
DIRECTIONS = ("max", "min")


@dataclass(frozen=True)
class TrialPoint:
    run_id: str
    method: str
    accuracy: float
    macs: float
    params: float
    test_accuracy: float
    latency_ms: float

    @property
    def objectives(self) -> tuple[float, float]:
        return (self.accuracy, self.macs)


def sweep_points(client: MlflowClient, parent_run_id: str) -> list[TrialPoint]:
    """Every FINISHED trial of the sweep that reported both objectives."""
    points = []
    for run in child_runs(client, parent_run_id):
        m = run.data.metrics
        if run.info.status != "FINISHED" or "accuracy" not in m or "macs" not in m:
            continue
        points.append(TrialPoint(run.info.run_id, run.data.tags.get("method", run.data.params.get("method", "?")),
                                 m["accuracy"], m["macs"], m.get("params", math.nan), m.get("test_accuracy", math.nan),
                                 m.get("latency_ms", math.nan)))
    return sorted(points, key=lambda p: p.macs)


def record_front(client: MlflowClient, parent_run_id: str, out_dir: Path, dense_macs: float | None = None) -> dict:
    """Tag the front, log its CSV, PNG and hypervolume to the parent run; return a summary."""
    points = sweep_points(client, parent_run_id)
    on_front = set(front([p.objectives for p in points], DIRECTIONS)) if points else set()
    for i, p in enumerate(points):
        client.set_tag(p.run_id, "pareto", "true" if i in on_front else "false")
    best = [points[i] for i in sorted(on_front, key=lambda i: points[i].macs)]
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = write_csv(best, out_dir / "pareto_front.csv")
    png_path = plot_fronts({"all trials": points}, out_dir / "pareto_front.png", highlight={"all trials": best})
    client.log_artifact(parent_run_id, str(csv_path))
    client.log_artifact(parent_run_id, str(png_path))
    summary = {"trials": len(points), "front_size": len(best), "hypervolume": math.nan}
    if points:
        # A fixed reference makes sweeps of the same model comparable: zero accuracy, dense MACs.
        ref = (0.0, dense_macs if dense_macs else 1.1 * max(p.macs for p in points))
        summary["hypervolume"] = hypervolume([p.objectives for p in points], ref, DIRECTIONS)
        client.log_metric(parent_run_id, "hypervolume", summary["hypervolume"])
        client.log_metric(parent_run_id, "front_size", len(best))
    summary["front"] = best
    return summary


def write_csv(points: Sequence[TrialPoint], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run_id", "method", "accuracy", "macs", "params", "test_accuracy", "latency_ms"])
        for p in points:
            writer.writerow([p.run_id, p.method, p.accuracy, int(p.macs), int(p.params) if math.isfinite(p.params) else "",
                             p.test_accuracy, p.latency_ms])
    return path


def plot_fronts(series: dict[str, Sequence[TrialPoint]], path: Path,
                highlight: dict[str, Sequence[TrialPoint]] | None = None) -> Path:
    """Scatter every series (MACs on x, accuracy on y) and draw each one's front as a step line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, pts in series.items():
        if not pts:
            continue
        sc = ax.scatter([p.macs / 1e6 for p in pts], [p.accuracy for p in pts], s=18, alpha=0.5, label=label)
        best = (highlight or {}).get(label)
        if best is None:
            idx = front([p.objectives for p in pts], DIRECTIONS)
            best = sorted((pts[i] for i in idx), key=lambda p: p.macs)
        if best:
            ax.step([p.macs / 1e6 for p in best], [p.accuracy for p in best], where="post",
                    color=sc.get_facecolor()[0][:3], linewidth=1.8, label=f"{label} front")
    ax.set_xlabel("MACs (millions, batch 1)")
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
