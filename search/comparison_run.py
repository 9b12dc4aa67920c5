"""``prunetune fronts`` recorded in MLflow: the overlay of the compared series as a run of the first
sweep's experiment (named ``fronts-<time>``, tagged ``prunetune.fronts=true`` and with the compared
sweep runs), holding the interactive overlay (HTML), the PNG and a CSV of every series' front with its
hypervolume on the one common reference; each hypervolume is also a metric of the run. Only the PNG
stays on the local disk (``--out``).
"""
from __future__ import annotations

import csv
import logging
import math
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from mlflow.entities import Metric, RunTag

from .front_html import SeriesSpec, TrialRecord, figure, sweep_trials, write_html
from .store import open_client
from .ui_links import artifact_url, run_url

__all__ = ["ComparisonRun", "overlay_figure", "write_front_table", "log_comparison", "FRONTS_TAG"]

log = logging.getLogger(__name__)
FRONTS_TAG = "prunetune.fronts"
TABLE_COLUMNS = ["series", "sweep", "sweep_run_id", "method", "run_id", "accuracy", "macs", "latency_ratio", "params",
                 "test_accuracy", "hypervolume", "trials", "front_size", "reference_accuracy", "reference_cost",
                 "objective"]


@dataclass(frozen=True)
class ComparisonRun:
    run_id: str
    experiment_id: str
    tracking_uri: str
    url: str            # the run's page
    html_url: str       # its interactive overlay


def _series_records(series, cache: dict[str, list[TrialRecord]]) -> list[TrialRecord]:
    """The trials of one series: its points, and its sweep's failed / stopped / infeasible trials
    (of its method, for a by-method series)."""
    if series.parent_run_id not in cache:
        cache[series.parent_run_id] = sweep_trials(open_client(series.tracking_uri, create=False), series.parent_run_id,
                                                   series.objective)
    ids = {p.run_id for p in series.points}
    return [r for r in cache[series.parent_run_id]
            if r.run_id in ids or (r.status != "finished" and series.method in (None, r.method))]


def overlay_figure(series: Sequence, reference: tuple[float, float]) -> dict:
    """The overlay of ``series`` (``search.compare.FrontSeries``): one colour per series, each front
    a step line; the title names the common hypervolume reference."""
    cache: dict[str, list[TrialRecord]] = {}
    objective = series[0].objective if series else "macs"
    specs = [SeriesSpec(s.label, _series_records(s, cache), [p.run_id for p in s.front], by_method=False)
             for s in series]
    ref_cost = f"{reference[1]:,.0f} MACs" if objective == "macs" else f"latency ratio {reference[1]:g}"
    hv = " · ".join(f"{s.label} {s.hypervolume:.4g}" for s in series)
    cost = "MACs" if objective == "macs" else "latency ratio"
    return figure(specs, objective, f"fronts compared: validation accuracy vs {cost}<br><sup>hypervolume "
                                    f"(reference: accuracy {reference[0]:g}, {ref_cost}): {hv}</sup>")


def write_front_table(series: Sequence, reference: tuple[float, float], path: Path) -> Path:
    """One row per front point of each series (a series with an empty front: one row without a
    point), with the series' hypervolume on the common reference."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(TABLE_COLUMNS)
        for s in series:
            common = [s.hypervolume, len(s.points), len(s.front), reference[0], reference[1], s.objective]
            for p in s.front or [None]:
                cells = ([p.method, p.run_id, p.accuracy, p.macs, p.latency_ratio, p.params, p.test_accuracy]
                         if p else [s.method or "", "", "", "", "", "", ""])
                writer.writerow([s.label, s.sweep, s.parent_run_id, *cells, *common])
    return path


def _metric_key(label: str) -> str:
    return "hypervolume/" + re.sub(r"[^A-Za-z0-9_\-. /]", "_", label)


def log_comparison(series: Sequence, reference: tuple[float, float], png: Path) -> ComparisonRun | None:
    """Log ``png`` with the overlay's HTML and CSV (named after it, written to a temporary folder: only
    the PNG is left on disk) as a new run; None without series."""
    if not series:
        log.warning("fronts: nothing to record in MLflow (no series)")
        return None
    with tempfile.TemporaryDirectory(prefix="prunetune-fronts-") as tmp:
        html = write_html(overlay_figure(series, reference), Path(tmp) / f"{png.stem}.html")
        table = write_front_table(series, reference, Path(tmp) / f"{png.stem}.csv")
        return _log_run(series, (html, png, table))


def _log_run(series: Sequence, paths: Sequence[Path]) -> ComparisonRun:
    first = series[0]
    client = open_client(first.tracking_uri, create=False)
    exp_id = client.get_run(first.parent_run_id).info.experiment_id
    html = paths[0]
    sweeps = ",".join(dict.fromkeys(s.parent_run_id for s in series))
    run = client.create_run(exp_id, run_name=f"fronts-{time.strftime('%Y%m%d-%H%M%S')}",
                            tags={FRONTS_TAG: "true", "prunetune.fronts.sweep_runs": sweeps[:5000]})
    run_id = run.info.run_id
    try:
        now = int(time.time() * 1000)
        metrics = [Metric(_metric_key(s.label), s.hypervolume, now, 0) for s in series if math.isfinite(s.hypervolume)]
        tags = [RunTag("prunetune.fronts.series", ", ".join(s.label for s in series)[:5000])]
        client.log_batch(run_id, metrics=metrics, tags=tags)
        for path in paths:
            client.log_artifact(run_id, str(path))
        client.set_terminated(run_id, status="FINISHED")
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    return ComparisonRun(run_id, exp_id, first.tracking_uri, run_url(first.tracking_uri, exp_id, run_id),
                         artifact_url(first.tracking_uri, exp_id, run_id, html.name))
