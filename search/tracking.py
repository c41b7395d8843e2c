"""MLflow tracking: one parent run per search, one nested child run per trial, metrics per prune step.

The callback runs in the Tune driver, so trials need no MLflow access (a cluster's workers may not
reach the tracking server). Calls that fail (the server is down) are queued and retried on the next
event and at the end, so no metric is lost; steps already logged are never logged twice, also
after a trial restarts from a checkpoint or the whole search is resumed.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, RunStatus
from mlflow.tracking import MlflowClient
from ray import tune

SEARCH_TAG = "prune_search.search_id"
TRIAL_TAG = "prune_search.trial_id"
STOPPED_TAG = "prune_search.asha_stopped"
STRATEGY_KEYS = ("granularity", "scorer", "threshold")
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
    "seconds",
    "area",
)


def tracking_uri(runs_dir: Path) -> str:
    """`MLFLOW_TRACKING_URI` when set, else the embedded sqlite store `runs/mlflow.db`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(runs_dir / 'mlflow.db').resolve()}"


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


def _param(key: str, value: Any):
    from mlflow.entities import Param

    return Param(key, str(value)[:6000])


class MlflowTracker(tune.Callback):
    """Ray Tune callback mirroring every trial into a nested MLflow child run."""

    def __init__(self, uri: str, experiment: str, parent: str, search_id: str) -> None:
        self.uri, self.experiment, self.parent, self.search_id = uri, experiment, parent, search_id
        self._runs: dict[str, str] = {}
        self._logged: dict[str, set[int]] = {}
        self._pending: list[tuple[str, tuple, dict]] = []

    def __getstate__(self) -> dict:
        # Tune pickles callbacks with the experiment state; the queue of unsent calls goes with it
        return {k: v for k, v in self.__dict__.items() if k != "_client_cache"}

    @property
    def client(self) -> MlflowClient:
        if "_client_cache" not in self.__dict__:
            self._client_cache = MlflowClient(self.uri)
        return self._client_cache

    def _call(self, method: str, *args, **kwargs) -> None:
        """Run a client call; if the server cannot take it now, queue it (in order) for later."""
        self._pending.append((method, args, kwargs))
        self.flush()

    def flush(self, retries: int = 0, wait: float = 2.0) -> bool:
        """Send queued calls in order; True when the queue is empty."""
        for attempt in range(retries + 1):
            while self._pending:
                method, args, kwargs = self._pending[0]
                try:
                    getattr(self.client, method)(*args, **kwargs)
                except Exception:  # noqa: BLE001 - any transport error: keep the call queued
                    break
                self._pending.pop(0)
            if not self._pending:
                return True
            if attempt < retries:
                time.sleep(wait)
        return False

    def _run_for(self, trial) -> str:
        """The trial's child run: remembered, found in MLflow (after a resume), or created."""
        trial_id = trial.trial_id
        if trial_id in self._runs:
            return self._runs[trial_id]
        found = self.client.search_runs(
            [self.experiment],
            filter_string=f"tags.`{TRIAL_TAG}` = '{trial_id}' and tags.`mlflow.parentRunId` = '{self.parent}'",
            max_results=1,
        )
        if found:
            run_id = found[0].info.run_id
            history = self.client.get_metric_history(run_id, "attention_sparsity")
            self._logged[trial_id] = {m.step for m in history}
        else:
            config = trial.config
            tags = {
                "mlflow.parentRunId": self.parent,
                TRIAL_TAG: trial_id,
                SEARCH_TAG: self.search_id,
                "strategy": "/".join(str(config.get(k)) for k in STRATEGY_KEYS),
                **{k: str(config.get(k)) for k in STRATEGY_KEYS},
            }
            run_id = self.client.create_run(self.experiment, run_name=trial_id, tags=tags).info.run_id
            self.client.log_batch(run_id, params=[_param(k, v) for k, v in sorted(config.items())])
            self._logged[trial_id] = set()
        self._runs[trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._run_for(trial)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        run_id, step = self._run_for(trial), int(result["step"])
        if step in self._logged[trial.trial_id]:
            return
        stamp = int(time.time() * 1000)
        metrics = [Metric(k, float(result[k]), stamp, step) for k in METRIC_KEYS if k in result]
        metrics += [
            Metric(f"layer_sparsity/{i}", value, stamp, step)
            for i, value in enumerate(json.loads(result.get("layer_sparsity", "[]")))
        ]
        self._call("log_batch", run_id, metrics=metrics)
        self._logged[trial.trial_id].add(step)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        run_id = self._run_for(trial)
        stopped = not (trial.last_result or {}).get("final", False)
        self._call("set_tag", run_id, STOPPED_TAG, str(stopped).lower())
        self._call("set_terminated", run_id, RunStatus.to_string(RunStatus.FINISHED))

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        run_id = self._run_for(trial)
        self._call("set_tag", run_id, "prune_search.error", str(getattr(trial, "error_file", "") or "see Ray logs"))
        self._call("set_terminated", run_id, RunStatus.to_string(RunStatus.FAILED))

    def on_experiment_end(self, trials: list, **info) -> None:
        self.flush(retries=30)

