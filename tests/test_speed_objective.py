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
    assert speedups[-1] > 1.0, "whole heads removed: the table predicts a faster model"
    curve = [(0.0, 0.95, 1.0)]
    for metrics in reported:
        curve.append((metrics["attention_sparsity"], metrics["accuracy"], metrics["speedup"]))
        assert metrics["area"] == pytest.approx(trial_area(config, curve, 0.6), abs=1e-12)
    assert reported[-1]["area"] > 0


def test_a_table_that_does_not_cover_the_input_size_is_refused_before_ray_starts(workspace, table):  # noqa: F811
    _check_latency_table(speed_config(workspace, table, "covered"))
    with pytest.raises(ConfigError, match=r"latency_table: .*tokens 146"):
        _check_latency_table(speed_config(workspace, table, "uncovered", speedup_at={"tokens": 146, "batch": 1}))
