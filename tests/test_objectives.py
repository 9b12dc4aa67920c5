"""search.objectives: the one table of objectives, and the fronts, tables and plots that follow it
for three objectives (hand-made points, no sweep)."""
from __future__ import annotations

import math

import pytest
from PIL import Image

from methods.errors import ConfigError
from search import objectives as obj
from search.compare import FrontSeries, format_table
from search.fronts import TrialPoint, front_of, plot_fronts, reference_point
from search.pareto import hypervolume

NAMES = ("accuracy", "macs", "params")


def _p(run_id, acc, macs, params, names=NAMES):
    return TrialPoint(run_id, "l1_norm", acc, macs, params, acc - 0.01, 1.0, 2.0, 0.5, names)


def test_table():
    assert obj.directions(("accuracy", "macs", "params", "latency_ratio")) == ("max", "min", "min", "min")
    assert obj.SHORTHANDS == {"macs": ("accuracy", "macs"), "latency": ("accuracy", "latency_ratio")}
    assert obj.reference(("accuracy", "macs", "params"), {"dense_macs": 1e6, "dense_params": 5e4}) == (0.0, 1e6, 5e4)
    assert obj.reference(("accuracy", "params"), {}, [(0.5, 10.0), (0.7, 20.0)]) == (0.0, pytest.approx(22.0))
    assert obj.reference(("latency_ratio", "accuracy")) == (1.0, 0.0)
    assert obj.parse_names("['accuracy', 'macs', 'params']") == NAMES and obj.parse_names(None) is None
    with pytest.raises(ConfigError, match=r"objectives\[0\]: unknown objective 'flops'"):
        obj.check_names(["flops", "macs"])


def test_three_objective_front_table_and_plot(tmp_path):
    pts = [_p("a", 0.9, 300, 30), _p("b", 0.8, 100, 50), _p("c", 0.8, 200, 20), _p("d", 0.7, 300, 40)]
    best = front_of(pts, NAMES)  # d is dominated by a; b and c trade MACs against params
    assert [p.run_id for p in best] == ["b", "c", "a"]  # cheapest (first cost: MACs) first
    ref = reference_point(NAMES, {"dense_macs": 400.0, "dense_params": 60.0}, pts)
    assert ref == (0.0, 400.0, 60.0)
    hv = hypervolume([p.objectives for p in pts], ref, obj.directions(NAMES))
    series = [FrontSeries("s", "s", pts, best, hv, None, NAMES)]
    lines = format_table(series, ref).splitlines()
    assert lines[0].split() == ["label", "method", "accuracy", "MACs", "params", "test", "acc", "run", "id"]
    assert lines[1].split() == ["s", "l1_norm", "0.8000", "100", "50", "0.7900", "b"]
    assert f"hypervolume (reference: accuracy 0, MACs 400, params 60):" in lines
    out = plot_fronts({"s": pts}, tmp_path / "f.png", highlight={"s": best}, objective=NAMES)
    image = Image.open(out)
    assert image.size[0] > 1.8 * image.size[1]  # three panels side by side
    assert image.info["Title"] == ("validation accuracy vs MACs; validation accuracy vs params; "
                                   "MACs (millions, batch 1) vs params")


def test_two_objective_table_keeps_its_columns():
    pts = [_p("a", 0.9, 300, 30, obj.DEFAULT)]
    table = format_table([FrontSeries("s", "s", pts, pts, 0.1)], (0.0, 400.0))
    assert table.splitlines()[0].split() == ["label", "method", "accuracy", "MACs", "params", "test", "acc", "run", "id"]
    assert "hypervolume (reference: accuracy 0, MACs 400):" in table
    assert math.isclose(pts[0].cost, 300)
