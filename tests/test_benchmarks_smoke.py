"""benchmarks/scoring_cost.py on a tiny AST: the result's structure, not its timings."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

from prune_core import SCORERS
from search.baseline import BaselineConfig
from tests.conftest import ast_batches, tiny_ast

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "scoring_cost.py"


def load_benchmark():
    """Load the script as `python benchmarks/scoring_cost.py` runs it: benchmarks/ first on sys.path."""
    if str(PATH.parent) not in sys.path:
        sys.path.insert(0, str(PATH.parent))
    spec = importlib.util.spec_from_file_location("scoring_cost", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scoring_cost_times_every_scorer_against_one_forward_backward():
    bench = load_benchmark()
    model = tiny_ast()
    result = bench.measure(model, ast_batches(count=2, size=2), repeats=2, warmup=1)
    assert set(result["timings"]) == {bench.FORWARD, bench.REFERENCE, *SCORERS}
    for timing in result["timings"].values():
        assert len(timing["samples_s"]) == 2
        assert 0 < timing["min_s"] <= timing["median_s"]
        assert timing["ratio_to_fwd_bwd"] == timing["median_s"] / result["timings"][bench.REFERENCE]["median_s"]
    assert result["fisher_within_1_5x"] == (result["timings"]["fisher"]["ratio_to_fwd_bwd"] <= bench.FISHER_LIMIT)


def test_scoring_cost_demo_size_mirrors_the_baseline():
    """The benchmark mirrors the demo baseline's size (to keep Ray out of it); keep them equal."""
    model = load_benchmark().SIZES["demo"]["model"]
    demo = dataclasses.asdict(BaselineConfig())
    assert {key: model[key] for key in ("hidden_size", "num_layers", "num_heads", "intermediate_size")} == {
        key: demo[key] for key in ("hidden_size", "num_layers", "num_heads", "intermediate_size")
    }
