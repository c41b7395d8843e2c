"""The per-layer analysis and the Pareto notebook, on a small MLflow store written by the project's
own tracker (no search is run): six strategies with hand-chosen numbers, the notebook executed
headless in a kernel of this venv."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import ipykernel.kernelspec
import nbclient
import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from mlflow.tracking import MlflowClient

from search.analysis import layer_profile, scorer_heatmap
from search.tracking import Event, MlflowTracker, experiment_id, parent_run

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "pareto_report.ipynb"

STEPS = 4
STEP_RATIO = 0.125  # linear schedule: step s has removed s/8 of the dense attention
# Where each scorer cuts, per layer, relative to the overall sparsity (the mean over the 4 layers is 1):
# magnitude over-prunes the early layers, Fisher the late ones.
SHAPE = {"magnitude": [1.6, 1.2, 0.8, 0.4], "fisher": [0.4, 0.8, 1.2, 1.6]}
# Each granularity moves some cuts between layer 0 and layer 3; the moves cancel over granularities.
SHIFT = {"entire_head": -0.2, "per_head": 0.0, "same_channel": 0.2}
# (scorer, granularity, accuracy lost per step, steps reached): fisher/per_head leads at every step;
# magnitude/entire_head is stopped by ASHA after 2 steps.
TRIALS = {
    "trial_0": ("magnitude", "entire_head", 0.040, 2),
    "trial_1": ("magnitude", "per_head", 0.015, STEPS),
    "trial_2": ("magnitude", "same_channel", 0.020, STEPS),
    "trial_3": ("fisher", "entire_head", 0.025, STEPS),
    "trial_4": ("fisher", "per_head", 0.005, STEPS),
    "trial_5": ("fisher", "same_channel", 0.010, STEPS),
}
FRONT_TRIAL = "trial_4"


def layer_sparsity(scorer: str, granularity: str, overall: float) -> list[float]:
    shift = [SHIFT[granularity], 0.0, 0.0, -SHIFT[granularity]]
    return [overall * (share + moved) for share, moved in zip(SHAPE[scorer], shift)]


def config(scorer: str, granularity: str, threshold: str = "global") -> dict:
    strategy = {"granularity": granularity, "scorer": scorer, "threshold": threshold}
    return {**strategy, "step_ratio": STEP_RATIO, "lora_rank": 8}


def result(step: int, accuracy: float, layers: list[float] | None, final: bool) -> dict:
    overall = STEP_RATIO * step
    values = {
        "step": step,
        "accuracy": accuracy,
        "attention_sparsity": overall,
        "params": 600_000 * (1 - 0.4 * overall),
        "macs": 3.0e7 * (1 - 0.3 * overall),
        "latency_ms": 2.0 * (1 - 0.2 * overall),
        "final": final,
    }
    return values if layers is None else {**values, "layer_sparsity": json.dumps(layers)}


def new_search(client: MlflowClient, uri: str, runs: Path, experiment: str, search_id: str) -> MlflowTracker:
    exp = experiment_id(client, experiment, runs)
    parent = parent_run(client, exp, search_id, {"trials": len(TRIALS)})
    return MlflowTracker(uri, exp, parent, search_id)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """An sqlite MLflow store: experiment "demo" with the six trials and one that failed before its
    first step; experiment "no-layers" with an empty search and one whose trial logged no layers."""
    runs = tmp_path_factory.mktemp("runs")
    uri = f"sqlite:///{runs / 'mlflow.db'}"
    client = MlflowClient(uri)
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)  # artifacts under `runs`, not ./mlruns
        tracker = new_search(client, uri, runs, "demo", "search-1")
        for trial_id, (scorer, granularity, loss, reached) in TRIALS.items():
            trial = config(scorer, granularity)
            for step in range(1, reached + 1):
                layers = layer_sparsity(scorer, granularity, STEP_RATIO * step)
                tracker.send(Event("result", trial_id, trial, result(step, 0.9 - loss * step, layers, step == STEPS)))
            tracker.send(Event("finished", trial_id, trial, {"final": reached == STEPS}))
        crashed = config("fisher", "per_head", "local")
        tracker.send(Event("started", "trial_6", crashed))
        tracker.send(Event("failed", "trial_6", crashed, {"error": "out of memory"}))

        empty = new_search(client, uri, runs, "no-layers", "search-empty")
        no_layers = new_search(client, uri, runs, "no-layers", "search-no-layers")
        no_layers.send(Event("result", "trial_0", config("magnitude", "per_head"), result(1, 0.9, None, False)))
        assert tracker.close() and no_layers.close(), tracker.last_error or no_layers.last_error
    searches = {"demo": tracker, "empty": empty, "no_layers": no_layers}
    return {"uri": uri, "client": client, **{name: (s.experiment, s.parent) for name, s in searches.items()}}


def test_layer_profile_takes_each_trial_at_the_closest_step(store):
    profile = layer_profile(store["client"], *store["demo"], "accuracy", at_sparsity=0.5)

    assert list(profile.columns) == [
        "trial", "strategy", "granularity", "scorer", "threshold", "step", "attention_sparsity", "accuracy",
        "layer_0", "layer_1", "layer_2", "layer_3",
    ]
    assert sorted(profile["trial"]) == sorted(TRIALS)  # trial_6 never logged a step
    rows = profile.set_index("trial")
    for trial_id, (scorer, granularity, loss, reached) in TRIALS.items():
        row = rows.loc[trial_id]
        assert row["strategy"] == f"{granularity}/{scorer}/global"
        assert row["step"] == reached  # 0.5 itself, or the furthest the stopped trial got
        assert row["attention_sparsity"] == STEP_RATIO * reached
        assert row["accuracy"] == pytest.approx(0.9 - loss * reached)
        expected = layer_sparsity(scorer, granularity, STEP_RATIO * reached)
        assert [row[f"layer_{i}"] for i in range(4)] == pytest.approx(expected)
    assert [rows.loc["trial_1", f"layer_{i}"] for i in range(4)] == pytest.approx([0.8, 0.6, 0.4, 0.2])


def test_layer_profile_ties_go_to_the_lower_step(store):
    # 0.3125 is as far from step 2 (0.25) as from step 3 (0.375); 0.33 is closer to step 3
    tie = layer_profile(store["client"], *store["demo"], "accuracy", at_sparsity=0.3125).set_index("trial")
    closer = layer_profile(store["client"], *store["demo"], "accuracy", at_sparsity=0.33).set_index("trial")
    assert tie.loc["trial_4", "step"] == 2
    assert closer.loc["trial_4", "step"] == 3
    assert closer.loc["trial_0", "step"] == 2  # stopped at step 2


def test_scorer_heatmap_averages_trials_by_scorer(store):
    heatmap = scorer_heatmap(layer_profile(store["client"], *store["demo"], "accuracy"))

    assert list(heatmap.index) == ["fisher", "magnitude"]
    assert list(heatmap.columns) == [0, 1, 2, 3]
    # fisher: all three trials at 0.5, the granularity shifts cancel
    assert list(heatmap.loc["fisher"]) == pytest.approx([0.2, 0.4, 0.6, 0.8])
    # magnitude: entire_head stopped at 0.25 [0.35, 0.3, 0.2, 0.15], per_head [0.8, 0.6, 0.4, 0.2],
    # same_channel [0.9, 0.6, 0.4, 0.1]
    assert list(heatmap.loc["magnitude"]) == pytest.approx([2.05 / 3, 0.5, 1.0 / 3, 0.15])


@pytest.mark.parametrize("search", ["empty", "no_layers"])
def test_layer_profile_names_the_search_when_there_is_nothing_to_profile(store, search):
    experiment, parent = store[search]
    with pytest.raises(ValueError, match=rf"nothing to profile: no trial of search {parent} in experiment 'no-layers'"):
        layer_profile(store["client"], experiment, parent, "accuracy")


@pytest.fixture
def python_kernel(tmp_path, monkeypatch) -> str:
    """A "python3" kernelspec that starts this interpreter, first on JUPYTER_PATH (a user-level
    python3 kernel could otherwise run another Python)."""
    prefix = tmp_path / "jupyter"
    ipykernel.kernelspec.install(kernel_name="python3", prefix=str(prefix))
    monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
    assert KernelSpecManager().get_kernel_spec("python3").argv[0] == sys.executable
    return "python3"


def outputs(notebook, tag: str) -> list:
    cells = [cell for cell in notebook.cells if tag in cell.metadata.get("tags", [])]
    assert len(cells) == 1, f"one cell tagged {tag!r}"
    return cells[0].outputs


@pytest.mark.parametrize("cwd", [ROOT, ROOT / "notebooks"], ids=["repo-root", "notebooks"])
def test_notebook_runs_headless(store, python_kernel, tmp_path, monkeypatch, cwd):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    monkeypatch.setenv("PRUNE_SEARCH_EXPERIMENT", "demo")
    monkeypatch.delenv("PRUNE_SEARCH_METRIC", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook's report files
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), "commit it cleared"

    resources = {"metadata": {"path": str(cwd)}}  # the kernel's working directory
    nbclient.NotebookClient(notebook, timeout=300, kernel_name=python_kernel, resources=resources).execute()
    # execute() raised CellExecutionError if any cell failed

    assert any("image/png" in output.get("data", {}) for output in outputs(notebook, "front-plot"))
    table = "".join(output.get("data", {}).get("text/html", "") for output in outputs(notebook, "front-table"))
    assert "<table" in table
    assert table.count(f">{FRONT_TRIAL}<") == STEPS  # the front: fisher/per_head, every step
    assert not any(f">{trial}<" in table for trial in TRIALS if trial != FRONT_TRIAL)
    for tag in ("scorer-heatmap", "strategy-heatmaps"):
        assert any("image/png" in output.get("data", {}) for output in outputs(notebook, tag))
    assert list(tmp_path.glob("pareto-report-*/pareto.parquet"))
