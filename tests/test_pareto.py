"""Pareto fronts (2 and 3 objectives), hypervolume, epsilon-net and the trial scalars on hand-checked numbers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from search.pareto import (
    dominates,
    epsilon_front,
    hypervolume,
    nondominated_ranks,
    own_hypervolume,
    pareto_front,
    staircase_area,
    trapezoid_area,
)


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


# n objectives: (accuracy, sparsity, speedup) below, all maximized

# 0 and 1 differ in speed only; 4 and 5 are identical; 4 is dominated by 0 in the first two objectives, not in the third
POINTS_3D = [
    (0.5, 0.9, 1.2),  # 0 front
    (0.5, 0.9, 1.1),  # 1 dominated by 0 alone
    (0.3, 0.95, 1.0),  # 2 front: most accurate
    (0.6, 0.8, 1.1),  # 3 front: sparsest
    (0.4, 0.85, 1.5),  # 4 front: fastest
    (0.4, 0.85, 1.5),  # 5 = 4
    (0.3, 0.8, 1.0),  # 6 dominated by every other point
    (0.6, 0.8, 1.0),  # 7 dominated by 3 alone
]


def test_dominates_in_three_objectives():
    assert dominates((1, 2, 3), (1, 2, 2))
    assert not dominates((1, 2, 3), (1, 2, 3))
    assert not dominates((1, 3, 2), (2, 2, 2)) and not dominates((2, 2, 2), (1, 3, 2))
    assert not dominates((1, 2, 3), (1, 2, 4)), "the third objective counts"
    with pytest.raises(ValueError):
        dominates((1, 2, 3), (1, 2))


def test_front_and_ranks_in_three_objectives_by_hand():
    # front: 0, 2, 3, 4 (5 is 4 again: the first only), in ascending order of (first, second, third) coordinate
    assert pareto_front(POINTS_3D) == [2, 4, 0, 3]
    # rank 0: the front and 5 (equal points do not dominate each other); rank 1: 1 (under 0) and 7 (under 3);
    # rank 2: 6, which 1 and 7 dominate too
    assert nondominated_ranks(POINTS_3D) == [0, 1, 0, 0, 0, 0, 2, 1]


def test_front_keeps_the_two_objective_order():
    """Two objectives: by the first coordinate, the first of identical points, whatever the input order."""
    points = [(0.5, 0.91), (0.1, 0.96), (0.5, 0.91), (0.3, 0.92), (0.0, 0.97)]
    assert pareto_front(points) == [4, 1, 3, 0]


def test_hypervolume_of_overlapping_boxes_by_hand():
    # boxes of volume 2 and 2 sharing the unit cube: 3
    assert hypervolume([(2, 1, 1), (1, 2, 1)], (0, 0, 0)) == pytest.approx(3.0)
    # with a third box [0,1] x [0,1] x [0,3]: 2 + 2 + 3, minus the three pairwise unit overlaps, plus the triple one
    boxes = [(2, 1, 1), (1, 2, 1), (1, 1, 3)]
    assert hypervolume(boxes, (0, 0, 0)) == pytest.approx(5.0)
    # from (0.5, 0.5, 0.5): 0.375 + 0.375 + 0.625, pairwise overlaps 0.125 each, triple 0.125
    assert hypervolume(boxes, (0.5, 0.5, 0.5)) == pytest.approx(1.125)
    assert hypervolume(boxes) == pytest.approx(5.0), "the default reference is the origin"


def test_points_not_better_than_the_reference_add_nothing():
    assert hypervolume([(2, 2, 0)], (0, 0, 0)) == 0.0  # on the reference in one objective
    assert hypervolume([(2, 2, -1)], (0, 0, 0)) == 0.0  # worse in one
    assert hypervolume([(2, 1, 1), (5, 5, 0), (5, 0.5, -1)], (0, 0, 0)) == pytest.approx(2.0)
    assert hypervolume([(3.0, 3.0)], (1.0, 2.5)) == pytest.approx(1.0)
    assert hypervolume([], (0, 0, 0)) == 0.0
    nan = float("nan")
    assert hypervolume([(2, 1, 1), (5, nan, 5), (nan, 5, 5)], (0, 0, 0)) == pytest.approx(2.0)


def test_a_point_with_a_nan_value_is_on_no_front():
    nan = float("nan")
    points = [(0.5, 0.9, 1.1), (0.2, nan, 1.0), (nan, 0.95, 1.0), (0.3, 0.8, 1.0)]
    assert pareto_front(points) == [0]
    assert epsilon_front(points, (0.01, 0.01, 0.01)) == [0]
    with pytest.raises(ValueError, match="one value per objective"):
        hypervolume([(1, 1, 1)], (0, 0))


@pytest.mark.parametrize("dimensions,levels,reference", [(3, 10, (0, 0, 0)), (3, 10, (2, 3, 1)), (4, 5, (0, 1, 0, 0))])
def test_hypervolume_matches_a_count_of_grid_cells(dimensions, levels, reference):
    """Random points on an integer grid: the volume they dominate is the count of unit cells whose top corner
    one of them dominates, exactly."""
    rng = np.random.default_rng(dimensions * levels)
    points = rng.integers(1, levels + 1, size=(12, dimensions))
    count = sum(
        any(all(p >= c + 1 for p, c in zip(point, cell)) for point in points)
        for cell in itertools.product(*(range(r, levels) for r in reference))
    )
    assert count > 0
    assert hypervolume([tuple(p) for p in points], reference) == pytest.approx(count, abs=1e-9)
    # scaled to the unit cube, as accuracies and sparsities are
    scaled = [tuple(p / levels) for p in points]
    assert hypervolume(scaled, tuple(r / levels for r in reference)) == pytest.approx(count / levels**dimensions)


DEMO = [(0.0, 0.95), (0.25, 0.93), (0.499, 0.893), (0.501, 0.765), (0.2, 0.90)]  # (sparsity, accuracy)


def test_epsilon_front_drops_the_point_a_neighbour_covers():
    """(0.501, 0.765) is 0.002 sparser than (0.499, 0.893) and far less accurate: the exact front keeps both,
    the net with epsilon (0.01, 0.005) only the latter (0.499 + 0.01 >= 0.501, 0.893 + 0.005 >= 0.765)."""
    assert pareto_front(DEMO) == [0, 1, 2, 3]
    assert epsilon_front(DEMO, (0.01, 0.005)) == [0, 1, 2]


def test_epsilon_front_keeps_everything_when_no_point_covers_another():
    assert epsilon_front(DEMO, (0.0, 0.0)) == [0, 1, 2, 3]
    assert epsilon_front(DEMO, (0.001, 0.001)) == [0, 1, 2, 3]
    assert epsilon_front([], (0.1, 0.1)) == []


def test_epsilon_is_additive_and_favours_the_kept_point():
    # 0.1 + 0.01 >= 0.105: covered; a multiplicative epsilon (0.1 * 1.01 = 0.101) would not cover it
    assert epsilon_front([(0.1, 0.9), (0.105, 0.5)], (0.01, 0.0)) == [0]
    # the covering point is the less sparse but more accurate one; the other does not cover it (0.5 < 0.9)
    assert epsilon_front([(0.105, 0.5), (0.1, 0.9)], (0.01, 0.0)) == [1]


def test_epsilon_front_in_three_objectives():
    # (accuracy, sparsity, speedup): 0 and 1 cover each other; the tie goes to the first in the front's order (1)
    points = [(0.90, 0.5, 1.30), (0.89, 0.5, 1.32), (0.95, 0.2, 1.10), (0.80, 0.2, 1.00)]
    assert pareto_front(points) == [1, 0, 2]
    assert epsilon_front(points, (0.02, 0.0, 0.05)) == [1, 2]
    # 1 is 0.01 less accurate than 0: with an accuracy epsilon of 0.005 only 0 covers both
    assert epsilon_front(points, (0.005, 0.0, 0.05)) == [0, 2]
    with pytest.raises(ValueError, match="one value >= 0 per objective"):
        epsilon_front(points, (0.01, 0.01))
    with pytest.raises(ValueError, match="one value >= 0 per objective"):
        epsilon_front(points, (0.01, -0.01, 0.0))


@pytest.mark.parametrize("curve,upto", [
    ([(0.0, 0.95), (0.1, 0.94), (0.2, 0.92), (0.3, 0.90), (0.4, 0.86)], 0.4),
    ([(0.0, 0.95), (0.1, 0.94), (0.2, 0.92), (0.3, 0.90), (0.4, 0.86)], 0.25),  # past upto: up to it only
    ([(0.0, 0.95), (0.2, 0.92), (0.4, 0.86)], 0.4),  # skipped levels: the next model's accuracy
    ([(0.0, 0.9), (0.25, 0.8)], 0.5),  # stopped halfway
    ([(0.0, 1.0), (0.3, 0.9), (0.6, 0.5)], 0.4),
    ([(0.0, 0.9), (0.25, 0.9), (0.5, 0.9)], 0.5),  # flat
    ([(0.0, 0.96), (0.125, 0.95), (0.25, 0.95), (0.375, 0.7), (0.5, 0.3)], 0.5),
])
def test_own_hypervolume_of_accuracy_and_sparsity_is_the_staircase(curve, upto):
    points = [(accuracy, sparsity) for sparsity, accuracy in curve]
    assert own_hypervolume(points, (0.0, 0.0), (1.0, upto)) == pytest.approx(staircase_area(curve, upto))


def test_own_hypervolume_pays_a_more_accurate_later_model_where_the_staircase_does_not():
    curve = [(0.0, 0.9), (0.1, 0.8), (0.2, 0.85)]  # the 20% model beats the 10% one
    assert staircase_area(curve, 0.2) == pytest.approx((0.1 * 0.8 + 0.1 * 0.85) / 0.2)
    assert own_hypervolume([(a, s) for s, a in curve], (0.0, 0.0), (1.0, 0.2)) == pytest.approx(0.85)


def test_own_hypervolume_in_three_objectives_by_hand():
    """(accuracy, sparsity, speedup) from (0, 0, 1x) to (1, 0.5, 2x), a box of volume 0.5."""
    points = [(0.9, 0.25, 1.2), (0.8, 0.5, 1.5)]
    # boxes 0.9 * 0.25 * 0.2 and 0.8 * 0.5 * 0.5, overlapping in 0.8 * 0.25 * 0.2
    assert own_hypervolume(points, (0.0, 0.0, 1.0), (1.0, 0.5, 2.0)) == pytest.approx((0.045 + 0.2 - 0.04) / 0.5)
    # a point past the box is clipped to it: (0.7, 0.5, 2.0); by inclusion-exclusion 0.595 - 0.25 + 0.035
    beyond = [*points, (0.7, 0.8, 3.0)]
    assert own_hypervolume(beyond, (0.0, 0.0, 1.0), (1.0, 0.5, 2.0)) == pytest.approx(0.38 / 0.5)
    # the dense model (sparsity 0, speedup 1x) adds nothing
    assert own_hypervolume([(0.95, 0.0, 1.0), *points], (0.0, 0.0, 1.0), (1.0, 0.5, 2.0)) == pytest.approx(0.41)
    with pytest.raises(ValueError, match="upper > reference"):
        own_hypervolume(points, (0.0, 0.0, 1.0), (1.0, 0.5, 1.0))


def test_pareto_asha_ranks_a_rung_on_every_objective():
    """(accuracy, sparsity, speedup) at one rung, 2 of 3 kept, then 3 of 5."""
    from ray.tune.schedulers import TrialScheduler

    from search.schedulers import ParetoAsha

    scheduler = ParetoAsha("sparsity_pct", ("accuracy", "attention_sparsity", "speedup"), max_t=50, grace_period=10,
                           reduction_factor=2)
    go, stop = TrialScheduler.CONTINUE, TrialScheduler.STOP
    assert scheduler.decide("a", 10, (0.90, 0.10, 1.05)) == go  # alone
    assert scheduler.decide("c", 10, (0.88, 0.10, 1.00)) == stop  # a dominates it: 2nd of 2, 1 kept
    # b is the least accurate, but the fastest: on front 0 with a, 2nd of 3 (a, b, c), 2 kept. On accuracy and
    # sparsity alone c would dominate it: 3rd.
    assert scheduler.decide("b", 12, (0.85, 0.10, 1.20)) == go
    # d: b dominates it (front 1, behind c by accuracy): 4th of 4, 2 kept
    assert scheduler.decide("d", 11, (0.80, 0.10, 1.10)) == stop
    # e is the fastest of all, the least accurate: front 0 with a and b, 3rd of 5, 3 kept
    assert scheduler.decide("e", 10, (0.70, 0.10, 1.50)) == go
    with pytest.raises(ValueError, match="two or more objectives"):
        ParetoAsha("sparsity_pct", ("accuracy",), max_t=50, grace_period=10, reduction_factor=2)
