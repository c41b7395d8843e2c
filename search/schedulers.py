"""A Pareto-aware asynchronous successive halving scheduler for Ray Tune (MO-ASHA).

ASHA stops a trial at a rung when its scalar metric falls below the rung's top 1/reduction_factor.
Here the rung is ranked by non-dominated sorting of several objectives instead, as Syne Tune's
MO-ASHA (Schmucker et al. 2021) does: a trial continues when, among the results recorded at that
rung and its own, it is within the first ceil(n / reduction_factor) by (front index, first
objective). No scalarization is chosen for the user: a trial that is less accurate but further
along in sparsity can survive.
"""

from __future__ import annotations

import math

from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from search.pareto import nondominated_ranks


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
