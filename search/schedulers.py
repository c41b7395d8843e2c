"""When trials stop: the scheduler a config names, the search's step budget, and a Pareto-aware ASHA (MO-ASHA).

Rungs are on the attention sparsity reached in percent (`sparsity_pct`) and ASHA's metric is the
trial's `area` (by default the staircase area under its accuracy-sparsity curve, the trial's own
hypervolume, over the target), so trials with different step ratios are compared
at the same sparsity.

ASHA stops a trial at a rung when its scalar metric falls below the rung's top 1/reduction_factor.
Here the rung is ranked by non-dominated sorting of several objectives instead, as Syne Tune's
MO-ASHA (Schmucker et al. 2021) does: a trial continues when, among the results recorded at that
rung and its own, it is within the first ceil(n / reduction_factor) by (front index, first
objective). No scalarization is chosen for the user: a trial that is less accurate but further
along in sparsity can survive.

What each scheduler ranks on, by `objectives:` (search.space): `pareto_asha` on the objectives themselves
(the task's metric, `attention_sparsity`, `speedup`, as listed); `asha` and `pbt` on one scalar, the
trial's `area` from `trial_area`: with [accuracy, sparsity] the `objective:` area over the accuracy-sparsity
curve, with speedup among the objectives the trial's own hypervolume over them (`own_hypervolume`; over
[accuracy, sparsity] it would be the staircase area again).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import NamedTuple

from ray import tune
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, PopulationBasedTraining, TrialScheduler

from prune_core import GRANULARITIES
from search.pareto import OBJECTIVES, nondominated_ranks, own_hypervolume
from search.space import FRONT_OBJECTIVES, Param, SearchConfig, objective_keys

TIME_ATTR = "sparsity_pct"  # the attention sparsity a trial reached, in percent: ASHA's rungs
ASHA_METRIC = "area"  # the trial's `trial_area` up to the target (maximized)


class Scheduling(NamedTuple):
    """The scheduler, and whether a search algorithm may propose its trials (population-based ones pick their own)."""

    scheduler: TrialScheduler
    takes_searcher: bool


def build_scheduler(config: SearchConfig, metric: str, dense_metric: float) -> Scheduling:
    """The scheduler `config.scheduler` names, with rungs of attention sparsity (in percent) up to the target.

    `dense_metric` is the baseline's metric: every trial's curve starts there (PBT ranks on curves).
    """
    max_t = round(100 * config.target_sparsity)
    if config.scheduler == "none":
        return Scheduling(FIFOScheduler(), takes_searcher=True)
    if config.scheduler == "pbt":
        return Scheduling(StrategyPbt(config, metric, dense_metric), takes_searcher=False)
    if config.scheduler == "pareto_asha":
        scheduler = ParetoAsha(TIME_ATTR, objective_keys(config.objectives, metric), max_t, config.asha.grace_period,
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


def further_objectives(config: SearchConfig) -> tuple[str, ...]:
    """The objectives beyond accuracy and sparsity (speedup): their values follow those two in a curve entry."""
    return tuple(name for name in config.objectives if name not in ("accuracy", "sparsity"))


def curve_entry(config: SearchConfig, result: dict, metric: str) -> tuple[float, ...]:
    """One model of a trial's curve: (attention sparsity, metric, then each further objective's value)."""
    keys = ("attention_sparsity", metric, *(FRONT_OBJECTIVES[name].key for name in further_objectives(config)))
    return tuple(float(result[key]) for key in keys)


def trial_area(config: SearchConfig, curve: Sequence[Sequence[float]], upto: float) -> float:
    """The scalar a trial is ranked on (ASHA's and single-objective Optuna's `area`, PBT's ranking), from its
    curve of `curve_entry`s, dense model first, credited up to sparsity `upto`.

    With [accuracy, sparsity]: the `objective:` area over the accuracy-sparsity curve. With speedup: the trial's
    own hypervolume over `config.objectives` (search.pareto.own_hypervolume) of the models it delivers up to
    `upto` (those below it and the first at or beyond it, as the staircase pays them), in the box from the dense
    model's values (accuracy 0) to the most a model at `upto` can score.
    """
    further = further_objectives(config)
    if not further:
        return OBJECTIVES[config.objective]([(entry[0], entry[1]) for entry in curve], upto)
    ordered = sorted(curve)
    delivered = [entry for entry in ordered if entry[0] < upto] + [entry for entry in ordered if entry[0] >= upto][:1]
    column = {"sparsity": 0, "accuracy": 1, **{name: 2 + i for i, name in enumerate(further)}}
    points = [tuple(entry[column[name]] for name in config.objectives) for entry in delivered]
    reference = tuple(FRONT_OBJECTIVES[name].reference for name in config.objectives)
    upper = tuple(FRONT_OBJECTIVES[name].most(upto) for name in config.objectives)
    return own_hypervolume(points, reference, upper)


class StepBudget(tune.Stopper):
    """Ends the search once its trials have run `budget` prune steps together.

    Steps are counted as distinct (trial, segment, step) triples: Tune hands a finished function
    trainable's last result to stoppers a second time, and a restored trial may repeat a step's
    report, but a trial that population-based training sends on from another trial's checkpoint (a
    new segment) runs its steps anew, so they count. The count is per driver session (a resumed
    search gets the budget again); it is the compute budget the search-efficiency benchmark
    compares methods at.
    """

    def __init__(self, budget: int | None) -> None:
        self.budget = budget
        self.steps: set[tuple[str, int, int]] = set()

    def __call__(self, trial_id: str, result: dict) -> bool:
        if result.get("step") is not None:
            self.steps.add((trial_id, int(result.get("segment", 0)), int(result["step"])))
        return False

    def stop_all(self) -> bool:
        return self.budget is not None and len(self.steps) >= self.budget


class ParetoAsha(FIFOScheduler):
    """MO-ASHA over `objectives` (two or more result keys, all maximized) with rungs on `time_attr`."""

    def __init__(
        self, time_attr: str, objectives: tuple[str, ...], max_t: float, grace_period: float, reduction_factor: float
    ) -> None:
        if len(objectives) < 2 or not 0 < grace_period < max_t or reduction_factor <= 1:
            raise ValueError("ParetoAsha needs two or more objectives, 0 < grace_period < max_t and reduction_factor > 1")
        super().__init__()
        self.time_attr, self.objectives, self.max_t, self.rf = time_attr, tuple(objectives), max_t, reduction_factor
        count = int(math.log(max_t / grace_period) / math.log(reduction_factor)) + 1
        milestones = [grace_period * reduction_factor**k for k in range(count)]
        self.rungs: list[tuple[float, dict[str, tuple[float, ...]]]] = [(m, {}) for m in reversed(milestones) if m < max_t]

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True  # the objectives are the scheduler's own; the searcher keeps its metric

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if self.time_attr not in result or any(key not in result for key in self.objectives):
            return TrialScheduler.CONTINUE
        if result[self.time_attr] >= self.max_t:
            return TrialScheduler.STOP
        return self.decide(trial.trial_id, result[self.time_attr], tuple(float(result[k]) for k in self.objectives))

    def decide(self, trial_id: str, time: float, point: tuple[float, ...]) -> str:
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


class StrategyPbt(PopulationBasedTraining):
    """Population-based training over strategy schedules (`scheduler: pbt`).

    Every `pbt.interval` percent of attention sparsity, a trial in the bottom quantile goes on from a
    top trial's step checkpoint (its pruned, LoRA-merged model) with an explored config for its next
    steps, so its schedule may change strategy on the way and no step of the top trial is redone.
    Changes to Ray's PBT:
    - trials are ranked by `trial_area` up to the sparsity all of them have reached (the curve from the
      dense model), not on each one's last score, which grows with the sparsity reached;
    - a bottom trial is exploited only when it ranks strictly below the top ones (a tie is no reason to clone);
    - a population that fits its slots (`trials` <= `max_concurrent`) runs at once: no trial is paused to
      time-share (see `on_trial_result`); a larger one takes turns, as in Ray's;
    - a clone never writes over its trial's earlier step checkpoints;
    - explore resamples each searched key from the space with probability `pbt.resample` (Ray's list
      mutation shifts to the neighbouring entry, meaningless for strategy names), and never proposes a
      granularity that cannot prune the clone's model (after `variable_per_head`, ragged heads).
    A clone's config carries its lineage: `segment` (0, then one more per exploit) and `cloned_from`
    ("trial/step"); the trainable starts a new segment from it.
    """

    def __init__(self, config: SearchConfig, metric: str, dense_metric: float) -> None:
        self.config = config
        self.space = {param.name: param for param in config.space}
        self.resample = config.pbt.resample
        self.metric_name, self.dense_metric = metric, dense_metric
        self.rng = random.Random(config.seed)
        self.curves: dict[str, dict[int, tuple[float, ...]]] = {}  # trial id -> step -> curve_entry
        self.keys = ("attention_sparsity", *objective_keys(config.objectives, metric))  # what a curve entry needs
        self.checkpoint_index: dict[str, int] = {}  # trial id -> the highest checkpoint folder index it has written
        self.time_share = config.trials > config.max_concurrent  # a population larger than its slots takes turns
        super().__init__(
            time_attr=TIME_ATTR,
            metric=ASHA_METRIC,
            mode="max",
            perturbation_interval=config.pbt.interval,
            burn_in_period=config.pbt.interval,
            quantile_fraction=config.pbt.quantile,
            custom_explore_fn=self.explore,
            log_config=False,
        )

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if result.get("step") is not None and all(key in result for key in self.keys):
            step = int(result["step"])
            if result.get("cloned_from") and step - 1 == int(result["cloned_from"].rsplit("/", 1)[1]):
                self._inherit(trial.trial_id, result["cloned_from"])  # a clone's first step: its true origin
            curve = self.curves.setdefault(trial.trial_id, {})
            curve[step] = curve_entry(self.config, result, self.metric_name)
        if str(result.get("checkpoint_dir_name") or "").startswith("checkpoint_"):
            index = int(result["checkpoint_dir_name"].rsplit("_", 1)[1])
            self.checkpoint_index[trial.trial_id] = max(index, self.checkpoint_index.get(trial.trial_id, -1))
        decision = super().on_trial_result(tune_controller, trial, result)
        # Ray's PBT pauses a trial at a decision point while any other trial is pending or paused, to time-share
        # a population larger than the trial slots. A clone is paused while it restores, so where the population
        # fits its slots every clone paused others, which paused others in turn: 64 trials on 64 simulated GPUs
        # got 1.7 of the 12.8 results/s offered (benchmarks/scale.py). There the population runs at once.
        return TrialScheduler.CONTINUE if decision == TrialScheduler.PAUSE and not self.time_share else decision

    def _exploit(self, tune_controller, trial, trial_to_clone) -> None:
        """As Ray's, and the clone's next checkpoint goes after every one its trial wrote. Ray restarts the
        clone with a checkpoint index that can lag behind (seen: three segments of a trial all wrote
        checkpoint_000000), so a clone would write over its own earlier segments' step checkpoints, and the
        report could no longer find the front's models there."""
        super()._exploit(tune_controller, trial, trial_to_clone)
        written = self.checkpoint_index.get(trial.trial_id, -1)
        trial.storage.current_checkpoint_index = max(trial.storage.current_checkpoint_index, written)

    def _inherit(self, trial_id: str, cloned_from: str) -> None:
        """A clone's curve: its source's, up to the step it was cloned at."""
        source, step = cloned_from.rsplit("/", 1)
        self.curves[trial_id] = {s: point for s, point in self.curves.get(source, {}).items() if s <= int(step)}

    def curve(self, trial_id: str) -> list[tuple[float, ...]]:
        """The trial's curve of `curve_entry`s along its lineage, from the dense model."""
        further = tuple(FRONT_OBJECTIVES[name].reference for name in further_objectives(self.config))  # the dense values
        return [(0.0, self.dense_metric, *further), *sorted(self.curves.get(trial_id, {}).values())]

    def _quantiles(self):
        """Bottom and top quantile by `trial_area` up to the sparsity every ranked trial has reached."""
        trials = [
            trial for trial, state in self._trial_state.items()
            if state.last_score is not None and not math.isnan(state.last_score) and not trial.is_finished()
            and not self._final(trial) and self.curves.get(trial.trial_id)
        ]
        if len(trials) <= 1:
            return [], []
        reached = min(max(entry[0] for entry in self.curves[t.trial_id].values()) for t in trials)
        score = {t: trial_area(self.config, self.curve(t.trial_id), reached) for t in trials}
        trials.sort(key=score.get)
        count = min(math.ceil(len(trials) * self._quantile_fraction), len(trials) // 2)
        upper = trials[len(trials) - count:]
        # Only a trial strictly worse than every top trial is exploited. A clone's curve is its source's up to
        # the step it was cloned at, so while the others have not gone further they tie, and cloning on a tie
        # would clone it again at every step (seen when a dead node's trial waited for a slot the clone held).
        lower = [t for t in trials[:count] if score[t] < score[upper[0]]]
        return lower, upper

    def _final(self, trial) -> bool:
        """Whether the trial has reported its last step (nothing is left to clone it for)."""
        return any((result or {}).get("final", False) for result in (self._trial_state[trial].last_result, trial.last_result))

    def _checkpoint_or_exploit(self, trial, tune_controller, upper_quantile, lower_quantile) -> None:
        """As Ray's, but a top trial is cloned from its latest step checkpoint: every step reports one, while
        Ray's PBT only holds one for a trial taken at that trial's own last perturbation in the top quantile."""
        for top in upper_quantile:
            # the checkpoint and the result that describes it, taken together: a trial just cloned holds its
            # source's checkpoint while its `last_result` is still its own old one (which model is ragged)
            latest = top.latest_checkpoint_result
            if top is not trial and latest is not None and latest.checkpoint is not None and not self._final(top):
                state = self._trial_state[top]
                state.last_checkpoint, state.last_result = latest.checkpoint, latest.metrics
        super()._checkpoint_or_exploit(trial, tune_controller, upper_quantile, lower_quantile)

    def _get_new_config(self, trial, trial_to_clone) -> tuple[dict, dict]:
        """The clone's explored config, with its lineage; the clone's curve goes with it."""
        cloned = self._trial_state[trial_to_clone].last_result
        step = int(cloned["step"])
        new = self.explore(trial_to_clone.config, ragged=bool(cloned.get("ragged_heads", False)))
        new["segment"] = int(trial.config.get("segment", 0)) + 1
        new["cloned_from"] = f"{trial_to_clone.trial_id}/{step}"  # as the scheduler sees it; the trainable reports the truth
        self._inherit(trial.trial_id, new["cloned_from"])
        return new, {}

    def explore(self, config: dict, ragged: bool = False) -> dict:
        """`config` with each searched key resampled from the space with probability `resample`; on a model
        with ragged heads only the granularities that prune those."""
        new = dict(config)
        for name in self.space:
            if self.rng.random() < self.resample:
                new[name] = self._sample(self.space[name])
        if ragged and not GRANULARITIES[new["granularity"]].ragged_heads:
            able = [g for g in self.space["granularity"].choices if GRANULARITIES[g].ragged_heads]
            new["granularity"] = config["granularity"] if config["granularity"] in able else self.rng.choice(able)
        return new

    def _sample(self, param: Param):
        if param.choices is not None:
            return self.rng.choice(param.choices)
        if param.distribution == "int":
            return self.rng.randint(int(param.low), int(param.high))
        if param.distribution == "loguniform":
            return math.exp(self.rng.uniform(math.log(param.low), math.log(param.high)))
        return self.rng.uniform(param.low, param.high)
