"""Pareto fronts over n maximized objectives, their hypervolume and epsilon-net, and the scalars that rank trials.

Pure functions on plain numbers, so the same code serves the schedulers during a search, the report after it,
and the notebook. Today's front is (attention sparsity, accuracy); with a latency table it may add speedup.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import moocore
import numpy as np

Point = Sequence[float]  # one value per objective, all larger is better; e.g. (attention sparsity, accuracy)


def dominates(a: Point, b: Point) -> bool:
    """`a` is at least as good as `b` in every objective and better in one."""
    pairs = list(zip(a, b, strict=True))
    return all(x >= y for x, y in pairs) and any(x > y for x, y in pairs)


def pareto_front(points: Sequence[Point]) -> list[int]:
    """Indices of the non-dominated points (the first of identical points only; none with a NaN value), in
    ascending order of their coordinates, first coordinate first (with two objectives: by the first, e.g. sparsity)."""
    measured = [i for i, point in enumerate(points) if not any(math.isnan(x) for x in point)]
    kept: list[int] = []
    # a point can only be dominated by one before it in descending order, and then by a kept one (transitivity)
    for index in sorted(measured, key=lambda i: (*(-float(x) for x in points[i]), i)):
        point = tuple(points[index])
        if not any(dominates(points[k], point) or tuple(points[k]) == point for k in kept):
            kept.append(index)
    return sorted(kept, key=lambda i: (*(float(x) for x in points[i]), i))


def nondominated_ranks(points: Sequence[Point]) -> list[int]:
    """Front index of every point under non-dominated sorting: 0 = the Pareto front, 1 = the front
    once the first is removed, and so on (NSGA-II's sorting; MO-ASHA ranks a rung with it)."""
    ranks = [-1] * len(points)
    left = set(range(len(points)))
    level = 0
    while left:
        front = {i for i in left if not any(dominates(points[j], points[i]) for j in left if j != i)}
        for index in front:
            ranks[index] = level
        left -= front
        level += 1
    return ranks


def hypervolume(points: Sequence[Point], reference: Point | None = None) -> float:
    """Volume dominated by `points` and bounded below by `reference` (default: the origin), computed by moocore.

    A point not strictly better than the reference in every objective, or with a NaN value, adds nothing.
    """
    if len(points) == 0:
        return 0.0
    data = np.asarray(points, dtype=float)
    ref = np.zeros(data.shape[-1]) if reference is None else np.asarray(reference, dtype=float)
    if data.ndim != 2 or ref.shape != (data.shape[1],):
        raise ValueError(f"every point and the reference need one value per objective; got points of shape "
                         f"{data.shape} and a reference of {ref.size} values")
    data = data[~np.isnan(data).any(axis=1)]  # moocore's 3-D algorithm returns NaN for them
    return float(moocore.hypervolume(data, ref=ref, maximise=True)) if len(data) else 0.0


def epsilon_front(points: Sequence[Point], epsilon: Sequence[float]) -> list[int]:
    """An additive epsilon-net of the Pareto front: indices of a subset of `pareto_front(points)`, in its order,
    such that every front point left out is epsilon-dominated by a kept one (kept_i + epsilon_i >= dropped_i in
    every objective i).

    Front points closer than `epsilon` say the same thing twice (e.g. two models 0.2% apart in sparsity); the net
    shows one. It is chosen greedily: keep the front point that epsilon-dominates the most front points not yet
    covered (ties: the first in the front's order), until every front point is covered.
    """
    if any(not e >= 0 for e in epsilon) or (len(points) and len(epsilon) != len(points[0])):
        raise ValueError(f"epsilon needs one value >= 0 per objective, got {list(epsilon)}")
    front = pareto_front(points)
    order = {index: position for position, index in enumerate(front)}
    covers = {i: {i} | {j for j in front if all(a + e >= b for a, e, b in zip(points[i], epsilon, points[j]))}
              for i in front}  # {i}: each point covers itself, even at -inf + inf
    kept: list[int] = []
    uncovered = set(front)
    while uncovered:
        best = max(front, key=lambda i: (len(covers[i] & uncovered), -order[i]))
        kept.append(best)
        uncovered -= covers[best]
    return sorted(kept, key=order.get)


def own_hypervolume(points: Sequence[Point], reference: Point, upper: Point) -> float:
    """A trial's own scalar over n objectives: the fraction of the box from `reference` to `upper` that its
    points dominate, each point first clipped to `upper`.

    It is what ASHA (`area`) and population-based training rank a trial on when speedup is an objective,
    where no accuracy-over-sparsity area exists: like the area, it grows when the trial stays accurate and
    when it goes further, and trials share the box, so their values compare. The box's top is where credit
    ends (the target sparsity: going past it earns nothing). For (accuracy, sparsity), reference (0, 0) and
    upper (1, upto) it is `staircase_area(curve, upto)` on any curve where no model is more accurate than a less
    pruned one; where one is, the hypervolume pays that model's accuracy at the lower sparsities too (the model
    is there to be taken), the staircase only the next model's.
    """
    if len(reference) != len(upper) or any(not top > low for low, top in zip(reference, upper)):
        raise ValueError(f"the box needs upper > reference in every objective, got reference {list(reference)} "
                         f"and upper {list(upper)}")
    clipped = [tuple(min(x, top) for x, top in zip(point, upper, strict=True)) for point in points]
    return hypervolume(clipped, reference) / float(np.prod(np.subtract(upper, reference)))


def staircase_area(curve: Sequence[Point], upto: float) -> float:
    """Mean over sparsity [0, `upto`] of the accuracy the trial delivers there: that of its least pruned
    model at or beyond that sparsity, 0 past its last point.

    This is the trial's own hypervolume (reference accuracy 0) divided by `upto`, the measure its points
    add to a front, as long as no model is more accurate than a less pruned one (`own_hypervolume`): a
    trial that skips a level (25% steps) is paid its next model's accuracy there, never the interpolation
    between two models that do not exist. A trial that keeps accuracy `a` all the way
    scores `a`; one that stops halfway at most `a / 2`.
    """
    _check_upto(upto)
    area, done = 0.0, 0.0
    for sparsity, accuracy in sorted(curve):
        end = min(sparsity, upto)
        if end > done:
            area += (end - done) * accuracy
            done = end
    return area / upto


def trapezoid_area(curve: Sequence[Point], upto: float) -> float:
    """Mean over sparsity [0, `upto`] of the accuracy interpolated linearly between the curve's points,
    0 past its last point (`objective: trapezoid`; it credits the levels a trial skips, which no model holds)."""
    _check_upto(upto)
    ordered = sorted(curve)
    area = 0.0
    for (s0, a0), (s1, a1) in zip(ordered, ordered[1:]):
        if s0 >= upto:
            break
        end = min(s1, upto)
        at_end = a0 + (a1 - a0) * (end - s0) / (s1 - s0) if s1 > s0 else a1
        area += (end - s0) * (a0 + at_end) / 2
    return area / upto


def _check_upto(upto: float) -> None:
    if upto <= 0:
        raise ValueError(f"the sparsity to average up to must be > 0, got {upto}")


# The scalar a trial is ranked on (`objective:`): ASHA at its rungs and Optuna at its end take it up to the
# target sparsity, population-based training up to the sparsity all ranked trials have reached. Curves start
# at the dense model (sparsity 0). With speedup among the objectives a trial is ranked on `own_hypervolume`
# instead (search.schedulers.trial_area).
OBJECTIVES = {"staircase": staircase_area, "trapezoid": trapezoid_area}
