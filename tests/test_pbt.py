"""`scheduler: pbt`: ranking at a common sparsity, explore over strategies, lineage records, end to end on Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from ray.tune import ExperimentAnalysis
from ray.tune.schedulers.pbt import _PBTTrialState

from prune_core import GRANULARITIES
from search.report import collect_points, tune_points
from search.runner import run
from search.schedulers import StrategyPbt, build_scheduler
from search.space import ConfigError, load_config, parse_config
from search.tracking import CLONED_FROM_TAG, EXPLOITED_TAG, LINEAGE_TAG, SEGMENT_TAG, run_key, tune_events
from prune_core.session import STATE_FILE
from search.trainable import SEGMENT_FILE
from tests.test_search import child_runs, search_config, trained_inputs, workspace  # noqa: F401 - the module's Ray + data fixture

SPACE = {
    "granularity": ["entire_head", "per_head", "variable_per_head"],
    "scorer": ["magnitude", "fisher"],
    "threshold": ["global", "local"],
    "step_ratio": [0.1, 0.2],
    "lora_rank": [2, 4],
    "lora_alpha": 8,
    "lr": {"loguniform": [1.0e-4, 1.0e-2]},
    "epochs": 1,
}


def pbt_config(**overrides):
    raw = {
        "experiment": "pbt", "data": "d", "baseline": "b", "target_sparsity": 0.6, "scheduler": "pbt",
        "searcher": "random", "pbt": {"interval": 10, "quantile": 0.5, "resample": 1.0}, "space": SPACE, **overrides,
    }
    return parse_config(raw, "pbt.yaml")


class FakeTrial:
    """What PBT's bookkeeping reads of a Tune trial."""

    experiment_tag = ""

    def __init__(self, trial_id: str, config: dict | None = None) -> None:
        self.trial_id, self.config, self.last_result, self.latest_checkpoint_result = trial_id, config or {}, {}, None

    def is_finished(self) -> bool:
        return False


def test_pbt_ranks_at_the_sparsity_every_trial_has_reached():
    """A went further with 25% steps, so its own area is larger; over [0, 30%], the range both reached, B is better."""
    scheduler = StrategyPbt(pbt_config(), "accuracy", dense_metric=0.96)
    a, b = FakeTrial("a"), FakeTrial("b")
    scheduler.curves = {"a": {1: (0.25, 0.90), 2: (0.5, 0.85)}, "b": {1: (0.1, 0.95), 2: (0.2, 0.94), 3: (0.3, 0.93)}}
    for trial, area in ((a, 0.75), (b, 0.47)):  # each trial's last score: the area, bigger for the one further on
        state = _PBTTrialState(trial)
        state.last_score, state.last_result = area, {"final": False}
        scheduler._trial_state[trial] = state
    lower, upper = scheduler._quantiles()
    assert (lower, upper) == ([a], [b])
    # a trial at its final step has nothing left to clone: it is not ranked
    scheduler._trial_state[b].last_result = {"final": True}
    assert scheduler._quantiles() == ([], [])


def test_a_tie_is_not_exploited():
    """A clone's curve is its source's up to the step it was cloned at: while the source has not gone further
    (its node died, it waits for a slot), the two tie, and the clone must go on rather than be cloned again."""
    scheduler = StrategyPbt(pbt_config(), "accuracy", dense_metric=0.96)
    source, clone = FakeTrial("source"), FakeTrial("clone")
    scheduler.curves = {"source": {1: (0.1, 0.95), 2: (0.2, 0.90)},
                        "clone": {1: (0.1, 0.95), 2: (0.2, 0.90), 3: (0.3, 0.80)}}
    for trial in (clone, source):
        state = _PBTTrialState(trial)
        state.last_score, state.last_result = 0.5, {"final": False}
        scheduler._trial_state[trial] = state
    assert scheduler._quantiles()[0] == []
    scheduler.curves["source"][2] = (0.2, 0.91)  # strictly better over [0, 20%]: now the clone is exploited
    assert scheduler._quantiles() == ([clone], [source])


def test_explore_resamples_from_the_space_and_respects_ragged_heads():
    config = pbt_config()
    start = {"granularity": "per_head", "scorer": "fisher", "threshold": "global", "step_ratio": 0.1, "lora_rank": 2,
             "lora_alpha": 8, "lr": 1e-3, "epochs": 1}
    kept = StrategyPbt(pbt_config(pbt={"resample": 0.0}), "accuracy", 0.9)
    assert kept.explore(start) == start
    scheduler = StrategyPbt(config, "accuracy", 0.9)
    seen = {name: set() for name in start}
    for _ in range(200):
        new = scheduler.explore(start)
        for name, value in new.items():
            seen[name].add(value)
        assert 1e-4 <= new["lr"] <= 1e-2 and new["step_ratio"] in (0.1, 0.2)
        ragged = scheduler.explore(start, ragged=True)
        assert GRANULARITIES[ragged["granularity"]].ragged_heads, ragged
    assert seen["granularity"] == set(SPACE["granularity"]) and seen["scorer"] == {"magnitude", "fisher"}


def test_a_clone_carries_its_lineage_and_its_curve():
    scheduler = StrategyPbt(pbt_config(), "accuracy", 0.9)
    top = FakeTrial("top", {**{k: v[0] if isinstance(v, list) else v for k, v in SPACE.items()}, "lr": 1e-3})
    weak = FakeTrial("weak", {"segment": 1})
    scheduler.curves = {"top": {1: (0.1, 0.9), 2: (0.2, 0.88), 3: (0.3, 0.8)}, "weak": {1: (0.2, 0.5)}}
    state = _PBTTrialState(top)
    state.last_result = {"step": 2, "ragged_heads": True}  # the checkpoint it is cloned from
    scheduler._trial_state[top] = state
    new, _ = scheduler._get_new_config(weak, top)
    assert (new["segment"], new["cloned_from"]) == (2, "top/2")
    assert GRANULARITIES[new["granularity"]].ragged_heads
    assert scheduler.curves["weak"] == {1: (0.1, 0.9), 2: (0.2, 0.88)}


def test_a_just_cloned_trial_is_cloned_with_the_result_of_the_checkpoint_it_holds(monkeypatch):
    """Ray's exploit hands a clone its source's checkpoint (with the source's result) while the clone's
    `last_result` stays its own old one. Cloned again before it reports, the next clone must be explored from
    the model it really gets: here a ragged one, so only granularities that prune ragged heads may follow."""
    from ray.train._internal.session import _TrainingResult
    from ray.tune.schedulers import PopulationBasedTraining

    scheduler = StrategyPbt(pbt_config(), "accuracy", 0.9)
    just_cloned, weak = FakeTrial("clone", {"granularity": "variable_per_head"}), FakeTrial("weak")
    just_cloned.last_result = {"step": 1, "ragged_heads": False, "final": False}  # its own, before the clone
    source_result = {"step": 3, "ragged_heads": True, "final": False}  # what its checkpoint holds now
    just_cloned.latest_checkpoint_result = _TrainingResult(checkpoint="source-step-3", metrics=source_result)
    for trial in (just_cloned, weak):
        scheduler._trial_state[trial] = _PBTTrialState(trial)
    monkeypatch.setattr(PopulationBasedTraining, "_checkpoint_or_exploit", lambda *args: None)
    scheduler._checkpoint_or_exploit(weak, None, [just_cloned], [weak])
    state = scheduler._trial_state[just_cloned]
    assert (state.last_checkpoint, state.last_result) == ("source-step-3", source_result)
    for _ in range(50):
        new, _ = scheduler._get_new_config(weak, just_cloned)
        assert GRANULARITIES[new["granularity"]].ragged_heads and new["cloned_from"] == "clone/3"


def test_a_population_that_fits_its_slots_is_never_paused_to_time_share(monkeypatch):
    """Ray's PBT answers PAUSE at a decision point while any other trial is pending or paused (a clone restoring
    is), and each pause paused more: 64 trials on 64 slots got 1.7 of 12.8 results/s. A population that fits its
    slots runs at once; a larger one still takes turns; a trial cloned itself is left to Ray (NOOP)."""
    from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler

    fits = StrategyPbt(pbt_config(trials=4, max_concurrent=4), "accuracy", 0.9)
    larger = StrategyPbt(pbt_config(trials=4, max_concurrent=2), "accuracy", 0.9)
    trial = FakeTrial("t")
    for ray_says, at_once, taking_turns in (
        (TrialScheduler.PAUSE, TrialScheduler.CONTINUE, TrialScheduler.PAUSE),
        (TrialScheduler.NOOP, TrialScheduler.NOOP, TrialScheduler.NOOP),
        (TrialScheduler.CONTINUE, TrialScheduler.CONTINUE, TrialScheduler.CONTINUE),
    ):
        monkeypatch.setattr(PopulationBasedTraining, "on_trial_result", lambda *args, said=ray_says: said)
        assert fits.on_trial_result(None, trial, {"step": 1}) == at_once
        assert larger.on_trial_result(None, trial, {"step": 1}) == taking_turns


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"searcher": "optuna"}, "scheduler: pbt draws its first population itself: use searcher: random or grid"),
        ({"multi_objective": True}, "multi_objective: scheduler: pbt ranks trials on one metric"),
        ({"pbt": {"interval": 60}}, "pbt.interval: an integer >= 1 below the target sparsity"),
        ({"pbt": {"quantile": 0.7}}, r"pbt.quantile: a fraction in \(0, 0.5\]"),
        ({"pbt": {"every": 3}}, "pbt.every: unknown key"),
    ],
)
def test_bad_pbt_configs_are_refused_when_read(overrides, message):
    with pytest.raises(ConfigError, match=message):
        pbt_config(**overrides)


def test_pbt_scheduler_takes_no_searcher():
    scheduling = build_scheduler(pbt_config(), "accuracy", 0.9)
    assert isinstance(scheduling.scheduler, StrategyPbt) and not scheduling.takes_searcher


def test_pbt_search_records_every_segment_and_its_lineage(workspace, monkeypatch):  # noqa: F811
    """A population of 4 on local Ray: clones happen, and Tune's results, MLflow and the report agree step
    for step on every segment, its lineage and where it was cloned from."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runs = workspace / "runs"
    data, baseline = trained_inputs(workspace)  # at chance (the workspace's baseline) every trial ties: no clone
    path = search_config(
        workspace, "pbt", space=SPACE, scheduler="pbt", searcher="random", trials=4, max_concurrent=2,
        target_sparsity=0.5, points_to_evaluate=[], pbt={"interval": 10, "quantile": 0.5, "resample": 1.0},
        data=str(data), baseline=str(baseline),
    )
    assert run(load_config(path), runs_dir=runs) == 0

    state = json.loads((runs / "pbt" / "search.json").read_text())
    events = tune_events(ExperimentAnalysis(state["experiment_dir"]))
    results = [e for e in events if e.kind == "result"]
    steps: dict[str, dict[int, dict]] = {}
    strategies: dict[str, str] = {}  # the strategy each segment's config names
    for event in results:
        assert event.result["step"] not in steps.get(event.run_key, {}), "a step recorded twice"
        steps.setdefault(event.run_key, {})[event.result["step"]] = event.result
        # from the segment's first row: Tune logs the row that triggered an exploit with the next segment's config
        strategies.setdefault(event.run_key, "/".join(str(event.config[k]) for k in ("granularity", "scorer", "threshold")))
    clones = [key for key, segment in steps.items() if min(segment) > 1]
    assert clones, "PBT cloned no trial: the test does not exercise exploits"
    lineages = {key: {step: json.loads(r["lineage"]) for step, r in segment.items()} for key, segment in steps.items()}
    for key in clones:
        first = steps[key][min(steps[key])]
        source, cloned_step = first["cloned_from"].rsplit("/", 1)
        sources = [k for k in steps if k.split(".")[0] == source and int(cloned_step) in steps[k]]
        assert sources, f"{key} cloned from {first['cloned_from']}, a step no segment of {source} ran"
        assert min(steps[key]) == int(cloned_step) + 1
        # the clone's lineage starts with the source's, step for step, and goes on with its own (explored) strategy
        last = lineages[key][max(steps[key])]
        assert last[: int(cloned_step)] == lineages[sources[0]][int(cloned_step)]
        assert set(last[int(cloned_step):]) == {strategies[key]}, (key, last, strategies[key])
    for key, segment in lineages.items():
        assert all(len(lineage) == step for step, lineage in segment.items())
    # every step of every segment keeps its own checkpoint (the report logs the front's models from them): a clone
    # must not write over its trial's earlier checkpoints
    saved = set()
    for folder in Path(state["experiment_dir"]).glob("*/checkpoint_*"):
        segment = json.loads((folder / SEGMENT_FILE).read_text())
        saved.add((run_key(segment["trial_id"], segment["segment"]), json.loads((folder / STATE_FILE).read_text())["step"]))
    assert saved == {(key, step) for key, segment in steps.items() for step in segment}

    client, parents, children = child_runs(runs, "pbt")
    by_name = {child.info.run_name: child for child in children}
    assert set(by_name) == set(steps)
    for key, segment in steps.items():
        child = by_name[key]
        history = {m.step: m.value for m in client.get_metric_history(child.info.run_id, "accuracy")}
        assert history == {step: pytest.approx(r["accuracy"]) for step, r in segment.items()}, key
        assert json.loads(child.data.tags[LINEAGE_TAG]) == lineages[key][max(segment)]
        assert child.data.tags[SEGMENT_TAG] == str(steps[key][min(segment)].get("segment", 0))
        if key in clones:
            assert child.data.tags[CLONED_FROM_TAG] == steps[key][min(segment)]["cloned_from"]
            trial, segment = key.rsplit(".", 1)
            previous = by_name[trial if segment == "1" else f"{trial}.{int(segment) - 1}"]
            assert previous.data.tags.get(EXPLOITED_TAG) == "true"

    # the report reads each point's schedule; from MLflow and from Tune's results alike
    columns = ["trial", "step", "accuracy", "schedule"]
    mlflow_points = collect_points(client, parents[0].info.experiment_id, parents[0].info.run_id, "accuracy")
    tune = tune_points(events, "accuracy")
    ordered = lambda frame: frame[columns].sort_values(["trial", "step"]).reset_index(drop=True)  # noqa: E731
    pd.testing.assert_frame_equal(ordered(mlflow_points), ordered(tune), check_exact=False)
    front = pd.read_parquet(runs / "pbt" / "report" / "pareto.parquet")
    assert set(front["schedule"]) <= set(tune["schedule"])
    for _, row in tune.iterrows():  # 'a x2 -> b x1' at step 3: the counts add up to the step
        assert sum(int(part.rsplit(" x", 1)[1]) for part in row["schedule"].split(" -> ")) == row["step"], row["schedule"]
