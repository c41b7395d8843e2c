"""What a search leaves behind and how it is read back: its state file, the Pareto report, the parent run's end.

Tune's stored results are the record of truth; MLflow is kept complete from them (`_report`), so a
report can be rebuilt after the driver died or while MLflow was down.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune import ExperimentAnalysis, ResultGrid

from search.report import Report, build_report, collect_points, log_report, print_front, tune_points
from search.tracking import MlflowTracker, fail_fast, run_key, tune_events

STATE_FILE = "search.json"


@dataclass(frozen=True)
class SearchState:
    """What `resume` and `report` need to find a search again (runs/<experiment>/search.json)."""

    config_path: str
    search_id: str
    experiment_dir: str
    tracking_uri: str
    mlflow_experiment: str
    parent_run: str
    metric: str
    settings: dict
    finished: bool = False  # the driver saw the search end (`report` may then end the parent run)


def save_state(runs_dir: Path, experiment: str, state: SearchState) -> None:
    path = runs_dir / experiment / STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(state), indent=2))


def load_state(runs_dir: Path, experiment: str) -> SearchState:
    path = runs_dir / experiment / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no search named {experiment!r} was started from this folder")
    return SearchState(**json.loads(path.read_text()))


def finish(results: ResultGrid, experiment: str, state: SearchState, runs_dir: Path) -> int:
    """Report what the search found, say which trials failed and why; non-zero exit if any failed for good."""
    failed = [result for result in results if result.error is not None]
    print()
    title = f"{experiment}: {state.metric} vs attention sparsity"
    state = replace(state, finished=True)
    save_state(runs_dir, experiment, state)
    found = _report(experiment, state, runs_dir / experiment / "report", title)
    stopped = int(found.points.groupby("trial")["asha_stopped"].first().sum()) if found else 0
    print(
        f"\n{len(results)} trials: {len(results) - len(failed)} finished ({stopped} stopped early by ASHA), "
        f"{len(failed)} failed"
    )
    for result in failed:
        trial = Path(result.path).name if result.path else "?"
        lines = str(result.error).strip().splitlines()
        print(f"  FAILED {trial}: {lines[-1] if lines else repr(result.error)}", file=sys.stderr)
    if found:
        print(f"report:    {found.files['html'].resolve()}")
        print(f"front:     {found.files['table'].resolve()}")
    print(f"MLflow:    {state.tracking_uri} (experiment {experiment}); browse with `prune-search ui`")
    print(f"Ray Tune:  {state.experiment_dir}")
    return 1 if failed else 0


def report(experiment: str, *, out: Path | None = None, runs_dir: Path = Path("runs")) -> int:
    """Rebuild the Pareto report of a search; first send MLflow anything it is missing of Tune's results."""
    state = load_state(runs_dir, experiment)
    fail_fast()
    found = _report(experiment, state, out or runs_dir / experiment / "report", f"{experiment}: Pareto front")
    if found is None:
        return 1
    print(f"report: {found.files['html'].resolve()}")
    return 0


def _report(experiment: str, state: SearchState, out: Path, title: str) -> Report | None:
    """Send MLflow what it lacks of Tune's results, then report from MLflow, or from Tune while MLflow is down.

    Tune's results on `storage` are the record of truth; None when no trial has reported a step yet.
    """
    analysis = ExperimentAnalysis(state.experiment_dir) if tune.Tuner.can_restore(state.experiment_dir) else None
    events = tune_events(analysis) if analysis else []
    tracker = MlflowTracker(state.tracking_uri, state.mlflow_experiment, state.parent_run, state.search_id)
    tracker.pending.extend(events)
    if tracker.flush(retries=2):
        client = MlflowClient(state.tracking_uri)
        points = collect_points(client, state.mlflow_experiment, state.parent_run, state.metric)
    else:
        client = None
        points = tune_points(events, state.metric)
        print(
            f"warning: MLflow at {state.tracking_uri} is unreachable ({tracker.last_error}); {len(tracker.pending)} "
            "updates are not there yet. This report is built from Ray Tune's results; run "
            f"`prune-search report --experiment {experiment}` once MLflow is back to send them.",
            file=sys.stderr,
        )
    if points.empty:
        print("no trial reported a prune step: no Pareto report")
        return None
    found = build_report(points, state.metric, out, title)
    if client is not None:
        log_report(client, state.parent_run, found)
        if analysis is not None:
            _log_front_models(client, ResultGrid(analysis), found.front)
        if state.finished:
            failed = any(event.kind == "failed" for event in events)
            _end_parent(state, RunStatus.FAILED if failed else RunStatus.FINISHED)
    print_front(found, state.metric)
    return found


def _log_front_models(client: MlflowClient, results: ResultGrid, front) -> None:
    """Attach the pruned model of every front point (its step checkpoint) to its segment's child run, once."""
    checkpoints = {}
    for result in results:
        trial = (result.metrics or {}).get("trial_id")
        for checkpoint, metrics in result.best_checkpoints or []:
            checkpoints[run_key(trial, int(metrics.get("segment", 0))), int(metrics["step"])] = checkpoint
    for _, row in front.iterrows():
        checkpoint = checkpoints.get((row["trial"], int(row["step"])))
        folder = f"pruned-model-step-{int(row['step'])}"
        if checkpoint is not None and not client.list_artifacts(row["run_id"], folder):
            with checkpoint.as_directory() as directory:
                client.log_artifacts(row["run_id"], directory, artifact_path=folder)


def _end_parent(state: SearchState, status: int) -> None:
    try:
        MlflowClient(state.tracking_uri).set_terminated(state.parent_run, RunStatus.to_string(status))
    except Exception:  # noqa: BLE001 - MLflow down: `report` ends the parent run once it is back
        pass
