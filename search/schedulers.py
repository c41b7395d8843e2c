"""When trials stop: the scheduler a config names, the search's step budget, and a Pareto-aware ASHA (MO-ASHA).

Rungs are on the attention sparsity reached in percent (`sparsity_pct`) and ASHA's metric is the
normalized area under the accuracy-sparsity curve, so trials with different step ratios are compared
at the same sparsity.

ASHA stops a trial at a rung when its scalar metric falls below the rung's top 1/reduction_factor.
Here the rung is ranked by non-dominated sorting of several objectives instead, as Syne Tune's
MO-ASHA (Schmucker et al. 2021) does: a trial continues when, among the results recorded at that
rung and its own, it is within the first ceil(n / reduction_factor) by (front index, first
objective). No scalarization is chosen for the user: a trial that is less accurate but further
along in sparsity can survive.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from ray import tune
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler

from search.pareto import nondominated_ranks
from search.space import SearchConfig

TIME_ATTR = "sparsity_pct"  # the attention sparsity a trial reached, in percent: ASHA's rungs
ASHA_METRIC = "area"  # the normalized area under the accuracy-sparsity curve (maximized)


class Scheduling(NamedTuple):
    """The scheduler, and whether a search algorithm may propose its trials (population-based ones pick their own)."""

    scheduler: TrialScheduler
    takes_searcher: bool


def build_scheduler(config: SearchConfig, metric: str) -> Scheduling:
    """The scheduler `config.scheduler` names, with rungs of attention sparsity (in percent) up to the target."""
    max_t = round(100 * config.target_sparsity)
    if config.scheduler == "none":
        return Scheduling(FIFOScheduler(), takes_searcher=True)
    if config.scheduler == "pareto_asha":
        scheduler = ParetoAsha(TIME_ATTR, (metric, "attention_sparsity"), max_t, config.asha.grace_period,
                               config.asha.reduction_factor)
        return Scheduling(scheduler, takes_searcher=True)
    scheduler = AsyncHyperBandScheduler(
        time_attr=TIME_ATTR,
        metric=ASHA_METRIC,
        mode="max",
        max_t=max_t,
        grace_period=config.asha.grace_period,
        reduction_factor=config.asha.reduction_factor,
    )
    return Scheduling(scheduler, takes_searcher=True)


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


class ParetoAsha(FIFOScheduler):
    """MO-ASHA over `objectives` (result keys, all maximized) with rungs on `time_attr`."""

    def __init__(
        self, time_attr: str, objectives: tuple[str, ...], max_t: float, grace_period: float, reduction_factor: float
    ) -> None:
        if len(objectives) != 2 or not 0 < grace_period < max_t or reduction_factor <= 1:
            raise ValueError("ParetoAsha needs two objectives, 0 < grace_period < max_t and reduction_factor > 1")
        super().__init__()
        self.time_attr, self.objectives, self.max_t, self.rf = time_attr, tuple(objectives), max_t, reduction_factor
        count = int(math.log(max_t / grace_period) / math.log(reduction_factor)) + 1
        milestones = [grace_period * reduction_factor**k for k in range(count)]
        self.rungs: list[tuple[float, dict[str, tuple[float, float]]]] = [(m, {}) for m in reversed(milestones) if m < max_t]

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True  # the objectives are the scheduler's own; the searcher keeps its metric

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if self.time_attr not in result or any(key not in result for key in self.objectives):
            return TrialScheduler.CONTINUE
        if result[self.time_attr] >= self.max_t:
            return TrialScheduler.STOP
        return self.decide(trial.trial_id, result[self.time_attr], tuple(float(result[k]) for k in self.objectives))

    def decide(self, trial_id: str, time: float, point: tuple[float, float]) -> str:
        """Record the trial at the highest rung it just reached and say whether it goes on."""
        for milestone, recorded in self.rungs:  # highest first
            if time < milestone:
                continue
            if trial_id in recorded:  # judged at this rung already (unlike Ray's ASHA, never at a lower one later)
                return TrialScheduler.CONTINUE
            rung = [*recorded.values(), point]
            recorded[trial_id] = point
            ranks = nondominated_ranks(rung)
            order = sorted(range(len(rung)), key=lambda i: (ranks[i], -rung[i][0], i))
            keep = math.ceil(len(rung) / self.rf)
            return TrialScheduler.CONTINUE if order.index(len(rung) - 1) < keep else TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def debug_string(self) -> str:
        return "ParetoAsha: " + " | ".join(f"{m:g}: {len(r)} trials" for m, r in self.rungs)
