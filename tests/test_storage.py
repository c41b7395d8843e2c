"""`checkpoints_to_keep: front` (search.storage): each trial's latest step, the front's steps and clone sources are
kept, every other step checkpoint is deleted as the front moves; checked by hand and on a simulated search."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pyarrow.fs
import pytest
import yaml
from ray.tune import ExperimentAnalysis, ResultGrid

from search.runner import run
from search.space import ConfigError, load_config
from search.storage import CheckpointKeeper

KEYS = ("accuracy", "attention_sparsity")


class Trials:
    """Fake Tune trials whose step checkpoints are real folders under `root`."""

    def __init__(self, root: Path) -> None:
        self.root, self.trials, self.written = root, {}, {}
        self.keeper = CheckpointKeeper(KEYS)

    def trial(self, trial_id: str, **config) -> SimpleNamespace:
        if trial_id not in self.trials:
            storage = SimpleNamespace(storage_filesystem=pyarrow.fs.LocalFileSystem(), trial_fs_path=str(self.root / trial_id))
            self.trials[trial_id] = SimpleNamespace(trial_id=trial_id, config={}, storage=storage)
        self.trials[trial_id].config.update(config)
        return self.trials[trial_id]

    def report(self, trial_id: str, step: int, accuracy: float, sparsity: float, segment: int = 0, **extra) -> None:
        trial = self.trial(trial_id)
        self.written[trial_id] = self.written.get(trial_id, -1) + 1
        name = f"checkpoint_{self.written[trial_id]:06d}"  # Tune's folder names: one more per checkpoint
        (self.root / trial_id / name).mkdir(parents=True)
        (self.root / trial_id / name / "weights.bin").write_bytes(b"w")
        result = {"step": step, "segment": segment, "accuracy": accuracy, "attention_sparsity": sparsity,
                  "checkpoint_dir_name": name, **extra}
        self.keeper.on_trial_result(0, list(self.trials.values()), trial, result)

    def left(self) -> set[tuple[str, str]]:
        return {(folder.parent.name, folder.name) for folder in self.root.glob("*/checkpoint_*")}


def test_the_front_and_each_latest_step_stay_and_the_rest_goes(tmp_path):
    trials = Trials(tmp_path)
    trials.report("a", 1, 0.90, 0.1)        # a/0: front
    trials.report("a", 2, 0.89, 0.2)        # a/1: front; a/0 stays on it (more accurate)
    trials.report("b", 1, 0.92, 0.1)        # b/0 dominates a/0 (a's step 1): deleted
    assert trials.left() == {("a", "checkpoint_000001"), ("b", "checkpoint_000000")}
    trials.report("a", 3, 0.70, 0.3)        # a/2: front (sparsest); a/1 stays (front)
    trials.report("b", 2, 0.895, 0.2)       # b/1 dominates a/1: deleted; b/0 on the front, kept
    assert trials.left() == {("a", "checkpoint_000002"), ("b", "checkpoint_000000"), ("b", "checkpoint_000001")}
    trials.report("b", 3, 0.75, 0.3)        # b/2 dominates a/2, but a/2 is a's latest: kept
    assert trials.keeper.front == {("b", 1), ("b", 2), ("b", 3)}
    assert trials.left() == {("a", "checkpoint_000002"), ("b", "checkpoint_000000"), ("b", "checkpoint_000001"),
                             ("b", "checkpoint_000002")}
    trials.report("a", 4, 0.60, 0.4)        # a goes on: a/2 is neither latest nor on the front any more
    assert ("a", "checkpoint_000002") not in trials.left() and ("a", "checkpoint_000003") in trials.left()
    assert trials.keeper.deleted == 3


def test_a_finished_trial_keeps_only_its_front_steps(tmp_path):
    """Nothing resumes a finished trial: its latest step goes unless it is on the front. A failed trial's stays
    (a resumed search restarts it from there)."""
    trials = Trials(tmp_path)
    trials.report("a", 1, 0.90, 0.1)
    trials.report("a", 2, 0.80, 0.2)
    trials.report("b", 1, 0.95, 0.2)  # dominates both of a's steps
    trials.report("c", 1, 0.50, 0.1)
    assert trials.left() == {("a", "checkpoint_000001"), ("b", "checkpoint_000000"), ("c", "checkpoint_000000")}
    trials.keeper.on_trial_complete(0, [], trials.trial("a"))
    trials.keeper.on_trial_complete(0, [], trials.trial("b"))
    trials.keeper.on_trial_error(0, [], trials.trial("c"))
    assert trials.left() == {("b", "checkpoint_000000"), ("c", "checkpoint_000000")}


def test_a_clone_source_stays_from_the_moment_the_scheduler_clones(tmp_path):
    """The scheduler sets the clone's config before the callbacks see any result after it: the source's step
    is kept although its trial goes on and a better model dominates it."""
    trials = Trials(tmp_path)
    trials.report("a", 1, 0.80, 0.1)
    trials.report("b", 1, 0.70, 0.1)
    trials.trial("b", segment=1, cloned_from="a/1")  # PBT: b goes on from a's step 1
    trials.report("a", 2, 0.79, 0.2)                 # a's step 1 is no longer its latest
    trials.report("c", 1, 0.95, 0.1)                 # and no longer on the front
    trials.report("b", 2, 0.78, 0.2, segment=1, cloned_from="a/1")
    assert ("a", "checkpoint_000000") in trials.left(), "the clone source was deleted"
    assert ("b", "checkpoint_000000") not in trials.left(), "b's first segment ended: its step 1 is unneeded"
    assert trials.keeper.front == {("c", 1), ("a", 2)}


def test_three_objectives_keep_a_point_best_in_one(tmp_path):
    keeper = CheckpointKeeper(("accuracy", "attention_sparsity", "speedup"))
    keeper._place(("a", 1), (0.9, 0.2, 1.1))
    keeper._place(("b", 1), (0.9, 0.2, 1.3))   # dominates a/1
    keeper._place(("c", 1), (0.8, 0.2, 1.5))   # fastest: stays
    keeper._place(("d", 1), (0.8, 0.2, 1.5))   # identical to c/1: both stay (the report keeps one of them)
    assert keeper.front == {("b", 1), ("c", 1), ("d", 1)}


@pytest.mark.parametrize("value", [0, -1, "latest", True, 2.5])
def test_bad_checkpoints_to_keep_is_refused(tmp_path, value):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"experiment": "bad", "space": SPACE, "simulate": {}, "checkpoints_to_keep": value}))
    with pytest.raises(ConfigError, match=r"checkpoints_to_keep: 'front' .* got"):
        load_config(path)


SPACE = {"granularity": ["per_head", "entire_head", "variable_per_head"], "scorer": ["magnitude", "fisher"],
         "threshold": ["global", "local"], "step_ratio": 0.1, "lora_rank": 4, "lora_alpha": 8, "lr": 1e-3, "epochs": 1}


def test_a_simulated_search_keeps_exactly_what_it_needs(tmp_path, monkeypatch):
    """On disk at the end: each segment's latest step, every front point of the report and the PBT clone sources,
    nothing else; the report still finds a checkpoint for each front point."""
    import ray

    from search.evaluate import step_checkpoints
    from search.tracking import run_key

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    raw = {"experiment": "keep", "space": SPACE, "trials": 4, "max_concurrent": 4, "target_sparsity": 0.5,
           "scheduler": "pbt", "searcher": "random", "pbt": {"interval": 10, "quantile": 0.25, "resample": 1.0},
           "simulate": {"step_seconds": 0.1, "checkpoint_mb": 0.01, "dense_metric": 0.9},
           "checkpoints_to_keep": "front", "storage": str(tmp_path / "ray")}
    (tmp_path / "keep.yaml").write_text(yaml.safe_dump(raw))
    runs = tmp_path / "runs"
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        assert run(load_config(tmp_path / "keep.yaml"), runs_dir=runs) == 0
    finally:
        ray.shutdown()
    experiment_dir = Path(json.loads((runs / "keep" / "search.json").read_text())["experiment_dir"])
    rows = [json.loads(line) for path in experiment_dir.glob("*/result.json")
            for line in path.read_text().splitlines() if line.strip()]
    point = {(run_key(r["trial_id"], int(r.get("segment") or 0)), int(r["step"])): (r["accuracy"], r["attention_sparsity"])
             for r in rows}
    front = pd.read_parquet(runs / "keep" / "report" / "pareto.parquet")
    on_front = {(str(trial), int(step)) for trial, step in zip(front["trial"], front["step"])}
    sources = {(r["cloned_from"].rsplit("/", 1)[0], int(r["cloned_from"].rsplit("/", 1)[1])) for r in rows if r.get("cloned_from")}
    assert sources, "PBT cloned no trial: the test does not exercise clone sources"
    kept = set(step_checkpoints(ResultGrid(ExperimentAnalysis(str(experiment_dir)))))
    # every trial has finished: nothing resumes from a trial's latest step, so only the front and the sources stay
    assert on_front <= kept, "a front model's checkpoint was deleted"
    assert all(any(k[0].split(".")[0] == source and k[1] == at for k in kept) for source, at in sources)
    duplicates = {point[k] for k in on_front}  # a point equal to a front point is on the front too; the report shows one
    extra = {k for k in kept - on_front if (k[0].split(".")[0], k[1]) not in sources and point[k] not in duplicates}
    assert not extra, f"kept without need: {extra}"
    assert len(kept) < len(point), "nothing was deleted"
