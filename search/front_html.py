"""The interactive front: a self-contained HTML page (plotly, its JavaScript embedded, no CDN) that
MLflow shows inline as an artifact.

Every trial of a sweep is a point, accuracy against the searched cost, coloured by method (or by
series, for an overlay of sweeps), with a hover naming its run, method, hyperparameters, accuracy,
test accuracy, MACs and latency ratio. Each series' front is a step line; the dense model is a star;
failed, stopped and infeasible trials are a separate grey trace; earlier sweeps of the experiment are
faded series. ``figure`` builds the plotly figure as plain data (tested without a browser);
``write_html`` renders it. Every trace carries ``meta`` = {"role", "series", "method", "faded"}, so a
reader (or a browser test) can tell the traces apart; every point's ``customdata`` is its run id.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from mlflow.tracking import MlflowClient

from .config import COST_METRICS, check_objective
from .tracking import FEASIBLE_TAG, SWEEP_TAG, VIOLATED_TAG, child_runs

__all__ = ["TrialRecord", "SeriesSpec", "sweep_trials", "figure", "write_html", "earlier_sweeps", "front_ids",
           "dense_point", "sweep_figure", "COLOURS", "HTML_NAME"]

log = logging.getLogger(__name__)
#: plotly's default qualitative palette: one colour per method (or per series of an overlay).
COLOURS = ("#636EFA", "#EF553B", "#00CC96", "#AB63FA", "#FFA15A", "#19D3F3", "#FF6692", "#B6E880", "#FF97FF",
           "#FECB52")
HTML_NAME = "pareto_front.html"
APART_COLOUR, FADED_COLOUR, DENSE_COLOUR = "#7f7f7f", "#9e9e9e", "#000000"
#: Run statuses that are not a finished trial, as the plot names them.
APART = {"FAILED": "failed", "KILLED": "stopped", "RUNNING": "stopped", "SCHEDULED": "stopped"}


@dataclass(frozen=True)
class TrialRecord:
    """One trial run as the plot shows it. ``status``: finished, failed, stopped or infeasible
    (finished without both objectives, its cut removed nothing, or outside the sweep's constraints)."""

    run_id: str
    run_name: str
    method: str
    status: str
    accuracy: float = math.nan
    test_accuracy: float = math.nan
    macs: float = math.nan
    latency_ratio: float = math.nan
    params: tuple[tuple[str, str], ...] = ()
    reason: str = ""

    def cost(self, objective: str) -> float:
        return self.macs if objective == "macs" else self.latency_ratio


@dataclass(frozen=True)
class SeriesSpec:
    """A sweep (or one method of it) to plot: its trials and its front's run ids (cheapest first)."""

    label: str
    trials: Sequence[TrialRecord]
    front: Sequence[str] = ()
    faded: bool = False           # an earlier sweep: one grey series, behind the others
    by_method: bool = True        # one colour per method (else one colour for the series)
    dense: tuple[float, float] | None = None  # (cost, accuracy) of the dense model, marked with a star


def _status(run, objective: str) -> tuple[str, str]:
    status = run.info.status
    if status != "FINISHED":
        return APART.get(status, status.lower()), run.data.tags.get("failure_reason", "").strip()[-300:]
    m = run.data.metrics
    cost = m.get(COST_METRICS[objective], math.nan)
    if not (math.isfinite(m.get("accuracy", math.nan)) and math.isfinite(cost)):
        return "infeasible", f"no {COST_METRICS[objective]} or accuracy recorded"
    if m.get("removed_nothing", 0.0) >= 1.0:
        return "infeasible", "the cut removed nothing (dense MACs)"
    if run.data.tags.get(FEASIBLE_TAG) == "false":
        return "infeasible", f"outside the sweep's constraints ({run.data.tags.get(VIOLATED_TAG, '?')})"
    return "finished", ""


def sweep_trials(client: MlflowClient, parent_run_id: str, objective: str = "macs",
                 runs: Sequence | None = None) -> list[TrialRecord]:
    """Every trial run of the sweep (any status), cheapest first, then by run name. ``runs``: its
    child runs, if the caller has read them already."""
    check_objective(objective)
    records = []
    for run in runs if runs is not None else child_runs(client, parent_run_id):
        m, tags = run.data.metrics, run.data.tags
        status, reason = _status(run, objective)
        params = tuple(sorted((k, v) for k, v in run.data.params.items() if k != "method"))
        records.append(TrialRecord(run.info.run_id, run.info.run_name or run.info.run_id[:8],
                                   tags.get("method", run.data.params.get("method", "?")), status,
                                   m.get("accuracy", math.nan), m.get("test_accuracy", math.nan), m.get("macs", math.nan),
                                   m.get("latency_ratio", math.nan), params, reason))
    inf = math.inf
    return sorted(records, key=lambda r: (r.cost(objective) if math.isfinite(r.cost(objective)) else inf, r.run_name))


def earlier_sweeps(client: MlflowClient, parent_run_id: str, objective: str) -> list[tuple[str, str]]:
    """(run id, run name) of the experiment's sweeps started before ``parent_run_id`` that searched the
    same objective, oldest first."""
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = 'true'",
                              order_by=["attributes.start_time ASC"], max_results=1000)
    return [(r.info.run_id, r.info.run_name or r.info.run_id[:8]) for r in runs
            if r.info.start_time < parent.info.start_time and r.info.run_id != parent_run_id
            and r.data.params.get("objective", "macs") == objective]


# ---- the figure ----------------------------------------------------------------------------------------------
def _num(value: float, fmt: str) -> str:
    return format(value, fmt) if math.isfinite(value) else "n/a"


def _hover(t: TrialRecord) -> str:
    hp = ", ".join(f"{k}={v}" for k, v in t.params) or "none"
    lines = [f"<b>{t.run_name}</b> ({t.status})", f"method: {t.method}", f"hyperparameters: {hp}",
             f"accuracy: {_num(t.accuracy, '.4f')}   test accuracy: {_num(t.test_accuracy, '.4f')}",
             f"MACs: {_num(t.macs, ',.0f')}   latency ratio: {_num(t.latency_ratio, '.3f')}",
             f"run id: {t.run_id}"]
    if t.reason:
        lines.append(f"reason: {t.reason.splitlines()[-1][:160]}")
    return "<br>".join(lines)


def _x(value: float, objective: str) -> float | None:
    if not math.isfinite(value):
        return None
    return value * 1e-6 if objective == "macs" else value


def _points_trace(trials: Sequence[TrialRecord], objective: str, name: str, meta: dict, **style) -> dict:
    return {"type": "scatter", "mode": "markers", "name": name, "meta": meta,
            "x": [_x(t.cost(objective), objective) for t in trials], "y": [t.accuracy for t in trials],
            "customdata": [t.run_id for t in trials], "hovertext": [_hover(t) for t in trials],
            "hoverinfo": "text", **style}


def _series_traces(s: SeriesSpec, objective: str, colour: str, method_colours: dict[str, str]) -> list[dict]:
    finished = [t for t in s.trials if t.status == "finished"]
    meta = {"series": s.label, "faded": s.faded}
    traces = []
    if s.faded:
        traces.append(_points_trace(finished, objective, f"{s.label} (earlier)", {**meta, "role": "trials",
                                    "method": None}, marker={"color": FADED_COLOUR, "size": 7}, opacity=0.35))
    elif s.by_method:
        for method in sorted({t.method for t in finished}):
            pts = [t for t in finished if t.method == method]
            traces.append(_points_trace(pts, objective, method, {**meta, "role": "trials", "method": method},
                                        marker={"color": method_colours[method], "size": 10,
                                                "line": {"width": 1, "color": "white"}}))
    elif finished:
        traces.append(_points_trace(finished, objective, s.label, {**meta, "role": "trials", "method": None},
                                    marker={"color": colour, "size": 9}))
    by_id = {t.run_id: t for t in s.trials}
    best = [by_id[r] for r in s.front if r in by_id]
    if best:
        line_colour = FADED_COLOUR if s.faded else colour
        # The step line, and a ring around each front point (so a one-point front shows too).
        traces.append({"type": "scatter", "mode": "lines+markers", "name": f"{s.label} front",
                       "meta": {**meta, "role": "front"},
                       "x": [_x(t.cost(objective), objective) for t in best], "y": [t.accuracy for t in best],
                       "customdata": [t.run_id for t in best],
                       "line": {"shape": "hv", "width": 1.5 if s.faded else 2.5, "color": line_colour},
                       "marker": {"symbol": "circle-open", "size": 12 if s.faded else 18, "color": line_colour,
                                  "line": {"width": 2}},
                       "opacity": 0.5 if s.faded else 1.0, "hoverinfo": "skip"})
    apart = [t for t in s.trials if t.status != "finished"]
    if apart and not s.faded:
        # No accuracy or cost recorded: drawn on the x axis (accuracy 0) at its cost, else at the dense cost.
        dense_x = s.dense[0] if s.dense else None
        xs = [_x(t.cost(objective), objective) if math.isfinite(t.cost(objective))
              else (_x(dense_x, objective) if dense_x is not None else None) for t in apart]
        trace = _points_trace(apart, objective, f"{s.label}: failed / stopped / infeasible",
                              {**meta, "role": "apart", "method": None},
                              marker={"color": APART_COLOUR, "symbol": "x", "size": 9})
        trace["x"] = xs
        trace["y"] = [t.accuracy if math.isfinite(t.accuracy) else 0.0 for t in apart]
        traces.append(trace)
    return traces


def _dense_trace(s: SeriesSpec, objective: str) -> dict:
    cost, accuracy = s.dense
    cost_text = f"MACs: {_num(cost, ',.0f')}" if objective == "macs" else f"latency ratio: {_num(cost, '.3f')}"
    return {"type": "scatter", "mode": "markers", "name": f"dense model ({s.label})",
            "meta": {"role": "dense", "series": s.label, "faded": False, "method": None},
            "x": [_x(cost, objective)], "y": [accuracy], "marker": {"symbol": "star", "size": 16, "color": DENSE_COLOUR},
            "hovertext": [f"<b>dense model</b> ({s.label})<br>accuracy: {_num(accuracy, '.4f')}<br>{cost_text}"],
            "hoverinfo": "text"}


def figure(series: Sequence[SeriesSpec], objective: str, title: str) -> dict:
    """The plotly figure (plain dicts) of ``series``: earlier (faded) ones first, so they lie behind."""
    from .fronts import COST_AXIS

    check_objective(objective)
    methods = sorted({t.method for s in series if s.by_method and not s.faded for t in s.trials})
    method_colours = {m: COLOURS[i % len(COLOURS)] for i, m in enumerate(methods)}
    traces: list[dict] = []
    ordered = [s for s in series if s.faded] + [s for s in series if not s.faded]
    colour_of = {s.label: COLOURS[i % len(COLOURS)] for i, s in enumerate(s for s in ordered if not s.faded)}
    for s in ordered:
        colour = "#222222" if s.by_method else colour_of.get(s.label, FADED_COLOUR)
        traces += _series_traces(s, objective, colour, method_colours)
    traces += [_dense_trace(s, objective) for s in ordered if s.dense and not s.faded]
    layout = {"title": {"text": title}, "xaxis": {"title": {"text": COST_AXIS[objective]}},
              "yaxis": {"title": {"text": "validation accuracy"}}, "hovermode": "closest",
              "legend": {"orientation": "h", "yanchor": "top", "y": -0.18, "xanchor": "left", "x": 0},
              "template": "plotly_white", "height": 540, "margin": {"l": 60, "r": 20, "t": 50, "b": 40},
              "title_font": {"size": 14}}
    return {"data": traces, "layout": layout}


def write_html(fig: dict, path: Path) -> Path:
    """Write ``fig`` as one self-contained HTML page (plotly.js embedded: works offline)."""
    import plotly.graph_objects as go
    import plotly.io as pio

    html = pio.to_html(go.Figure(fig), include_plotlyjs=True, full_html=True, div_id="prunetune-front",
                       config={"responsive": True, "displaylogo": False})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html, encoding="utf-8")
    return path


# ---- a sweep's page -------------------------------------------------------------------------------------------
def front_ids(client: MlflowClient, parent_run_id: str, objective: str) -> list[str]:
    """The run ids of the sweep's front, cheapest first: the same points and rule as ``record_front``."""
    from .fronts import DIRECTIONS, sweep_points
    from .pareto import front

    points = sweep_points(client, parent_run_id, objective, feasible_only=True)
    idx = front([p.objectives for p in points], DIRECTIONS) if points else []
    return [points[i].run_id for i in sorted(idx, key=lambda i: (points[i].cost, -points[i].accuracy))]


def dense_point(client: MlflowClient, parent_run_id: str, objective: str,
                dense_macs: float | None) -> tuple[float, float] | None:
    """(cost, validation accuracy) of the sweep's dense model, or None when its accuracy is unknown."""
    accuracy = client.get_run(parent_run_id).data.metrics.get("base_accuracy", math.nan)
    cost = 1.0 if objective == "latency" else (dense_macs if dense_macs else math.nan)
    return (cost, accuracy) if math.isfinite(accuracy) and math.isfinite(cost) else None


def sweep_figure(client: MlflowClient, parent_run_id: str, objective: str = "macs",
                 dense_macs: float | None = None, front: Sequence[str] | None = None,
                 runs: Sequence | None = None) -> dict:
    """The figure of one sweep: its trials by method, its front, its dense model, and the
    experiment's earlier sweeps (same objective) faded behind it. ``runs``: the sweep's child runs,
    if the caller has read them already."""
    parent = client.get_run(parent_run_id)
    name = parent.info.run_name or parent_run_id[:8]
    series = [SeriesSpec(label, sweep_trials(client, run_id, objective), front_ids(client, run_id, objective),
                         faded=True, by_method=False)
              for run_id, label in earlier_sweeps(client, parent_run_id, objective)]
    ids = list(front) if front is not None else front_ids(client, parent_run_id, objective)
    series.append(SeriesSpec(name, sweep_trials(client, parent_run_id, objective, runs), ids,
                             dense=dense_point(client, parent_run_id, objective, dense_macs)))
    exp = client.get_experiment(parent.info.experiment_id).name
    cost = "MACs" if objective == "macs" else "latency ratio"
    return figure(series, objective, f"{exp} / {name}: validation accuracy vs {cost}")
