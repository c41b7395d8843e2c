"""What a search leaves behind and how it is read back: its state file, the Pareto report (its front evaluated
on another split, logged as MLflow onnx models and one point registered, on request), the parent run's end.

Tune's stored results are the record of truth; MLflow is kept complete from them (`_report`), so a
report can be rebuilt after the driver died or while MLflow was down.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pandas as pd
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune import ExperimentAnalysis, ResultGrid

from prune_core import load_pruned
from search.evaluate import evaluate_rows, step_checkpoints
from search.report import Report, build_report, collect_points, front_of, log_report, print_front, tune_points
from search.space import OBJECTIVE_SETS, load_config
from search.tracking import MlflowTracker, fail_fast, tune_events

STATE_FILE = "search.json"
UI_ADDRESS = "http://127.0.0.1:5000"  # where `prune-search ui` serves a local store's runs


@dataclass(frozen=True)
class Shipping:
    """What `report` does with the front's models besides reporting them: log each as an MLflow `onnx` model
    (`onnx`), and register one in the Model Registry as a new version of `register`, chosen by `point`
    ("TRIAL/STEP", the report's trial and step) or as the sparsest front point within `best_within` accuracy
    points of the dense model."""

    onnx: bool = False
    register: str | None = None
    point: str | None = None
    best_within: float | None = None

    def __post_init__(self) -> None:
        chosen = (self.point is not None) + (self.best_within is not None)
        if self.register is None and chosen:
            raise ValueError("--point and --best-within choose the model to --register NAME; give a name")
        if self.register is not None and chosen != 1:
            raise ValueError(f"--register {self.register}: choose its model with --point TRIAL/STEP or "
                             "--best-within POINTS (one of them)")
        if self.best_within is not None and self.best_within < 0:
            raise ValueError(f"--best-within {self.best_within}: accuracy points below dense, >= 0 (e.g. 1.0)")
        if self.point is not None and not _point_key(self.point):
            raise ValueError(f"--point {self.point!r}: expected TRIAL/STEP as the report shows them, e.g. 3f2a1_00004/5")


def _point_key(point: str) -> tuple[str, int] | None:
    trial, _, step = point.rpartition("/")
    return (trial, int(step)) if trial and step.isdigit() else None


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
    found = _report(experiment, state, runs_dir, runs_dir / experiment / "report", title)
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


def report(
    experiment: str, *, out: Path | None = None, runs_dir: Path = Path("runs"), evaluate: str | None = None,
    epsilon: tuple[float, ...] | None = None, shipping: Shipping | None = None,
) -> int:
    """Rebuild the Pareto report of a search; first send MLflow anything it is missing of Tune's results.

    With `evaluate` (a split, e.g. "test"), the front's models are evaluated on it too (`evaluate_front`);
    `epsilon` (one per objective) shows an epsilon-net of the front instead of the search config's;
    `shipping` logs the front's models as MLflow onnx models and registers one."""
    state = load_state(runs_dir, experiment)
    fail_fast()
    out = out or runs_dir / experiment / "report"
    found = _report(experiment, state, runs_dir, out, f"{experiment}: Pareto front", evaluate, epsilon, shipping)
    if found is None:
        return 1
    print(f"report: {found.files['html'].resolve()}")
    return 0


def evaluate_front(experiment: str, split: str, runs_dir: Path = Path("runs")) -> pd.DataFrame:
    """A search's Pareto front, chosen on its eval split, with each point's model evaluated on `split`.

    Columns: trial, step, attention_sparsity, the search's metric (on its eval split) and `<split>_<metric>`
    (e.g. test_accuracy). The front comes from Tune's results (no MLflow needed); evaluations are cached in
    runs/<experiment>/report/evaluated-<split>.json.
    """
    state = load_state(runs_dir, experiment)
    analysis = _analysis(state)
    points = tune_points(tune_events(analysis), state.metric) if analysis else pd.DataFrame()
    if points.empty:
        raise ValueError(f"{experiment}: no trial has reported a prune step in {state.experiment_dir}: no front yet")
    front = front_of(points, state.metric, report_settings(state)["objectives"])
    column = f"{split}_{state.metric}"
    evaluated = _evaluate(front, state, analysis, split, runs_dir / experiment).rename(column)
    return front.join(evaluated, on=["trial", "step"])[["trial", "step", "attention_sparsity", state.metric, column]]


def evaluate_steps(experiment: str, steps: pd.DataFrame, split: str, runs_dir: Path = Path("runs")) -> pd.Series:
    """The metric on `split` of the models a search saved at `steps` (columns trial, the trial segment's run
    name, and step), e.g. a front chosen on a part of the search; cached as `evaluate_front` caches."""
    state = load_state(runs_dir, experiment)
    return _evaluate(steps, state, _analysis(state), split, runs_dir / experiment)


def _evaluate(front: pd.DataFrame, state: SearchState, analysis: ExperimentAnalysis | None, split: str,
              folder: Path) -> pd.Series:
    """The front's step checkpoints (in Tune's results) evaluated on `split`, cached under `folder`/report."""
    if analysis is None:
        raise ValueError(f"{state.experiment_dir}: no Ray Tune results there, so no checkpoints to evaluate on {split!r}")
    cache = folder / "report" / f"evaluated-{split}.json"
    config = load_config(state.config_path)
    return evaluate_rows(front, step_checkpoints(ResultGrid(analysis)), split, config, state.search_id, cache)


def _report(
    experiment: str, state: SearchState, runs_dir: Path, out: Path, title: str, split: str | None = None,
    epsilon: tuple[float, ...] | None = None, shipping: Shipping | None = None,
) -> Report | None:
    """Send MLflow what it lacks of Tune's results, then report from MLflow, or from Tune while MLflow is down.

    Tune's results on `storage` are the record of truth; None when no trial has reported a step yet. With
    `split`, the front's models are evaluated on it too; with `shipping`, they are logged and one registered.
    """
    analysis = _analysis(state)
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
    evaluated = None
    settings = report_settings(state)
    if epsilon is not None:
        settings["epsilon"] = epsilon
    front = front_of(points, state.metric, settings["objectives"])
    if split is not None:
        evaluated = _evaluate(front, state, analysis, split, runs_dir / experiment)
    checkpoints = step_checkpoints(ResultGrid(analysis)) if analysis is not None else {}
    if shipping is not None and (shipping.onnx or shipping.register):
        if client is None:
            raise ValueError(f"MLflow at {state.tracking_uri} is unreachable: no model was logged or registered; "
                             "run the same `report` again once it is back")
        _ship(client, state, points, front, checkpoints, shipping)
    deployment = _deployment(client, front, checkpoints)
    found = build_report(points, state.metric, out, title, evaluated, deployment=deployment, **settings)
    if client is not None:
        log_report(client, state.parent_run, found, state.metric)
        _log_front_models(client, checkpoints, found.front)
        if state.finished:
            failed = any(event.kind == "failed" for event in events)
            _end_parent(state, RunStatus.FAILED if failed else RunStatus.FINISHED)
    print_front(found, state.metric)
    return found


def report_settings(state: SearchState) -> dict:
    """`build_report`'s objectives, epsilon, dense reference lines and MLflow links for this search (searches
    from before `objectives:` have the default ones and their eval split's dense metric only)."""
    settings = state.settings
    ui = state.tracking_uri if state.tracking_uri.startswith(("http://", "https://")) else UI_ADDRESS
    return {
        "objectives": tuple(settings.get("objectives", OBJECTIVE_SETS[0])),
        "epsilon": settings.get("epsilon"),
        "dense": settings.get("dense_splits") or {"validation": settings["dense"]},
        "run_url": f"{ui.rstrip('/')}/#/experiments/{state.mlflow_experiment}/runs/{{run_id}}",
    }


def _analysis(state: SearchState) -> ExperimentAnalysis | None:
    """Tune's stored results of the search; None before Tune has saved any."""
    return ExperimentAnalysis(state.experiment_dir) if tune.Tuner.can_restore(state.experiment_dir) else None


def _log_front_models(client: MlflowClient, checkpoints: dict, front) -> None:
    """Attach the pruned model of every front point (its step checkpoint) to its segment's child run, once."""
    for _, row in front.iterrows():
        checkpoint = checkpoints.get((row["trial"], int(row["step"])))
        folder = f"pruned-model-step-{int(row['step'])}"
        if checkpoint is not None and not client.list_artifacts(row["run_id"], folder):
            with checkpoint.as_directory() as directory:
                client.log_artifacts(row["run_id"], directory, artifact_path=folder)


def _ship(client: MlflowClient, state: SearchState, points: pd.DataFrame, front: pd.DataFrame, checkpoints: dict,
          shipping: Shipping) -> None:
    """Log the front's models as MLflow onnx models (`shipping.onnx`); register the chosen point's."""
    from search.deploy import log_onnx_model, register

    def logged(row) -> tuple[str, str]:
        """(the MLflow onnx model's runs:/ URI, the checkpoint's path)"""
        checkpoint = checkpoints.get((row["trial"], int(row["step"])))
        if checkpoint is None:
            raise ValueError(f"no checkpoint of trial {row['trial']} at step {row['step']} is kept under "
                             f"{state.experiment_dir}: nothing to export")
        with checkpoint.as_directory() as directory:
            model = load_pruned(directory).eval()
        return log_onnx_model(client, row["run_id"], model, int(row["step"])), checkpoint.path

    if shipping.onnx:
        for _, row in front.iterrows():
            logged(row)
        print(f"logged the front's {len(front)} models as MLflow onnx models (onnx-model-step-<step> on each run)")
    if shipping.register is None:
        return
    row = _chosen(points, front, state, shipping)
    uri, checkpoint = logged(row)
    tags = {"experiment": state.mlflow_experiment, "trial": row["trial"], "step": int(row["step"]),
            state.metric: f"{row[state.metric]:.6f}", "attention_sparsity": f"{row['attention_sparsity']:.6f}",
            "schedule": row["schedule"], "source": uri, "checkpoint": checkpoint}
    for key in ("speedup", "latency_ms", "params"):
        if key in row and pd.notna(row[key]):
            tags[key] = f"{row[key]:g}"
    version = register(client, row["run_id"], int(row["step"]), shipping.register, tags)
    print(f"registered models:/{shipping.register}/{version.version}: trial {row['trial']} step {row['step']}, "
          f"{state.metric} {row[state.metric]:.4f} at {row['attention_sparsity']:.1%} attention sparsity\n"
          f"serve it:  MLFLOW_TRACKING_URI={state.tracking_uri} mlflow models serve -m models:/{shipping.register}/"
          f"{version.version} --env-manager local --host 127.0.0.1 --port 5001")


def _chosen(points: pd.DataFrame, front: pd.DataFrame, state: SearchState, shipping: Shipping) -> pd.Series:
    """The point `shipping` asks to register: `point` among all reported points, or the sparsest front point
    within `best_within` accuracy points of the dense model (on the search's eval split)."""
    if shipping.point is not None:
        trial, step = _point_key(shipping.point)
        match = points[(points["trial"] == trial) & (points["step"] == step)]
        if match.empty:
            shown = ", ".join(f"{t}/{s}" for t, s in zip(front["trial"], front["step"]))
            raise ValueError(f"--point {shipping.point}: no such (trial, step) in {state.mlflow_experiment}; the "
                             f"front's points: {shown}")
        return match.iloc[0]
    dense = state.settings["dense"]
    floor = dense - shipping.best_within / 100
    near = front[front[state.metric] >= floor - 1e-12]
    if near.empty:
        best = front.loc[front[state.metric].idxmax()]
        raise ValueError(f"--best-within {shipping.best_within:g}: no front point has {state.metric} >= {floor:.4f} "
                         f"(dense {dense:.4f}); the most accurate is {best['trial']}/{best['step']} with "
                         f"{best[state.metric]:.4f}")
    return near.loc[near["attention_sparsity"].idxmax()]


def _deployment(client: MlflowClient | None, front: pd.DataFrame, checkpoints: dict) -> pd.DataFrame:
    """Per front point (trial, step): the command that exports its checkpoint to ONNX and, where it is
    registered, its `models:/` URIs."""
    from search.deploy import ONNX_FOLDER

    rows = []
    for _, row in front.iterrows():
        key = (row["trial"], int(row["step"]))
        checkpoint = checkpoints.get(key)
        export = "" if checkpoint is None else (f"prune-search export --model {checkpoint.path} --format onnx "
                                                f"--out {key[0]}-step{key[1]}.onnx")
        uris = []
        if client is not None and isinstance(row.get("run_id"), str):
            folder = ONNX_FOLDER.format(step=key[1])
            uris = [f"models:/{v.name}/{v.version}" for v in client.search_model_versions(f"run_id = '{row['run_id']}'")
                    if v.source.rstrip("/").endswith(f"/{folder}")]
        rows.append({"trial": key[0], "step": key[1], "export": export, "model_uri": ", ".join(sorted(uris))})
    return pd.DataFrame(rows, columns=["trial", "step", "export", "model_uri"]).set_index(["trial", "step"])


def _end_parent(state: SearchState, status: int) -> None:
    try:
        MlflowClient(state.tracking_uri).set_terminated(state.parent_run, RunStatus.to_string(status))
    except Exception:  # noqa: BLE001 - MLflow down: `report` ends the parent run once it is back
        pass
