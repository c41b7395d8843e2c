"""`run --warm-start`: an earlier search's trials reach the new study as COMPLETE or PRUNED, before its own."""

from __future__ import annotations

import optuna
import pytest

from search.cli import build_parser
from search.results import SearchState, save_state
from search.searchers import build_searcher, optuna_distributions
from search.space import ConfigError, load_config
from search.tracking import STOPPED_TAG, TRIAL_TAG, Event, MlflowTracker, experiment_id, parent_run
from search.warm_start import EarlierTrial, WarmStart, earlier_trials, study_of, tell, tell_earlier_trials
from tests.test_search import child_runs, search_config, searcher_plans, workspace  # noqa: F401 - fixtures

TrialState = optuna.trial.TrialState
CONFIG = {"granularity": "per_head", "scorer": "fisher", "threshold": "global", "step_ratio": 0.2, "lora_rank": 4,
          "lora_alpha": 8, "lr": 1e-3, "epochs": 1}
EARLIER = [
    EarlierTrial("t-finished", CONFIG, {"area": 0.6, "accuracy": 0.8, "attention_sparsity": 0.4, "step": 2, "final": True}, False),
    EarlierTrial("t-stopped", {**CONFIG, "lora_rank": 2}, {"area": 0.3, "accuracy": 0.5, "attention_sparsity": 0.2, "step": 1}, False),
    EarlierTrial("t-failed", CONFIG, {"area": 0.1, "accuracy": 0.1, "attention_sparsity": 0.2, "step": 1}, True),
    EarlierTrial("t-silent", CONFIG, {}, False),  # started, never reported a step
]


def new_study(tmp_path, **overrides):
    config = load_config(search_config(tmp_path, "new", points_to_evaluate=[], **overrides))
    plan = build_searcher(config, "new-test", "accuracy")
    return config, plan, study_of(plan)


def test_finished_trials_are_complete_stopped_ones_pruned_failed_ones_skipped(tmp_path):
    config, _, study = new_study(tmp_path)
    assert tell(study, optuna_distributions(config), EARLIER, ("area",), WarmStart("earlier")) == 2
    finished, stopped = study.trials
    assert (finished.state, finished.values, finished.params) == (TrialState.COMPLETE, [0.6], CONFIG)
    assert (stopped.state, stopped.intermediate_values) == (TrialState.PRUNED, {1: 0.3}), "its last area at its last step"
    assert stopped.params["lora_rank"] == 2
    assert [t.user_attrs["warm_start"] for t in study.trials] == ["earlier/t-finished", "earlier/t-stopped"]
    study.ask(fixed_distributions=optuna_distributions(config))  # TPE samples on from them


def test_multi_objective_trials_carry_metric_and_sparsity(tmp_path):
    config, _, study = new_study(tmp_path, multi_objective=True)
    assert tell(study, optuna_distributions(config), EARLIER, ("accuracy", "attention_sparsity"), WarmStart("earlier")) == 2
    finished, stopped = study.trials
    assert finished.state == TrialState.COMPLETE and finished.values == [0.8, 0.4]
    assert stopped.state == TrialState.PRUNED and stopped.values is None
    assert finished.system_attrs["NSGAIISampler:generation"] == 0, "NSGA-II breeds from generations only"
    study.ask(fixed_distributions=optuna_distributions(config))


def test_values_read_from_tune_tables_become_the_spaces_own(tmp_path):
    """Tune's result tables give numpy scalars (and whole floats): the study gets the space's values."""
    import numpy as np

    config, _, study = new_study(tmp_path, space={"epochs": {"int": [1, 3]}})
    read = {**CONFIG, "lora_rank": np.float64(4.0), "lr": np.float64(1e-3), "epochs": np.int64(2)}
    assert tell(study, optuna_distributions(config), [EarlierTrial("t", read, EARLIER[0].last, False)], ("area",), WarmStart("e")) == 1
    params = study.trials[0].params
    assert (params["lora_rank"], params["epochs"]) == (4, 2) and type(params["epochs"]) is int


@pytest.mark.parametrize(
    ("change", "said"),
    [
        ({"granularity": "same_channel"}, "granularity='same_channel', not among the new choices"),
        ({"lr": 0.5}, r"lr=0.5, outside the new range \[0.0001, 0.001\]"),
        ({"lr": None}, "no lr"),
    ],
)
def test_a_trial_outside_the_new_space_is_refused_or_skipped(tmp_path, capsys, change, said):
    config, _, study = new_study(tmp_path, space={"granularity": ["entire_head", "per_head"], "lr": {"loguniform": [1e-4, 1e-3]}})
    outside = {key: value for key, value in {**CONFIG, **change}.items() if value is not None}
    trials = [EarlierTrial("t-outside", outside, EARLIER[0].last, False), EARLIER[1]]
    with pytest.raises(ConfigError, match=f"--warm-start earlier: trial t-outside has {said}"):
        tell(study, optuna_distributions(config), trials, ("area",), WarmStart("earlier"))
    assert tell(study, optuna_distributions(config), trials, ("area",), WarmStart("earlier", skip_outside=True)) == 1
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 1 and "trial t-outside has" in warnings[0] and warnings[0].endswith("skipped")


@pytest.mark.parametrize("overrides", [{"searcher": "grid"}, {"searcher": "random", "scheduler": "pbt"}])
def test_only_optuna_studies_take_a_warm_start(tmp_path, overrides):
    config = load_config(search_config(tmp_path, "new", points_to_evaluate=[], **overrides))
    plan = build_searcher(config, "new-test", "accuracy")
    with pytest.raises(ConfigError, match="--warm-start tells earlier trials to an Optuna study"):
        tell_earlier_trials(WarmStart("earlier"), plan, config, "accuracy", tmp_path / "runs")


@pytest.mark.parametrize("earlier,overrides,message", [
    ({"objective": "trapezoid"}, {}, "ranked trials on objective: trapezoid, this one on staircase"),
    ({}, {}, "objective: trapezoid"),  # a search from before `objective:` ranked on the trapezoid
    ({"objective": "staircase"}, {"objective": "trapezoid"}, "objective: staircase, this one on trapezoid"),
])
def test_an_earlier_search_ranked_on_another_objective_is_refused(tmp_path, earlier, overrides, message):
    config, plan, study = new_study(tmp_path, **overrides)
    state = SearchState("c.yaml", "earlier-1", str(tmp_path / "gone"), "sqlite:///none", "1", "p", "accuracy", earlier)
    save_state(tmp_path / "runs", "earlier", state)
    with pytest.raises(ConfigError, match=message):
        tell_earlier_trials(WarmStart("earlier"), plan, config, "accuracy", tmp_path / "runs")
    assert not study.trials


def test_the_cli_passes_the_warm_start():
    args = build_parser().parse_args(["run", "--config", "c.yaml", "--warm-start", "earlier", "--warm-start-skip-outside"])
    assert (args.warm_start, args.warm_start_skip_outside) == ("earlier", True)


def test_without_tune_results_the_trials_come_from_mlflow(tmp_path):
    """Tune's folder gone: the child runs MLflow keeps give the same trials, params typed again."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = experiment_id(client, "earlier", tmp_path)
    parent = parent_run(client, experiment, "earlier-1", {})
    tracker = MlflowTracker(uri, experiment, parent, "earlier-1")
    for trial in EARLIER[:3]:
        tracker.pending.append(Event("result", trial.trial_id, trial.config, {k: v for k, v in trial.last.items() if k != "final"}))
        end = Event("failed", trial.trial_id, trial.config) if trial.failed else \
            Event("finished", trial.trial_id, trial.config, {"final": trial.last.get("final", False)})
        tracker.pending.append(end)
    assert tracker.flush()
    state = SearchState("c.yaml", "earlier-1", str(tmp_path / "gone"), uri, experiment, parent, "accuracy", {})
    found = {trial.trial_id: trial for trial in earlier_trials(state)}
    assert set(found) == {"t-finished", "t-stopped", "t-failed"}
    assert found["t-finished"].config == CONFIG and found["t-finished"].last["final"] is True
    assert found["t-finished"].last["step"] == 2 and found["t-finished"].last["area"] == 0.6
    assert found["t-stopped"].last["final"] is False and found["t-failed"].failed


def test_a_second_search_starts_from_the_first_ones_trials(workspace, monkeypatch, searcher_plans):  # noqa: F811
    """End to end on local Ray: the second study holds the first search's 2 trials, then its own 2."""
    from search.runner import run

    plans = searcher_plans
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runs = workspace / "runs"
    first = search_config(workspace, "warm-first", trials=2, points_to_evaluate=[])
    assert run(load_config(first), runs_dir=runs) == 0
    second = search_config(workspace, "warm-second", trials=2, points_to_evaluate=[], seed=1)
    assert run(load_config(second), runs_dir=runs, warm_start=WarmStart("warm-first")) == 0
    _, _, earlier = child_runs(runs, "warm-first")
    stopped = {f"warm-first/{c.data.tags[TRIAL_TAG]}": c.data.tags[STOPPED_TAG] == "true" for c in earlier}
    study = study_of(plans[1])
    told, own = study.trials[:2], study.trials[2:]
    assert {t.user_attrs["warm_start"]: t.state == TrialState.PRUNED for t in told} == stopped
    assert len(own) == 2 and all("warm_start" not in t.user_attrs for t in own)
    _, (parent,), _ = child_runs(runs, "warm-second")
    assert (parent.data.params["warm_start"], parent.data.params["warm_start_trials"]) == ("warm-first", "2")


def test_from_an_earlier_pbt_search_only_first_segments_count(monkeypatch):
    """A clone's segment went on from another trial's model: no point of the space describes it. The first
    segment it replaced counts as stopped at its last step."""
    import search.warm_start as warm_start

    config = {"granularity": "per_head", "scorer": "fisher", "threshold": "global", "step_ratio": 0.1}
    clone = {**config, "granularity": "entire_head", "segment": 1, "cloned_from": "b/2"}
    events = [
        Event("result", "a", config, {"step": 1, "area": 0.2, "final": False}),
        Event("result", "a", config, {"step": 2, "area": 0.4, "final": False}),
        Event("result", "a", clone, {"step": 3, "area": 0.5, "segment": 1, "final": False}),
        Event("result", "a", clone, {"step": 4, "area": 0.6, "segment": 1, "final": True}),
        Event("finished", "a", clone, {"final": True}),
        Event("result", "b", config, {"step": 1, "area": 0.3, "final": True}),
        Event("finished", "b", config, {"final": True}),
    ]
    monkeypatch.setattr(warm_start, "tune_events", lambda analysis: events)
    trials = {trial.trial_id: trial for trial in warm_start._tune_trials(analysis=None)}
    assert trials["a"].config == config and trials["a"].last["step"] == 2 and not trials["a"].last["final"]
    assert trials["b"].last["final"]
