"""The MLflow tracker's queue: a server that is down loses nothing, and nothing is logged twice."""

from __future__ import annotations

import json
import pickle
import time
from collections import Counter
from types import SimpleNamespace

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from search.report import build_report, collect_points, tune_points
from search.tracking import NODES_TAG, STOPPED_TAG, Event, MlflowTracker, child_runs, experiment_id, parent_run

CONFIG = {"granularity": "per_head", "scorer": "fisher", "threshold": "global", "step_ratio": 0.1, "lora_rank": 4}


class Outage:
    """An MlflowClient that raises like a server that is down while `down` is set."""

    def __init__(self, client: MlflowClient) -> None:
        self.client, self.down, self.refused = client, False, 0

    def __getattr__(self, name: str):
        method = getattr(self.client, name)

        def call(*args, **kwargs):
            if self.down:
                self.refused += 1
                raise ConnectionError("connection refused")
            return method(*args, **kwargs)

        return call


def result(step: int, node: str = "node-a") -> dict:
    return {
        "step": step, "accuracy": 0.9 - 0.01 * step, "attention_sparsity": 0.1 * step, "params": 1000 - 10 * step,
        "macs": 5000 - 50 * step, "latency_ms": 1.0, "final": step == 4, "node_id": node,
        "layer_sparsity": json.dumps([0.1 * step, 0.05 * step]),
    }


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = experiment_id(client, "tracking", tmp_path)
    parent = parent_run(client, experiment, "search-1", {"trials": 1})
    return uri, client, experiment, parent


def steps(client: MlflowClient, run_id: str, key: str = "accuracy") -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


def eventually(condition, timeout: float = 10.0) -> bool:
    """Poll `condition` until it holds (True) or `timeout` seconds pass (False): the sender thread's pace."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_events_wait_out_an_outage_in_order(store):
    uri, client, experiment, parent = store
    tracker = MlflowTracker(uri, experiment, parent, "search-1", retry_every=0.05)
    outage = Outage(client)
    tracker._client_cache = outage
    tracker.send(Event("started", "t1", CONFIG))
    tracker.send(Event("result", "t1", CONFIG, result(1)))
    assert eventually(lambda: not tracker.pending)
    outage.down = True
    for step in (2, 3):
        tracker.send(Event("result", "t1", CONFIG, result(step, node="node-b")))
    assert eventually(lambda: outage.refused >= 3), "the sender keeps retrying on its own"
    assert len(tracker.pending) == 2 and "connection refused" in tracker.last_error
    outage.down = False
    assert eventually(lambda: not tracker.pending) and tracker.last_error is None
    tracker.send(Event("result", "t1", CONFIG, result(4, node="node-b")))
    tracker.send(Event("finished", "t1", CONFIG, {"final": True}))
    assert tracker.close()
    (child,) = client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    for key in ("accuracy", "attention_sparsity", "params", "macs", "latency_ms", "layer_sparsity/1"):
        assert steps(client, child.info.run_id, key) == [1, 2, 3, 4], key
    assert child.data.tags[NODES_TAG] == "node-a,node-b"
    assert child.data.tags[STOPPED_TAG] == "false" and child.info.status == "FINISHED"
    assert child.data.params["lora_rank"] == "4"


class Slow:
    """An MlflowClient whose every call takes `delay` seconds, counting the calls by name."""

    def __init__(self, client: MlflowClient, delay: float) -> None:
        self.client, self.delay, self.calls = client, delay, Counter()

    def __getattr__(self, name: str):
        method = getattr(self.client, name)

        def call(*args, **kwargs):
            self.calls[name] += 1
            time.sleep(self.delay)
            return method(*args, **kwargs)

        return call


def test_a_slow_server_never_holds_up_the_driver(store):
    """Tune's hooks only queue: 20 results against a server taking 50 ms a call return at once, and all
    arrive, in order, when the search ends."""
    uri, client, experiment, parent = store
    tracker = MlflowTracker(uri, experiment, parent, "search-1")
    tracker._client_cache = Slow(client, 0.05)
    trial = SimpleNamespace(trial_id="t1", config=CONFIG, last_result={"final": True})
    started = time.perf_counter()
    tracker.on_trial_start(0, [], trial)
    for step in range(1, 21):
        tracker.on_trial_result(0, [], trial, result(step, node=f"node-{step // 10}"))
    tracker.on_trial_complete(0, [], trial)
    assert time.perf_counter() - started < 0.5, "the hooks waited on MLflow"
    assert tracker.pending, "nothing can have been sent yet"
    tracker.on_experiment_end([])
    assert not tracker.pending
    (child,) = client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    assert steps(client, child.info.run_id) == list(range(1, 21))
    assert child.data.tags[NODES_TAG] == "node-0,node-1,node-2" and child.info.status == "FINISHED"


def test_a_trial_costs_a_fixed_number_of_calls(store):
    """Existing runs are looked up once per process, not once per trial: 30 new trials of 3 steps each make
    one `search_runs` call, and each step one `log_batch` (metrics and tags together)."""
    uri, client, experiment, parent = store
    tracker = MlflowTracker(uri, experiment, parent, "search-1")
    counting = Slow(client, 0.0)
    tracker._client_cache = counting
    for trial in range(30):
        tracker.pending.append(Event("started", f"t{trial}", CONFIG))
        tracker.pending.extend(Event("result", f"t{trial}", CONFIG, result(step)) for step in (1, 2, 3))
        tracker.pending.append(Event("finished", f"t{trial}", CONFIG, {"final": True}))
    assert tracker.flush()
    assert counting.calls["search_runs"] == 1 and counting.calls["get_metric_history"] == 0
    assert counting.calls["create_run"] == 30 and counting.calls["log_batch"] == 30 + 30 * 3  # params; steps
    assert len(child_runs(client, experiment, parent)) == 30


def test_a_pickled_tracker_keeps_its_queue_and_sends_nothing_twice(store):
    """Tune pickles the callback with its experiment state while the sender runs; a restored tracker sends the
    unsent events, and what was sent before it reads back from MLflow instead of logging it again."""
    uri, client, experiment, parent = store
    tracker = MlflowTracker(uri, experiment, parent, "search-1", retry_every=0.05)
    outage = Outage(client)
    tracker._client_cache = outage
    tracker.send(Event("result", "t1", CONFIG, result(1)))
    assert eventually(lambda: not tracker.pending)
    outage.down = True
    tracker.send(Event("result", "t1", CONFIG, result(2)))
    restored = pickle.loads(pickle.dumps(tracker))
    outage.down = False
    assert tracker.close()  # the first driver's sender got step 2 through too
    assert [e.result["step"] for e in restored.pending] == [2]
    restored.pending.append(Event("result", "t1", CONFIG, result(3)))
    assert restored.flush()
    (child,) = client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    assert steps(client, child.info.run_id) == [1, 2, 3]


def test_replaying_tune_results_adds_only_what_is_missing(store):
    uri, client, experiment, parent = store
    first = MlflowTracker(uri, experiment, parent, "search-1")
    for step in (1, 2):
        first.send(Event("result", "t1", CONFIG, result(step)))
    assert first.close()
    (child,) = client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    logged = client.get_metric_history(child.info.run_id, "accuracy")

    replayed = MlflowTracker(uri, experiment, parent, "search-1")  # e.g. `report` after the driver died
    replayed.pending.extend([Event("result", "t1", CONFIG, result(step)) for step in (1, 2, 3, 4)])
    replayed.pending.append(Event("finished", "t1", CONFIG, {"final": True}))
    assert replayed.flush()
    history = client.get_metric_history(child.info.run_id, "accuracy")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert [(m.step, m.timestamp) for m in history[:2]] == [(m.step, m.timestamp) for m in logged], "not re-logged"
    ended = client.get_run(child.info.run_id).info
    assert ended.status == "FINISHED"
    again = MlflowTracker(uri, experiment, parent, "search-1")
    again.pending.append(Event("finished", "t1", CONFIG, {"final": True}))
    assert again.flush()
    assert client.get_run(child.info.run_id).info.end_time == ended.end_time, "a replayed end changes nothing"


def test_a_failed_trial_that_restarts_runs_again(store):
    uri, client, experiment, parent = store
    tracker = MlflowTracker(uri, experiment, parent, "search-1")
    tracker.send(Event("result", "t1", CONFIG, result(1)))
    tracker.send(Event("failed", "t1", CONFIG, {"error": "node died"}))
    assert tracker.close()
    restarted = MlflowTracker(uri, experiment, parent, "search-1")  # after `resume`
    restarted.send(Event("started", "t1", CONFIG))
    assert restarted.flush()
    (child,) = client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    assert child.info.status == "RUNNING"
    restarted.send(Event("result", "t1", CONFIG, result(2)))
    restarted.send(Event("finished", "t1", CONFIG, {"final": False}))
    assert restarted.close()
    child = client.get_run(child.info.run_id)
    assert child.info.status == "FINISHED" and child.data.tags[STOPPED_TAG] == "true"
    assert steps(client, child.info.run_id) == [1, 2]


def test_the_report_from_tune_matches_the_report_from_mlflow(store):
    """The fallback used while MLflow is down gives the same points as MLflow itself."""
    uri, client, experiment, parent = store
    events = [Event("result", trial, {**CONFIG, "scorer": scorer}, result(step))
              for trial, scorer in (("t1", "fisher"), ("t2", "magnitude")) for step in (1, 2, 3)]
    events += [Event("finished", "t1", CONFIG, {"final": True}), Event("finished", "t2", CONFIG, {"final": False})]
    tracker = MlflowTracker(uri, experiment, parent, "search-1")
    tracker.pending.extend(events)
    assert tracker.flush()
    columns = ["trial", "strategy", "step", "accuracy", "attention_sparsity", "latency_ms", "params", "macs", "status",
               "asha_stopped", "step_ratio", "lora_rank"]
    from_mlflow = collect_points(client, experiment, parent, "accuracy")[columns].sort_values(["trial", "step"])
    from_tune = tune_points(events, "accuracy")[columns].sort_values(["trial", "step"])
    assert len(from_tune) == 6
    assert from_mlflow.reset_index(drop=True).equals(from_tune.reset_index(drop=True))


def test_the_report_prints_counts_as_integers(store, tmp_path):
    """Parameter and MAC counts reach MLflow as floats; the report's tables show them as integers."""
    uri, client, experiment, parent = store
    tracker = MlflowTracker(uri, experiment, parent, "search-1")
    tracker.pending.extend([Event("result", "t1", CONFIG, {**result(1), "params": 552778})])
    assert tracker.flush()
    points = collect_points(client, experiment, parent, "accuracy")
    found = build_report(points, "accuracy", tmp_path / "report", "counts")
    page = found.files["html"].read_text()
    assert "<td>552778</td>" in page and "552778.0" not in page
    assert pd.read_parquet(found.files["table"])["params"].tolist() == [552778]


def test_runs_lost_with_a_killed_driver_end_killed(tmp_path):
    """A trial Tune's saved state does not know (started after its last save) cannot resume: its run ends KILLED."""
    from mlflow.entities import RunStatus

    from search.tracking import LOST_TAG, TRIAL_TAG, end_lost_runs

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = experiment_id(client, "lost", tmp_path)
    parent = parent_run(client, experiment, "lost-1", {})
    runs = {}
    for trial, status in (("known", "RUNNING"), ("lost", "RUNNING"), ("done", "FINISHED")):
        run = client.create_run(experiment, run_name=trial, tags={"mlflow.parentRunId": parent, TRIAL_TAG: trial})
        if status == "FINISHED":
            client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FINISHED))
        runs[trial] = run.info.run_id
    assert sorted(end_lost_runs(client, experiment, parent, known={"known"})) == ["done", "lost"]
    assert client.get_run(runs["lost"]).info.status == "KILLED"
    assert client.get_run(runs["done"]).info.status == "FINISHED"  # its results are real; Tune just lacks them
    assert all(client.get_run(runs[t]).data.tags[LOST_TAG] == "true" for t in ("lost", "done"))
    assert client.get_run(runs["known"]).info.status == "RUNNING" and LOST_TAG not in client.get_run(runs["known"]).data.tags
    assert end_lost_runs(client, experiment, parent, known={"known"}) == []  # a second resume finds them tagged


def test_child_runs_pages_past_the_first_thousand(tmp_path):
    """MLflow returns at most 1,000 runs a call: a search of 1,005 trials must keep every one."""
    from search.tracking import child_runs

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("many", artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(experiment).info.run_id
    made = {client.create_run(experiment, tags={"mlflow.parentRunId": parent}).info.run_id for _ in range(1005)}
    client.create_run(experiment, tags={"mlflow.parentRunId": "another-search"})  # not this search's
    assert len(client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent}'")) == 1000
    found = [run.info.run_id for run in child_runs(client, experiment, parent)]
    assert len(found) == 1005 and set(found) == made
