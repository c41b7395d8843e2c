"""The Ray Tune trainable: one trial = one pruning strategy, reported and checkpointed after each prune step.

A trial loads the dense baseline (or its last step checkpoint after a failure), then iterates
prune_core's `PruningSession`. Each step's metrics go to `tune.report` with a safetensors checkpoint,
so ASHA can stop the trial there and Tune can resume it there. Under population-based training a
trial may be handed another trial's checkpoint with a new config: it goes on from that model as a
new segment of its schedule, and each result says which segment, where it was cloned from, and the
strategy of every step of its lineage.
"""

from __future__ import annotations

import itertools
import json
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import ray
import torch
from ray import tune

from data_prep.loader import make_loader, soft_target_loss
from prune_core import load_model
from prune_core.accounting import latency_ms, layer_sparsity
from prune_core.latency_model import predicted_speedup, table_for
from prune_core.finetune import LoraSettings
from prune_core.metrics import METRIC_NAME, evaluate
from prune_core.session import PruningSession, SessionConfig, Strategy, steps_to_target
from search.schedulers import curve_entry, trial_area
from search.space import OPTIONAL_SPACE_KEYS, SearchConfig

CURVE_FILE = "curve.json"
SEGMENT_FILE = "segment.json"  # which trial and segment wrote a checkpoint


@dataclass(frozen=True)
class TrialSettings:
    """What every trial of a search shares beyond its sampled values: the search's config (its paths made
    absolute: Tune runs each trial in its own working directory) and what the data set and baseline add."""

    search: SearchConfig
    task: str  # from the data set's manifest
    dense_metric: float  # the baseline's metric on the evaluation split, the curve's first point

    @property
    def metric_name(self) -> str:
        return METRIC_NAME[self.task]

    @property
    def use_gpu(self) -> bool:
        return self.search.resources.gpu > 0


class FirstBatches:
    """The first `count` batches of a loader, re-drawn (reshuffled) at every pass; sized for LR schedules."""

    def __init__(self, loader: Iterable, count: int | None) -> None:
        self.loader, self.count = loader, count

    def __len__(self) -> int:
        return len(self.loader) if self.count is None else min(self.count, len(self.loader))

    def __iter__(self) -> Iterator:
        return itertools.islice(iter(self.loader), len(self))


def session_config(config: dict, settings: TrialSettings) -> SessionConfig:
    """The prune_core session a trial's sampled values describe."""
    search = settings.search
    ratio = float(config["step_ratio"])
    return SessionConfig(
        strategy=Strategy(config["granularity"], config["scorer"], config["threshold"],
                          int(config.get("min_heads", OPTIONAL_SPACE_KEYS["min_heads"]))),
        step_ratio=ratio,
        steps=steps_to_target(ratio, search.target_sparsity, search.schedule),
        schedule=search.schedule,
        lora=LoraSettings(
            rank=int(config["lora_rank"]),
            alpha=float(config["lora_alpha"]),
            lr=float(config["lr"]),
            epochs=int(config["epochs"]),
            target_modules=search.lora_targets,
        ),
        task=settings.task,
        calib_batches=search.calib_batches,
        final_sparsity=search.target_sparsity,
    )


def _saved_segment(directory: Path) -> dict:
    path = directory / SEGMENT_FILE
    return json.loads(path.read_text()) if path.is_file() else {"trial_id": None, "segment": 0}


def run_trial(config: dict, settings: TrialSettings) -> None:
    """Ray Tune function trainable (bound with `tune.with_parameters(run_trial, settings=...)`)."""
    search = settings.search
    torch.manual_seed(search.seed)
    device = torch.device("cuda" if settings.use_gpu and torch.cuda.is_available() else "cpu")
    train = FirstBatches(make_loader(search.data, "train", search.loader, train=True), search.train_batches_per_step)
    sources = {
        "train": train,
        "evaluation": make_loader(search.data, search.eval_split, search.loader, train=False),
        "loss_fn": soft_target_loss,
    }
    # the speed objective: predicted from the device's latency table, the same on every node of a type
    device = "cuda" if settings.use_gpu and torch.cuda.is_available() else "cpu"
    table = table_for(search.latency_table, device) if search.latency_table else None
    trial_id = tune.get_context().get_trial_id()
    segment = {"trial_id": trial_id, "segment": int(config.get("segment", 0)), "cloned_from": config.get("cloned_from", "")}
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            saved = _saved_segment(Path(directory))
            # a checkpoint of another trial or segment: population-based training cloned it, and this
            # trial goes on from it with its own (explored) config; else a restart of this segment
            clone = (saved["trial_id"], saved["segment"]) != (trial_id, segment["segment"])
            explored = session_config(config, settings) if clone else None
            session = PruningSession.resume(directory, config=explored, **sources)
            if clone:  # where the model really comes from: the checkpoint says, not the scheduler's view of it
                segment["cloned_from"] = f"{saved['trial_id']}/{session.step}"
            else:
                segment["cloned_from"] = saved.get("cloned_from", segment["cloned_from"])
            curve = [tuple(point) for point in json.loads((Path(directory) / CURVE_FILE).read_text())]
        session.model.to(device)
    else:
        model = load_model(search.baseline).to(device)
        session = PruningSession(model, session_config(config, settings), **sources)
        dense = {"attention_sparsity": 0.0, settings.metric_name: settings.dense_metric, "speedup": 1.0}
        curve = [curve_entry(search, dense, settings.metric_name)]
    for result in session:
        final = session.step == session.end_step
        metrics = {
            settings.metric_name: result.metric,
            "loss": result.loss,
            "attention_sparsity": result.attention_sparsity,
            "sparsity_pct": round(100 * result.attention_sparsity),
            "params": result.params,
            "attention_params": result.attention_params,
            "macs": result.macs,
            "latency_ms": latency_ms(session.model, repeats=search.latency_repeats),
            "step": result.step,
            "seconds": result.seconds,
            "final": final,
            "layers": json.dumps(result.layers),
            "layer_sparsity": json.dumps(layer_sparsity(session.model)),
            "node_id": ray.get_runtime_context().get_node_id(),
            "segment": segment["segment"],
            "cloned_from": segment["cloned_from"],
            "lineage": json.dumps([record["strategy"] for record in session.history]),
            "ragged_heads": any("qk_dims" in layer for layer in result.layers),
        }
        if table is not None:
            at = search.speedup_at
            metrics["speedup"] = predicted_speedup(session.model, table, tokens=at.tokens, batch=at.batch)
        curve.append(curve_entry(search, metrics, settings.metric_name))
        metrics["area"] = trial_area(search, curve, search.target_sparsity)
        if final:
            test = make_loader(search.data, "test", search.loader, train=False)
            metrics[f"test_{settings.metric_name}"] = evaluate(session.model, test, settings.task)[settings.metric_name]
        with tempfile.TemporaryDirectory() as directory:
            session.save(directory)
            (Path(directory) / CURVE_FILE).write_text(json.dumps(curve))
            (Path(directory) / SEGMENT_FILE).write_text(json.dumps(segment))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))
