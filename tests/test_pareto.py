"""search.pareto: fronts and hypervolumes against brute force, hand examples, directions, bad input."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from search.pareto import contributions, default_reference, front, hypervolume, ranks

DIRECTIONS = [("max", "min"), ("min", "min"), ("max", "max"), ("min", "max")]


# ---- brute force -------------------------------------------------------------------------------
def _better_eq(a: float, b: float, d: str) -> bool:
    return a >= b if d == "max" else a <= b


def _better(a: float, b: float, d: str) -> bool:
    return a > b if d == "max" else a < b


def _dominates(p, q, directions) -> bool:
    return all(_better_eq(a, b, d) for a, b, d in zip(p, q, directions)) and any(
        _better(a, b, d) for a, b, d in zip(p, q, directions)
    )


def _brute_front(points, directions) -> list[int]:
    ok = [i for i, p in enumerate(points) if all(math.isfinite(v) for v in p)]
    return [i for i in ok if not any(_dominates(points[j], points[i], directions) for j in ok if j != i)]


def _boxes(points, reference, directions):
    """Each point's dominated rectangle as (x_lo, x_hi, y_lo, y_hi), or nothing if empty."""
    out = []
    for p in points:
        if not all(math.isfinite(v) for v in p):
            continue
        if not all(_better(v, r, d) for v, r, d in zip(p, reference, directions)):
            continue
        (x0, x1), (y0, y1) = (sorted((v, r)) for v, r in zip(p, reference))
        out.append((x0, x1, y0, y1))
    return out


def _grid_union_area(boxes) -> float:
    """Exact union area on the grid of all box edges: a cell is covered or not as a whole."""
    if not boxes:
        return 0.0
    xs = sorted({b[0] for b in boxes} | {b[1] for b in boxes})
    ys = sorted({b[2] for b in boxes} | {b[3] for b in boxes})
    area = 0.0
    for xa, xb in zip(xs, xs[1:]):
        for ya, yb in zip(ys, ys[1:]):
            cx, cy = (xa + xb) / 2, (ya + yb) / 2
            if any(b[0] <= cx <= b[1] and b[2] <= cy <= b[3] for b in boxes):
                area += (xb - xa) * (yb - ya)
    return area


def _inclusion_exclusion_area(boxes) -> float:
    total = 0.0
    for k in range(1, len(boxes) + 1):
        for subset in itertools.combinations(boxes, k):
            w = min(b[1] for b in subset) - max(b[0] for b in subset)
            h = min(b[3] for b in subset) - max(b[2] for b in subset)
            if w > 0 and h > 0:
                total += (-1) ** (k + 1) * w * h
    return total


def _random_points(rng: np.random.Generator, n: int) -> np.ndarray:
    """Small integer grids force ties and duplicates; sometimes floats, sometimes NaN/inf."""
    kind = rng.integers(3)
    if kind == 0:
        pts = rng.integers(0, 5, size=(n, 2)).astype(float)
    elif kind == 1:
        pts = rng.random((n, 2))
    else:
        pts = rng.integers(0, 8, size=(n, 2)).astype(float)
        if n:
            pts[rng.integers(n)] = pts[rng.integers(n)]  # an exact duplicate
    if n and rng.random() < 0.3:
        pts[rng.integers(n), rng.integers(2)] = rng.choice([np.nan, np.inf, -np.inf])
    return pts


# ---- front ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("directions", DIRECTIONS)
def test_front_matches_brute_force(directions):
    rng = np.random.default_rng(0)
    for _ in range(300):
        pts = _random_points(rng, int(rng.integers(0, 25)))
        got = front(pts, directions)
        assert got == _brute_front(pts.tolist(), directions)
        assert got == front([tuple(p) for p in pts.tolist()], list(directions))  # sequences work too


def test_front_hand_example_accuracy_vs_macs():
    pts = [(0.90, 100), (0.85, 50), (0.80, 60), (0.95, 200), (0.90, 120), (0.70, 10)]
    # (0.80, 60) is dominated by (0.85, 50); (0.90, 120) by (0.90, 100).
    assert front(pts, ("max", "min")) == [0, 1, 3, 5]
    # Flipping both directions: now (0.80, 60) beats (0.85, 50) and (0.90, 120) beats (0.90, 100).
    assert front(pts, ("min", "max")) == [2, 3, 4, 5]


def test_front_keeps_duplicates_and_drops_same_x_worse_y():
    pts = [(1.0, 1.0), (1.0, 1.0), (1.0, 2.0), (0.0, 0.5), (0.0, 0.5)]
    # (1, 2) is worse than (1, 1) on a minimised y; (0, 0.5) trades x for y, so it stays.
    assert front(pts, ("max", "min")) == [0, 1, 3, 4]
    assert front(pts, ("min", "min")) == [3, 4]
    assert front(pts, ("max", "max")) == [2]


def test_front_excludes_nan_and_inf():
    pts = [(0.9, 100), (float("nan"), 1), (1.0, float("nan")), (float("inf"), 1), (0.8, -math.inf)]
    assert front(pts, ("max", "min")) == [0]
    assert front([(float("nan"), float("nan"))], ("max", "min")) == []


def test_front_empty_and_single():
    assert front([], ("max", "min")) == []
    assert front(np.zeros((0, 2)), ("max", "min")) == []
    assert front([(0.5, 3)], ("max", "min")) == [0]


# ---- hypervolume ---------------------------------------------------------------------------------
@pytest.mark.parametrize("directions", DIRECTIONS)
def test_hypervolume_matches_grid_union(directions):
    rng = np.random.default_rng(1)
    for _ in range(200):
        pts = _random_points(rng, int(rng.integers(0, 15)))
        finite = pts[np.isfinite(pts).all(axis=1)]
        # A reference that some points fail to beat strictly, so the exclusion rule is exercised.
        if len(finite):
            ref = [float(np.quantile(finite[:, k], 0.8)) if d == "max" else float(np.quantile(finite[:, k], 0.2))
                   for k, d in enumerate(directions)]
            ref = [r + (1 if d == "min" else -1) * float(rng.integers(0, 3)) for r, d in zip(ref, directions)]
        else:
            ref = [0.0, 0.0]
        expected = _grid_union_area(_boxes(pts.tolist(), ref, directions))
        assert hypervolume(pts, ref, directions) == pytest.approx(expected, abs=1e-12)


def test_hypervolume_matches_inclusion_exclusion():
    rng = np.random.default_rng(2)
    for _ in range(150):
        n = int(rng.integers(1, 8))
        pts = np.column_stack([rng.integers(0, 6, n) / 5, rng.integers(1, 6, n) * 100.0])
        ref = (0.0, 600.0)
        expected = _inclusion_exclusion_area(_boxes(pts.tolist(), ref, ("max", "min")))
        assert hypervolume(pts, ref, ("max", "min")) == pytest.approx(expected, abs=1e-9)


def test_hypervolume_hand_examples():
    # One point: a single rectangle 0.9 x (200 - 100).
    assert hypervolume([(0.9, 100)], (0.0, 200), ("max", "min")) == pytest.approx(90.0)
    # Staircase: (0.5, 10) and (0.8, 20), reference (0, 30):
    # 0.8 * (30 - 20) + 0.5 * (20 - 10) = 8 + 5 = 13.
    pts = [(0.5, 10), (0.8, 20), (0.4, 25)]  # the last one is dominated
    assert hypervolume(pts, (0.0, 30), ("max", "min")) == pytest.approx(13.0)
    # Both minimised, reference (4, 4), points (1, 3), (2, 2), (3, 1): a staircase of area
    # (2-1)*(4-3) + (3-2)*(4-2) + (4-3)*(4-1) = 1 + 2 + 3 = 6.
    assert hypervolume([(1, 3), (2, 2), (3, 1)], (4, 4), ("min", "min")) == pytest.approx(6.0)
    # Duplicates do not count twice.
    assert hypervolume([(1, 3), (1, 3), (2, 2), (3, 1)], (4, 4), ("min", "min")) == pytest.approx(6.0)


def test_hypervolume_points_not_strictly_better_than_reference_add_nothing():
    assert hypervolume([(0.9, 200)], (0.0, 200), ("max", "min")) == 0.0  # equal MACs
    assert hypervolume([(0.0, 100)], (0.0, 200), ("max", "min")) == 0.0  # equal accuracy
    assert hypervolume([(0.9, 300)], (0.0, 200), ("max", "min")) == 0.0  # worse MACs
    assert hypervolume([(0.9, 300), (0.5, 100)], (0.0, 200), ("max", "min")) == pytest.approx(50.0)
    assert hypervolume([], (0.0, 200), ("max", "min")) == 0.0


def test_hypervolume_ignores_nan_and_inf():
    base = hypervolume([(0.5, 10), (0.8, 20)], (0.0, 30), ("max", "min"))
    noisy = [(0.5, 10), (0.8, 20), (float("nan"), 0), (1.0, float("nan")), (float("inf"), 1)]
    assert hypervolume(noisy, (0.0, 30), ("max", "min")) == pytest.approx(base)


def test_hypervolume_is_direction_consistent():
    """Negating an objective and flipping its direction gives the same volume."""
    rng = np.random.default_rng(3)
    for _ in range(50):
        pts = rng.random((10, 2))
        ref = (0.0, 1.0)
        hv = hypervolume(pts, ref, ("max", "min"))
        flipped = pts * np.array([-1.0, 1.0])
        assert hypervolume(flipped, (0.0, 1.0), ("min", "min")) == pytest.approx(hv)
        assert hypervolume(pts * -1.0, (0.0, -1.0), ("min", "max")) == pytest.approx(hv)


def test_hypervolume_grows_with_a_dominating_point():
    pts = [(0.5, 10), (0.8, 20)]
    hv = hypervolume(pts, (0.0, 30), ("max", "min"))
    assert hypervolume(pts + [(0.9, 5)], (0.0, 30), ("max", "min")) > hv
    assert hypervolume(pts + [(0.9, 5)], (0.0, 30), ("max", "min")) == pytest.approx(0.9 * 25)


# ---- default reference ------------------------------------------------------------------------------
def test_default_reference_accuracy_macs():
    pts = [(0.9, 100.0), (0.5, 40.0), (float("nan"), 1e9)]
    assert default_reference(pts, ("max", "min")) == (0.0, pytest.approx(110.0))
    ref = default_reference(pts, ("max", "min"))
    assert hypervolume(pts, ref, ("max", "min")) > 0


def test_default_reference_is_worse_than_every_point_otherwise():
    pts = [(-1.0, -5.0), (2.0, -1.0)]
    r = default_reference(pts, ("max", "min"))
    assert r[0] < -1.0 and r[1] > -1.0
    r = default_reference(pts, ("min", "max"))
    assert r[0] > 2.0 and r[1] < -5.0
    with pytest.raises(ValueError, match="finite"):
        default_reference([(float("nan"), 1.0)], ("max", "min"))


# ---- validation -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("directions, match", [
    (("max", "minimize"), r"directions\[1\].*'minimize'"),
    (("up", "min"), r"directions\[0\].*'up'"),
    (("max",), "2 or 3 objectives"),
    (("max", "min", "min", "min"), "2 or 3 objectives"),
    ("maxmin", "pair"),
])
def test_bad_directions(directions, match):
    with pytest.raises(ValueError, match=match):
        front([(1, 2)], directions)
    with pytest.raises(ValueError, match=match):
        hypervolume([(1, 2)], (0, 3), directions)


@pytest.mark.parametrize("points", [[(1, 2, 3)], np.zeros((4, 3)), [1, 2, 3], np.zeros((2, 2, 2))])
def test_bad_point_shapes(points):
    with pytest.raises(ValueError, match=r"shape \(N, 2\)"):
        front(points, ("max", "min"))


def test_bad_reference():
    with pytest.raises(ValueError, match="reference"):
        hypervolume([(1, 2)], (0, 1, 2), ("max", "min"))
    with pytest.raises(ValueError, match="finite"):
        hypervolume([(1, 2)], (0, float("nan")), ("max", "min"))
    with pytest.raises(ValueError, match="numeric"):
        front([("a", "b")], ("max", "min"))


# ---- three objectives: fronts, ranks, exact volume, contributions -----------------------------------
DIRECTIONS_3D = [("max", "min", "min"), ("min", "min", "min"), ("max", "max", "min"), ("min", "max", "max")]


def _grid_union_volume(points, reference, directions) -> float:
    """Independent check: the union volume of the dominated boxes on the grid of all their edges
    (every cell is covered or not as a whole), counted cell by cell."""
    boxes = []
    for p in points:
        if not all(math.isfinite(v) for v in p) or not all(_better(v, r, d) for v, r, d in zip(p, reference, directions)):
            continue
        boxes.append([sorted((v, r)) for v, r in zip(p, reference)])
    if not boxes:
        return 0.0
    axes = [sorted({b[k][0] for b in boxes} | {b[k][1] for b in boxes}) for k in range(3)]
    volume = 0.0
    for xa, xb in zip(axes[0], axes[0][1:]):
        for ya, yb in zip(axes[1], axes[1][1:]):
            for za, zb in zip(axes[2], axes[2][1:]):
                c = ((xa + xb) / 2, (ya + yb) / 2, (za + zb) / 2)
                if any(all(b[k][0] <= c[k] <= b[k][1] for k in range(3)) for b in boxes):
                    volume += (xb - xa) * (yb - ya) * (zb - za)
    return volume


def _inclusion_exclusion_volume(points, reference, directions) -> float:
    boxes = [[sorted((v, r)) for v, r in zip(p, reference)] for p in points
             if all(math.isfinite(v) for v in p) and all(_better(v, r, d) for v, r, d in zip(p, reference, directions))]
    total = 0.0
    for k in range(1, len(boxes) + 1):
        for subset in itertools.combinations(boxes, k):
            sides = [min(b[a][1] for b in subset) - max(b[a][0] for b in subset) for a in range(3)]
            if all(s > 0 for s in sides):
                total += (-1) ** (k + 1) * sides[0] * sides[1] * sides[2]
    return total


def _brute_ranks(points, directions) -> list[int]:
    out = [-1] * len(points)
    left = [i for i, p in enumerate(points) if all(math.isfinite(v) for v in p)]
    rank = 0
    while left:
        layer = [i for i in left if not any(_dominates(points[j], points[i], directions) for j in left if j != i)]
        for i in layer:
            out[i] = rank
        left = [i for i in left if i not in layer]
        rank += 1
    return out


def _random_points_3d(rng: np.random.Generator, n: int) -> np.ndarray:
    pts = rng.integers(0, 5, size=(n, 3)).astype(float) if rng.random() < 0.5 else rng.random((n, 3))
    if n and rng.random() < 0.3:
        pts[rng.integers(n)] = pts[rng.integers(n)]
    if n and rng.random() < 0.2:
        pts[rng.integers(n), rng.integers(3)] = np.nan
    return pts


@pytest.mark.parametrize("directions", DIRECTIONS_3D)
def test_3d_hypervolume_matches_grid_counting_and_inclusion_exclusion(directions):
    rng = np.random.default_rng(hash(directions) % 2**32)
    for _ in range(40):
        pts = _random_points_3d(rng, int(rng.integers(0, 8)))
        finite = pts[np.isfinite(pts).all(axis=1)] if len(pts) else pts
        ref = default_reference(finite, directions) if len(finite) else (0.5, 0.5, 0.5)
        ref = tuple(r + (rng.random() - 0.5) for r in ref)  # sometimes a point lies outside the reference
        got = hypervolume(pts, ref, directions)
        assert got == pytest.approx(_grid_union_volume(pts.tolist(), ref, directions), rel=1e-9, abs=1e-12)
        if len(pts) <= 6:
            assert got == pytest.approx(_inclusion_exclusion_volume(pts.tolist(), ref, directions), rel=1e-9, abs=1e-12)


def test_3d_hand_example():
    # By hand:
    # p=(1,1,2) box [1,3]x[1,3]x[2,3] = 4; q=(2,2,0) box [2,3]x[2,3]x[0,3] = 3; overlap [2,3]^2x[2,3] = 1.
    assert hypervolume([(1, 1, 2), (2, 2, 0)], (3, 3, 3), ("min", "min", "min")) == pytest.approx(6.0)
    assert front([(1, 1, 2), (2, 2, 0), (2, 2, 2)], ("min", "min", "min")) == [0, 1]


@pytest.mark.parametrize("directions", DIRECTIONS_3D + DIRECTIONS)
def test_ranks_match_brute_force(directions):
    rng = np.random.default_rng(7)
    for _ in range(60):
        n = int(rng.integers(0, 12))
        pts = _random_points_3d(rng, n)[:, :len(directions)]
        assert ranks(pts, directions) == _brute_ranks(pts.tolist(), directions)
        assert front(pts, directions) == _brute_front(pts.tolist(), directions)


@pytest.mark.parametrize("directions", [("max", "min"), ("max", "min", "min")])
def test_contributions_are_exclusive_volumes(directions):
    rng = np.random.default_rng(3)
    for _ in range(20):
        pts = rng.random((6, len(directions)))
        ref = default_reference(pts, directions)
        got = contributions(pts, ref, directions)
        total = hypervolume(pts, ref, directions)
        for i in range(len(pts)):
            rest = np.delete(pts, i, axis=0)
            assert got[i] == pytest.approx(total - hypervolume(rest, ref, directions), abs=1e-12)
        on_front = set(front(pts, directions))
        assert all(got[i] == 0 for i in range(len(pts)) if i not in on_front)
    dup = [(0.5, 0.5), (0.5, 0.5), (0.2, 0.9)]
    assert contributions(dup, (0, 1), ("max", "min"))[:2] == [0.0, 0.0]
