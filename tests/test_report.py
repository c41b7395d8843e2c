"""The Pareto report on hand-made points: n-objective fronts, the epsilon-net beside the exact front, the
hypervolume against hand computation, and a page that shows the dense reference and links each point."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from search.report import build_report


def points(rows: list[tuple]) -> pd.DataFrame:
    """(trial, step, sparsity, accuracy, speedup) -> the report's point rows."""
    return pd.DataFrame([
        {"trial": trial, "segment": 0, "run_id": f"run-{trial}", "strategy": f"s-{trial}", "schedule": f"s-{trial} x{step}",
         "step": step, "attention_sparsity": sparsity, "accuracy": accuracy, "speedup": speedup, "latency_ms": 10 / speedup,
         "params": 100, "macs": 1000, "step_ratio": 0.1, "lora_rank": "8", "status": "FINISHED", "asha_stopped": False}
        for trial, step, sparsity, accuracy, speedup in rows
    ])


# today's demo front: variable_per_head at 50.1% and 76.5% beside per_head at 49.9% and 89.3%
DEMO = [("a", 1, 0.20, 0.95, 1.10), ("b", 5, 0.499, 0.893, 1.20), ("c", 5, 0.501, 0.765, 1.25), ("a", 2, 0.30, 0.90, 1.15)]


def test_the_epsilon_net_drops_a_point_barely_sparser_and_far_less_accurate(tmp_path):
    report = build_report(points(DEMO), "accuracy", tmp_path, "demo", epsilon=(0.005, 0.01))
    exact = set(zip(report.exact_front["trial"], report.exact_front["step"]))
    assert exact == {("a", 1), ("a", 2), ("b", 5), ("c", 5)}, "the exact front keeps every non-dominated point"
    assert set(zip(report.front["trial"], report.front["step"])) == {("a", 1), ("a", 2), ("b", 5)}
    assert pd.read_parquet(report.files["table"])["trial"].tolist() == ["a", "a", "b"]
    assert len(pd.read_parquet(report.files["exact"])) == 4
    # the hypervolume is the exact front's, by hand: strips of sparsity under the staircase
    assert report.hypervolume == pytest.approx(0.2 * 0.95 + 0.1 * 0.90 + 0.199 * 0.893 + 0.002 * 0.765)


def test_without_epsilon_the_front_is_exact(tmp_path):
    report = build_report(points(DEMO), "accuracy", tmp_path, "demo")
    assert len(report.front) == 4 and report.exact_front is None and "exact" not in report.files


def test_a_speed_front_keeps_the_fastest_model_and_measures_from_speedup_one(tmp_path):
    rows = [("a", 1, 0.30, 0.90, 1.10), ("b", 1, 0.30, 0.85, 1.40), ("c", 1, 0.20, 0.80, 1.20)]
    two = build_report(points(rows), "accuracy", tmp_path / "two", "sparsity")
    assert set(two.front["trial"]) == {"a"}, "on accuracy x sparsity the fast model is dominated"
    speed = build_report(points(rows), "accuracy", tmp_path / "speed", "speed", objectives=("accuracy", "speedup"))
    assert set(speed.front["trial"]) == {"a", "b"}
    # reference accuracy 0, speedup 1: 0.90 x 0.10 + 0.85 x (0.40 - 0.10)
    assert speed.hypervolume == pytest.approx(0.9 * 0.1 + 0.85 * 0.3)
    three = build_report(points(rows), "accuracy", tmp_path / "three", "3", objectives=("accuracy", "sparsity", "speedup"))
    assert set(three.front["trial"]) == {"a", "b"}
    # boxes [0, 0.9] x [0, 0.3] x [1, 1.1] and [0, 0.85] x [0, 0.3] x [1, 1.4] overlap in [0, .85] x [0, .3] x [1, 1.1]
    assert three.hypervolume == pytest.approx(0.9 * 0.3 * 0.1 + 0.85 * 0.3 * 0.4 - 0.85 * 0.3 * 0.1)


def test_objectives_the_points_lack_are_refused(tmp_path):
    frame = points(DEMO).drop(columns=["speedup"])
    with pytest.raises(ValueError, match="speedup"):
        build_report(frame, "accuracy", tmp_path, "no speed", objectives=("accuracy", "speedup"))
    with pytest.raises(ValueError, match="epsilon"):
        build_report(points(DEMO), "accuracy", tmp_path, "bad", epsilon=(0.01,))


def test_the_page_shows_dense_lines_hover_labels_and_links_each_point(tmp_path):
    url = "http://127.0.0.1:5000/#/experiments/7/runs/{run_id}"
    report = build_report(points(DEMO), "accuracy", tmp_path, "demo", dense={"validation": 0.9028, "test": 0.8975},
                          run_url=url, epsilon=(0.005, 0.01))
    page = report.files["html"].read_text()
    # the figure's data is JSON in the page, with / and < written as \\u escapes
    page = re.sub(r"\\u([0-9a-fA-F]{4})", lambda found: chr(int(found.group(1), 16)), page)
    assert "dense, validation 0.9028" in page and "dense, test 0.8975" in page
    for trial in ("a", "b", "c"):
        assert f"http://127.0.0.1:5000/#/experiments/7/runs/run-{trial}" in page, "every point links its MLflow run"
        assert f"s-{trial} x5" in page or trial == "a"
    assert "plotly_click" in page and "window.open" in page
    assert re.search(r"<b>b</b> step 5<br>s-b x5", page), "hovering shows trial, step and schedule"
    assert "predicted speedup" in page, "accuracy against speedup beside accuracy against sparsity"
    assert "The exact Pareto front" in page and "epsilon-net" in page
    assert report.files["plot"].stat().st_size > 10_000
