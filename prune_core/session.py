"""The paper's iterative loop: score -> select -> remove -> LoRA fine-tune -> merge -> evaluate, a step at a time.

`PruningSession` is an iterator: it hands control back after every step with a `StepResult`, so a
caller (a notebook, a Ray Tune trainable) can report, checkpoint, stop, or resume from a saved step.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from torch import nn

from prune_core.accounting import attention_params, attention_sparsity, macs_per_sample, total_params
from prune_core.adapters import attention_sites
from prune_core.batches import Batch, LossFn
from prune_core.finetune import LoraSettings, lora_finetune
from prune_core.granularities import GRANULARITIES, check_min_heads
from prune_core.io import load_pruned, save_pruned
from prune_core.metrics import METRIC_NAME, TASKS, evaluate
from prune_core.pruning import prune
from prune_core.registry import check
from prune_core.scorers import SCORERS
from prune_core.thresholds import THRESHOLDS


@dataclass(frozen=True)
class Schedule:
    """How attention sparsity grows with prune steps of `ratio` from a `start` sparsity: the sparsity
    after `step` steps, and the steps needed to reach a target (the last step is capped at it).

    `start` is 0 for a schedule run from the dense model, and where a schedule takes over a model
    another strategy has pruned (a strategy schedule that changes on the way) the sparsity it took over at.
    """

    sparsity: Callable[[float, int, float], float]
    steps: Callable[[float, float, float], int]


SCHEDULES: dict[str, Schedule] = {
    # each step removes `ratio` of what remains
    "compound": Schedule(
        sparsity=lambda ratio, step, start: 1.0 - (1.0 - start) * (1.0 - ratio) ** step,
        steps=lambda ratio, target, start: math.ceil(math.log((1 - target) / (1 - start)) / math.log(1 - ratio) - 1e-9),
    ),
    # each step removes `ratio` of the dense model
    "linear": Schedule(
        sparsity=lambda ratio, step, start: start + ratio * step,
        steps=lambda ratio, target, start: math.ceil((target - start) / ratio - 1e-9),
    ),
}
STATE_FILE = "session.json"


def steps_to_target(ratio: float, target: float, schedule: str, start: float = 0.0) -> int:
    """Prune steps a schedule of `ratio` per step needs to go from `start` to `target` (the last step is
    capped at it); 0 when `start` is already there."""
    return max(0, SCHEDULES[schedule].steps(ratio, target, start))


def schedule_summary(history: list[dict]) -> str:
    """A lineage's strategies in order, run-length encoded: 'per_head/fisher/global x3 -> entire_head/fisher/global x2'."""
    runs: list[list] = []
    for record in history:
        if runs and runs[-1][0] == record["strategy"]:
            runs[-1][1] += 1
        else:
            runs.append([record["strategy"], 1])
    return " -> ".join(f"{strategy} x{count}" for strategy, count in runs)


@dataclass(frozen=True)
class Strategy:
    """What to prune and how: one point of the search space.

    `min_heads` is `prune`'s: 1 keeps a head in every layer, 0 lets `entire_head` and `hybrid` remove
    whole attention blocks (no effect on the channel granularities).
    """

    granularity: str = "per_head"
    scorer: str = "fisher"
    threshold: str = "global"
    min_heads: int = 1

    def __post_init__(self) -> None:
        check("granularity", self.granularity, GRANULARITIES)
        check("scorer", self.scorer, SCORERS)
        check("threshold", self.threshold, THRESHOLDS)
        check_min_heads(self.min_heads)

    @property
    def name(self) -> str:
        """'per_head/fisher/global'; with `min_heads` 0, '.../min_heads=0' (the default leaves names as they were)."""
        name = f"{self.granularity}/{self.scorer}/{self.threshold}"
        return name if self.min_heads == 1 else f"{name}/min_heads={self.min_heads}"


@dataclass(frozen=True)
class SessionConfig:
    """An iterative pruning run: strategy, step schedule, LoRA recovery and evaluation task."""

    strategy: Strategy = field(default_factory=Strategy)
    step_ratio: float = 0.1
    steps: int = 10
    schedule: str = "compound"
    lora: LoraSettings = field(default_factory=LoraSettings)
    task: str = "single_label"
    calib_batches: int = 8
    final_sparsity: float | None = None  # cap the schedule here (a search's target sparsity)
    start_sparsity: float = 0.0  # where this config takes over (0: the dense model; see `continued_from`)

    def __post_init__(self) -> None:
        check("schedule", self.schedule, SCHEDULES)
        if not 0 < self.step_ratio < 1:
            raise ValueError(f"step_ratio must be in (0, 1), got {self.step_ratio}")
        if not 0 <= self.start_sparsity < 1:
            raise ValueError(f"start_sparsity must be in [0, 1), got {self.start_sparsity}")
        if self.steps < (1 if self.start_sparsity == 0 else 0):
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.target(self.steps) >= 1:
            raise ValueError(
                f"{self.steps} linear steps of {self.step_ratio} would remove all attention; lower steps or step_ratio"
            )
        check("task", self.task, TASKS)
        if self.calib_batches < 1:
            raise ValueError(f"calib_batches must be >= 1, got {self.calib_batches}")
        if self.final_sparsity is not None and not 0 < self.final_sparsity < 1:
            raise ValueError(f"final_sparsity must be in (0, 1), got {self.final_sparsity}")

    def target(self, step: int) -> float:
        """Attention sparsity the schedule reaches after `step` of its steps (capped at `final_sparsity`)."""
        reached = SCHEDULES[self.schedule].sparsity(self.step_ratio, step, self.start_sparsity)
        return reached if self.final_sparsity is None else min(reached, self.final_sparsity)

    def continued_from(self, sparsity: float) -> SessionConfig:
        """This config taking over a model at `sparsity`: its steps go on from there at its own ratio, to
        `final_sparsity` when set (0 steps if already there), else for its own number of steps."""
        steps = self.steps
        if self.final_sparsity is not None:
            steps = steps_to_target(self.step_ratio, self.final_sparsity, self.schedule, sparsity)
        return replace(self, start_sparsity=sparsity, steps=steps)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SessionConfig:
        lora = dict(data.get("lora", {}))
        if isinstance(lora.get("target_modules"), list):
            lora["target_modules"] = tuple(lora["target_modules"])
        return cls(
            **{k: v for k, v in data.items() if k not in ("strategy", "lora")},
            strategy=Strategy(**data.get("strategy", {})),
            lora=LoraSettings(**lora),
        )


@dataclass(frozen=True)
class StepResult:
    """Where the model stands after a step (step 0: the dense model)."""

    step: int
    target_sparsity: float
    attention_sparsity: float
    metric_name: str
    metric: float
    loss: float
    params: int
    attention_params: int
    macs: int
    seconds: float
    layers: list[dict]

    def to_dict(self) -> dict:
        return asdict(self)


class PruningSession:
    """Iterate to prune: each `next()` runs one step on `model` and returns its `StepResult`.

    `train` and `evaluation` are re-iterable batch sources (DataLoaders or lists); calibration
    batches for the gradient scorers come from `calib` or, by default, the first
    `config.calib_batches` batches of `train` (never the evaluation split).

    The strategy may change on the way (`switch`): `history` records every step of the model's
    lineage (strategy, step ratio, target and sparsity reached), saved with each checkpoint.
    """

    def __init__(
        self,
        model: nn.Module,
        config: SessionConfig,
        *,
        train: Iterable[Batch],
        evaluation: Iterable[Batch],
        validation: Iterable[Batch] | None = None,
        calib: Iterable[Batch] | None = None,
        loss_fn: LossFn | None = None,
        step: int = 0,
        start_step: int = 0,
        history: list[dict] | None = None,
    ) -> None:
        self.model = model
        self.config = config
        self.train = train
        self.evaluation = evaluation
        self.validation = validation
        self.calib = calib
        self.loss_fn = loss_fn
        self.step = step
        self.start_step = start_step  # the step at which `config` took over
        self.history = list(history or [])
        attention_sites(model)

    @property
    def end_step(self) -> int:
        """The step at which the current config is done."""
        return self.start_step + self.config.steps

    def target(self, step: int) -> float:
        """The attention sparsity the current config aims at after `step` (a step of the whole session)."""
        return self.config.target(step - self.start_step)

    def switch(self, config: SessionConfig) -> None:
        """Go on from the current step with `config`: its strategy and step ratio, from the sparsity the
        schedule has reached (so a new step ratio applies to the steps still to come).

        A granularity that cannot prune the model as it is (a uniform one after `variable_per_head` left
        heads of different dims) is refused here, before any step runs."""
        granularity = config.strategy.granularity
        ragged = next((site for site in attention_sites(self.model) if not site.shape.is_uniform), None)
        if ragged is not None and not GRANULARITIES[granularity].ragged_heads:
            able = sorted(name for name, g in GRANULARITIES.items() if g.ragged_heads)
            raise ValueError(
                f"cannot switch to granularity {granularity!r}: the heads of {ragged.path} have different dims "
                f"(Q/K {ragged.shape.qk_dims}); after variable_per_head use one of {able}"
            )
        self.config = config.continued_from(self.target(self.step))
        self.start_step = self.step

    def measure(self, seconds: float = 0.0) -> StepResult:
        """Evaluate and account the model as it is now."""
        metrics = evaluate(self.model, self.evaluation, self.config.task, self.loss_fn)
        name = METRIC_NAME[self.config.task]
        return StepResult(
            step=self.step,
            target_sparsity=self.target(self.step),
            attention_sparsity=attention_sparsity(self.model),
            metric_name=name,
            metric=metrics[name],
            loss=metrics["loss"],
            params=total_params(self.model),
            attention_params=attention_params(self.model),
            macs=macs_per_sample(self.model),
            seconds=seconds,
            layers=[site.shape.to_dict() for site in attention_sites(self.model)],
        )

    def __iter__(self) -> Iterator[StepResult]:
        return self

    def __next__(self) -> StepResult:
        if self.step >= self.end_step:
            raise StopIteration
        started = time.perf_counter()
        target = self.target(self.step + 1)
        current = attention_sparsity(self.model)
        amount = max((target - current) / (1.0 - current), 1e-9)
        strategy = self.config.strategy
        calib = None
        if SCORERS[strategy.scorer].needs_data:
            calib = self.calib if self.calib is not None else list(itertools.islice(self.train, self.config.calib_batches))
        prune(
            self.model,
            granularity=strategy.granularity,
            scorer=strategy.scorer,
            threshold=strategy.threshold,
            amount=amount,
            calib=calib,
            loss_fn=self.loss_fn,
            min_heads=strategy.min_heads,
        )
        self.model = lora_finetune(
            self.model, self.train, self.config.lora, validation=self.validation, loss_fn=self.loss_fn
        )
        self.step += 1
        result = self.measure(time.perf_counter() - started)
        self.history.append(
            {
                "step": self.step,
                "strategy": strategy.name,
                "step_ratio": self.config.step_ratio,
                "target": target,
                "attention_sparsity": result.attention_sparsity,
            }
        )
        return result

    @property
    def schedule(self) -> str:
        """The lineage's strategies so far, e.g. 'per_head/fisher/global x3 -> entire_head/fisher/global x2'."""
        return schedule_summary(self.history)

    def save(self, directory: str | Path) -> Path:
        """Checkpoint the model, the step reached and the lineage's history (safetensors + JSON, no pickles).

        The saved model's `pruning.json` carries the history too, so a model says how it was pruned.
        """
        directory = save_pruned(self.model, directory, history=self.history)
        state = {
            "step": self.step,
            "start_step": self.start_step,
            "config": self.config.to_dict(),
            "history": self.history,
        }
        (directory / STATE_FILE).write_text(json.dumps(state, indent=2))
        return directory

    @classmethod
    def resume(cls, directory: str | Path, config: SessionConfig | None = None, **sources) -> PruningSession:
        """Continue a session saved by `save`, with the same data sources passed again.

        With `config`, the session goes on with it from the saved step (`switch`): another strategy or
        step ratio for the steps to come, as when a search clones a model and explores.
        """
        directory = Path(directory)
        state = json.loads((directory / STATE_FILE).read_text())
        session = cls(
            load_pruned(directory),
            SessionConfig.from_dict(state["config"]),
            step=state["step"],
            start_step=state.get("start_step", 0),
            history=state.get("history", []),
            **sources,
        )
        if config is not None:
            session.switch(config)
        return session
