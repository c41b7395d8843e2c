"""Pareto front, hypervolume and the area objective on hand-checked numbers."""

from __future__ import annotations

import pytest

from search.pareto import dominates, hypervolume, nondominated_ranks, pareto_front, staircase_area, trapezoid_area


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


def test_trapezoid_area_by_hand():
    # flat 0.9 to the target scores 0.9
    assert trapezoid_area([(0.0, 0.9), (0.25, 0.9), (0.5, 0.9)], upto=0.5) == pytest.approx(0.9)
    # stopping halfway halves it
    assert trapezoid_area([(0.0, 0.9), (0.25, 0.9)], upto=0.5) == pytest.approx(0.45)
    # 0.9 -> 0.7 over [0, 0.5]: mean 0.8
    assert trapezoid_area([(0.0, 0.9), (0.5, 0.7)], upto=0.5) == pytest.approx(0.8)
    # past `upto` the line is cut where it crosses it: 0.9 -> 0.7 over [0, 1], accuracy 0.8 at 0.5
    assert trapezoid_area([(0.0, 0.9), (1.0, 0.7)], upto=0.5) == pytest.approx(0.85)
    # 0-0.25: (0.96 + 0.90) / 2 * 0.25; 0.25-0.3: accuracy 0.89 at 0.3, (0.90 + 0.89) / 2 * 0.05
    assert trapezoid_area([(0.0, 0.96), (0.25, 0.90), (0.5, 0.85)], 0.3) == pytest.approx((0.2325 + 0.04475) / 0.3)
    with pytest.raises(ValueError):
        trapezoid_area([(0.0, 1.0)], upto=0.0)


def test_staircase_area_by_hand():
    """Each sparsity gets the accuracy of the least pruned model at or beyond it: the trial's own hypervolume."""
    ten = [(0.0, 0.95), (0.1, 0.94), (0.2, 0.92), (0.3, 0.90), (0.4, 0.86)]
    assert staircase_area(ten, upto=0.4) == pytest.approx((0.94 + 0.92 + 0.90 + 0.86) / 4)
    assert staircase_area(ten, upto=0.4) == pytest.approx(hypervolume(ten) / 0.4)
    # a trial that skips 10% and 30% is paid its next model's accuracy there, less than the trapezoid credits it
    skips = [(0.0, 0.95), (0.2, 0.92), (0.4, 0.86)]
    assert staircase_area(skips, upto=0.4) == pytest.approx((0.92 + 0.86) / 2)
    assert staircase_area(skips, 0.4) < staircase_area(ten, 0.4) < trapezoid_area(skips, 0.4)
    # part of the way: 0 past the last point; past `upto` only up to it
    assert staircase_area([(0.0, 0.9), (0.25, 0.8)], upto=0.5) == pytest.approx(0.4)
    assert staircase_area([(0.0, 1.0), (0.3, 0.9), (0.6, 0.5)], upto=0.4) == pytest.approx((0.3 * 0.9 + 0.1 * 0.5) / 0.4)
    with pytest.raises(ValueError):
        staircase_area(ten, upto=-0.1)


def test_nondominated_ranks_by_hand():
    points = [(0.1, 0.9), (0.2, 0.8), (0.1, 0.8), (0.3, 0.5), (0.05, 0.7), (0.2, 0.8)]
    # front 0: (0.1, 0.9), (0.2, 0.8) twice (equal points do not dominate each other), (0.3, 0.5)
    # front 1: (0.1, 0.8); front 2: (0.05, 0.7)
    assert nondominated_ranks(points) == [0, 0, 1, 0, 2, 0]
    assert nondominated_ranks([]) == []


def test_pareto_asha_ranks_a_rung_by_fronts():
    from ray.tune.schedulers import TrialScheduler

    from search.schedulers import ParetoAsha

    scheduler = ParetoAsha("sparsity_pct", ("accuracy", "attention_sparsity"), max_t=50, grace_period=10, reduction_factor=2)
    assert [m for m, _ in scheduler.rungs] == [40, 20, 10]
    go, stop = TrialScheduler.CONTINUE, TrialScheduler.STOP
    assert scheduler.decide("a", 10, (0.90, 0.10)) == go  # alone at the rung
    # b is not dominated by a (both on front 0), but only 1 of 2 goes on: a front's ties go to accuracy
    assert scheduler.decide("b", 12, (0.85, 0.12)) == stop
    # rung 10 now has a (0.90, 0.10), b (0.85, 0.12); c is dominated by both: front 1, 3rd of 3, 2 kept
    assert scheduler.decide("c", 10, (0.80, 0.10)) == stop
    # d dominates everyone: first of 4
    assert scheduler.decide("d", 13, (0.95, 0.13)) == go
    # a trial that skips rungs is judged at the highest it reached, once
    assert scheduler.decide("e", 25, (0.5, 0.25)) == go and scheduler.decide("e", 26, (0.4, 0.26)) == go
    assert "e" in scheduler.rungs[1][1] and "e" not in scheduler.rungs[2][1]


def test_pareto_asha_keeps_the_less_accurate_but_sparser_trial():
    from ray.tune.schedulers import TrialScheduler

    from search.schedulers import ParetoAsha

    scheduler = ParetoAsha("sparsity_pct", ("accuracy", "attention_sparsity"), max_t=50, grace_period=10, reduction_factor=3)
    for name, point in {"a": (0.9, 0.10), "b": (0.89, 0.10), "c": (0.88, 0.10)}.items():
        scheduler.decide(name, 10, point)
    # ASHA on accuracy alone would stop it (worst of 4); it is on the front (sparsest): kept in the top 2
    assert scheduler.decide("sparse", 15, (0.80, 0.15)) == TrialScheduler.CONTINUE
