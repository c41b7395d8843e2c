"""The simulated trial (search.simulation): no torch on its import path, the real trainable's results and checkpoints,
and the real search around it (Optuna + ASHA, PBT, MLflow, report) on a simulated Ray cluster with GPU nodes."""

from __future__ import annotations

import csv
import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import ray
import yaml
from mlflow.tracking import MlflowClient
from ray.tune import ExperimentAnalysis, ResultGrid

import search.simulation as simulation
from search.pareto import dominates
from search.results import report
from search.runner import run
from search.space import ConfigError, load_config, parse_config
from search.tracking import CLONED_FROM_TAG, LINEAGE_TAG, NODES_TAG, STOPPED_TAG, run_key
from tests.conftest import ast_batches, tiny_ast

ROOT = Path(__file__).resolve().parents[1]
SPACE = {
    "granularity": ["entire_head", "per_head", "same_channel", "hybrid", "variable_per_head"],
    "scorer": ["magnitude", "fisher"],
    "threshold": ["global", "local"],
    "step_ratio": [0.1, 0.125, 0.25],
    "lora_rank": [4, 8],
    "lora_alpha": 16,
    "lr": {"loguniform": [3.0e-4, 3.0e-3]},
    "epochs": 1,
}
POINT = {"granularity": "per_head", "scorer": "magnitude", "threshold": "global", "step_ratio": 0.25, "lora_rank": 2,
         "lora_alpha": 8, "lr": 1e-3, "epochs": 1}


def raw_config(tmp_path: Path, name: str, **overrides) -> dict:
    return {
        "experiment": name, "target_sparsity": 0.5, "trials": 12, "max_concurrent": 4, "seed": 0,
        "storage": str(tmp_path / "ray"), "asha": {"grace_period": 10, "reduction_factor": 2},
        "simulate": {"step_seconds": 0.01, "checkpoint_mb": 0.1, "dense_metric": 0.9}, "space": SPACE, **overrides,
    }


def write_config(tmp_path: Path, name: str, **overrides) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw_config(tmp_path, name, **overrides)))
    return path


def test_the_simulation_imports_no_torch():
    code = "import sys, search.simulation; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False", "search.simulation imported torch: 64 workers would not fit"


def test_its_copies_agree_with_the_real_modules():
    """What the simulation copies because importing it would import torch, checked against the originals."""
    from prune_core import GRANULARITIES, SCORERS, THRESHOLDS, build_ast, prune
    from prune_core.accounting import attention_params, attention_sparsity, macs_per_sample, total_params
    from prune_core.session import SCHEDULES, STATE_FILE, steps_to_target
    from search.space import OPTIONAL_SPACE_KEYS
    from search.tracking import LINEAGE_KEYS
    from search.trainable import CURVE_FILE, SEGMENT_FILE

    assert (simulation.STATE_FILE, simulation.CURVE_FILE, simulation.SEGMENT_FILE) == (STATE_FILE, CURVE_FILE, SEGMENT_FILE)
    assert simulation.LINEAGE_KEYS == LINEAGE_KEYS and simulation.DEFAULT_MIN_HEADS == OPTIONAL_SPACE_KEYS["min_heads"]
    assert set(simulation.GRANULARITY_COST) == set(GRANULARITIES) and set(simulation.SCORER_COST) == set(SCORERS)
    assert set(simulation.THRESHOLD_COST) == set(THRESHOLDS)
    assert set(simulation.RAGGED_ABLE) == {name for name, g in GRANULARITIES.items() if g.ragged_heads}
    assert set(simulation.SCHEDULES) == set(SCHEDULES)
    for name, schedule in SCHEDULES.items():
        # floating point lands some of these a hair past a whole number of steps (linear 0.1 from 10% to 40%: 3.0000000000000004)
        for ratio, target in itertools.product((0.1, 0.125, 0.15, 0.25, 0.3, 0.5), (0.3, 0.4, 0.5, 0.75)):
            for start in (0.0, 0.1, 0.2):
                assert simulation.steps_to_target(ratio, target, name, start) == steps_to_target(ratio, target, name, start)
                for step in range(6):
                    assert simulation.SCHEDULES[name].sparsity(ratio, step, start) == schedule.sparsity(ratio, step, start)
    # the demo model's counts (search.baseline.BaselineConfig's size on the demo's features), dense and pruned
    demo = dict(num_labels=35, hidden_size=96, num_layers=5, num_heads=6, intermediate_size=384, num_mel_bins=64, max_length=100)
    model, sim = build_ast(**demo), simulation.DEMO_MODEL
    assert (sim.params, sim.attention_params, sim.macs) == (total_params(model), attention_params(model), macs_per_sample(model))
    prune(model, granularity="per_head", scorer="magnitude", threshold="global", amount=0.5)
    sparsity = attention_sparsity(model)
    assert sim.macs - sparsity * sim.attention_macs == pytest.approx(macs_per_sample(model), rel=0.01)
    assert sim.params - sparsity * sim.attention_params == pytest.approx(total_params(model), rel=0.01)


class Session:
    """Ray Tune's session as a trainable sees it, in process: reports, and each checkpoint's files kept."""

    def __init__(self, monkeypatch, module, trial_id: str, folder: Path, checkpoint: Path | None = None) -> None:
        self.reported: list[dict] = []
        self.checkpoints: list[Path] = []
        self.folder, self.trial_id, self.checkpoint = folder, trial_id, checkpoint
        self.Checkpoint = module.tune.Checkpoint
        monkeypatch.setattr(module, "tune", self)
        monkeypatch.setattr(module.ray, "get_runtime_context", lambda: SimpleNamespace(get_node_id=lambda: "node"))

    def get_context(self):
        return SimpleNamespace(get_trial_id=lambda: self.trial_id)

    def get_checkpoint(self):
        return None if self.checkpoint is None else self.Checkpoint.from_directory(self.checkpoint)

    def report(self, metrics: dict, checkpoint=None) -> None:
        kept = self.folder / f"{self.trial_id}-{len(self.reported)}"
        shutil.copytree(checkpoint.path, kept)
        self.reported.append(metrics)
        self.checkpoints.append(kept)


def settings() -> simulation.SimulationSettings:
    """A search's simulation settings: 50% target, linear steps, staircase area, dense accuracy 0.9."""
    config = parse_config(raw_config(Path("unused"), "s"), "s.yaml")
    return simulation.SimulationSettings.of(config, "accuracy", 0.9)


def test_a_simulated_trial_reports_what_the_real_one_reports(monkeypatch, tmp_path):
    """The real trainable run in process on a tiny AST (its data and baseline stubbed) is the reference: the same
    result keys at every step, the same checkpoint files beside the model's."""
    import search.trainable as trainable

    config = parse_config(raw_config(tmp_path, "keys"), "keys.yaml")
    monkeypatch.setattr(trainable, "make_loader", lambda *args, **kwargs: ast_batches(count=1, num_labels=3))
    monkeypatch.setattr(trainable, "load_model", lambda name: tiny_ast(num_labels=3))
    monkeypatch.setattr(trainable, "latency_ms", lambda model, repeats: 1.0)
    real = Session(monkeypatch, trainable, "real", tmp_path)
    trainable.run_trial(POINT, trainable.TrialSettings(config, "single_label", dense_metric=0.9))
    simulated = Session(monkeypatch, simulation, "sim", tmp_path)
    simulation.run_simulated_trial(POINT, simulation.SimulationSettings.of(config, "accuracy", 0.9))
    assert [m["step"] for m in simulated.reported] == [m["step"] for m in real.reported] == [1, 2]
    for ours, theirs in zip(simulated.reported, real.reported):
        assert set(ours) == set(theirs)
        assert {k: type(v) for k, v in ours.items()} == {k: type(v) for k, v in theirs.items()}
        assert ours["attention_sparsity"] == pytest.approx(theirs["attention_sparsity"], abs=0.02)
    for ours, theirs in zip(simulated.checkpoints, real.checkpoints):
        names = {path.name for path in theirs.iterdir()} - {"model.safetensors", "config.json", "pruning.json"}
        assert {path.name for path in ours.iterdir()} == names | {simulation.WEIGHTS_FILE}
        assert (ours / simulation.WEIGHTS_FILE).stat().st_size == 100_000


def test_the_metric_model_ranks_strategies_and_falls_with_sparsity(monkeypatch, tmp_path):
    """accuracy = dense - cost(strategy) x sparsity^2, plus noise within NOISE: checked by hand at the target."""
    def final(name: str, point: dict) -> list[dict]:
        session = Session(monkeypatch, simulation, "t", tmp_path / name)
        simulation.run_simulated_trial(point, settings())
        return session.reported

    best = final("best", {**POINT, "granularity": "per_head", "scorer": "fisher", "threshold": "global", "step_ratio": 0.1})
    worst = final("worst", {**POINT, "granularity": "entire_head", "scorer": "magnitude", "threshold": "local", "step_ratio": 0.1})
    assert [m["attention_sparsity"] for m in best] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    by_hand = {"best": 0.9 - 0.08 * 1.0 * 1.0 * 1.2 * 0.25, "worst": 0.9 - 0.30 * 1.3 * 1.25 * 1.2 * 0.25}
    assert best[-1]["accuracy"] == pytest.approx(by_hand["best"], abs=simulation.NOISE)
    assert worst[-1]["accuracy"] == pytest.approx(by_hand["worst"], abs=simulation.NOISE)
    assert all(a["accuracy"] > b["accuracy"] for a, b in zip(best, worst)) and best[-1]["area"] > worst[-1]["area"]
    assert best[-1]["final"] and not any(m["final"] for m in best[:-1]) and "test_accuracy" in best[-1]
    again = final("again", {**POINT, "granularity": "per_head", "scorer": "fisher", "threshold": "global", "step_ratio": 0.1})
    assert [m["accuracy"] for m in again] == [m["accuracy"] for m in best], "deterministic"


def test_a_restarted_trial_goes_on_from_its_checkpoint(monkeypatch, tmp_path):
    """A trial restarted from its step-2 checkpoint reports steps 3.. as the uninterrupted trial did."""
    whole = Session(monkeypatch, simulation, "t", tmp_path / "whole")
    point = {**POINT, "step_ratio": 0.1}
    simulation.run_simulated_trial(point, settings())
    restarted = Session(monkeypatch, simulation, "t", tmp_path / "restarted", checkpoint=whole.checkpoints[1])
    simulation.run_simulated_trial(point, settings())
    assert [m["step"] for m in restarted.reported] == [3, 4, 5]
    drop = ("seconds", "node_id")
    assert [{k: v for k, v in m.items() if k not in drop} for m in restarted.reported] == [
        {k: v for k, v in m.items() if k not in drop} for m in whole.reported[2:]]


def test_a_clone_goes_on_from_anothers_checkpoint_as_a_new_segment(monkeypatch, tmp_path):
    """Population-based training hands trial b trial a's step-2 checkpoint with an explored config."""
    source = Session(monkeypatch, simulation, "a", tmp_path / "a")
    simulation.run_simulated_trial({**POINT, "granularity": "variable_per_head", "step_ratio": 0.1}, settings())
    explored = {**POINT, "granularity": "entire_head", "step_ratio": 0.25, "segment": 1, "cloned_from": "a/9"}
    clone = Session(monkeypatch, simulation, "b", tmp_path / "b", checkpoint=source.checkpoints[1])
    simulation.run_simulated_trial(explored, settings())
    assert [m["step"] for m in clone.reported] == [3, 4]  # from 20% by 25% steps, capped at the 50% target
    assert [m["attention_sparsity"] for m in clone.reported] == pytest.approx([0.45, 0.5])
    assert {(m["segment"], m["cloned_from"]) for m in clone.reported} == {(1, "a/2")}, "the checkpoint's step, not the config's"
    assert json.loads(clone.reported[-1]["lineage"]) == ["variable_per_head/magnitude/global"] * 2 + ["entire_head/magnitude/global"] * 2
    assert all(m["ragged_heads"] for m in clone.reported)
    assert json.loads((clone.checkpoints[0] / simulation.SEGMENT_FILE).read_text())["segment"] == 1
    Session(monkeypatch, simulation, "c", tmp_path / "c", checkpoint=source.checkpoints[1])
    with pytest.raises(ValueError, match="cannot switch to granularity 'per_head'"):  # as prune_core refuses it
        simulation.run_simulated_trial({**explored, "granularity": "per_head"}, settings())


@pytest.mark.parametrize(
    "simulate,message",
    [
        ({"step_seconds": 0}, r"simulate.step_seconds: a number > 0, got 0"),
        ({"checkpoint_mb": "big"}, r"simulate.checkpoint_mb: a number > 0, got 'big'"),
        ({"dense_metric": 1.5}, r"simulate.dense_metric: the dense model's metric, in \(0, 1\]"),
        ({"task": "regression"}, r"simulate.task: one of \['single_label', 'multi_label'\]"),
        ({"steps": 3}, r"simulate.steps: unknown key"),
    ],
)
def test_bad_simulate_sections_are_refused_when_read(tmp_path, simulate, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write_config(tmp_path, "bad", simulate=simulate))


def test_a_simulated_config_needs_no_data_or_baseline(tmp_path):
    config = load_config(write_config(tmp_path, "plain", simulate={}))
    assert (config.data, config.baseline, config.simulate.step_seconds, config.simulate.checkpoint_mb) == (
        "simulated", "simulated", 5.0, 2.4)
    with pytest.raises(ConfigError, match="data: missing"):
        parse_config({k: v for k, v in raw_config(tmp_path, "real").items() if k != "simulate"})


@pytest.fixture(scope="module")
def cluster():
    """A simulated Ray cluster: a head with CPUs and no GPU, and two nodes advertising two (logical) GPUs each.
    Yields the GPU nodes' ids."""
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0, "include_dashboard": False})
    gpu_nodes = {cluster.add_node(num_cpus=2, num_gpus=2).node_id for _ in range(2)}
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield gpu_nodes
    ray.shutdown()
    cluster.shutdown()


def tune_steps(experiment_dir: Path) -> dict[str, list[int]]:
    """Ray Tune's own record: trial segment (its MLflow run name) -> the steps it stored. The union of its two logs,
    result.json and progress.csv: after a PBT exploit restores a trial, either may miss rows (see test_cluster)."""
    record: dict[str, set[int]] = {}
    for results in experiment_dir.glob("*/result.json"):
        with open(results.with_name("progress.csv"), newline="") as progress:
            logs = [[json.loads(line) for line in results.read_text().splitlines() if line.strip()], list(csv.DictReader(progress))]
        for rows in logs:
            keys = [(run_key(row["trial_id"], int(row.get("segment") or 0)), int(row["step"])) for row in rows]
            assert len(keys) == len(set(keys)), f"a step reported twice: {keys}"
            for key, step in keys:
                record.setdefault(key, set()).add(step)
    return {key: sorted(steps) for key, steps in record.items()}


def mlflow_children(runs: Path, experiment: str) -> tuple[MlflowClient, object, dict]:
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    found = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    (parent,) = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    children = {r.info.run_name: r for r in found if "mlflow.parentRunId" in r.data.tags}
    return client, parent, children


def assert_tracked(runs: Path, experiment: str) -> tuple[MlflowClient, object, dict, dict]:
    """Every step of every Tune trial segment is in MLflow once, for every metric, from its first step on;
    every step left a checkpoint the report finds. Returns MLflow's record and Tune's."""
    client, parent, children = mlflow_children(runs, experiment)
    experiment_dir = Path(json.loads((runs / experiment / "search.json").read_text())["experiment_dir"])
    tune = tune_steps(experiment_dir)
    assert set(children) == set(tune), "one MLflow child run per Tune trial segment"
    for key, steps in tune.items():
        tags = children[key].data.tags
        first = int(tags[CLONED_FROM_TAG].rsplit("/", 1)[1]) + 1 if CLONED_FROM_TAG in tags else 1
        assert steps == list(range(first, first + len(steps))), f"{key}: Tune's steps {steps}"
        for metric in ("accuracy", "attention_sparsity", "params", "macs", "latency_ms", "area", "layer_sparsity/0"):
            logged = [m.step for m in client.get_metric_history(children[key].info.run_id, metric)]
            assert logged == steps, f"{key}: MLflow {metric} steps {logged}, Tune's {steps}"
    from search.evaluate import step_checkpoints

    checkpoints = step_checkpoints(ResultGrid(ExperimentAnalysis(str(experiment_dir))))
    assert set(checkpoints) == {(key, step) for key, steps in tune.items() for step in steps}
    return client, parent, children, tune


def test_a_simulated_search_runs_optuna_asha_mlflow_and_the_report(cluster, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runs = tmp_path / "runs"
    assert run(load_config(write_config(tmp_path, "sim", points_to_evaluate="paper")), runs_dir=runs) == 0
    assert "SIMULATED search" in capsys.readouterr().out
    client, parent, children, tune = assert_tracked(runs, "sim")
    assert len(children) == 12 and parent.data.params["simulated"] == "True"
    stopped = [key for key, child in children.items() if child.data.tags[STOPPED_TAG] == "true"]
    assert stopped and all(children[key].data.metrics["attention_sparsity"] < 0.5 - 1e-9
                           and "test_accuracy" not in children[key].data.metrics for key in stopped)
    finished = [key for key in children if key not in stopped]
    assert finished and all("test_accuracy" in children[key].data.metrics for key in finished)
    front = pd.read_parquet(runs / "sim" / "report" / "pareto.parquet")
    pairs = list(zip(front["attention_sparsity"], front["accuracy"]))
    assert pairs and not any(dominates(a, b) for a in pairs for b in pairs)
    assert client.get_run(parent.info.run_id).data.metrics["pareto_hypervolume"] > 0
    assert all(front["export"].str.contains("checkpoint_")), "every front point's checkpoint is found"
    assert report("sim", runs_dir=runs) == 0  # replays Tune's results into MLflow again: nothing doubles
    assert_tracked(runs, "sim")


def test_a_simulated_search_under_pbt_records_its_segments(cluster, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runs = tmp_path / "runs"
    # no variable_per_head: StrategyPbt may clone a trial just cloned itself, whose checkpoint (its source's) and last
    # result (its own) disagree, so a ragged model can be explored into a granularity that cannot prune it
    granularities = ["entire_head", "per_head", "same_channel", "hybrid"]
    path = write_config(tmp_path, "simpbt", scheduler="pbt", searcher="random", trials=4, max_concurrent=4,
                        space={**SPACE, "granularity": granularities, "step_ratio": 0.1},
                        pbt={"interval": 10, "quantile": 0.25, "resample": 1.0},
                        simulate={"step_seconds": 0.1, "checkpoint_mb": 0.1})
    assert run(load_config(path), runs_dir=runs) == 0
    client, parent, children, tune = assert_tracked(runs, "simpbt")
    clones = [key for key in tune if "." in key]
    assert clones, "PBT cloned no trial: the test does not exercise exploits"
    for key in clones:
        tags = children[key].data.tags
        source, step = tags[CLONED_FROM_TAG].rsplit("/", 1)
        lineage = json.loads(tags[LINEAGE_TAG])
        # the segments of the source that ran that step (a clone may redo a step its trial had run before)
        sources = [k for k in tune if k.split(".")[0] == source and int(step) in tune[k]]
        assert sources, f"{key} cloned from {tags[CLONED_FROM_TAG]}, a step no segment of {source} ran"
        histories = [json.loads(children[k].data.tags[LINEAGE_TAG])[: int(step)] for k in sources]
        assert lineage[: int(step)] in histories and len(lineage) == tune[key][-1], (key, lineage, histories)


def test_trials_that_ask_for_a_gpu_run_on_the_gpu_nodes(cluster, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runs = tmp_path / "runs"
    path = write_config(tmp_path, "simgpu", trials=4, scheduler="none", resources={"cpu": 1, "gpu": 1},
                        simulate={"step_seconds": 0.3, "checkpoint_mb": 0.1})
    assert run(load_config(path), runs_dir=runs) == 0
    _, _, children, _ = assert_tracked(runs, "simgpu")
    assert len(children) == 4 and all(child.info.status == "FINISHED" for child in children.values())
    nodes = {key: set(child.data.tags[NODES_TAG].split(",")) for key, child in children.items()}
    assert all(used <= cluster for used in nodes.values()), f"a trial ran off the GPU nodes: {nodes} vs {cluster}"
    assert set().union(*nodes.values()) == cluster, "4 trials at once need both nodes' GPUs"


def test_seeded_bytes_come_in_chunks_any_size(monkeypatch):
    """An AST-base checkpoint (350 MB) is more than one `randbytes` call can make (2**31 bits): chunks of the same
    seeded stream, the same bytes for the same seed, exactly `size` of them."""
    assert simulation.CHUNK * 8 < 2**31
    monkeypatch.setattr(simulation, "CHUNK", 4)
    chunks = list(simulation.seeded_bytes("0/t/0/1", 10))
    assert [len(c) for c in chunks] == [4, 4, 2]
    assert b"".join(chunks) == b"".join(simulation.seeded_bytes("0/t/0/1", 10)) != b"".join(simulation.seeded_bytes("0/t/0/2", 10))
    assert list(simulation.seeded_bytes("s", 0)) == []
