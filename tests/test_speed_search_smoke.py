"""benchmarks.speed_search: its headline pick on hand-checked points and its tables on a hand-made results dict.

The quick mode starts Ray and runs two searches (minutes on 2 cores), too slow for a smoke test.
"""

from __future__ import annotations

import pytest

from benchmarks.speed_search import headline, markdown, summarize

DENSE = 0.90


def point(validation: float, measured: float | None, predicted: float = 1.5, **extra) -> dict:
    return {"trial": "t", "step": 1, "sparsity": 0.5, "validation": validation, "predicted": predicted,
            "measured": measured, **extra}


def test_headline_is_the_fastest_model_within_one_point_of_dense():
    points = [
        point(0.905, 1.20),  # more accurate than dense, slow
        point(0.893, 1.60),  # 0.7 pt below dense: the headline
        point(0.889, 1.90),  # 1.1 pt below: too far
        point(0.895, None, predicted=3.0),  # not timed: no candidate
    ]
    assert headline(points, DENSE) is points[1]


def test_headline_counts_a_model_exactly_one_point_below_and_none_when_none_qualifies():
    exactly = point(0.09, 1.7)  # 0.10 - 0.01 in floats is 0.09000000000000001: 0.09 is still within one point
    assert headline([point(0.095, 1.3), exactly], 0.10) is exactly
    assert headline([point(0.85, 2.0), point(0.80, 3.0)], DENSE) is None


def test_markdown_shows_each_seed_and_the_medians():
    runs = []
    for seed, (sparsity_speed, speed_speed) in enumerate([(1.5, 1.8), (1.4, 1.2), (1.6, 2.0)]):
        for method, speed in (("sparsity", sparsity_speed), ("speedup", speed_speed)):
            runs.append({"method": method, "seed": seed, "seconds": 120.0, "steps_run": 48, "dense_validation": DENSE,
                         "points": [point(0.895, speed, sparsity=0.4, test=0.88), point(0.70, 3.0)]})
    results = {"runs": runs, "measured": {str(s): {"dense_test": 0.8975} for s in range(3)}}
    results["summary"] = summarize(results)
    # hypervolume of {(0.895, s), (0.70, 3.0)} over (0, 1): 0.895 (s - 1) + 0.70 (3 - s)
    first = next(f for f in results["summary"]["runs"] if (f["seed"], f["method"]) == (0, "speedup"))
    assert first["hypervolume"] == pytest.approx(0.895 * 0.8 + 0.70 * 1.2)
    assert results["summary"]["methods"]["speedup"]["headline_speedup"] == pytest.approx(1.8)  # median of 1.8, 1.2, 2.0
    assert results["summary"]["methods"]["sparsity"]["headline_speedup"] == pytest.approx(1.5)
    text = markdown(results)
    assert "| 0 | speedup | 1.80x | 1.50x | 40% | 89.5% | 88.0% | 89.8% |" in text
    assert "| speedup | 3 | 1.80x | 88.0% |" in text
