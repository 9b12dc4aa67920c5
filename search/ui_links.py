"""Direct links into the MLflow UI (3.x routes): a run's artifact shown inline, and an experiment's
training-runs view with a filter and a sort, so a printed line opens the view it names.

For an ``http(s)://`` tracking URI the UI is that server; for a local store (SQLite, files) it is the
``mlflow ui`` that ``ui_command`` starts, on its default address.
"""
from __future__ import annotations

from urllib.parse import quote

__all__ = ["ui_base", "ui_command", "artifact_url", "run_url", "runs_view_url", "front_runs_url", "look_at_it", "LOCAL_UI"]

LOCAL_UI = "http://127.0.0.1:5000"
#: Opens the UI in its "Model training" mode (MLflow 3 otherwise opens an experiment in GenAI mode).
TRAINING = "workflowType=machine_learning"


def ui_base(tracking_uri: str) -> str:
    """Where the UI of ``tracking_uri`` answers."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return LOCAL_UI


def ui_command(tracking_uri: str) -> str | None:
    """The command that serves the UI of a local store (None for a server: it is its own UI)."""
    if tracking_uri.startswith(("http://", "https://")):
        return None
    return f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1"


def _run_path(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    return f"{ui_base(tracking_uri)}/#/experiments/{experiment_id}/runs/{run_id}"


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    return f"{_run_path(tracking_uri, experiment_id, run_id)}?{TRAINING}"


def artifact_url(tracking_uri: str, experiment_id: str, run_id: str, path: str) -> str:
    """The run's artifact ``path`` opened in the run's Artifacts tab (HTML is rendered inline)."""
    return f"{_run_path(tracking_uri, experiment_id, run_id)}/artifacts/{quote(path)}?{TRAINING}"


def runs_view_url(tracking_uri: str, experiment_id: str, search_filter: str, order_by: str | None = None,
                  ascending: bool = True) -> str:
    """The experiment's training-runs table, filtered (MLflow search syntax) and sorted by ``order_by``
    (e.g. ``metrics.`macs```)."""
    url = (f"{ui_base(tracking_uri)}/#/experiments/{experiment_id}/runs?{TRAINING}"
           f"&searchFilter={quote(search_filter, safe='')}")
    if order_by:
        url += f"&orderByKey={quote(order_by, safe='')}&orderByAsc={'true' if ascending else 'false'}"
    return url


def front_runs_url(tracking_uri: str, experiment_id: str, sweep_name: str, cost_metric: str = "macs") -> str:
    """The sweep's front (trials tagged ``pareto=true`` and ``sweep=<name>``), cheapest first."""
    return runs_view_url(tracking_uri, experiment_id, f"tags.pareto = 'true' and tags.sweep = '{sweep_name}'",
                         f"metrics.`{cost_metric}`")


def look_at_it(tracking_uri: str, parent_run_id: str, objective: str = "macs") -> str:
    """The lines a finished sweep prints: how to serve the UI (local store), the interactive front,
    and the front's trials in the runs table, cheapest first."""
    from .config import COST_METRICS
    from .front_html import HTML_NAME
    from .store import open_client

    run = open_client(tracking_uri, create=False).get_run(parent_run_id)
    exp_id, name = run.info.experiment_id, run.info.run_name or parent_run_id
    command = ui_command(tracking_uri)
    lines = [f"look at it: {command}, then open" if command else "look at it:",
             f"  front (interactive): {artifact_url(tracking_uri, exp_id, parent_run_id, HTML_NAME)}",
             f"  front's trials, cheapest first: {front_runs_url(tracking_uri, exp_id, name, COST_METRICS[objective])}"]
    return "\n".join(lines) + "\n"
