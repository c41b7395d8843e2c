"""Run, resume and report a pruning-strategy search: Optuna proposes, ASHA stops, MLflow tracks.

Design choices (see the README): ASHA's time attribute is the attention sparsity reached in percent
and its metric the normalized area under the accuracy–sparsity curve, so trials with different step
ratios are compared at the same sparsity. Optuna optimizes the same final area, or with
`multi_objective: true` the pair (accuracy, attention sparsity); metric and mode are then given to
the searcher and the scheduler separately (a TuneConfig metric would make the study single-objective),
and a trial stopped early is told to Optuna as PRUNED instead of COMPLETE with a partial result.
`searcher` (optuna, random, grid) and `scheduler` (asha, pareto_asha, none) swap either side, and
`step_budget` caps the prune steps of the whole search, so the methods can be compared at equal cost.
Tune's stored results are the record of truth; MLflow is kept complete from them (`_report`).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import ray
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune import ExperimentAnalysis, ResultGrid
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from data_prep.loader import LoaderConfig, read_manifest
from prune_core.metrics import METRIC_NAME
from search.report import Report, build_report, collect_points, log_report, print_front, tune_points
from search.schedulers import ParetoAsha
from search.space import SearchConfig, grid_values, load_config
from search.tracking import MlflowTracker, experiment_id, fail_fast, parent_run, tracking_uri, tune_events
from search.trainable import TrialSettings, run_trial

STATE_FILE = "search.json"


class StudyAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna a trial stopped early (no `final` result) was PRUNED.

    Ray hands a trial ASHA stopped to the searcher as complete with its last partial result; in
    multi-objective mode that partial (accuracy, sparsity) pair would enter Optuna's front.
    """

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if isinstance(self.metric, list) and result is not None and not result.get("final", False):
            result = None
        super().on_trial_complete(trial_id, result=result, error=error)


def _distributions(config: SearchConfig) -> dict:
    import optuna

    space = {}
    for param in config.space:
        if param.choices is not None:
            space[param.name] = optuna.distributions.CategoricalDistribution(list(param.choices))
        elif param.distribution == "int":
            space[param.name] = optuna.distributions.IntDistribution(int(param.low), int(param.high))
        else:
            log = param.distribution == "loguniform"
            space[param.name] = optuna.distributions.FloatDistribution(param.low, param.high, log=log)
    return space


def _searcher(config: SearchConfig, study_name: str, metric: str):
    """Who proposes trials: Optuna (TPE, NSGA-II if multi-objective, or random) or the full grid."""
    import optuna

    if config.searcher == "grid":  # the grid itself is the param_space (`_param_space`)
        return BasicVariantGenerator(max_concurrent=config.max_concurrent)
    if config.multi_objective:
        objective = {"metric": [metric, "attention_sparsity"], "mode": ["max", "max"]}
        sampler = optuna.samplers.NSGAIISampler(seed=config.seed)
    else:
        objective = {"metric": "area", "mode": "max"}
        sampler = (optuna.samplers.RandomSampler if config.searcher == "random" else optuna.samplers.TPESampler)(seed=config.seed)
    searcher = StudyAwareOptunaSearch(
        space=_distributions(config),
        points_to_evaluate=[dict(p) for p in config.points_to_evaluate] or None,
        sampler=sampler,
        study_name=study_name,
        **objective,
    )
    return ConcurrencyLimiter(searcher, max_concurrent=config.max_concurrent)


def _param_space(config: SearchConfig) -> dict | None:
    if config.searcher != "grid":
        return None  # the searcher samples the space
    return {name: tune.grid_search(values) for name, values in grid_values(config).items()}


def _trials(config: SearchConfig) -> int:
    return math.prod(len(v) for v in grid_values(config).values()) if config.searcher == "grid" else config.trials


def _scheduler(config: SearchConfig, metric: str) -> TrialScheduler:
    """Who stops trials early, at rungs of attention sparsity (in percent)."""
    max_t = round(100 * config.target_sparsity)
    if config.scheduler == "none":
        return FIFOScheduler()
    if config.scheduler == "pareto_asha":
        return ParetoAsha("sparsity_pct", (metric, "attention_sparsity"), max_t, config.asha.grace_period,
                          config.asha.reduction_factor)
    return AsyncHyperBandScheduler(
        time_attr="sparsity_pct",
        metric="area",
        mode="max",
        max_t=max_t,
        grace_period=config.asha.grace_period,
        reduction_factor=config.asha.reduction_factor,
    )


class StepBudget(tune.Stopper):
    """Ends the search once its trials have run `budget` prune steps together.

    Steps are counted as distinct (trial, step) pairs: Tune hands a finished function trainable's
    last result to stoppers a second time, and a restored trial may repeat a step's report. The
    count is per driver session (a resumed search gets the budget again); it is the compute budget
    the search-efficiency benchmark compares methods at.
    """

    def __init__(self, budget: int | None) -> None:
        self.budget = budget
        self.steps: set[tuple[str, int]] = set()

    def __call__(self, trial_id: str, result: dict) -> bool:
        if result.get("step") is not None:
            self.steps.add((trial_id, int(result["step"])))
        return False

    def stop_all(self) -> bool:
        return self.budget is not None and len(self.steps) >= self.budget


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


def _connect(address: str | None) -> None:
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(address="local", include_dashboard=False, log_to_driver=False)  # never a stale `ray start` cluster


def _dense_metric(config: SearchConfig, settings: TrialSettings) -> float:
    """The baseline's metric on the evaluation split, computed once on trial-like resources."""

    @ray.remote(num_cpus=config.resources.cpu, num_gpus=config.resources.gpu, resources=dict(config.resources.custom))
    def evaluate_baseline() -> float:
        import torch

        from data_prep.loader import make_loader
        from prune_core import load_model
        from prune_core.metrics import evaluate

        device = "cuda" if settings.use_gpu and torch.cuda.is_available() else "cpu"
        model = load_model(settings.baseline).to(device)
        batches = make_loader(settings.data, settings.eval_split, settings.loader, train=False)
        return evaluate(model, batches, settings.task)[settings.metric_name]

    return ray.get(evaluate_baseline.remote())


def _settings(config: SearchConfig, manifest: dict, dense: float) -> TrialSettings:
    task = manifest["task"]
    loader = LoaderConfig(
        batch_size=config.loader.batch_size,
        eval_batch_size=config.loader.eval_batch_size,
        spec_augment=config.loader.spec_augment,
        freq_mask=config.loader.freq_mask,
        time_mask=config.loader.time_mask,
        mixup=config.loader.mixup,
        balanced=config.loader.balanced,
        seed=config.seed,
    )
    baseline = Path(config.baseline)
    return TrialSettings(  # absolute paths: Tune runs each trial in its own working directory
        baseline=str(baseline.resolve()) if baseline.exists() else config.baseline,
        data=str(Path(config.data).resolve()),
        task=task,
        metric_name=METRIC_NAME[task],
        dense_metric=dense,
        target_sparsity=config.target_sparsity,
        schedule=config.schedule,
        eval_split=config.eval_split,
        calib_batches=config.calib_batches,
        train_batches_per_step=config.train_batches_per_step,
        latency_repeats=config.latency_repeats,
        lora_targets=config.lora_targets,
        loader=loader,
        use_gpu=config.resources.gpu > 0,
        seed=config.seed,
    )


def _trainable(config: SearchConfig, settings: TrialSettings):
    resources = {"cpu": config.resources.cpu, "gpu": config.resources.gpu, **config.resources.custom}
    return tune.with_resources(tune.with_parameters(run_trial, settings=settings), resources)


def _check_inputs(config: SearchConfig) -> dict:
    manifest = read_manifest(Path(config.data))
    if config.eval_split not in manifest["splits"] or not manifest["splits"][config.eval_split]["rows"]:
        raise ValueError(f"{config.source}: eval_split {config.eval_split!r} is empty in {config.data}")
    baseline = Path(config.baseline)
    if config.baseline.startswith((".", "/")) or "/" not in config.baseline or baseline.exists():
        if not (baseline / "config.json").is_file():
            raise FileNotFoundError(
                f"{config.source}: baseline {config.baseline!r} has no config.json; train one with "
                "`prune-search baseline` or give a save_pretrained directory"
            )
    return manifest


def _storage(storage: str) -> str:
    """Where Tune keeps results and checkpoints: a URI (s3://, gs://) as given, a folder made absolute."""
    return storage if "://" in storage else str(Path(storage).resolve())


def _mlflow_experiment(client: MlflowClient, name: str, runs_dir: Path) -> str:
    """The experiment id, checked before Ray starts: a tracking server that is down is a clear error."""
    fail_fast()
    try:
        return experiment_id(client, name, runs_dir)
    except Exception as error:  # noqa: BLE001 - MLflow raises its own and requests' errors
        raise ConnectionError(
            f"MLflow tracking at {client.tracking_uri} is unreachable ({type(error).__name__}); start the server "
            "or unset MLFLOW_TRACKING_URI to use the embedded store runs/mlflow.db"
        ) from error


def run(config: SearchConfig, *, address: str | None = None, runs_dir: Path = Path("runs")) -> int:
    """Start a new search; returns the process exit code (non-zero when a trial failed for good)."""
    manifest = _check_inputs(config)
    client_uri = tracking_uri(runs_dir)
    client = MlflowClient(client_uri)
    mlflow_experiment = _mlflow_experiment(client, config.experiment, runs_dir)
    _connect(address)
    settings = _settings(config, manifest, float("nan"))
    dense = _dense_metric(config, settings)
    settings = replace(settings, dense_metric=dense)
    search_id = f"{config.experiment}-{time.strftime('%Y%m%d-%H%M%S')}"
    parent = parent_run(
        client,
        mlflow_experiment,
        search_id,
        {"config": config.source, "baseline": config.baseline, "data": config.data, f"dense_{settings.metric_name}": dense,
         "target_sparsity": config.target_sparsity, "schedule": config.schedule, "trials": _trials(config),
         "multi_objective": config.multi_objective, "searcher": config.searcher, "scheduler": config.scheduler},
    )
    storage = _storage(config.storage)
    state = SearchState(
        config_path=config.source,
        search_id=search_id,
        experiment_dir=f"{storage}/{search_id}",
        tracking_uri=client_uri,
        mlflow_experiment=mlflow_experiment,
        parent_run=parent,
        metric=settings.metric_name,
        settings={"dense": dense},
    )
    _save_state(runs_dir, config.experiment, state)
    tuner = tune.Tuner(
        _trainable(config, settings),
        param_space=_param_space(config),
        tune_config=tune.TuneConfig(
            search_alg=_searcher(config, search_id, settings.metric_name),
            scheduler=_scheduler(config, settings.metric_name),
            num_samples=1 if config.searcher == "grid" else config.trials,
            time_budget_s=config.time_budget_s,
        ),
        run_config=tune.RunConfig(
            name=search_id,
            storage_path=storage,
            stop=StepBudget(config.step_budget),
            failure_config=tune.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=config.checkpoints_to_keep),
            callbacks=[MlflowTracker(client_uri, mlflow_experiment, parent, search_id)],
            verbose=1,
        ),
    )
    return _finish(tuner.fit(), config, state, runs_dir)


def resume(experiment: str, *, address: str | None = None, runs_dir: Path = Path("runs")) -> int:
    """Continue a stopped search where it stopped: finished trials are kept, unfinished ones resume."""
    state = _load_state(runs_dir, experiment)
    config = load_config(state.config_path)
    manifest = _check_inputs(config)
    fail_fast()
    _connect(address)
    settings = _settings(config, manifest, state.settings["dense"])
    if not tune.Tuner.can_restore(state.experiment_dir):
        raise ValueError(f"{state.experiment_dir}: no Ray Tune experiment to resume there")
    tuner = tune.Tuner.restore(
        state.experiment_dir, trainable=_trainable(config, settings), resume_unfinished=True, resume_errored=True
    )
    return _finish(tuner.fit(), config, state, runs_dir)


def _finish(results, config: SearchConfig, state: SearchState, runs_dir: Path) -> int:
    """Report what the search found, say which trials failed and why; non-zero exit if any failed for good."""
    failed = [result for result in results if result.error is not None]
    print()
    title = f"{config.experiment}: {state.metric} vs attention sparsity"
    state = replace(state, finished=True)
    _save_state(runs_dir, config.experiment, state)
    found = _report(config.experiment, state, runs_dir / config.experiment / "report", title)
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
    print(f"MLflow:    {state.tracking_uri} (experiment {config.experiment}); browse with `prune-search ui`")
    print(f"Ray Tune:  {state.experiment_dir}")
    return 1 if failed else 0


def _end_parent(state: SearchState, status: int) -> None:
    try:
        MlflowClient(state.tracking_uri).set_terminated(state.parent_run, RunStatus.to_string(status))
    except Exception:  # noqa: BLE001 - MLflow down: `report` ends the parent run once it is back
        pass


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
    """Attach the pruned model of every front point (its step checkpoint) to the trial's child run, once."""
    checkpoints = {}
    for result in results:
        trial = (result.metrics or {}).get("trial_id")
        for checkpoint, metrics in result.best_checkpoints or []:
            checkpoints[trial, int(metrics["step"])] = checkpoint
    for _, row in front.iterrows():
        checkpoint = checkpoints.get((row["trial"], int(row["step"])))
        folder = f"pruned-model-step-{int(row['step'])}"
        if checkpoint is not None and not client.list_artifacts(row["run_id"], folder):
            with checkpoint.as_directory() as directory:
                client.log_artifacts(row["run_id"], directory, artifact_path=folder)


def report(experiment: str, *, out: Path | None = None, runs_dir: Path = Path("runs")) -> int:
    """Rebuild the Pareto report of a search; first send MLflow anything it is missing of Tune's results."""
    state = _load_state(runs_dir, experiment)
    fail_fast()
    found = _report(experiment, state, out or runs_dir / experiment / "report", f"{experiment}: Pareto front")
    if found is None:
        return 1
    print(f"report: {found.files['html'].resolve()}")
    return 0


def _save_state(runs_dir: Path, experiment: str, state: SearchState) -> None:
    path = runs_dir / experiment / STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(state), indent=2))


def _load_state(runs_dir: Path, experiment: str) -> SearchState:
    path = runs_dir / experiment / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no search named {experiment!r} was started from this folder")
    return SearchState(**json.loads(path.read_text()))
