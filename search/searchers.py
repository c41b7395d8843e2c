"""Who proposes the trials: Optuna (TPE, NSGA-II when multi-objective, or its random sampler) or the full grid;
under `scheduler: pbt`, Tune's own sampler draws the first population (Ray allows no search algorithm there).

In multi-objective mode Optuna optimizes the config's `objectives` as result keys (the task's metric,
`attention_sparsity`, `speedup`, as listed), else the trial's `area` (with speedup, its own hypervolume over
the objectives: search.schedulers.trial_area). Metric and mode are given to the searcher alone (a TuneConfig
metric would make the study single-objective), and a trial stopped early is told to Optuna as PRUNED instead
of COMPLETE with a partial result (`StudyAwareOptunaSearch`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import optuna
from ray import tune
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, SearchAlgorithm, Searcher
from ray.tune.search.optuna import OptunaSearch

from search.space import SearchConfig, grid_values, objective_keys


class SearchPlan(NamedTuple):
    """What `tune.TuneConfig` takes from the searcher side: the algorithm, the space it does not sample, the count."""

    search_alg: SearchAlgorithm | Searcher
    param_space: dict | None
    num_samples: int


class StudyAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna a trial stopped early (no `final` result) was PRUNED.

    Ray hands a trial ASHA stopped to the searcher as complete with its last partial result; in
    multi-objective mode that partial point (accuracy, sparsity, ...) would enter Optuna's front.
    """

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if isinstance(self.metric, list) and result is not None and not result.get("final", False):
            result = None
        super().on_trial_complete(trial_id, result=result, error=error)


def build_searcher(config: SearchConfig, study_name: str, metric: str) -> SearchPlan:
    """The searcher `config.searcher` names; the grid is Tune's own generator over `tune.grid_search` values."""
    if config.searcher == "grid":
        grid = {name: tune.grid_search(values) for name, values in grid_values(config).items()}
        return SearchPlan(BasicVariantGenerator(max_concurrent=config.max_concurrent), grid, 1)
    if config.scheduler == "pbt":  # Tune's own sampler draws the first population; PBT explores from there
        points = [dict(point) for point in config.points_to_evaluate[: config.trials]]
        generator = BasicVariantGenerator(points_to_evaluate=points or None, max_concurrent=config.max_concurrent,
                                          random_state=config.seed)
        return SearchPlan(generator, tune_space(config), config.trials)
    if config.multi_objective:
        keys = list(objective_keys(config.objectives, metric))
        objective = {"metric": keys, "mode": ["max"] * len(keys)}
        sampler = optuna.samplers.NSGAIISampler(seed=config.seed)
    else:
        objective = {"metric": "area", "mode": "max"}
        sampler = (optuna.samplers.RandomSampler if config.searcher == "random" else optuna.samplers.TPESampler)(seed=config.seed)
    searcher = StudyAwareOptunaSearch(
        space=optuna_distributions(config),
        points_to_evaluate=[dict(p) for p in config.points_to_evaluate] or None,
        sampler=sampler,
        study_name=study_name,
        **objective,
    )
    return SearchPlan(ConcurrencyLimiter(searcher, max_concurrent=config.max_concurrent), None, config.trials)


def tune_space(config: SearchConfig) -> dict:
    """The space as Tune's own sampling domains (for the population of `scheduler: pbt`)."""
    space = {}
    for param in config.space:
        if param.choices is not None:
            space[param.name] = tune.choice(list(param.choices))
        elif param.distribution == "int":
            space[param.name] = tune.randint(int(param.low), int(param.high) + 1)
        elif param.distribution == "loguniform":
            space[param.name] = tune.loguniform(param.low, param.high)
        else:
            space[param.name] = tune.uniform(param.low, param.high)
    return space


def trial_count(config: SearchConfig) -> int:
    """Trials the search runs: every combination of the grid, else `trials`."""
    return math.prod(len(v) for v in grid_values(config).values()) if config.searcher == "grid" else config.trials


def optuna_distributions(config: SearchConfig) -> dict:
    """The space as Optuna distributions (the study's, and what earlier trials are told in)."""
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
