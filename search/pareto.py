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


def normalized_area(curve: Sequence[Point], target: float) -> float:
    """Area under a trial's accuracy–sparsity curve so far, divided by the target sparsity.

    The curve starts at the dense model (sparsity 0). A trial that keeps accuracy `a` all the way
    to the target scores `a`; one that stops halfway scores at most `a / 2`, so the score rewards
    both staying accurate and going further, and compares trials with different step sizes fairly.
    """
    if target <= 0:
        raise ValueError(f"target sparsity must be > 0, got {target}")
    ordered = sorted(curve)
    area = 0.0
    for (s0, a0), (s1, a1) in zip(ordered, ordered[1:]):
        area += (min(s1, target) - min(s0, target)) * (a0 + a1) / 2
    return area / target


def mean_accuracy_to(curve: Sequence[Point], sparsity: float) -> float:
    """Mean accuracy over attention sparsity [0, `sparsity`], linear between the curve's points.

    Population-based training ranks trials with this at a sparsity all of them have reached: trials
    whose steps land at different sparsities (other step ratios) are compared over the same range,
    and a trial that has gone further gains nothing from it. `curve` starts at the dense model.
    """
    ordered = sorted(curve)
    if sparsity <= 0 or not ordered or ordered[-1][0] < sparsity - 1e-12:
        raise ValueError(f"the curve must reach sparsity {sparsity} (it reaches {ordered[-1][0] if ordered else None})")
    area = 0.0
    for (s0, a0), (s1, a1) in zip(ordered, ordered[1:]):
        if s0 >= sparsity:
            break
        end = min(s1, sparsity)
        at_end = a0 + (a1 - a0) * (end - s0) / (s1 - s0) if s1 > s0 else a1
        area += (end - s0) * (a0 + at_end) / 2
    return area / sparsity
