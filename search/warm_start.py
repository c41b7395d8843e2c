"""`run --warm-start EXPERIMENT`: tell a new search's Optuna study the trials of an earlier search, so a
search with a larger budget or a wider space does not pay for them twice.

An earlier trial that finished is told COMPLETE with the objectives of its last result, one ASHA stopped
(or that the earlier driver left unfinished) PRUNED at its last step, a failed one not at all. Tune's
stored results are read (the record of truth), MLflow's child runs only when Tune's folder is gone.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune import ExperimentAnalysis
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from search.results import SearchState, load_state
from search.schedulers import ASHA_METRIC
from search.searchers import SearchPlan, optuna_distributions
from search.space import OBJECTIVE_SETS, ConfigError, SearchConfig, objective_keys
from search.tracking import SEGMENT_TAG, STOPPED_TAG, child_runs, fail_fast, tune_events

TrialState = optuna.trial.TrialState


@dataclass(frozen=True)
class WarmStart:
    """The earlier search (its `experiment:` name in the same runs folder), and whether its trials outside
    the new space are skipped with a warning instead of refused."""

    experiment: str
    skip_outside: bool = False


@dataclass(frozen=True)
class EarlierTrial:
    """What a new study learns from one trial of an earlier search."""

    trial_id: str
    config: dict
    last: dict  # its last result (with `step`, and `final` when it finished); {} when it reported none
    failed: bool


def tell_earlier_trials(warm: WarmStart, plan: SearchPlan, config: SearchConfig, metric: str, runs_dir: Path) -> dict[str, Any]:
    """Add the earlier search's trials to the study of `plan`; runs before Ray starts. Returns the parent
    run's params that record it (`warm_start`, `warm_start_trials`)."""
    if config.searcher == "grid" or config.scheduler == "pbt":
        raise ConfigError(
            f"{config.source}: --warm-start tells earlier trials to an Optuna study; searcher: {config.searcher} with "
            f"scheduler: {config.scheduler} has none (use searcher: optuna or random, and a scheduler other than pbt)"
        )
    state = load_state(runs_dir, warm.experiment)
    if state.metric != metric:
        raise ConfigError(f"--warm-start {warm.experiment}: that search measured {state.metric}, this one {metric}")
    earlier = state.settings.get("objective", "trapezoid")  # searches before `objective:` ranked on the trapezoid
    if not config.multi_objective and earlier != config.objective:
        raise ConfigError(
            f"--warm-start {warm.experiment}: that search ranked trials on objective: {earlier}, this one on "
            f"{config.objective}; their values do not compare (set objective: {earlier} to reuse its trials)"
        )
    ranked = tuple(state.settings.get("objectives", OBJECTIVE_SETS[0]))  # searches before `objectives:` had these
    if ranked != config.objectives:
        raise ConfigError(
            f"--warm-start {warm.experiment}: that search's objectives were {list(ranked)}, this one's are "
            f"{list(config.objectives)}; their values do not compare (set objectives: {list(ranked)} to reuse its trials)"
        )
    objectives = objective_keys(config.objectives, metric) if config.multi_objective else (ASHA_METRIC,)
    told = tell(study_of(plan), optuna_distributions(config), earlier_trials(state), objectives, warm)
    print(f"warm start: told the study {told} trials of {warm.experiment}")
    return {"warm_start": warm.experiment, "warm_start_trials": told}


def study_of(plan: SearchPlan) -> optuna.Study:
    """The Optuna study behind a plan's searcher (Ray's OptunaSearch makes it at construction when given a space)."""
    searcher = plan.search_alg
    while isinstance(searcher, ConcurrencyLimiter):
        searcher = searcher.searcher
    study = getattr(searcher, "_ot_study", None) if isinstance(searcher, OptunaSearch) else None
    if study is None:
        raise ConfigError(f"--warm-start needs an Optuna study to tell, and {type(searcher).__name__} has none")
    return study


def tell(study: optuna.Study, distributions: dict, trials: list[EarlierTrial], objectives: tuple[str, ...],
         warm: WarmStart) -> int:
    """Add each usable earlier trial to `study` (objective values from its last result); returns the count.

    A trial with a value outside `distributions` is refused with a ConfigError, or skipped with a warning
    under `warm.skip_outside`.
    """
    first_generation = _first_generation(study.sampler)
    told = 0
    for trial in trials:
        if trial.failed or any(trial.last.get(key) is None for key in objectives):
            continue
        params, outside = _placed(trial.config, distributions)
        if outside is not None:
            message = f"--warm-start {warm.experiment}: trial {trial.trial_id} has {outside}"
            if not warm.skip_outside:
                raise ConfigError(f"{message}; widen the space or pass --warm-start-skip-outside")
            print(f"warning: {message}; skipped", file=sys.stderr)
            continue
        values = [float(trial.last[key]) for key in objectives]
        common = {"params": params, "distributions": distributions,
                  "user_attrs": {"warm_start": f"{warm.experiment}/{trial.trial_id}"}}
        if trial.last.get("final", False):
            frozen = optuna.trial.create_trial(**common, values=values, state=TrialState.COMPLETE,
                                               system_attrs=first_generation)
        else:  # Optuna keeps intermediate values of single-objective trials only
            steps = {int(trial.last["step"]): values[0]} if len(values) == 1 else None
            frozen = optuna.trial.create_trial(**common, state=TrialState.PRUNED, intermediate_values=steps)
        study.add_trial(frozen)
        told += 1
    return told


def earlier_trials(state: SearchState) -> list[EarlierTrial]:
    """The trials of a search: from Tune's stored results, from MLflow's child runs if Tune's folder is gone."""
    if tune.Tuner.can_restore(state.experiment_dir):
        return _tune_trials(ExperimentAnalysis(state.experiment_dir))
    print(f"warm start: no Ray Tune results at {state.experiment_dir}; reading the trials from MLflow", file=sys.stderr)
    return _mlflow_trials(state)


def _tune_trials(analysis: ExperimentAnalysis) -> list[EarlierTrial]:
    """A trial's first segment: its config alone made those steps. Under population-based training a later
    segment goes on from another trial's model, so no single point of the space describes it: left out,
    and a first segment cut short by a clone counts as stopped at its last step."""
    trials: dict[str, dict] = {}
    for event in tune_events(analysis):
        if event.kind == "result" and event.segment > 0:
            trials.get(event.trial_id, {}).update(replaced=True)
            continue
        trial = trials.setdefault(event.trial_id, {"config": event.config, "last": {}, "failed": False})
        if event.kind == "result" and not trial.get("replaced"):
            trial.update(config=event.config, last=event.result)
        elif event.kind == "failed" and not trial.get("replaced"):  # a later segment's failure is not this one's
            trial["failed"] = True
    return [EarlierTrial(trial_id, trial["config"], trial["last"], trial["failed"]) for trial_id, trial in trials.items()]


def _mlflow_trials(state: SearchState) -> list[EarlierTrial]:
    """The child runs of the search's parent run; params are read back from MLflow's strings."""
    fail_fast()
    client = MlflowClient(state.tracking_uri)
    children = child_runs(client, state.mlflow_experiment, state.parent_run)
    trials = []
    for run in children:
        if int(run.data.tags.get(SEGMENT_TAG, "0")) > 0:  # a population-based training clone: see _tune_trials
            continue
        history: dict[int, dict] = {}
        for key in (ASHA_METRIC, state.metric, "attention_sparsity"):
            for entry in client.get_metric_history(run.info.run_id, key):
                history.setdefault(entry.step, {})[key] = entry.value
        step = max(history, default=None)
        final = run.info.status == "FINISHED" and run.data.tags.get(STOPPED_TAG) == "false"
        last = {} if step is None else {**history[step], "step": step, "final": final}
        config = {key: _literal(value) for key, value in run.data.params.items()}
        trials.append(EarlierTrial(run.info.run_name, config, last, run.info.status == "FAILED"))
    return trials


def _literal(text: str) -> Any:
    """A config value from the string MLflow keeps (`str(value)`): a number or bool as such, a name as text."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _placed(config: dict, distributions: dict) -> tuple[dict, str | None]:
    """An earlier trial's config as params of the new space, or what places it outside ('name=value, ...')."""
    params = {}
    for name, distribution in distributions.items():
        if name not in config:
            return {}, f"no {name} (the new space searches it)"
        value = config[name]
        value = value.item() if hasattr(value, "item") else value  # numpy scalars of Tune's result tables
        if isinstance(distribution, optuna.distributions.CategoricalDistribution):
            same = [choice for choice in distribution.choices if choice == value]
            if not same:
                return {}, f"{name}={value!r}, not among the new choices {list(distribution.choices)}"
            params[name] = same[0]
            continue
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        whole = isinstance(distribution, optuna.distributions.IntDistribution)
        if not (numeric and (not whole or float(value).is_integer()) and distribution.low <= value <= distribution.high):
            return {}, f"{name}={value!r}, outside the new range [{distribution.low}, {distribution.high}]"
        params[name] = int(value) if whole else float(value)
    return params, None


def _first_generation(sampler: optuna.samplers.BaseSampler) -> dict:
    """NSGA-II breeds only from trials of its numbered generations: told trials join the first one."""
    if isinstance(sampler, optuna.samplers.NSGAIISampler):
        return {sampler._get_generation_key(): 0}  # noqa: SLF001 - Optuna has no public way to seed a population
    return {}
