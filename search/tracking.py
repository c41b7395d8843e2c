"""MLflow tracking: one parent run per search, one nested child run per trial segment, metrics per prune step.

A trial is one segment until population-based training sends it on from another trial's checkpoint:
each such exploit starts a new segment, a child run of its own (run name `trial.segment`), tagged with
its trial, segment, where it was cloned from (`trial/step`) and its lineage (the strategy of every step
from the dense model, a JSON list), so a user browsing MLflow reads each model's schedule.

The callback runs in the Tune driver, so trials need no MLflow access (a cluster's workers may not
reach the tracking server). Every Tune event becomes an idempotent `Event` in a queue, which a
background thread sends in order: the driver's loop only appends to it, so a slow or unreachable
server never delays a result, a scheduling decision or a checkpoint. While the server cannot take
them, events stay queued, retried every few seconds and at the end. Steps already in MLflow are
never logged twice, also after a trial restarts from a checkpoint or the search is resumed. Tune's own results (on `storage`) are the
record of truth: `replay` sends whatever MLflow is missing from them (`prune-search report` does).
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient
from ray import tune

SEARCH_TAG = "prune_search.search_id"
TRIAL_TAG = "prune_search.trial_id"
STOPPED_TAG = "prune_search.asha_stopped"
NODES_TAG = "prune_search.nodes"
ERROR_TAG = "prune_search.error"
SEGMENT_TAG = "prune_search.segment"
CLONED_FROM_TAG = "prune_search.cloned_from"
LINEAGE_TAG = "prune_search.lineage"  # JSON list: the strategy of each step, from the dense model
EXPLOITED_TAG = "prune_search.exploited"  # "true" on a segment population-based training replaced
LOST_TAG = "prune_search.lost_with_driver"
LINEAGE_KEYS = ("segment", "cloned_from")  # config keys PBT adds to a clone: tags of its run, not params
STRATEGY_KEYS = ("granularity", "scorer", "threshold")
LAYER_METRIC = "layer_sparsity/"  # + layer index: the fraction of that layer's attention parameters removed
METRIC_KEYS = (
    "accuracy",
    "mAP",
    "test_accuracy",
    "test_mAP",
    "loss",
    "attention_sparsity",
    "params",
    "attention_params",
    "macs",
    "latency_ms",
    "speedup",
    "seconds",
    "area",
)
# What the tracker keeps of a Tune result: the metrics, and what it needs to place and tag them.
RESULT_KEYS = (*METRIC_KEYS, "step", "final", "layer_sparsity", "node_id", "segment", "cloned_from", "lineage")
# A tracking server that is down must fail fast (the queue retries), not stall the Tune loop in
# MLflow's own retries with backoff (minutes by default). A user's own setting wins.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def tracking_uri(runs_dir: Path) -> str:
    """`MLFLOW_TRACKING_URI` when set, else the embedded sqlite store `runs/mlflow.db`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(runs_dir / 'mlflow.db').resolve()}"


def fail_fast() -> None:
    """Make MLflow's HTTP client give up at once on a server that is down (see HTTP_DEFAULTS)."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


def experiment_id(client: MlflowClient, name: str, runs_dir: Path) -> str:
    """The MLflow experiment of that name, created with its artifacts under `runs/mlartifacts` if new."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None if os.environ.get("MLFLOW_TRACKING_URI") else (runs_dir / "mlartifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


def parent_run(client: MlflowClient, experiment: str, search_id: str, params: dict[str, Any]) -> str:
    """The search's parent run, found by its search id (resume) or created."""
    found = client.search_runs([experiment], filter_string=f"tags.`{SEARCH_TAG}` = '{search_id}'", max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment, run_name=search_id, tags={SEARCH_TAG: search_id})
    client.log_batch(run.info.run_id, params=[_param(k, v) for k, v in params.items()])
    return run.info.run_id


def child_runs(client: MlflowClient, experiment: str, parent: str) -> list:
    """Every child run of `parent`, page by page: one `search_runs` call returns at most 1,000, and a search
    of more trials than that must not lose the rest from its report, warm start or bookkeeping."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'",
                                  max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def end_lost_runs(client: MlflowClient, experiment: str, parent: str, known: set[str]) -> list[str]:
    """Tag the child runs whose trial Tune's saved state does not know, and end those still RUNNING as
    KILLED; returns their trial ids.

    Tune saves its experiment state every 10 s or so: a trial that started after the last save when the
    driver died is unknown to a resume, which cannot continue it (its searcher proposes another trial
    instead). Its run would stay RUNNING forever; a run that finished in that window keeps its results
    (they are real) but is not in Tune's record. Both are tagged `prune_search.lost_with_driver`.
    """
    lost = []
    for run in child_runs(client, experiment, parent):
        trial = run.data.tags.get(TRIAL_TAG)
        if trial in known or run.data.tags.get(LOST_TAG) == "true":
            continue
        client.set_tag(run.info.run_id, LOST_TAG, "true")
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED))
        lost.append(trial)
    return lost


def _param(key: str, value: Any) -> Param:
    return Param(key, str(value)[:6000])


@dataclass(frozen=True)
class Event:
    """One thing to mirror into a trial segment's child run; handling it twice changes nothing."""

    kind: str  # "started", "result" (one prune step), "finished" or "failed"
    trial_id: str
    config: dict = field(default_factory=dict)
    result: dict = field(default_factory=dict)

    @property
    def segment(self) -> int:
        return int(self.result.get("segment", self.config.get("segment", 0)))

    @property
    def run_key(self) -> str:
        """The child run's name: the trial id, and `.segment` after the first segment."""
        return run_key(self.trial_id, self.segment)


def run_key(trial_id: str, segment: int) -> str:
    return trial_id if segment == 0 else f"{trial_id}.{segment}"


class MlflowTracker(tune.Callback):
    """Ray Tune callback mirroring every trial into a nested MLflow child run, through a queue.

    `send` queues an event for the sender thread (started on first use); `flush` sends the queue in the
    caller's thread (the replay of `report`, and the end of a search). Both may run at once: each event is
    handled and dequeued under one lock, so none is sent twice or out of order."""

    def __init__(self, uri: str, experiment: str, parent: str, search_id: str, retry_every: float = 5.0) -> None:
        self.uri, self.experiment, self.parent, self.search_id = uri, experiment, parent, search_id
        self.retry_every = retry_every
        self.pending: list[Event] = []
        self.last_error: str | None = None
        self._runs: dict[str, str] = {}
        self._logged: dict[str, set[int]] = {}
        self._nodes: dict[str, list[str]] = {}
        self._ended: set[str] = set()
        self._local()

    def _local(self) -> None:
        """What lives only in this process: the client, the existing runs found, the lock and the sender."""
        self._client_cache: MlflowClient | None = None
        self._existing: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._wake, self._stop = threading.Event(), threading.Event()
        self._sender: threading.Thread | None = None

    def __getstate__(self) -> dict:
        """What Tune pickles with the experiment state: where to send, and the queue of unsent events. What
        was sent a restored tracker reads back from MLflow (as a replay does): the sender may be changing it."""
        kept = ("uri", "experiment", "parent", "search_id", "retry_every", "last_error")
        return {**{k: self.__dict__[k] for k in kept}, "pending": list(self.pending)}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["uri"], state["experiment"], state["parent"], state["search_id"], state["retry_every"])
        self.pending, self.last_error = state["pending"], state["last_error"]

    @property
    def client(self) -> MlflowClient:
        if self._client_cache is None:
            self._client_cache = MlflowClient(self.uri)
        return self._client_cache

    def send(self, event: Event) -> None:
        """Queue an event for the sender thread; returns at once."""
        self.pending.append(event)
        if self._sender is None:
            self._sender = threading.Thread(target=self._send_in_background, name="mlflow-tracker", daemon=True)
            self._sender.start()
        self._wake.set()

    def _send_in_background(self) -> None:
        """Send whatever is queued when woken; after a refusal, try again every `retry_every` seconds."""
        while not self._stop.is_set():
            self._wake.wait()
            self._wake.clear()
            if not self.flush() and not self._stop.wait(self.retry_every):
                self._wake.set()

    def close(self, retries: int = 5) -> bool:
        """Stop the sender and send what is left, retrying a refusing server; True when all went."""
        self._stop.set()
        self._wake.set()
        if self._sender is not None:
            self._sender.join()
        self._sender = None
        self._stop.clear()
        return self.flush(retries=retries)

    def flush(self, retries: int = 0, wait: float = 2.0) -> bool:
        """Send queued events in order, stopping at the first the server refuses; True when all went."""
        for attempt in range(retries + 1):
            while self._send_first():
                pass
            if not self.pending:
                return True
            if attempt < retries:
                time.sleep(wait)
        return False

    def _send_first(self) -> bool:
        """Handle and dequeue the oldest event; False when there is none or the server refused it."""
        with self._lock:
            if not self.pending:
                self.last_error = None
                return False
            try:
                self._handle(self.pending[0])
            except Exception as error:  # noqa: BLE001 - any transport or server error: keep it queued
                self.last_error = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                return False
            self.pending.pop(0)
            return True

    def _handle(self, event: Event) -> None:
        key = event.run_key
        run_id = self._run_for(event)
        if event.kind == "started":
            if key in self._ended:  # restarted after a failure, or resumed: it runs again
                self.client.update_run(run_id, RunStatus.to_string(RunStatus.RUNNING))
                self._ended.discard(key)
            return
        if event.kind == "result":
            self._log_step(key, run_id, event.result)
            return
        if key in self._ended:  # a replayed end: the run already says how it ended
            return
        if event.kind == "finished":
            self.client.set_tag(run_id, STOPPED_TAG, str(not event.result.get("final", False)).lower())
            self.client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
        elif event.kind == "failed":
            self.client.set_tag(run_id, ERROR_TAG, str(event.result.get("error") or "see the Ray logs"))
            self.client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        else:
            raise ValueError(f"unknown event kind {event.kind!r}")
        self._ended.add(key)

    def _run_for(self, event: Event) -> str:
        """The segment's child run: remembered, found in MLflow (after a resume or a replay), or created.

        A new segment ends its trial's previous one, tagged as exploited."""
        key = event.run_key
        if key in self._runs:
            return self._runs[key]
        trial_id, segment, config = event.trial_id, event.segment, event.config
        found = self._existing_runs().get(key)
        if found:
            run_id = found.info.run_id
            logged = {m.step for m in self.client.get_metric_history(run_id, "attention_sparsity")}
            nodes = [n for n in found.data.tags.get(NODES_TAG, "").split(",") if n]
            if found.info.status in ("FINISHED", "FAILED"):
                self._ended.add(key)
        else:
            tags = {
                "mlflow.parentRunId": self.parent,
                TRIAL_TAG: trial_id,
                SEARCH_TAG: self.search_id,
                SEGMENT_TAG: str(segment),
                "strategy": "/".join(str(config.get(k)) for k in STRATEGY_KEYS),
                **{k: str(config.get(k)) for k in STRATEGY_KEYS},
            }
            run_id = self.client.create_run(self.experiment, run_name=key, tags=tags).info.run_id
            params = [_param(k, v) for k, v in sorted(config.items()) if k not in LINEAGE_KEYS]
            self.client.log_batch(run_id, params=params)
            logged, nodes = set(), []
            if segment > 0:
                self._end_exploited(trial_id, segment - 1)
        self._runs[key], self._logged[key], self._nodes[key] = run_id, logged, nodes
        return run_id

    def _existing_runs(self) -> dict[str, Any]:
        """The search's child runs in MLflow when this process first needed one, by run key: read once (a
        resumed driver or a replay finds the runs made before it), not once per trial; the runs this
        process makes are remembered in `_runs`."""
        if self._existing is None:
            runs = child_runs(self.client, self.experiment, self.parent)
            self._existing = {run_key(r.data.tags.get(TRIAL_TAG, ""), int(r.data.tags.get(SEGMENT_TAG, "0"))): r
                              for r in runs if r.data.tags.get(TRIAL_TAG)}
        return self._existing

    def _end_exploited(self, trial_id: str, segment: int) -> None:
        """The trial's previous segment: population-based training replaced its model; it ends here."""
        previous = self._run_for(Event("started", trial_id, {"segment": segment}))
        key = run_key(trial_id, segment)
        if key not in self._ended:
            self.client.set_tag(previous, EXPLOITED_TAG, "true")
            self.client.set_terminated(previous, RunStatus.to_string(RunStatus.FINISHED))
            self._ended.add(key)

    def _log_step(self, key: str, run_id: str, result: dict) -> None:
        """One prune step's metrics and tags in one call (a step logged before adds only a new node)."""
        node = result.get("node_id")
        new_node = bool(node) and node not in self._nodes[key]
        tags = [RunTag(NODES_TAG, ",".join([*self._nodes[key], node]))] if new_node else []  # the nodes, in order
        step = int(result["step"])
        metrics = []
        if step not in self._logged[key]:
            stamp = int(time.time() * 1000)
            metrics = [Metric(k, float(result[k]), stamp, step) for k in METRIC_KEYS if result.get(k) is not None]
            metrics += [
                Metric(f"{LAYER_METRIC}{i}", value, stamp, step)
                for i, value in enumerate(json.loads(result.get("layer_sparsity") or "[]"))
            ]
            if result.get("lineage"):
                tags.append(RunTag(LINEAGE_TAG, result["lineage"]))
            if result.get("cloned_from"):  # the trainable's word, from the checkpoint it was handed
                tags.append(RunTag(CLONED_FROM_TAG, str(result["cloned_from"])))
        if metrics or tags:
            self.client.log_batch(run_id, metrics=metrics, tags=tags)
        self._logged[key].add(step)
        if new_node:
            self._nodes[key].append(node)

    # Tune's callback hooks, in the driver

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self.send(Event("started", trial.trial_id, dict(trial.config)))

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        self.send(Event("result", trial.trial_id, dict(trial.config), _kept(result)))

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self.send(Event("finished", trial.trial_id, dict(trial.config), {"final": (trial.last_result or {}).get("final", False)}))

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        error = str(getattr(trial, "error_file", "") or "")
        self.send(Event("failed", trial.trial_id, dict(trial.config), {"error": error}))

    def on_experiment_end(self, trials: list, **info) -> None:
        self.close()


def _kept(result: dict) -> dict:
    """The keys the tracker uses, without the gaps (None, NaN) of Tune's result tables."""
    return {k: result[k] for k in RESULT_KEYS if k in result and result[k] is not None and result[k] == result[k]}


def tune_events(analysis) -> list[Event]:
    """Every trial of a Tune experiment (an `ExperimentAnalysis` of its folder or URI) as events.

    Each row carries the config its segment ran with (Tune stores it with every result), so a trial
    that population-based training sent on from another's checkpoint replays as its segments."""
    from ray.tune.experiment.trial import Trial

    frames = analysis.trial_dataframes
    events = []
    for trial in analysis.trials:
        last: dict = {}
        for row in _stored_rows(trial, frames.get(trial.trial_id)):
            if row.get("attention_sparsity") is not None:
                last = _kept(row)
                last["step"] = int(last["step"])
                last["segment"] = int(last.get("segment", 0))
                events.append(Event("result", trial.trial_id, _row_config(row, trial.config), last))
        if trial.status == Trial.TERMINATED:
            events.append(Event("finished", trial.trial_id, dict(trial.config), {"final": bool(last.get("final", False))}))
        elif trial.status == Trial.ERROR:
            events.append(Event("failed", trial.trial_id, dict(trial.config), {"error": trial.error_file or ""}))
    return events


def _row_config(row: dict, fallback: dict) -> dict:
    """The config a stored result ran with (Tune's `config/...` columns), else the trial's last config."""
    config = {k[len("config/"):]: v for k, v in row.items() if k.startswith("config/") and v == v and v is not None}
    return config or dict(fallback)


def _stored_rows(trial, frame) -> list[dict]:
    """A trial's stored results in (segment, step) order: result.json's rows (Tune's `frame`), plus the
    progress.csv rows it lacks. After a trial restarts on another node, Tune's result.json can lose the
    rows written before the failure while progress.csv keeps them."""
    rows = {}
    for source in (frame, _progress_csv(trial)):
        for row in [] if source is None or source.empty else source.to_dict("records"):
            if row.get("step") == row.get("step") and row.get("step") is not None:  # not missing, not NaN
                segment = row.get("segment")
                segment = 0 if segment is None or segment != segment else int(segment)
                rows.setdefault((segment, int(row["step"])), row)
    return [rows[key] for key in sorted(rows)]


def _progress_csv(trial) -> pd.DataFrame | None:
    """The trial's progress.csv as a frame (on whatever file system its storage is), None if unreadable."""
    storage = trial.storage
    try:
        with storage.storage_filesystem.open_input_stream(f"{storage.trial_fs_path}/progress.csv") as stream:
            return pd.read_csv(stream)
    except (OSError, pd.errors.EmptyDataError):
        return None
