"""Two-objective Pareto fronts and their exact hypervolume.

Each objective has a direction, ``"max"`` or ``"min"`` (the sweep uses ``("max", "min")`` for
accuracy and MACs). Internally every objective is turned into one to minimise by flipping the sign
of the ``"max"`` ones; then

* ``p`` dominates ``q`` when ``p`` is no worse than ``q`` on both objectives and strictly better on
  at least one. Identical points do not dominate each other, so duplicates of a front point are all
  on the front.
* Points with a NaN or an infinite coordinate (a failed trial) are never on the front and add
  nothing to the hypervolume.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["front", "hypervolume", "default_reference"]

_VALID_DIRECTIONS = ("max", "min")


def _signs(directions: Sequence[str]) -> np.ndarray:
    """+1 for a "min" objective, -1 for a "max" one (multiply to get a minimisation problem)."""
    if isinstance(directions, str) or not isinstance(directions, Sequence):
        raise ValueError(f"directions must be a pair like ('max', 'min'), got {directions!r}")
    if len(directions) != 2:
        raise ValueError(f"directions must name 2 objectives, got {len(directions)}: {list(directions)!r}")
    for i, d in enumerate(directions):
        if d not in _VALID_DIRECTIONS:
            raise ValueError(f"directions[{i}] must be 'max' or 'min', got {d!r}")
    return np.array([-1.0 if d == "max" else 1.0 for d in directions])


def _as_points(points) -> np.ndarray:
    """An (N, 2) float array; an empty input gives shape (0, 2)."""
    try:
        arr = np.asarray(points, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"points must be numeric pairs, an (N, 2) array: {exc}") from None
    if arr.size == 0:
        return np.zeros((0, 2))
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"points must have shape (N, 2) (two objectives), got shape {arr.shape}")
    return arr


def _front_mask(minimised: np.ndarray) -> np.ndarray:
    """Boolean mask of the non-dominated rows of an (N, 2) array to minimise. O(N log N).

    Rows must already be finite. Sort by (f0, f1); within a group of equal f0 only the rows with the
    group's smallest f1 can survive, and they do when that f1 is strictly below every f1 seen in
    groups with a smaller f0 (an equal f1 with a smaller f0 dominates).
    """
    n = len(minimised)
    mask = np.zeros(n, dtype=bool)
    if n == 0:
        return mask
    order = np.lexsort((minimised[:, 1], minimised[:, 0]))  # primary key f0, then f1
    best_f1 = math.inf
    i = 0
    while i < n:
        f0 = minimised[order[i], 0]
        j = i
        while j < n and minimised[order[j], 0] == f0:
            j += 1
        group_min = minimised[order[i], 1]  # sorted by f1 inside the group
        if group_min < best_f1:
            k = i
            while k < j and minimised[order[k], 1] == group_min:
                mask[order[k]] = True
                k += 1
            best_f1 = group_min
        i = j
    return mask


def front(points, directions: Sequence[str]) -> list[int]:
    """Indices (ascending) of the non-dominated points.

    ``points`` is a sequence of pairs or an (N, 2) array; ``directions`` says for each objective
    whether it is maximised or minimised, e.g. ``("max", "min")`` for (accuracy, MACs). Identical
    points are all kept; points with NaN or infinite coordinates are excluded.
    """
    signs = _signs(directions)
    arr = _as_points(points)
    finite = np.flatnonzero(np.isfinite(arr).all(axis=1))
    mask = _front_mask(arr[finite] * signs)
    return sorted(int(i) for i in finite[mask])


def hypervolume(points, reference: Sequence[float], directions: Sequence[str]) -> float:
    """Exact area dominated by the points and bounded by ``reference`` (two objectives).

    The area is that of the union of the rectangles between each point and the reference point.
    A point that is not strictly better than the reference on both objectives contributes nothing,
    as do NaN or infinite points. Hypervolumes are comparable only under the same reference and
    directions.
    """
    signs = _signs(directions)
    arr = _as_points(points)
    ref = np.asarray(reference, dtype=float) if not isinstance(reference, str) else None
    if ref is None or ref.shape != (2,):
        raise ValueError(f"reference must be a pair of numbers, got {reference!r}")
    if not np.isfinite(ref).all():
        raise ValueError(f"reference must be finite, got {list(ref)!r}")
    ref = ref * signs
    arr = arr[np.isfinite(arr).all(axis=1)] * signs
    arr = arr[(arr < ref).all(axis=1)]
    if len(arr) == 0:
        return 0.0
    pts = np.unique(arr[_front_mask(arr)], axis=0)  # sorted by f0 ascending, so f1 descending
    next_f0 = np.append(pts[1:, 0], ref[0])
    return float(np.sum((next_f0 - pts[:, 0]) * (ref[1] - pts[:, 1])))


def default_reference(points, directions: Sequence[str]) -> tuple[float, float]:
    """A reference point a little worse than every finite point, for ``hypervolume``.

    Per objective, with ``worst`` its worst finite value and ``span`` its range (1 if all equal):

    * ``"max"``: 0 when every value is >= 0 (accuracy, a fraction: the natural zero), else
      ``worst - 0.1 * span``;
    * ``"min"``: ``1.1 * worst`` when every value is > 0 (MACs, params, latency), else
      ``worst + 0.1 * span``.

    So for (accuracy "max", MACs "min") it is ``(0, 1.1 * max MACs)``. It depends on the points, so
    to compare sweeps, pass one fixed reference to every ``hypervolume`` call instead (the dense
    model's MACs is a good MACs coordinate: no pruned model exceeds it).
    """
    signs = _signs(directions)
    arr = _as_points(points)
    arr = arr[np.isfinite(arr).all(axis=1)]
    if len(arr) == 0:
        raise ValueError("default_reference needs at least one point with finite coordinates")
    ref = []
    for col, sign in zip(arr.T, signs):
        lo, hi = float(col.min()), float(col.max())
        span = hi - lo if hi > lo else 1.0
        if sign < 0:  # maximised: the worst is the smallest
            ref.append(0.0 if lo >= 0 else lo - 0.1 * span)
        else:
            ref.append(1.1 * hi if lo > 0 else hi + 0.1 * span)
    return float(ref[0]), float(ref[1])
