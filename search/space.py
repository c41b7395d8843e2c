"""The search configuration: YAML parsed once into frozen dataclasses, validated before Ray starts.

A search-space entry is a list (a choice), a constant, or one of `{uniform: [lo, hi]}`,
`{loguniform: [lo, hi]}`, `{int: [lo, hi]}`. Every error names the file and the key.

`objectives:` are the front's axes, all maximized: `[accuracy, sparsity]` (the default), `[accuracy, speedup]`
or `[accuracy, sparsity, speedup]`, where speedup is predicted from a latency table (`latency_table:`, at
`speedup_at:`). What ranks trials then: Optuna with `multi_objective: true` and `scheduler: pareto_asha` take
the objectives themselves; ASHA, PBT and single-objective Optuna take the trial's `area`, which with speedup
is its own hypervolume over the objectives (search.schedulers.trial_area).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from data_prep.loader import LoaderConfig
from prune_core import GRANULARITIES, SCORERS, THRESHOLDS
from prune_core.metrics import TASKS
from prune_core.session import SCHEDULES

SEARCHERS = ("optuna", "random", "grid")  # TPE (or NSGA-II), Optuna's random sampler, every combination
# ASHA on the area, MO-ASHA on the objectives, population-based training over strategy schedules, no stopping
SCHEDULERS = ("asha", "pareto_asha", "pbt", "none")
OBJECTIVE_NAMES = ("staircase", "trapezoid")  # search.pareto.OBJECTIVES: the area a trial is ranked on
# The fronts a search can be after (`objectives:`), in the order given; `accuracy` is the task's metric.
OBJECTIVE_SETS = (("accuracy", "sparsity"), ("accuracy", "speedup"), ("accuracy", "sparsity", "speedup"))
SPACE_KEYS = ("granularity", "scorer", "threshold", "step_ratio", "lora_rank", "lora_alpha", "lr", "epochs")
# Dimensions a space may leave out, and the value every trial then has: `min_heads: 0` lets entire_head and
# hybrid remove whole attention blocks (prune_core.Strategy); `[0, 1]` searches it.
OPTIONAL_SPACE_KEYS = {"min_heads": 1}
DISTRIBUTIONS = ("uniform", "loguniform", "int")
# The paper's strategies, to warm-start Optuna (`points_to_evaluate: paper`).
PAPER_POINTS = (
    {"granularity": "per_head", "scorer": "fisher", "threshold": "global"},
    {"granularity": "entire_head", "scorer": "fisher", "threshold": "global"},
    {"granularity": "entire_head", "scorer": "fisher", "threshold": "local"},
    {"granularity": "per_head", "scorer": "magnitude", "threshold": "global"},
)


# The authors' recovery settings, used to complete a warm-start point where the space allows them.
PAPER_SETTINGS = {"step_ratio": 0.1, "lora_rank": 16, "lora_alpha": 16, "lr": 1e-4, "epochs": 1}


class ConfigError(ValueError):
    """A search configuration that cannot run; the message names the file and key."""


@dataclass(frozen=True)
class FrontObjective:
    """One axis of the front as trials report it, and the box a trial's own hypervolume is a fraction of
    (search.pareto.own_hypervolume): credit starts at `reference` (the dense model's value; 0 for accuracy,
    whose every point counts) and ends at `most(upto)`, the most a model pruned up to sparsity `upto` can score."""

    key: str | None  # the result key; None: the task's metric (accuracy, or mAP for multi-label tasks)
    reference: float
    most: Callable[[float], float]


FRONT_OBJECTIVES = {
    "accuracy": FrontObjective(None, 0.0, lambda upto: 1.0),
    "sparsity": FrontObjective("attention_sparsity", 0.0, lambda upto: upto),
    # latency stays above (1 - upto) of the dense one while no cost falls faster than the attention parameters
    # it comes from (the MLP's does not fall at all): a speedup of at most 1 / (1 - upto); beyond, it is clipped
    "speedup": FrontObjective("speedup", 1.0, lambda upto: 1.0 / (1.0 - upto)),
}


def objective_keys(objectives: tuple[str, ...], metric: str) -> tuple[str, ...]:
    """The result keys of `objectives`, in order; `metric` is the task's (e.g. accuracy or mAP)."""
    return tuple(FRONT_OBJECTIVES[name].key or metric for name in objectives)


@dataclass(frozen=True)
class SpeedupAt:
    """The input size speedup is predicted at: tokens per example and batch size."""

    tokens: int
    batch: int


@dataclass(frozen=True)
class Param:
    """One search dimension: `choices`, or a distribution over [low, high]."""

    name: str
    choices: tuple[Any, ...] | None = None
    distribution: str | None = None
    low: float | None = None
    high: float | None = None


@dataclass(frozen=True)
class Resources:
    """What one trial holds: CPUs, (fractional) GPUs and custom Ray resources, e.g. {a10g: 1} to pin a node type."""

    cpu: float = 1.0
    gpu: float = 0.0
    custom: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class AshaConfig:
    grace_period: int = 10  # attention sparsity in percent before a trial can be stopped
    reduction_factor: int = 2


@dataclass(frozen=True)
class PbtConfig:
    """Population-based training: every `interval` percent of attention sparsity a trial in the bottom
    `quantile` goes on from a top trial's checkpoint with an explored strategy (each key resampled
    from the space with probability `resample`)."""

    interval: int = 10  # percent attention sparsity between two exploit/explore decisions of a trial
    quantile: float = 0.25
    resample: float = 0.5


@dataclass(frozen=True)
class SimulateConfig:
    """A simulated search (search.simulation) for scale runs: each trial models its metric against sparsity instead
    of pruning, a step lasting `step_seconds` and checkpointing `checkpoint_mb` of stand-in weights (the demo
    model's size); `dense_metric` and `task` stand in for the baseline and the data set, which it does not read."""

    step_seconds: float = 5.0
    checkpoint_mb: float = 2.4
    dense_metric: float = 0.95
    task: str = "single_label"


@dataclass(frozen=True)
class SearchConfig:
    """A whole search: data, baseline, budget, the space, the scheduler and where results go."""

    experiment: str
    data: str
    baseline: str
    space: tuple[Param, ...]
    target_sparsity: float = 0.5
    schedule: str = "linear"
    trials: int = 12
    time_budget_s: float | None = None
    step_budget: int | None = None  # stop the search after this many prune steps, all trials together
    max_concurrent: int = 2
    seed: int = 0
    objective: str = "staircase"  # the area under a trial's accuracy-sparsity curve it is ranked on
    multi_objective: bool = False
    objectives: tuple[str, ...] = OBJECTIVE_SETS[0]  # the front's axes, one of OBJECTIVE_SETS
    latency_table: str | None = None  # `prune-search profile` output (absolute path); required with speedup
    speedup_at: SpeedupAt | None = None  # required with speedup
    epsilon: tuple[float, ...] | None = None  # per objective, the resolution of the report's epsilon-net of the front
    searcher: str = "optuna"
    scheduler: str = "asha"
    points_to_evaluate: tuple[dict, ...] = ()
    eval_split: str = "validation"
    calib_batches: int = 4
    train_batches_per_step: int | None = None
    latency_repeats: int = 20
    lora_targets: str = "all_linear"
    max_failures: int = 2
    # None: every step's checkpoint; "front": each trial's latest, the front's and clone sources' (search.storage);
    # N: each trial's last N (Tune's own rule: front models that are not a trial's latest are lost)
    checkpoints_to_keep: int | str | None = None
    storage: str = "runs/ray"
    resources: Resources = field(default_factory=Resources)
    asha: AshaConfig = field(default_factory=AshaConfig)
    pbt: PbtConfig = field(default_factory=PbtConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)  # its seed is the search's `seed`
    simulate: SimulateConfig | None = None  # set: a simulated search, no data set or baseline read
    source: str = "<config>"


def _fail(source: str, key: str, message: str) -> ConfigError:
    return ConfigError(f"{source}: {key}: {message}")


def _param(source: str, name: str, raw: Any) -> Param:
    if isinstance(raw, list):
        if not raw:
            raise _fail(source, f"space.{name}", "an empty list; give at least one value")
        return Param(name, choices=tuple(raw))
    if isinstance(raw, dict):
        if len(raw) != 1 or next(iter(raw)) not in DISTRIBUTIONS:
            raise _fail(source, f"space.{name}", f"a distribution must be one of {DISTRIBUTIONS}: {{uniform: [lo, hi]}}")
        kind, bounds = next(iter(raw.items()))
        if not (isinstance(bounds, list) and len(bounds) == 2 and all(isinstance(b, (int, float)) for b in bounds)):
            raise _fail(source, f"space.{name}.{kind}", f"expected [low, high], got {bounds!r}")
        low, high = bounds
        if not low < high or (kind == "loguniform" and low <= 0):
            raise _fail(source, f"space.{name}.{kind}", f"needs 0 < low < high for loguniform, low < high otherwise; got {bounds}")
        return Param(name, distribution=kind, low=low, high=high)
    return Param(name, choices=(raw,))


_CHECKS = {
    "granularity": lambda v: v in GRANULARITIES,
    "scorer": lambda v: v in SCORERS,
    "threshold": lambda v: v in THRESHOLDS,
    "step_ratio": lambda v: isinstance(v, (int, float)) and 0 < v < 1,
    "lora_rank": lambda v: isinstance(v, (int, float)) and v >= 1 and float(v).is_integer(),
    "lora_alpha": lambda v: isinstance(v, (int, float)) and v > 0,
    "lr": lambda v: isinstance(v, (int, float)) and 0 < v < 1,
    "epochs": lambda v: isinstance(v, (int, float)) and v >= 0 and float(v).is_integer(),
    "min_heads": lambda v: v in (0, 1) and not isinstance(v, bool),
}
_EXPECTED = {
    "granularity": f"one of {sorted(GRANULARITIES)}",
    "scorer": f"one of {sorted(SCORERS)}",
    "threshold": f"one of {sorted(THRESHOLDS)}",
    "step_ratio": "a fraction in (0, 1)",
    "lora_rank": "an integer >= 1",
    "lora_alpha": "a number > 0",
    "lr": "a learning rate in (0, 1)",
    "epochs": "an integer >= 0",
    "min_heads": "0 (whole attention blocks may go) or 1 (a head stays in every layer)",
}


def _section(source: str, name: str, cls, raw: Any, **fixed: Any):
    """A nested mapping as `cls`; `fixed` fields come from elsewhere in the config and are not keys here."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise _fail(source, name, f"expected a mapping, got {type(raw).__name__}")
    known = {f.name for f in fields(cls)} - set(fixed)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise _fail(source, f"{name}.{unknown[0]}", f"unknown key; known keys: {sorted(known)}")
    try:
        return cls(**raw, **fixed)
    except (TypeError, ValueError) as error:  # the section's own checks, e.g. LoaderConfig.batch_size >= 1
        raise _fail(source, name, str(error)) from error


def parse_config(raw: dict, source: str = "<config>") -> SearchConfig:
    """Validate a YAML document already loaded into a dict."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    known = {f.name for f in fields(SearchConfig)} - {"source"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise _fail(source, unknown[0], f"unknown key; known keys: {sorted(known)}")
    if raw.get("simulate") is not None:  # a simulated search reads no data set and no baseline
        raw = {"data": "simulated", "baseline": "simulated", **raw}
    for key in ("experiment", "data", "baseline", "space"):
        if key not in raw:
            raise _fail(source, key, "missing (required)")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(raw["experiment"])):
        raise _fail(source, "experiment", "use letters, digits, '.', '_' or '-' (it names folders and runs)")
    space_raw = raw["space"]
    if not isinstance(space_raw, dict):
        raise _fail(source, "space", "expected a mapping of search dimensions")
    unknown = sorted(set(space_raw) - set(SPACE_KEYS) - set(OPTIONAL_SPACE_KEYS))
    if unknown:
        raise _fail(source, f"space.{unknown[0]}", f"unknown dimension; known: {[*SPACE_KEYS, *OPTIONAL_SPACE_KEYS]}")
    missing = [key for key in SPACE_KEYS if key not in space_raw]
    if missing:
        raise _fail(source, f"space.{missing[0]}", "missing; give a value or a list of values")
    names = [*SPACE_KEYS, *(key for key in OPTIONAL_SPACE_KEYS if key in space_raw)]
    space = tuple(_param(source, name, space_raw[name]) for name in names)
    for param in space:
        for value in param.choices or (param.low, param.high):
            if not _CHECKS[param.name](value):
                raise _fail(source, f"space.{param.name}", f"{value!r} is not {_EXPECTED[param.name]}")
        if param.distribution and param.name in ("granularity", "scorer", "threshold", "min_heads"):
            raise _fail(source, f"space.{param.name}", "must be a list of names, not a distribution")
    parsed = ("space", "resources", "asha", "pbt", "loader", "simulate", "points_to_evaluate", *_FRONT_KEYS)
    values = {k: v for k, v in raw.items() if k not in parsed}
    points = raw.get("points_to_evaluate", ())
    if points == "paper":
        points = PAPER_POINTS
    elif not isinstance(points, (list, tuple)) or not all(isinstance(p, dict) for p in points):
        raise _fail(source, "points_to_evaluate", "expected 'paper' or a list of mappings")
    seed = raw.get("seed", SearchConfig.seed)
    if not isinstance(seed, int) or seed < 0:
        raise _fail(source, "seed", f"an integer >= 0, got {seed!r}")
    config = SearchConfig(
        **values,
        space=space,
        points_to_evaluate=tuple(_complete(point, space) for point in points),
        resources=_section(source, "resources", Resources, raw.get("resources")),
        asha=_section(source, "asha", AshaConfig, raw.get("asha")),
        pbt=_section(source, "pbt", PbtConfig, raw.get("pbt")),
        simulate=None if raw.get("simulate") is None else _section(source, "simulate", SimulateConfig, raw["simulate"]),
        loader=_section(source, "loader", LoaderConfig, raw.get("loader"), seed=seed),
        source=source,
        **_front(source, raw),
    )
    _validate(config)
    return config


_FRONT_KEYS = ("objectives", "latency_table", "speedup_at", "epsilon")
_PROFILE = ("build one with `prune-search profile --device cpu --out FILE` (or a folder of one per node type, "
            "each built on that node type)")


def _front(source: str, raw: dict) -> dict[str, Any]:
    """`objectives` and what speedup needs: the latency table (a file, resolved against the working directory as
    `data` and `baseline` are, made absolute for the trials) and the input size; `epsilon`, one per objective."""
    objectives = raw.get("objectives", list(OBJECTIVE_SETS[0]))
    if not isinstance(objectives, (list, tuple)) or tuple(objectives) not in OBJECTIVE_SETS:
        allowed = ", ".join(f"[{', '.join(names)}]" for names in OBJECTIVE_SETS)
        raise _fail(source, "objectives", f"one of {allowed} (accuracy: the task's metric); got {objectives!r}")
    objectives = tuple(objectives)
    speedup = "speedup" in objectives
    for key in ("latency_table", "speedup_at"):
        if not speedup and raw.get(key) is not None:
            raise _fail(source, key, "only used when speedup is an objective: add speedup to objectives or drop it")
        if speedup and raw.get(key) is None:
            needed = "the path of a latency table JSON; " + _PROFILE if key == "latency_table" else (
                "the input size speedup is predicted at, e.g. {tokens: 146, batch: 1}")
            raise _fail(source, key, f"required with speedup among the objectives: {needed}")
    table, at = raw.get("latency_table"), raw.get("speedup_at")
    if speedup:
        if not isinstance(table, str) or not Path(table).exists():
            raise _fail(source, "latency_table", f"no such file or folder: {table!r}; {_PROFILE}")
        table = str(Path(table).resolve())
        if not isinstance(at, dict):
            raise _fail(source, "speedup_at", f"a mapping of tokens and batch, e.g. {{tokens: 146, batch: 1}}; got {at!r}")
        unknown = sorted(set(at) - {"tokens", "batch"}, key=str)
        if unknown:
            raise _fail(source, f"speedup_at.{unknown[0]}", "unknown key; known keys: ['batch', 'tokens']")
        for key in ("tokens", "batch"):
            value = at.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise _fail(source, f"speedup_at.{key}", f"an integer >= 1, got {value!r}")
        at = SpeedupAt(**at)
    epsilon = raw.get("epsilon")
    if epsilon is not None:
        if not (isinstance(epsilon, list) and len(epsilon) == len(objectives) and all(
                isinstance(e, (int, float)) and not isinstance(e, bool) and 0 <= e < math.inf for e in epsilon)):
            raise _fail(source, "epsilon", f"one number >= 0 per objective ({', '.join(objectives)}), got {epsilon!r}")
        epsilon = tuple(float(e) for e in epsilon)
    return {"objectives": objectives, "latency_table": table, "speedup_at": at, "epsilon": epsilon}


def _complete(point: dict, space: tuple[Param, ...]) -> dict:
    """A warm-start point with every dimension: the authors' setting where allowed, else a central value."""
    full = dict(point)
    for param in space:
        if param.name in full:
            continue
        paper = PAPER_SETTINGS.get(param.name)
        if param.choices is not None:
            full[param.name] = paper if paper in param.choices else param.choices[0]
        elif paper is not None and param.low <= paper <= param.high:
            full[param.name] = paper
        elif param.distribution == "loguniform":
            full[param.name] = math.sqrt(param.low * param.high)
        else:
            full[param.name] = (param.low + param.high) / 2 if param.distribution == "uniform" else int((param.low + param.high) // 2)
    return full


def _validate(config: SearchConfig) -> None:
    source = config.source
    if not 0 < config.target_sparsity < 1:
        raise _fail(source, "target_sparsity", f"a fraction in (0, 1), got {config.target_sparsity}")
    if config.schedule not in SCHEDULES:
        raise _fail(source, "schedule", f"one of {sorted(SCHEDULES)}, got {config.schedule!r}")
    for key in ("trials", "max_concurrent", "calib_batches", "latency_repeats"):
        if not isinstance(getattr(config, key), int) or getattr(config, key) < 1:
            raise _fail(source, key, f"an integer >= 1, got {getattr(config, key)!r}")
    if config.step_budget is not None and (not isinstance(config.step_budget, int) or config.step_budget < 1):
        raise _fail(source, "step_budget", f"an integer >= 1 (prune steps over all trials), or leave it out; got {config.step_budget!r}")
    keep = config.checkpoints_to_keep
    if keep is not None and keep != "front" and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise _fail(source, "checkpoints_to_keep", "'front' (each trial's latest step and every front model), an "
                    f"integer >= 1 (each trial's last N steps), or leave it out to keep every step; got {keep!r}")
    if config.time_budget_s is not None and config.time_budget_s <= 0:
        raise _fail(source, "time_budget_s", "seconds > 0, or leave it out")
    if config.searcher not in SEARCHERS:
        raise _fail(source, "searcher", f"one of {list(SEARCHERS)}, got {config.searcher!r}")
    if config.objective not in OBJECTIVE_NAMES:
        raise _fail(source, "objective", f"one of {list(OBJECTIVE_NAMES)}, got {config.objective!r} (staircase: the "
                    "accuracy the trial's models deliver at each sparsity; trapezoid: interpolated between them)")
    if config.scheduler not in SCHEDULERS:
        raise _fail(source, "scheduler", f"one of {list(SCHEDULERS)}, got {config.scheduler!r}")
    if "speedup" in config.objectives and config.objective != "staircase":
        raise _fail(source, "objective", f"{config.objective} interpolates accuracy over sparsity and has no form with "
                    "speedup; with speedup a trial is ranked on its own hypervolume over the objectives: use staircase")
    if config.searcher == "grid" and (config.multi_objective or config.points_to_evaluate):
        raise _fail(source, "searcher", "grid runs every combination of the listed choices: drop multi_objective and points_to_evaluate")
    if config.eval_split not in ("train", "validation", "test"):
        raise _fail(source, "eval_split", f"one of train, validation, test; got {config.eval_split!r}")
    if config.resources.cpu <= 0 or config.resources.gpu < 0:
        raise _fail(source, "resources", "cpu > 0 and gpu >= 0 (fractions allowed, e.g. gpu: 0.5)")
    custom = config.resources.custom
    if not isinstance(custom, dict) or not all(
        isinstance(k, str) and k not in ("CPU", "GPU", "cpu", "gpu") and isinstance(v, (int, float)) and v > 0
        for k, v in custom.items()
    ):
        raise _fail(source, "resources.custom", f"a mapping of Ray resource names to amounts > 0, e.g. {{a10g: 1}}; got {custom!r}")
    if config.asha.grace_period < 1 or config.asha.reduction_factor < 2:
        raise _fail(source, "asha", "grace_period >= 1 (percent sparsity) and reduction_factor >= 2")
    if config.asha.grace_period >= round(100 * config.target_sparsity):
        raise _fail(source, "asha.grace_period", "must be below the target sparsity in percent, or ASHA never stops a trial")
    if config.scheduler == "pbt":
        _validate_pbt(config)
    if config.simulate is not None:
        _validate_simulate(config)
    choices = {p.name: p for p in config.space}
    for index, point in enumerate(config.points_to_evaluate):
        for key, value in point.items():
            if key not in choices:
                raise _fail(source, f"points_to_evaluate[{index}].{key}", f"not a search dimension; known: {list(SPACE_KEYS)}")
            param = choices[key]
            if param.choices is not None and value not in param.choices:
                raise _fail(source, f"points_to_evaluate[{index}].{key}", f"{value!r} is not among the choices {list(param.choices)}")


def _validate_simulate(config: SearchConfig) -> None:
    """A simulation models the metric against sparsity only; its stand-ins must be numbers that can run."""
    source, simulate = config.source, config.simulate

    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    for key in ("step_seconds", "checkpoint_mb"):
        if not (number(getattr(simulate, key)) and getattr(simulate, key) > 0):
            raise _fail(source, f"simulate.{key}", f"a number > 0, got {getattr(simulate, key)!r}")
    if not (number(simulate.dense_metric) and 0 < simulate.dense_metric <= 1):
        raise _fail(source, "simulate.dense_metric", f"the dense model's metric, in (0, 1]; got {simulate.dense_metric!r}")
    if simulate.task not in TASKS:
        raise _fail(source, "simulate.task", f"one of {list(TASKS)}, got {simulate.task!r}")
    if "speedup" in config.objectives:
        raise _fail(source, "objectives", "a simulated search models accuracy and sparsity only: drop speedup or simulate")


def _validate_pbt(config: SearchConfig) -> None:
    """PBT proposes its own trials after the first population, ranks on one metric, and explores only
    transitions that can run."""
    source, pbt = config.source, config.pbt
    if config.searcher not in ("random", "grid"):
        raise _fail(source, "searcher", "scheduler: pbt draws its first population itself: use searcher: random or grid "
                    f"(got {config.searcher!r}; Ray refuses a search algorithm beside population-based training)")
    if config.multi_objective:
        raise _fail(source, "multi_objective", "scheduler: pbt ranks trials on one metric (the area); drop multi_objective")
    if not isinstance(pbt.interval, int) or not 1 <= pbt.interval < round(100 * config.target_sparsity):
        raise _fail(source, "pbt.interval", f"an integer >= 1 below the target sparsity in percent, got {pbt.interval!r}")
    if not 0 < pbt.quantile <= 0.5:
        raise _fail(source, "pbt.quantile", f"a fraction in (0, 0.5], got {pbt.quantile!r}")
    if not 0 <= pbt.resample <= 1:
        raise _fail(source, "pbt.resample", f"a probability in [0, 1], got {pbt.resample!r}")


def grid_values(config: SearchConfig) -> dict[str, list]:
    """The values `searcher: grid` runs every combination of: the listed choices; a distribution
    is held at its warm-start value (the authors' setting where the range allows it)."""
    fixed = _complete({}, tuple(p for p in config.space if p.choices is None))
    return {p.name: list(p.choices) if p.choices is not None else [fixed[p.name]] for p in config.space}


def load_config(path: str | Path, **overrides: Any) -> SearchConfig:
    """Read and validate a YAML search config; `overrides` (e.g. trials) replace top-level keys."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from error
    raw = {**(raw or {}), **{k: v for k, v in overrides.items() if v is not None}}
    return parse_config(raw, source=str(path))
