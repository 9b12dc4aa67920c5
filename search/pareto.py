"""Pareto fronts, non-dominated ranks and exact hypervolumes for two or three objectives.

Each objective has a direction, ``"max"`` or ``"min"`` (the sweep uses ``("max", "min")`` for
accuracy and MACs; see ``search.objectives``). Internally every objective is turned into one to
minimise by flipping the sign of the ``"max"`` ones; then

* ``p`` dominates ``q`` when ``p`` is no worse than ``q`` on every objective and strictly better on
  at least one. Identical points do not dominate each other, so duplicates of a front point are all
  on the front.
* Points with a NaN or an infinite coordinate (a failed trial) are never on the front, get no rank
  and add nothing to the hypervolume.

Every function takes 2 or 3 objectives; ``hypervolume`` is exact for 2
(a sweep over the sorted staircase) and 3 (slices along the third objective, each a 2-D
hypervolume), ``contributions`` is each point's exclusive share of it.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from methods.errors import ArgumentError

__all__ = ["front", "ranks", "hypervolume", "contributions", "default_reference"]

_VALID_DIRECTIONS = ("max", "min")


def _signs(directions: Sequence[str], any_number: bool = False) -> np.ndarray:
    """+1 for a "min" objective, -1 for a "max" one (multiply to get a minimisation problem).
    2 or 3 objectives, or (``any_number``) at least 2."""
    if isinstance(directions, str) or not isinstance(directions, Sequence):
        raise ArgumentError(f"directions must be a pair or triple like ('max', 'min'), got {directions!r}")
    if len(directions) < 2 or (len(directions) > 3 and not any_number):
        want = "at least 2" if any_number else "2 or 3"
        raise ArgumentError(f"directions must name {want} objectives, got {len(directions)}: {list(directions)!r}")
    for i, d in enumerate(directions):
        if d not in _VALID_DIRECTIONS:
            raise ArgumentError(f"directions[{i}] must be 'max' or 'min', got {d!r}")
    return np.array([-1.0 if d == "max" else 1.0 for d in directions])


def _as_points(points, m: int) -> np.ndarray:
    """An (N, m) float array; an empty input gives shape (0, m)."""
    try:
        arr = np.asarray(points, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ArgumentError(f"points must be numeric rows, an (N, {m}) array: {exc}") from None
    if arr.size == 0:
        return np.zeros((0, m))
    if arr.ndim != 2 or arr.shape[1] != m:
        raise ArgumentError(f"points must have shape (N, {m}) (one column per objective), got shape {arr.shape}")
    return arr


def _dominated_by_any(minimised: np.ndarray) -> np.ndarray:
    """(N, N) boolean matrix: [i, j] is True when row j dominates row i (rows finite, to minimise)."""
    le = (minimised[None, :, :] <= minimised[:, None, :]).all(axis=2)
    lt = (minimised[None, :, :] < minimised[:, None, :]).any(axis=2)
    return le & lt


def _ranks_minimised(minimised: np.ndarray) -> np.ndarray:
    """Non-dominated sorting of finite rows: 0 for the front, 1 for the front of the rest, ..."""
    n = len(minimised)
    out = np.full(n, -1, dtype=int)
    if n == 0:
        return out
    dom = _dominated_by_any(minimised)
    remaining = np.ones(n, dtype=bool)
    rank = 0
    while remaining.any():
        layer = remaining & ~(dom[:, remaining].any(axis=1))
        out[layer] = rank
        remaining &= ~layer
        rank += 1
    return out


def ranks(points, directions: Sequence[str]) -> list[int]:
    """The non-dominated rank of every point (0 = on the front); -1 for a NaN or infinite point."""
    signs = _signs(directions)
    arr = _as_points(points, len(signs))
    out = np.full(len(arr), -1, dtype=int)
    finite = np.flatnonzero(np.isfinite(arr).all(axis=1))
    out[finite] = _ranks_minimised(arr[finite] * signs)
    return [int(r) for r in out]


def front(points, directions: Sequence[str]) -> list[int]:
    """Indices (ascending) of the non-dominated points.

    ``points`` is a sequence of rows or an (N, M) array; ``directions`` says for each objective
    whether it is maximised or minimised, e.g. ``("max", "min")`` for (accuracy, MACs). Identical
    points are all kept; points with NaN or infinite coordinates are excluded.
    """
    return [i for i, r in enumerate(ranks(points, directions)) if r == 0]


def _hv2(pts: np.ndarray, ref: np.ndarray) -> float:
    """Area dominated by rows (to minimise, all strictly better than ``ref``) up to ``ref``."""
    if len(pts) == 0:
        return 0.0
    order = np.lexsort((pts[:, 1], pts[:, 0]))
    area, best_y = 0.0, ref[1]
    xs = pts[order, 0]
    ys = pts[order, 1]
    for k in range(len(xs)):  # staircase: each step spans to the next smaller-y point's x
        if ys[k] < best_y:
            best_y = ys[k]
        next_x = xs[k + 1] if k + 1 < len(xs) else ref[0]
        area += (next_x - xs[k]) * (ref[1] - best_y)
    return float(area)


def _hv3(pts: np.ndarray, ref: np.ndarray) -> float:
    """Volume: slices along the third objective, each slice the 2-D area of the points below it."""
    if len(pts) == 0:
        return 0.0
    zs = np.unique(pts[:, 2])
    bounds = np.append(zs[1:], ref[2])
    volume = 0.0
    for z, z_next in zip(zs, bounds):
        volume += _hv2(pts[pts[:, 2] <= z][:, :2], ref[:2]) * (z_next - z)
    return float(volume)


def _prepared(points, reference, directions) -> tuple[np.ndarray, np.ndarray]:
    """(rows that count, to minimise and strictly better than the reference; the reference)."""
    signs = _signs(directions)
    m = len(signs)
    arr = _as_points(points, m)
    ref = np.asarray(reference, dtype=float) if not isinstance(reference, str) else None
    if ref is None or ref.shape != (m,):
        raise ArgumentError(f"reference must be {m} numbers (one per objective), got {reference!r}")
    if not np.isfinite(ref).all():
        raise ArgumentError(f"reference must be finite, got {list(ref)!r}")
    ref = ref * signs
    arr = np.where(np.isfinite(arr).all(axis=1, keepdims=True), arr * signs, np.inf)
    return arr, ref


def _hv(minimised: np.ndarray, ref: np.ndarray) -> float:
    pts = minimised[(minimised < ref).all(axis=1)]
    if len(pts) == 0:
        return 0.0
    pts = np.unique(pts[_ranks_minimised(pts) == 0], axis=0)
    return _hv2(pts, ref) if len(ref) == 2 else _hv3(pts, ref)


def hypervolume(points, reference: Sequence[float], directions: Sequence[str]) -> float:
    """Exact area (2 objectives) or volume (3) dominated by the points and bounded by ``reference``.

    It is the measure of the union of the boxes between each point and the reference point. A point
    that is not strictly better than the reference on every objective contributes nothing, as do NaN
    or infinite points. Hypervolumes are comparable only under the same reference and directions.
    """
    arr, ref = _prepared(points, reference, directions)
    return _hv(arr, ref)


def contributions(points, reference: Sequence[float], directions: Sequence[str]) -> list[float]:
    """Each point's exclusive hypervolume contribution: the total minus the total without it (0 for
    a dominated point, for either of two identical points, and for a non-finite one)."""
    arr, ref = _prepared(points, reference, directions)
    total = _hv(arr, ref)
    keep = np.ones(len(arr), dtype=bool)
    out = []
    for i in range(len(arr)):
        keep[i] = False
        out.append(max(0.0, total - _hv(arr[keep], ref)))
        keep[i] = True
    return out


def default_reference(points, directions: Sequence[str]) -> tuple[float, ...]:
    """A reference point a little worse than every finite point, for ``hypervolume``.

    Per objective, with ``worst`` its worst finite value and ``span`` its range (1 if all equal):

    * ``"max"``: 0 when every value is >= 0 (accuracy, a fraction: the natural zero), else
      ``worst - 0.1 * span``;
    * ``"min"``: ``1.1 * worst`` when every value is > 0 (MACs, params, latency), else
      ``worst + 0.1 * span``.

    It depends on the points, so to compare sweeps pass one fixed reference to every
    ``hypervolume`` call instead (``search.objectives.reference``).
    """
    signs = _signs(directions)
    arr = _as_points(points, len(signs))
    arr = arr[np.isfinite(arr).all(axis=1)]
    if len(arr) == 0:
        raise ArgumentError("default_reference needs at least one point with finite coordinates")
    ref = []
    for col, sign in zip(arr.T, signs):
        lo, hi = float(col.min()), float(col.max())
        span = hi - lo if hi > lo else 1.0
        if sign < 0:  # maximised: the worst is the smallest
            ref.append(0.0 if lo >= 0 else lo - 0.1 * span)
        else:
            ref.append(1.1 * hi if lo > 0 else hi + 0.1 * span)
    return tuple(float(r) for r in ref)
