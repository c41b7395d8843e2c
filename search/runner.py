"""Run or resume a pruning-strategy search: Optuna proposes (`searchers`), ASHA stops (`schedulers`), MLflow tracks.

`searcher` (optuna, random, grid) and `scheduler` (asha, pareto_asha, pbt, none) swap either side, and
`step_budget` caps the prune steps of the whole search, so the methods can be compared at equal cost.
What a search leaves behind, and its report, are in `results`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path

import ray
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune import ExperimentAnalysis
from ray.tune.search import BasicVariantGenerator

from data_prep.loader import make_loader, read_manifest
from prune_core.metrics import METRIC_NAME
from search.baseline import RECORD as BASELINE_RECORD
from search.results import SearchState, finish, load_state, save_state
from search.schedulers import StepBudget, build_scheduler
from search.searchers import build_searcher, trial_count
from search.simulation import SimulationSettings, run_simulated_trial
from search.space import ConfigError, SearchConfig, load_config, objective_keys
from search.storage import CheckpointKeeper
from search.tracking import MlflowTracker, end_lost_runs, experiment_id, fail_fast, parent_run, tracking_uri
from search.trainable import TrialSettings, run_trial
from search.warm_start import WarmStart, tell_earlier_trials


def run(config: SearchConfig, *, address: str | None = None, runs_dir: Path = Path("runs"),
        warm_start: WarmStart | None = None) -> int:
    """Start a new search (its study told an earlier search's trials with `warm_start`); returns the process
    exit code (non-zero when a trial failed for good)."""
    manifest = _check_inputs(config)
    metric = METRIC_NAME[manifest["task"]]
    search_id = f"{config.experiment}-{time.strftime('%Y%m%d-%H%M%S')}"
    searcher = build_searcher(config, search_id, metric)
    warm_params = tell_earlier_trials(warm_start, searcher, config, metric, runs_dir) if warm_start else {}
    client_uri = tracking_uri(runs_dir)
    client = MlflowClient(client_uri)
    mlflow_experiment = _mlflow_experiment(client, config.experiment, runs_dir)
    _connect(address)
    settings = _settings(config, manifest, float("nan"))
    settings = replace(settings, dense_metric=_dense_metric(settings))
    scheduling = build_scheduler(config, metric, settings.dense_metric)
    if not scheduling.takes_searcher and not isinstance(searcher.search_alg, BasicVariantGenerator):
        raise ConfigError(f"{config.source}: scheduler: {config.scheduler} proposes its own trials; use searcher: random or grid")
    parent = parent_run(
        client,
        mlflow_experiment,
        search_id,
        {"config": config.source, "baseline": config.baseline, "data": config.data,
         f"dense_{metric}": settings.dense_metric, "target_sparsity": config.target_sparsity,
         "schedule": config.schedule, "trials": trial_count(config), "objective": config.objective,
         "objectives": ",".join(config.objectives),
         "multi_objective": config.multi_objective,
         "searcher": config.searcher, "scheduler": config.scheduler, "simulated": config.simulate is not None,
         **warm_params},
    )
    storage = _storage(config.storage)
    state = SearchState(
        config_path=config.source,
        search_id=search_id,
        experiment_dir=f"{storage}/{search_id}",
        tracking_uri=client_uri,
        mlflow_experiment=mlflow_experiment,
        parent_run=parent,
        metric=metric,
        settings={"dense": settings.dense_metric, "objective": config.objective, "objectives": list(config.objectives),
                  "epsilon": None if config.epsilon is None else list(config.epsilon),
                  "dense_splits": dense_splits(config, settings.dense_metric)},
    )
    save_state(runs_dir, config.experiment, state)
    tuner = tune.Tuner(
        _trainable(settings),
        param_space=searcher.param_space,
        tune_config=tune.TuneConfig(
            search_alg=searcher.search_alg,
            scheduler=scheduling.scheduler,
            num_samples=searcher.num_samples,
            time_budget_s=config.time_budget_s,
            # a new trial (or a PBT clone) takes over a finished trial's process: no new Python, no torch import
            # (the tests' 6-trial search: 58 s -> 18 s on 2 cores)
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=search_id,
            storage_path=storage,
            stop=StepBudget(config.step_budget),
            failure_config=tune.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=_tune_keeps(config)),
            callbacks=[MlflowTracker(client_uri, mlflow_experiment, parent, search_id),
                       *([CheckpointKeeper(objective_keys(config.objectives, metric))]
                         if config.checkpoints_to_keep == "front" else [])],
            verbose=1,
        ),
    )
    return _finish(tuner.fit(), config, state, runs_dir)


def _tune_keeps(config: SearchConfig) -> int | None:
    """Tune's `num_to_keep`: its own rule for a number, none for `front` (search.storage deletes instead)."""
    return None if config.checkpoints_to_keep == "front" else config.checkpoints_to_keep


def resume(experiment: str, *, address: str | None = None, runs_dir: Path = Path("runs")) -> int:
    """Continue a stopped search where it stopped: finished trials are kept, unfinished ones resume."""
    state = load_state(runs_dir, experiment)
    config = load_config(state.config_path)
    manifest = _check_inputs(config)
    fail_fast()
    _connect(address)
    settings = _settings(config, manifest, state.settings["dense"])
    if not tune.Tuner.can_restore(state.experiment_dir):
        raise ValueError(f"{state.experiment_dir}: no Ray Tune experiment to resume there")
    _end_lost_runs(state)
    tuner = tune.Tuner.restore(state.experiment_dir, trainable=_trainable(settings), resume_unfinished=True, resume_errored=True)
    return _finish(tuner.fit(), config, state, runs_dir)


def _end_lost_runs(state: SearchState) -> None:
    """Trials the killed driver started after Tune's last state save cannot resume: end their runs (MLflow permitting)."""
    known = {trial.trial_id for trial in ExperimentAnalysis(state.experiment_dir).trials}
    try:
        lost = end_lost_runs(MlflowClient(state.tracking_uri), state.mlflow_experiment, state.parent_run, known)
    except Exception as error:  # noqa: BLE001 - MLflow down: the runs stay RUNNING, nothing else is affected
        print(f"note: could not check MLflow for runs lost with the driver ({type(error).__name__})")
        return
    if lost:
        print(f"{len(lost)} trial(s) started after Tune's last saved state were lost with the driver: "
              f"{', '.join(lost)} (their MLflow runs end as KILLED; the search proposes other trials instead)")


def _check_inputs(config: SearchConfig) -> dict:
    if config.simulate:  # a simulation reads no data set and no baseline: its config says the task
        return {"task": config.simulate.task}
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
    if config.latency_table:
        _check_latency_table(config)
    return manifest


def _check_latency_table(config: SearchConfig) -> None:
    """The table (every table, when `latency_table` is a folder of one per node type) must cover the baseline's
    layers at `speedup_at`: checked before Ray starts, so that a table that cannot serve fails here and not in
    every trial. The device is checked where trials run (the driver may be a CPU head of a GPU cluster)."""
    from prune_core.adapters import attention_sites
    from prune_core.latency_model import layer_latency, tables_in
    from prune_core.models import load_model

    at = config.speedup_at
    try:
        shapes = [site.shape for site in attention_sites(load_model(config.baseline))]
        for table in tables_in(config.latency_table):
            for shape in shapes:
                layer_latency(table, shape, tokens=at.tokens, batch=at.batch)
    except ValueError as error:
        raise ConfigError(f"{config.source}: latency_table: {config.latency_table}: {error}") from error


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


def _connect(address: str | None) -> None:
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(address="local", include_dashboard=False, log_to_driver=False)  # never a stale `ray start` cluster


def _settings(config: SearchConfig, manifest: dict, dense: float) -> TrialSettings:
    """What the trials share; absolute paths, since Tune runs each trial in its own working directory."""
    baseline = Path(config.baseline)
    search = replace(
        config,
        baseline=str(baseline.resolve()) if baseline.exists() else config.baseline,  # else a hub id
        data=str(Path(config.data).resolve()),
    )
    return TrialSettings(search=search, task=manifest["task"], dense_metric=dense)


def dense_splits(config: SearchConfig, dense: float) -> dict[str, float]:
    """The dense model's metric on each split known (the report's reference lines): the search's eval split as
    measured, and the others its training recorded (`search.baseline`'s record; a hub model has none)."""
    record = Path(config.baseline) / BASELINE_RECORD
    known = json.loads(record.read_text()) if record.is_file() else {}
    splits = {split: float(known[split]) for split in ("validation", "test") if isinstance(known.get(split), (int, float))}
    return {**splits, config.eval_split: dense}


def _dense_metric(settings: TrialSettings) -> float:
    """The baseline's metric on the evaluation split, computed once on trial-like resources (a simulation's: given)."""
    if settings.search.simulate:
        return settings.search.simulate.dense_metric
    resources = settings.search.resources

    @ray.remote(num_cpus=resources.cpu, num_gpus=resources.gpu, resources=dict(resources.custom))
    def evaluate_baseline() -> float:
        import torch

        from prune_core import load_model
        from prune_core.metrics import evaluate

        search = settings.search
        device = "cuda" if settings.use_gpu and torch.cuda.is_available() else "cpu"
        model = load_model(search.baseline).to(device)
        batches = make_loader(search.data, search.eval_split, search.loader, train=False)
        return evaluate(model, batches, settings.task)[settings.metric_name]

    return ray.get(evaluate_baseline.remote())


def _trainable(settings: TrialSettings):
    search = settings.search
    if search.simulate:  # the stand-in for scale runs: no torch in the trials' processes
        simulated = SimulationSettings.of(search, settings.metric_name, settings.dense_metric)
        trainable = tune.with_parameters(run_simulated_trial, settings=simulated)
    else:
        trainable = tune.with_parameters(run_trial, settings=settings)
    resources = search.resources
    return tune.with_resources(trainable, {"cpu": resources.cpu, "gpu": resources.gpu, **resources.custom})


def _finish(results, config: SearchConfig, state: SearchState, runs_dir: Path) -> int:
    """`finish`, and under a simulated search's summary, that it was one."""
    code = finish(results, config.experiment, state, runs_dir)
    if config.simulate:
        print(f"SIMULATED search: trials modelled {state.metric} against sparsity (search.simulation); nothing was pruned")
    return code


def _storage(storage: str) -> str:
    """Where Tune keeps results and checkpoints: a URI (s3://, gs://) as given, a folder made absolute."""
    return storage if "://" in storage else str(Path(storage).resolve())
