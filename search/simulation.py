"""A simulated trial for scale runs: the real trainable's results, checkpoints and resumption, with no pruning.

`run_simulated_trial` stands in for `search.trainable.run_trial` where what is under test is the search around
it (searcher, schedulers, MLflow tracking, stopper, replay, report) on many workers. Each prune step sleeps
`step_seconds`, then reports the real trial's result keys, valued by a deterministic model of the metric against
attention sparsity per strategy, with a checkpoint in the real layout whose weights are `checkpoint_bytes` of
seeded random bytes. Nothing on its import path imports torch (no prune_core, data_prep or search.trainable):
64 such workers fit where 64 torch processes (about 0.4 GB each) would not. A config asks for it with
`simulate:` (search.space.SimulateConfig); the runner then binds it instead of the real trainable.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import ray
from ray import tune

from search.pareto import OBJECTIVES

if TYPE_CHECKING:
    from search.space import SearchConfig

# The real modules' names, copied because importing them imports torch (tests/test_simulation.py checks they agree):
STATE_FILE = "session.json"  # prune_core.session.STATE_FILE: the step a checkpoint holds
CURVE_FILE = "curve.json"  # search.trainable.CURVE_FILE
SEGMENT_FILE = "segment.json"  # search.trainable.SEGMENT_FILE
WEIGHTS_FILE = "simulated-weights.bin"  # stands in for prune_core.io.WEIGHTS_FILE; no loader takes it for a model
LINEAGE_KEYS = ("segment", "cloned_from")  # search.tracking.LINEAGE_KEYS: where a config came from, not what it is
DEFAULT_MIN_HEADS = 1  # search.space.OPTIONAL_SPACE_KEYS["min_heads"]


CHUNK = 1 << 24  # seeded bytes are made 16 MB at a time: an AST-base checkpoint (350 MB) never sits in memory whole


def seeded_bytes(seed: str, size: int) -> Iterator[bytes]:
    """`size` pseudo-random bytes from `seed`, in chunks (one `randbytes` call takes at most 268 MB)."""
    generator = random.Random(seed)
    for start in range(0, size, CHUNK):
        yield generator.randbytes(min(CHUNK, size - start))


class Schedule(NamedTuple):
    """prune_core.session.Schedule: the sparsity after `step` steps of `ratio` from `start`, the steps to a target."""

    sparsity: Callable[[float, int, float], float]
    steps: Callable[[float, float, float], int]


SCHEDULES = {  # prune_core.session.SCHEDULES
    "compound": Schedule(
        sparsity=lambda ratio, step, start: 1.0 - (1.0 - start) * (1.0 - ratio) ** step,
        steps=lambda ratio, target, start: math.ceil(math.log((1 - target) / (1 - start)) / math.log(1 - ratio) - 1e-9),
    ),
    "linear": Schedule(
        sparsity=lambda ratio, step, start: start + ratio * step,
        steps=lambda ratio, target, start: math.ceil((target - start) / ratio - 1e-9),
    ),
}
RAGGED_ABLE = ("entire_head", "variable_per_head")  # the granularities that prune heads of different dims
MAKES_RAGGED = "variable_per_head"  # the granularity that leaves heads of different dims

# The metric a step costs per unit of sparsity squared it adds: granularity x scorer x threshold x (1 + 2 x step
# ratio), so that per_head/fisher/global is the best strategy, entire_head/magnitude/local among the worst (as in
# the paper), random a control, and smaller steps are gentler. LoRA settings enter only through the noise.
GRANULARITY_COST = {"per_head": 0.08, "variable_per_head": 0.09, "hybrid": 0.11, "same_channel": 0.14, "entire_head": 0.30}
SCORER_COST = {"fisher": 1.0, "fisher_mask": 1.05, "taylor": 1.1, "magnitude_l2": 1.25, "magnitude": 1.3, "random": 2.5}
THRESHOLD_COST = {"global": 1.0, "local": 1.25}
NOISE = 0.004  # half-width of a reported metric's deterministic noise: enough to order near-ties
TEST_GAP = 0.005  # how much lower the final model's test metric sits than its evaluation metric


@dataclass(frozen=True)
class SimulatedModel:
    """The size of the model a simulated trial prunes: what its parameter, MAC and latency counts start from."""

    params: int
    attention_params: int
    macs: int
    attention_macs: int  # Q/K/V/O projections and the attention matmuls of one forward pass
    latency_ms: float
    layers: int
    heads: int
    head_dim: int


# The demo's AST: search.baseline.BaselineConfig's defaults on the demo's features (64 mel bins, 100 frames, 35 labels).
DEMO_MODEL = SimulatedModel(params=592_355, attention_params=186_240, macs=29_219_040, attention_macs=10_783_680,
                            latency_ms=4.0, layers=5, heads=6, head_dim=16)


@dataclass(frozen=True)
class SimulationSettings:
    """What every simulated trial of a search shares, as plain values (a `SearchConfig` would import torch)."""

    metric_name: str  # accuracy, or mAP for a multi-label task
    dense_metric: float
    target_sparsity: float
    schedule: str
    objective: str  # search.pareto.OBJECTIVES: the area a trial reports
    step_seconds: float
    checkpoint_bytes: int
    seed: int
    model: SimulatedModel = DEMO_MODEL

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES or self.objective not in OBJECTIVES:
            raise ValueError(f"schedule must be one of {sorted(SCHEDULES)} and objective one of {sorted(OBJECTIVES)}; "
                             f"got {self.schedule!r}, {self.objective!r}")
        if self.step_seconds < 0 or self.checkpoint_bytes < 0:
            raise ValueError(f"step_seconds and checkpoint_bytes must be >= 0, got {self.step_seconds}, {self.checkpoint_bytes}")

    @classmethod
    def of(cls, search: SearchConfig, metric_name: str, dense_metric: float) -> SimulationSettings:
        """The settings of a search whose config has `simulate:`."""
        simulate = search.simulate
        return cls(metric_name=metric_name, dense_metric=dense_metric, target_sparsity=search.target_sparsity,
                   schedule=search.schedule, objective=search.objective, step_seconds=float(simulate.step_seconds),
                   checkpoint_bytes=round(simulate.checkpoint_mb * 1e6), seed=search.seed)


def steps_to_target(ratio: float, target: float, schedule: str, start: float = 0.0) -> int:
    """As prune_core.session.steps_to_target: the steps from `start` to `target` (0 when already there)."""
    return max(0, SCHEDULES[schedule].steps(ratio, target, start))


def plan(config: dict, settings: SimulationSettings, start_sparsity: float = 0.0) -> dict:
    """What a trial's sampled values make of its steps from `start_sparsity` (prune_core.session.SessionConfig's part)."""
    ratio = float(config["step_ratio"])
    min_heads = int(config.get("min_heads", DEFAULT_MIN_HEADS))
    name = f"{config['granularity']}/{config['scorer']}/{config['threshold']}"
    return {
        "strategy": name if min_heads == 1 else f"{name}/min_heads={min_heads}",  # prune_core.session.Strategy.name
        "granularity": config["granularity"],
        "scorer": config["scorer"],
        "threshold": config["threshold"],
        "step_ratio": ratio,
        "start_sparsity": start_sparsity,
        "steps": steps_to_target(ratio, settings.target_sparsity, settings.schedule, start_sparsity),
    }


def noise(*key) -> float:
    """A value in [-1, 1) fixed by `key` (the same in every process and run: no salted `hash`)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**63 - 1.0


class SimulatedSession:
    """`PruningSession`'s bookkeeping with no model: the step reached, the plan in force from `start_step`, and the
    lineage's history. Each step costs the modelled metric its strategy's price for the sparsity it adds."""

    def __init__(self, settings: SimulationSettings, config: dict, step: int = 0, start_step: int = 0,
                 history: list[dict] | None = None) -> None:
        self.settings, self.config = settings, config
        self.step, self.start_step = step, start_step
        self.history = list(history or [])

    @property
    def end_step(self) -> int:
        return self.start_step + self.config["steps"]

    @property
    def ragged(self) -> bool:
        """Whether the model's heads have different dims (once variable_per_head has pruned it)."""
        return any(record["granularity"] == MAKES_RAGGED for record in self.history)

    def target(self, step: int) -> float:
        reached = SCHEDULES[self.settings.schedule].sparsity(
            self.config["step_ratio"], step - self.start_step, self.config["start_sparsity"])
        return min(reached, self.settings.target_sparsity)

    def switch(self, config: dict) -> None:
        """Go on from the current step with another trial config, refused where the real session refuses it."""
        if self.ragged and config["granularity"] not in RAGGED_ABLE:
            raise ValueError(f"cannot switch to granularity {config['granularity']!r}: the heads have different dims; "
                             f"after variable_per_head use one of {list(RAGGED_ABLE)}")
        self.config = plan(config, self.settings, self.target(self.step))
        self.start_step = self.step

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        """The next step's record: its strategy, the sparsity it reaches and the metric (before noise) there."""
        if self.step >= self.end_step:
            raise StopIteration
        started = time.perf_counter()
        time.sleep(self.settings.step_seconds)  # the pruning and LoRA fine-tuning of a real step
        config = self.config
        before = self.history[-1] if self.history else {"attention_sparsity": 0.0, "metric": self.settings.dense_metric}
        reached = self.target(self.step + 1)
        cost = (GRANULARITY_COST[config["granularity"]] * SCORER_COST[config["scorer"]] * THRESHOLD_COST[config["threshold"]]
                * (1 + 2 * config["step_ratio"]))
        self.step += 1
        self.history.append({
            "step": self.step,
            "strategy": config["strategy"],
            "granularity": config["granularity"],
            "threshold": config["threshold"],
            "step_ratio": config["step_ratio"],
            "target": reached,
            "attention_sparsity": reached,
            "metric": before["metric"] - cost * (reached**2 - before["attention_sparsity"] ** 2),
            "seconds": time.perf_counter() - started,
        })
        return self.history[-1]

    def save(self, directory: Path, weights: Iterator[bytes]) -> None:
        """The step checkpoint: the session state (the step `search.evaluate.step_checkpoints` reads) and the weights."""
        state = {"step": self.step, "start_step": self.start_step, "config": self.config, "history": self.history}
        (directory / STATE_FILE).write_text(json.dumps(state, indent=2))
        with open(directory / WEIGHTS_FILE, "wb") as file:
            for chunk in weights:
                file.write(chunk)

    @classmethod
    def resume(cls, directory: Path, settings: SimulationSettings, config: dict | None = None) -> SimulatedSession:
        """Continue a saved session; with `config`, switched to it (a clone's explored config)."""
        state = json.loads((directory / STATE_FILE).read_text())
        session = cls(settings, state["config"], state["step"], state["start_step"], state["history"])
        if config is not None:
            session.switch(config)
        return session


def layer_sparsity(sparsity: float, threshold: str, layers: int) -> list[float]:
    """Per layer, the fraction of its attention parameters gone: equal under a local threshold; under a global one
    spread from the first layer (most) to the last (least), the mean still `sparsity`."""
    if threshold == "local" or layers == 1:
        return [sparsity] * layers
    spread = 0.8 * sparsity * (1 - sparsity)
    return [sparsity + spread * (1 - 2 * i / (layers - 1)) for i in range(layers)]


def layer_shapes(fractions: list[float], granularity: str, ragged: bool, model: SimulatedModel) -> list[dict]:
    """The layers as prune_core's `LayerShape.to_dict` writes them: whole heads gone (entire_head), channels of every
    head gone, or per-head dims (heads of different dims, after variable_per_head)."""
    shapes = []
    for fraction in fractions:
        kept = round(model.heads * model.head_dim * (1 - fraction))
        hidden = {"hidden_size": model.heads * model.head_dim}
        if ragged:
            dims = [kept // model.heads + (head < kept % model.heads) for head in range(model.heads)]
            shapes.append({"num_heads": model.heads, "qk_dims": dims, "v_dims": dims, **hidden})
        elif granularity == "entire_head":
            shapes.append({"num_heads": round(kept / model.head_dim), "qk_head_dim": model.head_dim,
                           "v_head_dim": model.head_dim, **hidden})
        else:
            dim = round(kept / model.heads)
            shapes.append({"num_heads": model.heads, "qk_head_dim": dim, "v_head_dim": dim, **hidden})
    return shapes


def _saved_segment(directory: Path) -> dict:
    path = directory / SEGMENT_FILE
    return json.loads(path.read_text()) if path.is_file() else {"trial_id": None, "segment": 0}


def run_simulated_trial(config: dict, settings: SimulationSettings) -> None:
    """Ray Tune function trainable standing in for `search.trainable.run_trial` (bound with
    `tune.with_parameters(run_simulated_trial, settings=...)`): its result keys, checkpoint layout and resumption,
    population-based training's clones included."""
    model, metric_name = settings.model, settings.metric_name
    trial_id = tune.get_context().get_trial_id()
    segment = {"trial_id": trial_id, "segment": int(config.get("segment", 0)), "cloned_from": config.get("cloned_from", "")}
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            saved = _saved_segment(Path(directory))
            # another trial's or segment's checkpoint: population-based training cloned it (see run_trial)
            clone = (saved["trial_id"], saved["segment"]) != (trial_id, segment["segment"])
            session = SimulatedSession.resume(Path(directory), settings, config=config if clone else None)
            if clone:
                segment["cloned_from"] = f"{saved['trial_id']}/{session.step}"
            else:
                segment["cloned_from"] = saved.get("cloned_from", segment["cloned_from"])
            curve = [tuple(point) for point in json.loads((Path(directory) / CURVE_FILE).read_text())]
    else:
        session = SimulatedSession(settings, plan(config, settings))
        curve = [(0.0, settings.dense_metric)]
    drawn = {key: value for key, value in config.items() if key not in LINEAGE_KEYS}  # what the trial is
    for record in session:
        sparsity = record["attention_sparsity"]
        value = min(1.0, max(0.0, record["metric"] + NOISE * noise(settings.seed, drawn, session.step)))
        fractions = layer_sparsity(sparsity, record["threshold"], model.layers)
        layers = layer_shapes(fractions, record["granularity"], session.ragged, model)
        macs = model.macs - round(sparsity * model.attention_macs)
        final = session.step == session.end_step
        metrics = {
            metric_name: value,
            "loss": -math.log(max(value, 1e-6)),
            "attention_sparsity": sparsity,
            "sparsity_pct": round(100 * sparsity),
            "params": model.params - round(sparsity * model.attention_params),
            "attention_params": model.attention_params - round(sparsity * model.attention_params),
            "macs": macs,
            "latency_ms": model.latency_ms * macs / model.macs,
            "step": session.step,
            "seconds": record["seconds"],
            "final": final,
            "layers": json.dumps(layers),
            "layer_sparsity": json.dumps(fractions),
            "node_id": ray.get_runtime_context().get_node_id(),
            "segment": segment["segment"],
            "cloned_from": segment["cloned_from"],
            "lineage": json.dumps([step["strategy"] for step in session.history]),
            "ragged_heads": any("qk_dims" in layer for layer in layers),
        }
        curve.append((sparsity, value))
        metrics["area"] = OBJECTIVES[settings.objective](curve, settings.target_sparsity)
        if final:
            test = record["metric"] - TEST_GAP + NOISE * noise(settings.seed, drawn, session.step, "test")
            metrics[f"test_{metric_name}"] = min(1.0, max(0.0, test))
        weights = seeded_bytes(f"{settings.seed}/{trial_id}/{segment['segment']}/{session.step}", settings.checkpoint_bytes)
        with tempfile.TemporaryDirectory() as directory:
            session.save(Path(directory), weights)
            (Path(directory) / CURVE_FILE).write_text(json.dumps(curve))
            (Path(directory) / SEGMENT_FILE).write_text(json.dumps(segment))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))
