"""The accuracy–sparsity Pareto front, its hypervolume, and the area objective that ranks trials.

Pure functions on plain numbers, so the same code serves ASHA during a search, the report after it,
and the notebook.
"""

from __future__ import annotations

from collections.abc import Sequence

Point = tuple[float, float]  # (attention sparsity, accuracy); both larger is better


def dominates(a: Point, b: Point) -> bool:
    """`a` is at least as good as `b` in both objectives and better in one."""
    return a[0] >= b[0] and a[1] >= b[1] and (a[0] > b[0] or a[1] > b[1])


def pareto_front(points: Sequence[Point]) -> list[int]:
    """Indices of the non-dominated points (the first of identical points only), by sparsity."""
    chosen: list[int] = []
    best_accuracy = float("-inf")
    for index in sorted(range(len(points)), key=lambda i: (-points[i][0], -points[i][1], i)):
        if points[index][1] > best_accuracy:
            chosen.append(index)
            best_accuracy = points[index][1]
    return sorted(chosen, key=lambda i: points[i][0])


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


def hypervolume(points: Sequence[Point], reference: Point = (0.0, 0.0)) -> float:
    """Area dominated by `points` and bounded below by `reference` (sparsity, accuracy)."""
    front = [points[i] for i in pareto_front(points) if points[i][0] > reference[0] and points[i][1] > reference[1]]
    area, floor = 0.0, reference[1]
    for sparsity, accuracy in sorted(front, key=lambda p: -p[0]):
        area += (sparsity - reference[0]) * (accuracy - floor)
        floor = accuracy
    return area


def staircase_area(curve: Sequence[Point], upto: float) -> float:
    """Mean over sparsity [0, `upto`] of the accuracy the trial delivers there: that of its least pruned
    model at or beyond that sparsity, 0 past its last point.

    This is the trial's own hypervolume (reference accuracy 0) divided by `upto`, the measure its points
    add to a front: a trial that skips a level (25% steps) is paid its next model's accuracy there, never
    the interpolation between two models that do not exist. A trial that keeps accuracy `a` all the way
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
# at the dense model (sparsity 0).
OBJECTIVES = {"staircase": staircase_area, "trapezoid": trapezoid_area}
