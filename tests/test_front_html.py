"""The interactive front's data, without a browser: which points, which front, which series, in the
plotly figure that ``search.front_html`` writes (and the HTML file it becomes). The sweeps here are
real MLflow records (SQLite) written directly, a few milliseconds each."""
from __future__ import annotations

import math
import re

import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from search.front_html import (APART_COLOUR, FADED_COLOUR, HTML_NAME, SeriesSpec, TrialRecord, figure, front_ids,
                               sweep_figure, sweep_trials, write_html)
from search.pareto import front
from search.tracking import FEASIBLE_TAG, PARENT_TAG, SWEEP_TAG, VIOLATED_TAG
from search.ui_links import artifact_url, front_runs_url, look_at_it, run_url

DENSE_MACS = 40e6


def _t(rid, method="l1_norm", status="finished", acc=0.9, macs=10e6, **kw) -> TrialRecord:
    return TrialRecord(rid, f"{method}-{rid}", method, status, acc, kw.pop("test", acc - 0.01), macs,
                       kw.pop("ratio", macs / DENSE_MACS), (("prune_ratio", "0.5"), ("scope", "all")), **kw)


def _roles(fig, role, faded=None):
    return [t for t in fig["data"] if t["meta"]["role"] == role and (faded is None or t["meta"]["faded"] == faded)]


def test_trials_by_method_front_and_apart():
    trials = [_t("a", acc=0.80, macs=5e6), _t("b", "slimming", acc=0.90, macs=10e6), _t("c", acc=0.85, macs=12e6),
              _t("d", "slimming", acc=0.95, macs=20e6), _t("f", status="failed", acc=math.nan, macs=math.nan,
                                                             reason="Traceback\nRuntimeError: boom"),
              _t("s", "slimming", status="stopped", acc=0.5, macs=8e6)]
    spec = SeriesSpec("sweep-2", trials, ["a", "b", "d"], dense=(DENSE_MACS, 0.97))
    fig = figure([spec], "macs", "t")

    by_method = {t["meta"]["method"]: t for t in _roles(fig, "trials")}
    assert sorted(by_method) == ["l1_norm", "slimming"] and by_method["l1_norm"]["name"] == "l1_norm"
    assert by_method["l1_norm"]["customdata"] == ["a", "c"] and by_method["slimming"]["customdata"] == ["b", "d"]
    assert by_method["l1_norm"]["x"] == [5.0, 12.0] and by_method["l1_norm"]["y"] == [0.80, 0.85]  # MACs in millions
    assert by_method["l1_norm"]["marker"]["color"] != by_method["slimming"]["marker"]["color"]
    hover = by_method["slimming"]["hovertext"][0]
    for text in ("slimming-b", "method: slimming", "prune_ratio=0.5, scope=all", "accuracy: 0.9000",
                 "test accuracy: 0.8900", "MACs: 10,000,000", "latency ratio: 0.250", "run id: b"):
        assert text in hover, text

    (line,) = _roles(fig, "front")
    assert line["customdata"] == ["a", "b", "d"] and line["y"] == [0.80, 0.90, 0.95]
    assert line["line"]["shape"] == "hv" and line["mode"] == "lines+markers"

    (apart,) = _roles(fig, "apart")
    assert apart["customdata"] == ["f", "s"] and apart["marker"]["color"] == APART_COLOUR
    # No recorded accuracy or cost: on the x axis at the dense cost; the reason's last line in the hover.
    assert apart["x"] == [40.0, 8.0] and apart["y"] == [0.0, 0.5]
    assert "reason: RuntimeError: boom" in apart["hovertext"][0] and "(stopped)" in apart["hovertext"][1]

    (dense,) = _roles(fig, "dense")
    assert dense["x"] == [40.0] and dense["y"] == [0.97] and dense["marker"]["symbol"] == "star"


def test_earlier_sweeps_are_faded_and_behind():
    earlier = SeriesSpec("sweep-1", [_t("e1", acc=0.7, macs=6e6), _t("e2", acc=0.6, macs=3e6),
                                     _t("ef", status="failed", acc=math.nan, macs=math.nan)], ["e2", "e1"],
                         faded=True, by_method=False)
    current = SeriesSpec("sweep-2", [_t("a"), _t("b", "slimming")], ["a"])
    fig = figure([current, earlier], "macs", "t")
    roles = [(t["meta"]["series"], t["meta"]["role"]) for t in fig["data"]]
    assert roles == [("sweep-1", "trials"), ("sweep-1", "front"), ("sweep-2", "trials"), ("sweep-2", "trials"),
                     ("sweep-2", "front")]  # faded first (drawn behind); an earlier sweep's failures are left out
    faded_trials, faded_front = fig["data"][0], fig["data"][1]
    assert faded_trials["meta"]["faded"] and faded_trials["customdata"] == ["e1", "e2"]
    assert faded_trials["marker"]["color"] == FADED_COLOUR and faded_trials["opacity"] < 0.5
    assert faded_front["customdata"] == ["e2", "e1"] and faded_front["line"]["color"] == FADED_COLOUR
    assert {t["meta"]["method"] for t in fig["data"][2:4]} == {"l1_norm", "slimming"}


def test_overlay_series_have_one_colour_each_and_latency_axis():
    one = SeriesSpec("A", [_t("a1", ratio=0.4), _t("a2", "slimming", ratio=0.6)], ["a1"], by_method=False)
    two = SeriesSpec("B", [_t("b1", ratio=0.3)], ["b1"], by_method=False)
    fig = figure([one, two], "latency", "t")
    trials = _roles(fig, "trials")
    assert [t["meta"]["series"] for t in trials] == ["A", "B"] and trials[0]["customdata"] == ["a1", "a2"]
    assert trials[0]["marker"]["color"] != trials[1]["marker"]["color"]
    assert trials[0]["x"] == [0.4, 0.6]  # the latency ratio itself, not scaled
    fronts = _roles(fig, "front")
    assert [f["line"]["color"] for f in fronts] == [t["marker"]["color"] for t in trials]
    assert "latency" in fig["layout"]["xaxis"]["title"]["text"]


# ---- from MLflow records --------------------------------------------------------------------------------------
def _sweep(client, exp_id, name, start, trials, objective="macs"):
    parent = client.create_run(exp_id, run_name=name, start_time=start, tags={SWEEP_TAG: "true"}).info.run_id
    client.log_batch(parent, metrics=[Metric("base_accuracy", 0.97, 0, 0)], params=[Param("objective", objective)])
    for i, (method, status, metrics, *tags) in enumerate(trials):
        rid = client.create_run(exp_id, run_name=f"{method}-{name[-1]}{i:07d}", start_time=start + i + 1,
                                tags={PARENT_TAG: parent, "method": method, **(tags[0] if tags else {})}).info.run_id
        client.log_batch(rid, metrics=[Metric(k, v, 0, 1) for k, v in metrics.items()],
                         params=[Param("method", method), Param("prune_ratio", str(0.1 * (i + 1)))],
                         tags=[RunTag("failure_reason", "RuntimeError: out of memory")] if status == "FAILED" else [])
        client.set_terminated(rid, status=status)
    client.set_terminated(parent, status="FINISHED")
    return parent


def _m(acc, macs, **kw):
    return {"accuracy": acc, "test_accuracy": acc - 0.01, "macs": macs, "latency_ratio": macs / DENSE_MACS, **kw}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store (creating one costs ~10 s of migrations) with three sweeps of one experiment."""
    tmp_path = tmp_path_factory.mktemp("front-html")
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp_id = client.create_experiment("html", artifact_location=(tmp_path / "art").as_uri())
    first = _sweep(client, exp_id, "sweep-1", 1_000, [("l1_norm", "FINISHED", _m(0.70, 6e6)),
                                                      ("l1_norm", "FINISHED", _m(0.60, 3e6))])
    other = _sweep(client, exp_id, "sweep-x", 1_500, [("l1_norm", "FINISHED", _m(0.99, 1e6))], objective="latency")
    second = _sweep(client, exp_id, "sweep-2", 2_000, [
        ("l1_norm", "FINISHED", _m(0.80, 5e6)), ("slimming", "FINISHED", _m(0.90, 10e6)),
        ("l1_norm", "FINISHED", _m(0.85, 12e6)), ("slimming", "FINISHED", _m(0.95, 20e6)),
        ("l1_norm", "FAILED", {"accuracy": 0.2}), ("slimming", "KILLED", _m(0.5, 8e6)),
        ("l1_norm", "FINISHED", {"accuracy": 0.9}),                          # no MACs: infeasible
        ("slimming", "FINISHED", _m(0.96, DENSE_MACS, removed_nothing=1.0)),  # cut nothing: infeasible
        ("l1_norm", "FINISHED", _m(0.97, 2e6), {FEASIBLE_TAG: "false", VIOLATED_TAG: "min_accuracy"})])
    return client, exp_id, first, other, second


def test_sweep_figure_from_mlflow_records(store, tmp_path):
    client, exp_id, first, other, second = store
    trials = {t.run_name: t for t in sweep_trials(client, second)}
    assert {n: t.status for n, t in trials.items()} == {
        "l1_norm-20000000": "finished", "slimming-20000001": "finished", "l1_norm-20000002": "finished",
        "slimming-20000003": "finished", "l1_norm-20000004": "failed", "slimming-20000005": "stopped",
        "l1_norm-20000006": "infeasible", "slimming-20000007": "infeasible", "l1_norm-20000008": "infeasible"}
    assert "min_accuracy" in trials["l1_norm-20000008"].reason  # outside the budgets: shown apart, never on the front
    assert trials["l1_norm-20000004"].reason == "RuntimeError: out of memory"
    assert trials["slimming-20000001"].params == (("prune_ratio", "0.2"),)

    ids = front_ids(client, second, "macs")
    points = [(t.accuracy, t.macs) for t in trials.values() if t.status == "finished" or t.run_name.endswith("7")]
    assert trials["l1_norm-20000008"].run_id not in front_ids(client, second, "macs")
    assert len(ids) == len(front(points, ("max", "min")))
    fig = sweep_figure(client, second, "macs", DENSE_MACS, ids)

    faded = _roles(fig, "trials", faded=True)
    assert [t["meta"]["series"] for t in faded] == ["sweep-1"]  # sweep-x searched latency: not comparable
    assert sorted(faded[0]["customdata"]) == sorted(r.info.run_id for r in client.search_runs(
        [exp_id], f"tags.`{PARENT_TAG}` = '{first}'"))
    current = _roles(fig, "trials", faded=False)
    finished = {t.run_id for t in trials.values() if t.status == "finished"}
    assert {rid for t in current for rid in t["customdata"]} == finished
    assert [t["meta"]["method"] for t in current] == ["l1_norm", "slimming"]
    (line,) = _roles(fig, "front", faded=False)
    assert line["customdata"] == ids
    (apart,) = _roles(fig, "apart")
    assert sorted(apart["customdata"]) == sorted(t.run_id for t in trials.values() if t.status != "finished")
    (dense,) = _roles(fig, "dense")
    assert dense["x"] == [DENSE_MACS / 1e6] and dense["y"] == [0.97]
    assert fig["layout"]["title"]["text"].startswith("html / sweep-2")

    page = write_html(fig, tmp_path / HTML_NAME).read_text()
    assert not re.search(r"<script[^>]+src=", page), "the page must not load scripts from elsewhere"
    assert "plotly.js v" in page.lower() or "plotly.js" in page.lower()  # the library itself, embedded
    assert len(page) > 1_000_000 and all(rid in page for rid in finished)


def test_links_open_the_views_they_name(store):
    client, exp_id, _, _, second = store
    base = "http://mlflow.example:5000"
    assert run_url(base + "/", exp_id, second) == f"{base}/#/experiments/{exp_id}/runs/{second}?workflowType=machine_learning"
    assert artifact_url(base, exp_id, second, HTML_NAME) == (
        f"{base}/#/experiments/{exp_id}/runs/{second}/artifacts/{HTML_NAME}?workflowType=machine_learning")
    assert front_runs_url(base, exp_id, "sweep-2", "latency_ratio") == (
        f"{base}/#/experiments/{exp_id}/runs?workflowType=machine_learning"
        "&searchFilter=tags.pareto%20%3D%20%27true%27%20and%20tags.sweep%20%3D%20%27sweep-2%27"
        "&orderByKey=metrics.%60latency_ratio%60&orderByAsc=true")
    text = look_at_it(client.tracking_uri, second, "macs")
    assert text.splitlines()[0] == f"look at it: mlflow ui --backend-store-uri {client.tracking_uri} --host 127.0.0.1, then open"
    assert f"front (interactive): http://127.0.0.1:5000/#/experiments/{exp_id}/runs/{second}/artifacts/" in text
    assert "orderByKey=metrics.%60macs%60" in text
