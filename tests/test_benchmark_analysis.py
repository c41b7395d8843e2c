"""The analysis of the search-efficiency and paper-proxy benchmarks, on hand-made results, and the results
tables of benchmarks/README.md, generated from benchmarks/results."""

from __future__ import annotations

import pytest

from benchmarks import readme
from benchmarks.common import print_from_json
from benchmarks.paper_proxy import compare, layer_summary
from benchmarks.search_efficiency import hypervolume_curve, summarize


def test_hypervolume_curve_grows_with_the_steps_in_order():
    points = [(0.1, 0.9), (0.2, 0.85), (0.1, 0.8), (0.3, 0.9)]
    curve = hypervolume_curve(points, (0.0, 0.8))
    assert curve == pytest.approx([0.01, 0.01 + 0.1 * 0.05, 0.015, 0.03])


def test_summary_counts_steps_to_reach_95_percent_of_the_best():
    runs = [
        {"method": "fast", "seed": 0, "dense": 0.9, "seconds": 10, "points": [(0.3, 0.9), (0.5, 0.9)]},
        {"method": "slow", "seed": 0, "dense": 0.9, "seconds": 20, "points": [(0.1, 0.9), (0.2, 0.9), (0.3, 0.9), (0.5, 0.9)]},
    ]
    summary = summarize(runs, budget=3)
    # reference (0, 0.8); best final = 0.5 * 0.1 (fast); slow stops at 3 steps: 0.3 * 0.1 < 95%
    assert summary["best_final_hypervolume"] == pytest.approx(0.05)
    fast, slow = summary["methods"]["fast"], summary["methods"]["slow"]
    assert fast["median_steps_to_reach"] == {"90%": 2, "95%": 2} and fast["reached"] == {"90%": "1/1", "95%": "1/1"}
    assert slow["median_steps_to_reach"] == {"90%": None, "95%": None} and slow["reached"]["95%"] == "0/1"
    # a second 'fast' seed reaches 90% at once (0.047) but never 95% (0.0475): a median needs most runs to reach
    runs.append({"method": "fast", "seed": 1, "dense": 0.9, "seconds": 10, "points": [(0.47, 0.9), (0.1, 0.9)]})
    summary = summarize(runs, budget=3)
    assert summary["methods"]["fast"]["reached"] == {"90%": "2/2", "95%": "1/2"}
    assert summary["methods"]["fast"]["median_steps_to_reach"] == {"90%": 1.5, "95%": None}
    assert summary["methods"]["slow"]["median_steps_run"] == 3


def row(granularity, scorer, threshold, test, seed=0):
    return {"granularity": granularity, "scorer": scorer, "threshold": threshold, "validation": test, "test": test, "seed": seed}


def test_paper_questions_pair_strategies_that_differ_in_one_factor():
    rows = [
        row("entire_head", "fisher", "global", 0.90), row("entire_head", "magnitude", "global", 0.85),
        row("per_head", "fisher", "global", 0.88), row("per_head", "magnitude", "global", 0.89),
        row("entire_head", "fisher", "local", 0.80), row("per_head", "fisher", "local", 0.86),
    ]
    answers = {a["question"]: a for a in compare(rows)}
    fisher = answers["Fisher beats magnitude"]
    assert fisher["pairs"] == 2 and fisher["test_wins"] == "1/2 (ties 0)"
    assert fisher["test_mean_diff"] == pytest.approx((0.05 - 0.01) / 2) and fisher["verdict"] == "unclear (within noise)"
    assert answers["global beats local"]["pairs"] == 2 and answers["global beats local"]["verdict"] == "yes"
    heads = answers["entire head beats channel pruning"]
    assert heads["pairs"] == 3  # (fisher, global), (magnitude, global), (fisher, local) against per_head
    summary = layer_summary([{"strategy": "a", "scorer": "fisher", "layers": [0.2, 0.6]},
                             {"strategy": "a", "scorer": "fisher", "layers": [0.4, 0.2]}])
    assert summary == [{"strategy": "a", "mean_layer_sparsity": pytest.approx([0.3, 0.4]), "most_pruned_layer": 1}]


def test_benchmarks_readme_tables_are_those_the_results_files_give():
    """A results file changed without `python -m benchmarks.readme` leaves the README's numbers stale."""
    assert readme.stale(readme.README.read_text()) == []


def test_readme_tables_are_regenerated_between_their_markers_and_must_all_have_a_place():
    text = "".join(f"<!-- table:{name} -->\nSTALE TABLE\n<!-- /table -->\n" for name in readme.TABLES)
    assert set(readme.stale(text)) == set(readme.TABLES)
    fresh = readme.regenerate(text)
    assert readme.stale(fresh) == [] and "STALE TABLE" not in fresh
    assert readme.regenerate(fresh) == fresh
    with pytest.raises(ValueError, match="without a place"):
        readme.regenerate(text.split("<!-- table:", 2)[0] + "<!-- table:" + text.split("<!-- table:", 2)[2])


def test_from_json_says_when_there_is_no_results_file(tmp_path, capsys):
    assert print_from_json(tmp_path / "missing.json", str) == 2
    assert "does not exist" in capsys.readouterr().err
