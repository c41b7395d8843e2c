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
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from prune_core.accounting import attention_params, attention_sparsity, macs_per_sample, total_params
from prune_core.adapters import attention_sites
from prune_core.batches import Batch, LossFn
from prune_core.finetune import LoraSettings, lora_finetune
from prune_core.granularities import GRANULARITIES
from prune_core.io import load_pruned, save_pruned
from prune_core.metrics import METRIC_NAME, TASKS, evaluate
from prune_core.pruning import prune
from prune_core.registry import check
from prune_core.scorers import SCORERS
from prune_core.thresholds import THRESHOLDS


@dataclass(frozen=True)
class Schedule:
    """How attention sparsity grows with prune steps of `ratio`: the sparsity after `step` steps, and the
    steps needed to reach a target (the last step is capped at it)."""

    sparsity: Callable[[float, int], float]
    steps: Callable[[float, float], int]


SCHEDULES: dict[str, Schedule] = {
    # each step removes `ratio` of what remains
    "compound": Schedule(
        sparsity=lambda ratio, step: 1.0 - (1.0 - ratio) ** step,
        steps=lambda ratio, target: math.ceil(math.log(1 - target) / math.log(1 - ratio) - 1e-9),
    ),
    # each step removes `ratio` of the dense model
    "linear": Schedule(
        sparsity=lambda ratio, step: ratio * step,
        steps=lambda ratio, target: math.ceil(target / ratio - 1e-9),
    ),
}
STATE_FILE = "session.json"


def steps_to_target(ratio: float, target: float, schedule: str) -> int:
    """Prune steps a schedule of `ratio` per step needs to reach `target` (the last step is capped at it)."""
    return SCHEDULES[schedule].steps(ratio, target)


@dataclass(frozen=True)
class Strategy:
    """What to prune and how: one point of the search space."""

    granularity: str = "per_head"
    scorer: str = "fisher"
    threshold: str = "global"

    def __post_init__(self) -> None:
        check("granularity", self.granularity, GRANULARITIES)
        check("scorer", self.scorer, SCORERS)
        check("threshold", self.threshold, THRESHOLDS)

    @property
    def name(self) -> str:
        return f"{self.granularity}/{self.scorer}/{self.threshold}"


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

    def __post_init__(self) -> None:
        check("schedule", self.schedule, SCHEDULES)
        if not 0 < self.step_ratio < 1:
            raise ValueError(f"step_ratio must be in (0, 1), got {self.step_ratio}")
        if self.steps < 1:
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
        """Attention sparsity the schedule reaches after `step` steps (capped at `final_sparsity`)."""
        reached = SCHEDULES[self.schedule].sparsity(self.step_ratio, step)
        return reached if self.final_sparsity is None else min(reached, self.final_sparsity)

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
    ) -> None:
        self.model = model
        self.config = config
        self.train = train
        self.evaluation = evaluation
        self.validation = validation
        self.calib = calib
        self.loss_fn = loss_fn
        self.step = step
        attention_sites(model)

    def measure(self, seconds: float = 0.0) -> StepResult:
        """Evaluate and account the model as it is now."""
        metrics = evaluate(self.model, self.evaluation, self.config.task, self.loss_fn)
        name = METRIC_NAME[self.config.task]
        return StepResult(
            step=self.step,
            target_sparsity=self.config.target(self.step),
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
        if self.step >= self.config.steps:
            raise StopIteration
        started = time.perf_counter()
        target = self.config.target(self.step + 1)
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
        )
        self.model = lora_finetune(
            self.model, self.train, self.config.lora, validation=self.validation, loss_fn=self.loss_fn
        )
        self.step += 1
        return self.measure(time.perf_counter() - started)

    def save(self, directory: str | Path) -> Path:
        """Checkpoint the model and the step reached (safetensors + JSON, no pickles)."""
        directory = save_pruned(self.model, directory)
        state = {"step": self.step, "config": self.config.to_dict()}
        (directory / STATE_FILE).write_text(json.dumps(state, indent=2))
        return directory

    @classmethod
    def resume(cls, directory: str | Path, **sources) -> PruningSession:
        """Continue a session saved by `save`, with the same data sources passed again."""
        directory = Path(directory)
        state = json.loads((directory / STATE_FILE).read_text())
        config = SessionConfig.from_dict(state["config"])
        return cls(load_pruned(directory), config, step=state["step"], **sources)
