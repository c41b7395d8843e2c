"""Speed as an objective, through the trainable: a latency table profiled here, each step's predicted speedup
reported, the trial's `area` over (accuracy, speedup), and a table that cannot serve refused before Ray starts."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from prune_core import load_pruned
from prune_core.latency_model import load_table, predicted_speedup
from search.cli import main
from search.runner import _check_latency_table
from search.schedulers import trial_area
from search.space import ConfigError, load_config
from tests.test_search import search_config, workspace  # noqa: F401 - the shared fixture


@pytest.fixture(scope="module")
def table(workspace, tmp_path_factory):  # noqa: F811
    """`prune-search profile --quick`: the tests' tiny AST architecture (the workspace's baseline), on this CPU."""
    path = tmp_path_factory.mktemp("latency") / "cpu.json"
    assert main(["profile", "--device", "cpu", "--quick", "--out", str(path)]) == 0
    return path


def speed_config(workspace, table, name, **overrides):  # noqa: F811
    settings = {"target_sparsity": 0.6, "objectives": ["accuracy", "speedup"], "latency_table": str(table),
                "speedup_at": {"tokens": 8, "batch": 1}, **overrides}
    path = search_config(workspace, name, **settings)
    return load_config(path)


def test_a_trial_reports_its_predicted_speedup_and_ranks_on_accuracy_and_speed(workspace, table, monkeypatch):  # noqa: F811
    import search.trainable as trainable

    accuracies = iter([0.9, 0.85, 0.8])
    monkeypatch.setattr("prune_core.session.evaluate", lambda *args, **kwargs: {"accuracy": next(accuracies), "loss": 1.0})
    reported, saved = [], []

    def report(metrics, checkpoint=None):
        reported.append(metrics)
        with checkpoint.as_directory() as directory:
            saved.append(load_pruned(directory))

    session = SimpleNamespace(Checkpoint=trainable.tune.Checkpoint, report=report, get_checkpoint=lambda: None,
                              get_context=lambda: SimpleNamespace(get_trial_id=lambda: "t0"))
    monkeypatch.setattr(trainable, "tune", session)
    monkeypatch.setattr(trainable.ray, "get_runtime_context", lambda: SimpleNamespace(get_node_id=lambda: "node"))
    config = speed_config(workspace, table, "speed")
    settings = trainable.TrialSettings(config, "single_label", dense_metric=0.95)
    trainable.run_trial({"granularity": "entire_head", "scorer": "magnitude", "threshold": "global", "step_ratio": 0.2,
                         "lora_rank": 2, "lora_alpha": 8, "lr": 1e-3, "epochs": 1}, settings)
    assert [m["accuracy"] for m in reported] == [0.9, 0.85, 0.8]
    loaded = load_table(table)
    speedups = [m["speedup"] for m in reported]
    # the speedup of the model each step saved, predicted again from the table: the trial reports that very number
    assert speedups == [pytest.approx(predicted_speedup(model, loaded, tokens=8, batch=1)) for model in saved]
    # not faster, necessarily: this table is measured here, on a shared CPU (seen under load: 0.996x at 60%)
    assert any(abs(speedup - 1.0) > 1e-9 for speedup in speedups), "whole heads removed: the prediction must change"
    curve = [(0.0, 0.95, 1.0)]
    for metrics in reported:
        curve.append((metrics["attention_sparsity"], metrics["accuracy"], metrics["speedup"]))
        assert metrics["area"] == pytest.approx(trial_area(config, curve, 0.6), abs=1e-12)
    # a measured table on a loaded CPU may predict no step faster than dense: then there is no area above speedup 1
    assert (reported[-1]["area"] > 0) == any(m["speedup"] > 1.0 for m in reported)


def test_a_table_that_does_not_cover_the_input_size_is_refused_before_ray_starts(workspace, table):  # noqa: F811
    _check_latency_table(speed_config(workspace, table, "covered"))
    _check_latency_table(speed_config(workspace, table.parent, "a-folder-of-tables"))  # one per node type
    empty = table.parent / "empty"
    empty.mkdir(exist_ok=True)
    with pytest.raises(ConfigError, match=r"latency_table: .*a folder with no latency table"):
        _check_latency_table(speed_config(workspace, empty, "empty-folder"))
    with pytest.raises(ConfigError, match=r"latency_table: .*tokens 146"):
        _check_latency_table(speed_config(workspace, table, "uncovered", speedup_at={"tokens": 146, "batch": 1}))


def test_a_speed_search_tracks_speedup_and_reports_an_accuracy_speed_front(workspace, table, monkeypatch):  # noqa: F811
    """End to end on local Ray: every step's speedup reaches MLflow, and the report's front is over (accuracy,
    speedup), drawn against speedup too, with the dense model as reference."""
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from search.pareto import dominates
    from search.runner import run
    from search.tracking import tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runs = workspace / "runs-speed"
    config = speed_config(workspace, table, "speed-e2e", trials=2, scheduler="none", points_to_evaluate=[],
                          space={"granularity": ["entire_head", "per_head"], "scorer": ["magnitude"],
                                 "threshold": ["global"], "step_ratio": 0.3, "lora_rank": 2, "lora_alpha": 8,
                                 "lr": 1e-3, "epochs": 1})
    assert run(config, runs_dir=runs) == 0
    client = MlflowClient(tracking_uri(runs))
    experiment = client.get_experiment_by_name("speed-e2e")
    children = [r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 2
    for child in children:
        speedups = client.get_metric_history(child.info.run_id, "speedup")
        accuracies = client.get_metric_history(child.info.run_id, "accuracy")
        assert [m.step for m in speedups] == [m.step for m in accuracies] == [1, 2]
    front = pd.read_parquet(runs / "speed-e2e" / "report" / "pareto.parquet")
    pairs = list(zip(front["accuracy"], front["speedup"]))
    assert not any(dominates(a, b) for a in pairs for b in pairs) and front["speedup"].notna().all()
    page = (runs / "speed-e2e" / "report" / "report.html").read_text()
    assert "predicted speedup" in page and "dense, validation" in page
