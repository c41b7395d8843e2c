"""Pareto front, hypervolume and the area objective on hand-checked numbers."""

from __future__ import annotations

import pytest

from search.pareto import dominates, hypervolume, normalized_area, pareto_front


def test_dominates():
    assert dominates((0.5, 0.9), (0.4, 0.9))
    assert not dominates((0.5, 0.9), (0.5, 0.9))
    assert not dominates((0.5, 0.8), (0.4, 0.9))


def test_front_by_hand():
    points = [(0.0, 0.95), (0.1, 0.94), (0.1, 0.96), (0.3, 0.90), (0.3, 0.85), (0.5, 0.91), (0.5, 0.91), (0.2, 0.5)]
    # (0.1, 0.96) dominates (0.0, 0.95) and (0.1, 0.94); (0.5, 0.91) dominates the 0.3s and (0.2, 0.5)
    assert pareto_front(points) == [2, 5]
    assert pareto_front([]) == []


def test_hypervolume_by_hand():
    # rectangles [0, 0.5] x [0, 0.9] and [0, 0.2] x [0, 0.95]: 0.45 + 0.2 * 0.05
    assert hypervolume([(0.5, 0.9), (0.2, 0.95), (0.1, 0.5)]) == pytest.approx(0.46)
    # against reference (0, 0.8): 0.5 * 0.1 + 0.2 * 0.05
    assert hypervolume([(0.5, 0.9), (0.2, 0.95)], reference=(0.0, 0.8)) == pytest.approx(0.06)
    assert hypervolume([(0.5, 0.7)], reference=(0.0, 0.8)) == 0.0


def test_normalized_area_by_hand():
    # flat 0.9 to the target scores 0.9
    assert normalized_area([(0.0, 0.9), (0.25, 0.9), (0.5, 0.9)], target=0.5) == pytest.approx(0.9)
    # stopping halfway halves it
    assert normalized_area([(0.0, 0.9), (0.25, 0.9)], target=0.5) == pytest.approx(0.45)
    # trapezoid: 0.9 -> 0.7 over [0, 0.5]: mean 0.8
    assert normalized_area([(0.0, 0.9), (0.5, 0.7)], target=0.5) == pytest.approx(0.8)
    # points past the target count only up to it
    assert normalized_area([(0.0, 1.0), (1.0, 1.0)], target=0.5) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        normalized_area([(0.0, 1.0)], target=0.0)
