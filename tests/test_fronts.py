"""`prunetune fronts` and search.compare on the real tiny sweep (MLflow on SQLite, Ray, torch)."""
from __future__ import annotations

import math

import pytest
from mlflow.tracking import MlflowClient

from methods.errors import ConfigError
from search.cli import main
from search.compare import compare_fronts, resolve_sweep
from search.pareto import front, hypervolume
from search.tracking import PARENT_TAG

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
    hv_lines = [ln for ln in hv_part if ln.strip() and not ln.startswith("plot:")]
    assert len(hv_lines) == 2
    for ln in hv_lines:
        assert float(ln.split()[1]) == pytest.approx(hv, rel=1e-5)


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
