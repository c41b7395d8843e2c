"""The analysis of the search-efficiency and paper-proxy benchmarks, on hand-made results, and the results
tables of benchmarks/README.md, generated from benchmarks/results."""

from __future__ import annotations

import pytest

from benchmarks import readme
from benchmarks.common import print_from_json
from benchmarks.paper_proxy import compare, layer_summary
from benchmarks.search_efficiency import METHODS, STEP_COST, TASKS, grid_budget, hypervolume_curve, parse_args, search_config, summarize
from search.space import load_config


def test_hypervolume_curve_grows_with_the_steps_in_order():
    points = [(0.1, 0.9), (0.2, 0.85), (0.1, 0.8), (0.3, 0.9)]
    curve = hypervolume_curve(points, (0.0, 0.8))
    assert curve == pytest.approx([0.01, 0.01 + 0.1 * 0.05, 0.015, 0.03])


def step(sparsity, validation, test=None, lineage=("per_head/fisher/global",)):
    found = {"sparsity": sparsity, "validation": validation, "lineage": list(lineage) * round(sparsity * 10)}
    return found if test is None else {**found, "test": test}


def test_protocol_summary_duels_each_method_with_the_same_seeds_grid():
    dense = {"validation": 0.9, "test": 0.88}
    grid = {"task": "ast", "method": "grid", "seed": 0, "seconds": 60, "budget": 4, "dense": dense,
            "steps": [step(0.4, 0.85, 0.80), step(0.8, 0.75, 0.70), step(0.4, 0.80), step(0.8, 0.72)]}
    pbt = {"task": "ast", "method": "pbt", "seed": 0, "seconds": 30, "budget": 4, "dense": dense,
           "steps": [step(0.4, 0.86, 0.84), step(0.8, 0.70), step(0.8, 0.80, 0.79, lineage=("a",))]}
    summary = summarize([grid, pbt])
    figures = {f["method"]: f for f in summary["runs"]}
    # validation reference 0.7: grid 0.8 * 0.05 + 0.4 * 0.10; pbt 0.4 * 0.16, then (0.8, 0.70) adds nothing, then
    # (0.8, 0.80) makes it 0.8 * 0.1 + 0.4 * 0.06
    assert figures["grid"]["validation_hypervolume"] == pytest.approx(0.08)
    assert figures["pbt"]["curve"] == pytest.approx([0.064, 0.064, 0.104])
    # test reference 0.68, the validation front's test values only: grid 0.8 * 0.02 + 0.4 * 0.10; pbt 0.8 * 0.11 + 0.4 * 0.05
    assert figures["grid"]["test_hypervolume"] == pytest.approx(0.8 * 0.02 + 0.4 * 0.10)
    assert figures["pbt"]["test_hypervolume"] == pytest.approx(0.8 * 0.11 + 0.4 * 0.05)
    assert figures["pbt"]["steps_to_grid"] == 3 and figures["grid"]["steps_to_grid"] == 2
    assert figures["pbt"]["best_at_target"] == {"schedule": "a x8", "validation": 0.80, "sparsity": 0.8}
    assert figures["grid"]["sparsest_near_dense"] == 0.0 and figures["pbt"]["steps_run"] == 3
    assert summary["methods"]["ast/pbt"]["test_wins_over_grid"] == "1/1"
    assert summary["methods"]["ast/pbt"]["median_steps_to_grid"] == 3


def test_a_method_with_costlier_steps_is_counted_in_grid_steps():
    """A step that trains 3x the grid's LoRA batches counts 3 grid steps; its front is complete at the last."""
    dense = {"validation": 0.9, "test": 0.88}
    grid = {"task": "ast", "method": "grid", "seed": 0, "seconds": 60, "budget": 6, "dense": dense,
            "steps": [step(0.4, 0.80, 0.80)] * 6}
    deep = {"task": "ast", "method": "pbt_deep", "seed": 0, "seconds": 60, "budget": 6, "step_cost": 3, "dense": dense,
            "steps": [step(0.4, 0.75, 0.75), step(0.4, 0.85, 0.84)]}
    figures = {f["method"]: f for f in summarize([grid, deep])["runs"]}
    assert figures["pbt_deep"]["curve"] == pytest.approx([0, 0, 0.4 * 0.05, 0.4 * 0.05, 0.4 * 0.05, 0.4 * 0.15])
    assert figures["pbt_deep"]["steps_run"] == 6 and figures["pbt_deep"]["steps_to_grid"] == 6
    assert figures["grid"]["steps_to_grid"] == 1


def test_protocol_runs_are_valid_searches_at_the_grids_budget(tmp_path):
    """Every (task, method) of the protocol is a search the product accepts, with the grid's step budget."""
    assert (grid_budget(TASKS["ast"].target), grid_budget(TASKS["vit"].target)) == (96, 108)
    args = parse_args([])
    for name, task in TASKS.items():
        for method in METHODS:
            config = load_config(search_config(name, task, method, 3, args, tmp_path, grid_budget(task.target)))
            cost = STEP_COST.get(method, 1)  # the budget is the grid's LoRA batches
            assert (config.step_budget, config.seed, config.target_sparsity) == (grid_budget(task.target) // cost, 3, task.target)
            assert config.objective == "staircase" and config.train_batches_per_step == args.train_batches * cost
            assert (config.searcher, config.scheduler) == (METHODS[method]["searcher"], METHODS[method]["scheduler"])
    grid = load_config(search_config("ast", TASKS["ast"], "grid", 0, args, tmp_path, 96))
    assert [len(p.choices) for p in grid.space] == [3, 2, 2, 1, 1, 1, 1, 1], "12 strategies, one recipe"


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
