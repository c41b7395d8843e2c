"""The benchmarks as modules: they run from the checkout they sit in, and scoring_cost on a tiny AST (the result's
structure, not its timings)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks import granularity_latency, onnx_runtime, scoring_cost
from benchmarks.common import RESULTS
from prune_core import GRANULARITIES, SCORERS
from search.baseline import BaselineConfig
from tests.conftest import ast_batches, tiny_ast

ROOT = Path(__file__).resolve().parents[1]


def test_a_benchmark_runs_as_a_module_and_reprints_its_results():
    results = RESULTS / "granularity_latency-cpu.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.granularity_latency", "--from-json", str(results)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == granularity_latency.markdown(json.loads(results.read_text()))


def test_ray_workers_of_a_benchmark_import_this_checkout(tmp_path):
    """The venv is shared between clones: another clone ahead on the import path must not be what a benchmark,
    or the Ray workers it starts, runs."""
    other = tmp_path / "other-clone" / "data_prep"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("")
    (other / "shards.py").write_text("")
    code = ("import json, ray\nfrom benchmarks import prepare_throughput as bench\n"
            "try:\n    print(json.dumps(bench.start_ray(1)['workers_seen']))\nfinally:\n    ray.shutdown()\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(other.parent), str(ROOT)])}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    workers = json.loads(done.stdout.strip().splitlines()[-1])
    assert workers and {w["data_prep"] for w in workers} == {str(ROOT / "data_prep")}


def test_scoring_cost_times_every_scorer_against_one_forward_backward():
    model = tiny_ast()
    result = scoring_cost.measure(model, ast_batches(count=2, size=2), repeats=2, warmup=1)
    assert set(result["timings"]) == {scoring_cost.FORWARD, scoring_cost.REFERENCE, *SCORERS}
    for timing in result["timings"].values():
        assert len(timing["samples_s"]) == 2
        assert 0 < timing["min_s"] <= timing["median_s"]
        assert timing["ratio_to_fwd_bwd"] == timing["median_s"] / result["timings"][scoring_cost.REFERENCE]["median_s"]
    assert result["fisher_within_1_5x"] == (result["timings"]["fisher"]["ratio_to_fwd_bwd"] <= scoring_cost.FISHER_LIMIT)


def test_scoring_cost_demo_size_mirrors_the_baseline():
    """The benchmark mirrors the demo baseline's size (to keep Ray out of it); keep them equal."""
    model = scoring_cost.SIZES["demo"]["model"]
    demo = dataclasses.asdict(BaselineConfig())
    assert {key: model[key] for key in ("hidden_size", "num_layers", "num_heads", "intermediate_size")} == {
        key: demo[key] for key in ("hidden_size", "num_layers", "num_heads", "intermediate_size")
    }


def test_onnx_runtime_times_every_granularity_in_both_runtimes(tmp_path):
    """The structure of the ONNX Runtime benchmark on a tiny AST: every model exported, checked and timed in both
    runtimes; each speedup is the paired median of that runtime's own samples."""
    results = onnx_runtime.measure(onnx_runtime.parse_args(["--quick", "--repeats", "2", "--out", str(tmp_path / "r.json")]))
    shapes = {label for label, _, _ in onnx_runtime.QUICK_SHAPES}
    assert {(r["shape"], r["model"]) for r in results["rows"]} == {(s, m) for s in shapes for m in {"dense", *GRANULARITIES}}
    for row in results["rows"]:
        dense = next(r for r in results["rows"] if r["shape"] == row["shape"] and r["model"] == "dense")
        assert row["max_abs_diff"] < onnx_runtime.PARITY and len(row["samples"]["ort"]) == 2
        for runtime in ("eager", "ort"):
            ratios = sorted(d / p for d, p in zip(dense["samples"][runtime], row["samples"][runtime]))
            assert row[f"{runtime}_speedup"] == sum(ratios) / 2
        assert row["speedup_ratio"] == row["ort_speedup"] / row["eager_speedup"]
        assert row["model"] == "dense" or abs(row["attention_sparsity"] - onnx_runtime.AMOUNT) < 0.02
