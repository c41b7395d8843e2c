"""The search on a real multi-node Ray cluster with a real MLflow tracking server, both on 127.0.0.1.

A head (no CPUs) and worker nodes are separate `ray start` processes; trials ask for a custom
resource only the workers have. Faults are real: a worker node is SIGKILLed mid-trial, the MLflow
server is stopped mid-search. Every check counts trials, steps and metrics against Ray Tune's own
record of what ran.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from prune_core import build_ast
from search.tracking import CLONED_FROM_TAG, LINEAGE_TAG, NODES_TAG, TRIAL_TAG
from tests.services import MlflowServer, RayCluster, mlflow_server, ray_cluster, start_mlflow_server
from tests.test_prepare import write_wav

ROOT = Path(__file__).resolve().parents[1]
TRIAL_RESOURCE = "trial_node"
# Steps of a few seconds, so that a fault lands mid-trial: many latency repeats, more LoRA epochs.
SLOW = {"latency_repeats": 1000, "epochs": 5}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with ray_cluster(tmp_path_factory.mktemp("ray-cluster")) as running:
        yield running


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, cluster: RayCluster):
    """Data prepared on the cluster (`data prepare` with RAY_ADDRESS), and a small AST baseline."""
    base = tmp_path_factory.mktemp("cluster-search")
    audio = base / "audio"
    for w, word in enumerate(["yes", "no", "up"]):
        for s in range(8):
            write_wav(audio / word / f"{s:08x}_nohash_0.wav", seed=100 * w + s)
    (audio / "validation_list.txt").write_text("".join(f"{w}/00000006_nohash_0.wav\n" for w in ["yes", "no", "up"]))
    (audio / "testing_list.txt").write_text("".join(f"{w}/00000007_nohash_0.wav\n" for w in ["yes", "no", "up"]))
    worker = cluster.add_worker(cpus=2, resources={TRIAL_RESOURCE: 2})
    prepared = subprocess.run(
        [sys.executable, "-m", "search.cli", "data", "prepare", "--source", "speechcommands", "--input", str(audio),
         "--out", str(base / "data"), "--num-mel-bins", "64", "--max-length", "100", "--shard-size", "8"],
        cwd=ROOT, env={**cluster.env, "RAY_ADDRESS": cluster.address}, capture_output=True, text=True, timeout=300,
    )
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    manifest = json.loads((base / "data" / "manifest.json").read_text())
    build_ast(
        num_labels=3, hidden_size=128, num_layers=4, num_heads=4, intermediate_size=256, num_mel_bins=64, max_length=100,
        labels=manifest["labels"],
    ).save_pretrained(base / "baseline")
    yield base, worker


def search_config(base: Path, name: str, slow: bool = False, **overrides) -> Path:
    config = {
        "experiment": name,
        "data": str(base / "data"),
        "baseline": str(base / "baseline"),
        "target_sparsity": 0.5,
        "schedule": "linear",
        "trials": 2,
        "max_concurrent": 2,
        "seed": 0,
        "points_to_evaluate": [
            {"granularity": "per_head", "scorer": "magnitude", "threshold": "global"},
            {"granularity": "entire_head", "scorer": "magnitude", "threshold": "local"},
        ],
        "calib_batches": 1,
        "train_batches_per_step": 2,
        "latency_repeats": SLOW["latency_repeats"] if slow else 5,
        "max_failures": 2,
        "storage": str(base / name / "ray"),
        "resources": {"cpu": 1, "custom": {TRIAL_RESOURCE: 1}},
        "asha": {"grace_period": 45, "reduction_factor": 2},
        "loader": {"batch_size": 8, "eval_batch_size": 16},
        "space": {
            "granularity": ["entire_head", "per_head"],
            "scorer": ["magnitude"],
            "threshold": ["global", "local"],
            "step_ratio": 0.1,
            "lora_rank": 2,
            "lora_alpha": 4,
            "lr": 1.0e-3,
            "epochs": SLOW["epochs"] if slow else 1,
        },
        **overrides,
    }
    path = base / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start_search(cluster: RayCluster, server: MlflowServer, config: Path, runs: Path) -> subprocess.Popen:
    env = {**cluster.env, "MLFLOW_TRACKING_URI": server.url, "PYTHONPATH": str(ROOT)}
    log = (runs.parent / f"{runs.name}-driver.log").open("w")
    return subprocess.Popen(
        [sys.executable, "-m", "search.cli", "run", "--config", str(config), "--address", cluster.address, "--runs", str(runs)],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )


def finish(process: subprocess.Popen, runs: Path, timeout: float = 420) -> str:
    try:
        process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 9)
            process.wait()
    return (runs.parent / f"{runs.name}-driver.log").read_text()


def tune_steps(storage: Path) -> dict[str, list[int]]:
    """Ray Tune's own record: trial segment (its MLflow run name) -> the steps it stored, each once and in order.

    Tune logs a trial twice, to result.json and progress.csv, and neither is a complete record once a node dies:
    after a trial restarts on another node result.json can lose the rows written before the failure (seen: step 1
    gone, progress.csv whole), and both logs can lose rows when Tune restores the trial's log folder (seen: steps 1
    then 3 across the node change; and once 1, then 2 and 5 on the new node). So the record is the union of the two
    logs, a log may skip steps, and only its order is checked: steps rise, and a step is done again only where the
    node changed (its checkpoint was not held yet when the node died; MLflow holds it once). MLflow, fed by the
    driver's callback, is the record `assert_complete` holds to every step. Under population-based training a
    trial's log holds its segments one after the other (each clone restarts the step count from the step it was
    cloned at).
    """
    record: dict[str, set[int]] = {}
    for results in storage.glob("*/*/result.json"):
        rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
        with open(results.with_name("progress.csv"), newline="") as progress:
            csv_rows = list(csv.DictReader(progress))
        for log in (rows, csv_rows):
            by_segment: dict[str, list[tuple[int, str]]] = {}
            for row in log:
                segment = int(row.get("segment") or 0)
                key = row["trial_id"] if segment == 0 else f"{row['trial_id']}.{segment}"
                by_segment.setdefault(key, []).append((int(row["step"]), row["node_id"]))
            for key, rows in by_segment.items():
                for (before, node_before), (step, node) in zip(rows, rows[1:]):
                    # rising; a step done again only where the trial moved to another node
                    assert step > before or (step == before and node != node_before), f"{key}: Tune's log {rows}"
                record.setdefault(key, set()).update(step for step, _ in rows)
    return {key: sorted(steps) for key, steps in record.items()}


def mlflow_record(url: str, experiment: str) -> tuple[MlflowClient, list, dict[str, dict]]:
    """(client, parent runs, run name (trial segment) -> {run, steps per metric}) from the tracking server, over HTTP."""
    client = MlflowClient(url)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {}
    for run in runs:
        if "mlflow.parentRunId" in run.data.tags:
            steps = {key: [m.step for m in client.get_metric_history(run.info.run_id, key)]
                     for key in ("accuracy", "attention_sparsity", "params", "macs", "latency_ms", "layer_sparsity/0")}
            children[run.info.run_name] = {"run": run, "steps": steps}
    return client, parents, children


# The configs' trials prune 0.1 of the dense attention per step (linear schedule) up to 0.5: 5 steps at most.
LAST_STEP = 5


def assert_complete(children: dict, record: dict[str, list[int]]) -> None:
    """One child run per Tune trial segment; every step of it is in MLflow once, for every metric.

    A first segment starts at step 1; a clone's at the step after the one it was cloned at. MLflow must hold
    every step from there to the last Tune recorded; Tune's own log may miss steps once a node died
    (see `tune_steps`), MLflow, fed by the driver's callback, may not."""
    assert set(children) == set(record), "one MLflow child run per Tune trial segment"
    for key, reported in record.items():
        tags = children[key]["run"].data.tags
        first = int(tags[CLONED_FROM_TAG].rsplit("/", 1)[1]) + 1 if CLONED_FROM_TAG in tags else 1
        expected = list(range(first, reported[-1] + 1))
        assert set(reported) <= set(expected) and reported[-1] <= LAST_STEP, (key, reported)
        for metric, steps in children[key]["steps"].items():
            assert steps == expected, f"{key}: MLflow {metric} steps {steps}, expected {expected} (Tune's {reported})"


def test_search_on_two_nodes_tracked_by_an_mlflow_server(cluster, workspace, tmp_path):
    """Trials run on the worker node only; every run, metric and artifact reaches the server over HTTP."""
    base, worker = workspace
    runs = tmp_path / "runs"
    with mlflow_server(tmp_path / "mlflow") as server:
        config = search_config(base, "two-nodes", storage=str(tmp_path / "ray"))
        log = finish(start_search(cluster, server, config, runs), runs)
        assert "2 trials: 2 finished" in log, log[-3000:]
        client, parents, children = mlflow_record(server.url, "two-nodes")
        assert len(parents) == 1 and client.get_run(parents[0].info.run_id).info.status == "FINISHED"
        assert_complete(children, tune_steps(tmp_path / "ray"))
        for trial, child in children.items():
            assert child["run"].data.tags[NODES_TAG] == worker, f"{trial} ran off the worker node"
            assert child["run"].info.status == "FINISHED"
        pareto = {a.path for a in client.list_artifacts(parents[0].info.run_id, "pareto")}
        assert pareto == {"pareto/pareto.parquet", "pareto/pareto.png", "pareto/report.html"}
        stored = {path.name for path in (server.folder / "artifacts").rglob("*") if path.is_file()}
        assert {"pareto.parquet", "report.html", "model.safetensors", "pruning.json"} <= stored, "artifacts went through the server"
    assert not (runs / "mlflow.db").exists(), "nothing was tracked in the embedded store"


def test_a_worker_node_killed_mid_trial(cluster, workspace, tmp_path):
    """Under population-based training, the trial on a node that dies resumes from its last step checkpoint on
    the other node and finishes; no segment, step or lineage is lost, and Tune and MLflow agree on all of them."""
    base, first = workspace
    second = cluster.add_worker(cpus=1, resources={TRIAL_RESOURCE: 1})
    runs = tmp_path / "runs"
    with mlflow_server(tmp_path / "mlflow") as server:
        config = search_config(
            base, "node-lost", slow=True, storage=str(tmp_path / "ray"), scheduler="pbt", searcher="random",
            pbt={"interval": 10, "quantile": 0.5, "resample": 1.0},
        )
        driver = start_search(cluster, server, config, runs)
        victim, killed = None, None
        deadline = time.time() + 300
        while time.time() < deadline and victim is None and driver.poll() is None:
            time.sleep(0.5)
            try:
                _, _, children = mlflow_record(server.url, "node-lost")
            except Exception:  # noqa: BLE001 - the experiment may not exist yet
                continue
            for key, child in children.items():
                nodes = child["run"].data.tags.get(NODES_TAG, "")
                if child["run"].info.status == "RUNNING" and child["steps"]["accuracy"] and nodes in (first, second):
                    victim, killed = child["run"].data.tags[TRIAL_TAG], nodes
                    break
        assert victim is not None, "no trial was caught mid-run"
        cluster.kill_worker(killed)
        log = finish(driver, runs)
        assert "2 trials: 2 finished" in log and "0 failed" in log, log[-3000:]
        _, _, children = mlflow_record(server.url, "node-lost")
        record = tune_steps(tmp_path / "ray")
        assert_complete(children, record)
        segments = sorted(key for key in children if key.split(".")[0] == victim)
        nodes = [node for key in segments for node in children[key]["run"].data.tags[NODES_TAG].split(",")]
        survivor = second if killed == first else first
        assert killed in nodes and nodes[-1] == survivor, f"the victim ran on {nodes}"
        assert all(child["run"].info.status == "FINISHED" for child in children.values())
        # every segment's lineage: one strategy per step, a clone's starting with its source's
        lineages = {key: json.loads(child["run"].data.tags[LINEAGE_TAG]) for key, child in children.items()}
        for key, child in children.items():
            assert len(lineages[key]) == record[key][-1], (key, lineages[key])
            if CLONED_FROM_TAG in child["run"].data.tags:
                source, step = child["run"].data.tags[CLONED_FROM_TAG].rsplit("/", 1)
                sources = [other for other, run in children.items()
                           if other.split(".")[0] == source and int(step) in run["steps"]["accuracy"]]
                assert sources, f"{key} was cloned from a step never recorded"
                assert lineages[key][: int(step)] == lineages[sources[0]][: int(step)], key


def test_mlflow_server_down_during_a_search(cluster, workspace, tmp_path):
    """The search runs on while MLflow is down; its report comes from Tune; `report` fills MLflow in after."""
    base, _ = workspace
    runs = tmp_path / "runs"
    server = start_mlflow_server(tmp_path / "mlflow")
    try:
        config = search_config(base, "mlflow-down", slow=True, storage=str(tmp_path / "ray"))
        driver = start_search(cluster, server, config, runs)
        deadline = time.time() + 300
        logged = 0
        while time.time() < deadline and not logged and driver.poll() is None:
            time.sleep(0.5)
            try:
                _, _, children = mlflow_record(server.url, "mlflow-down")
                logged = sum(len(child["steps"]["accuracy"]) for child in children.values())
            except Exception:  # noqa: BLE001 - not created yet
                continue
        assert logged, "the search should log a step before the server goes down"
        server.stop()
        log = finish(driver, runs)
        assert "2 trials: 2 finished" in log and "MLflow at" in log and "unreachable" in log, log[-3000:]
        assert (runs / "mlflow-down" / "report" / "pareto.parquet").is_file(), "the report is built from Tune's results"
        record = tune_steps(tmp_path / "ray")
        assert sum(len(steps) for steps in record.values()) > logged, "the search went on while MLflow was down"

        server = start_mlflow_server(tmp_path / "mlflow", port=int(server.url.rsplit(":", 1)[1]))
        env = {**os.environ, "MLFLOW_TRACKING_URI": server.url, "PYTHONPATH": str(ROOT)}
        rebuilt = subprocess.run(
            [sys.executable, "-m", "search.cli", "report", "--experiment", "mlflow-down", "--runs", str(runs)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        )
        assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
        client, parents, children = mlflow_record(server.url, "mlflow-down")
        assert_complete(children, record)
        assert all(child["run"].info.status == "FINISHED" for child in children.values())
        assert client.get_run(parents[0].info.run_id).info.status == "FINISHED"
        assert "pareto_hypervolume" in client.get_run(parents[0].info.run_id).data.metrics
    finally:
        server.stop()
