"""`prunetune fronts` and search.compare on the real tiny sweep (MLflow on SQLite, Ray, torch)."""
from __future__ import annotations

import csv
import itertools
import math
import re

import pytest
from mlflow.tracking import MlflowClient

from methods.errors import ConfigError
from search.cli import main
from search.compare import compare_fronts, resolve_sweep
from search.pareto import front, hypervolume
from search.tracking import PARENT_TAG, SWEEP_TAG

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _recorded(cfg, parent_run_id):
    """The sweep's finished trials straight from MLflow: run id -> (method, accuracy, macs, dense_macs)."""
    client = MlflowClient(cfg.tracking_uri)
    exp = client.get_experiment_by_name(cfg.name)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'")
    out = {}
    for r in runs:
        m = r.data.metrics
        if r.info.status == "FINISHED" and "accuracy" in m and "macs" in m:
            out[r.info.run_id] = (r.data.tags["method"], m["accuracy"], m["macs"], m.get("dense_macs", math.nan))
    assert out, "the tiny sweep recorded no finished trial"
    return out


def _front_ids(recorded, method=None):
    ids = [rid for rid, (meth, *_rest) in recorded.items() if method is None or meth == method]
    idx = front([recorded[rid][1:3] for rid in ids], ("max", "min"))
    return {ids[i] for i in idx}


def _table_rows(text):
    """(label, method, accuracy, macs, run id) per row of the printed front table."""
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["label", "method"], text
    rows = []
    for line in lines[1:]:
        if not line.strip():
            break
        tok = line.split()
        rows.append((tok[0], tok[1], float(tok[2]), float(tok[3].replace(",", "")), tok[-1]))
    return rows


def test_cli_writes_png_and_table_equal_to_recorded_front(tiny_sweep, tmp_path, capsys):
    cfg, result = tiny_sweep
    out = tmp_path / "plots" / "cmp.png"
    # The same sweep twice: by its directory and by its MLflow experiment name -> two series.
    rc = main(["fronts", str(result.experiment_dir), cfg.name, "--tracking-uri", cfg.tracking_uri, "--out", str(out)])
    assert rc == 0
    data = out.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_MAGIC)

    text = capsys.readouterr().out
    rows = _table_rows(text)
    recorded = _recorded(cfg, result.parent_run_id)
    expected = _front_ids(recorded)
    labels = {result.experiment_dir.name, cfg.name}
    assert {r[0] for r in rows} == labels
    for label in labels:
        assert {r[4] for r in rows if r[0] == label} == expected
    for label, method, acc, macs, run_id in rows:
        rec_method, rec_acc, rec_macs, _ = recorded[run_id]
        assert method == rec_method
        assert acc == pytest.approx(rec_acc, abs=5e-5)
        assert macs == rec_macs
    assert [r[3] for r in rows[: len(expected)]] == sorted(r[3] for r in rows[: len(expected)])  # cheapest first

    # Hypervolume against the common reference (0 accuracy, dense MACs) = the sweep's own.
    dense = max(v[3] for v in recorded.values())
    hv = hypervolume([v[1:3] for v in recorded.values()], (0.0, dense), ("max", "min"))
    assert hv == pytest.approx(result.hypervolume, rel=1e-9)
    hv_part = text.split("hypervolume", 1)[1].splitlines()[1:]
    hv_lines = list(itertools.takewhile(str.strip, hv_part))  # up to the blank line before "plot:"
    assert len(hv_lines) == 2
    for ln in hv_lines:
        assert float(ln.split()[1]) == pytest.approx(hv, rel=1e-5)

    # The overlay is recorded as an MLflow run in the sweep's experiment, and its URL printed.
    run_id = re.search(r"^MLflow run: ([0-9a-f]{32})", text, re.M).group(1)
    client = MlflowClient(cfg.tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name.startswith("fronts-")
    assert run.info.experiment_id == client.get_experiment_by_name(cfg.name).experiment_id
    assert run.data.tags["prunetune.fronts"] == "true" and PARENT_TAG not in run.data.tags
    assert {a.path for a in client.list_artifacts(run_id)} == {"cmp.html", "cmp.png", "cmp.csv"}
    assert f"#/experiments/{run.info.experiment_id}/runs/{run_id}/artifacts/cmp.html" in text
    assert sorted(run.data.metrics) == sorted(f"hypervolume/{lab}" for lab in labels)
    assert all(v == pytest.approx(hv, rel=1e-9) for v in run.data.metrics.values())
    with open(client.download_artifacts(run_id, "cmp.csv", str(tmp_path)), newline="") as f:
        table = list(csv.DictReader(f))
    assert {(r["series"], r["run_id"]) for r in table} == {(lab, rid) for lab in labels for rid in expected}
    assert all(float(r["hypervolume"]) == pytest.approx(hv, rel=1e-9) for r in table)
    assert {float(r["reference_cost"]) for r in table} == {dense}


def test_by_method_splits_series_by_method(tiny_sweep, tmp_path):
    cfg, result = tiny_sweep
    recorded = _recorded(cfg, result.parent_run_id)
    methods = {v[0] for v in recorded.values()}
    out = tmp_path / "by_method.png"
    fronts = compare_fronts([result.experiment_dir], out, by_method=True)
    assert out.read_bytes().startswith(PNG_MAGIC)
    assert set(fronts) == methods
    for method, pts in fronts.items():
        assert {p.method for p in pts} == {method}
        assert {p.run_id for p in pts} == _front_ids(recorded, method)

    # A single experiment is split by method even without --by-method.
    assert compare_fronts([result.experiment_dir], tmp_path / "single.png").keys() == fronts.keys()
    # Two sweeps with --by-method: one series per (sweep, method).
    both = compare_fronts([result.experiment_dir, cfg.name], tmp_path / "both.png", by_method=True,
                          tracking_uri=cfg.tracking_uri)
    assert set(both) == {f"{lab}/{m}" for lab in (result.experiment_dir.name, cfg.name) for m in methods}
    # Two sweeps without it: one series per sweep, each the whole front.
    whole = compare_fronts([result.experiment_dir, cfg.name], tmp_path / "whole.png", tracking_uri=cfg.tracking_uri)
    assert {lab: {p.run_id for p in pts} for lab, pts in whole.items()} == {
        result.experiment_dir.name: _front_ids(recorded), cfg.name: _front_ids(recorded)}


def test_experiment_name_resolves_to_latest_sweep_run(tiny_sweep):
    cfg, result = tiny_sweep
    by_name = resolve_sweep(cfg.name, cfg.tracking_uri)
    by_dir = resolve_sweep(result.experiment_dir)
    assert by_name.parent_run_id == by_dir.parent_run_id == result.parent_run_id
    assert by_dir.tracking_uri == cfg.tracking_uri and by_dir.config["dataset"] == cfg.dataset


def test_unknown_experiment_errors(tiny_sweep, tmp_path, capsys, monkeypatch):
    cfg, _ = tiny_sweep
    with pytest.raises(ConfigError, match="no-such-sweep"):
        compare_fronts(["no-such-sweep"], tmp_path / "x.png", tracking_uri=cfg.tracking_uri)
    # A directory that is not a sweep directory.
    with pytest.raises(ConfigError, match="not a prunetune sweep directory"):
        compare_fronts([tmp_path], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()

    # The default tracking URI (./mlflow.db) with no database there: an error, and no database created.
    monkeypatch.chdir(tmp_path)
    rc = main(["fronts", "no-such-sweep"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("prunetune: error:") and "no-such-sweep" in err
    assert not (tmp_path / "mlflow.db").exists()


def _copy_sweep(client, parent_run_id, experiment, run_ids, name):
    """The records (no artifacts) of some trials as one more sweep of ``experiment``."""
    from mlflow.entities import Metric, Param

    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    parent = client.create_run(exp_id, run_name=name, tags={SWEEP_TAG: "true"}).info.run_id
    client.log_batch(parent, params=[Param(k, v) for k, v in client.get_run(parent_run_id).data.params.items()])
    for rid in run_ids:
        src = client.get_run(rid)
        child = client.create_run(exp_id, run_name=src.info.run_name, tags={PARENT_TAG: parent,
                                                                             "method": src.data.tags["method"]})
        client.log_batch(child.info.run_id, metrics=[Metric(k, v, 0, 1) for k, v in src.data.metrics.items()])
        client.set_terminated(child.info.run_id, "FINISHED")
    client.set_terminated(parent, "FINISHED")
    return parent


def test_experiment_name_means_all_its_sweeps(tiny_sweep, tmp_path, capsys):
    cfg, result = tiny_sweep
    client = MlflowClient(cfg.tracking_uri)
    recorded = _recorded(cfg, result.parent_run_id)
    ids = sorted(recorded)
    first = _copy_sweep(client, result.parent_run_id, "tiny-fronts-two", ids[:2], "sweep-a")
    second = _copy_sweep(client, result.parent_run_id, "tiny-fronts-two", ids[2:], "sweep-b")

    rc = main(["fronts", "tiny-fronts-two", "--tracking-uri", cfg.tracking_uri, "--out", str(tmp_path / "all.png")])
    assert rc == 0
    rows = _table_rows(capsys.readouterr().out)
    assert {r[0] for r in rows} == {"tiny-fronts-two@sweep-a", "tiny-fronts-two@sweep-b"}  # one series per sweep
    for label, ids_of in (("tiny-fronts-two@sweep-a", ids[:2]), ("tiny-fronts-two@sweep-b", ids[2:])):
        names = {client.get_run(i).info.run_name for i in ids_of}
        assert {client.get_run(r[4]).info.run_name for r in rows if r[0] == label} <= names

    rc = main(["fronts", "tiny-fronts-two", "--latest", "--tracking-uri", cfg.tracking_uri,
               "--out", str(tmp_path / "latest.png")])
    assert rc == 0
    rows = _table_rows(capsys.readouterr().out)
    assert {client.get_run(r[4]).data.tags[PARENT_TAG] for r in rows} == {second}  # the latest sweep only
    assert first != second
