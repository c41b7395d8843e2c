"""cluster.yaml's autoscaling exercised on this machine with Ray's fake multi-node provider: GPU workers come up
while trials wait for GPUs, never more than the bound, and go away once idle; a simulated search runs on them."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.services import FAKE_HEAD_TYPE, autoscaling_cluster, fake_autoscaling_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = yaml.safe_load((ROOT / "cluster.yaml").read_text())
MAX_WORKERS = 2  # cluster.yaml allows 8 GPU workers; 2 fake nodes (a raylet and agents each) fit 2 cores
SPACE = {"granularity": ["per_head", "entire_head"], "scorer": ["magnitude", "fisher"], "threshold": "global",
         "step_ratio": 0.25, "lora_rank": 4, "lora_alpha": 8, "lr": 1e-3, "epochs": 1}


def test_the_fake_config_is_cluster_yaml_with_local_nodes():
    config = fake_autoscaling_config(CLUSTER, "127.0.0.1:1234", max_workers=MAX_WORKERS)
    worker = config["available_node_types"]["gpu_worker"]
    assert worker["resources"]["GPU"] == 1 and worker["resources"]["CPU"] == 4  # a g5.xlarge
    assert (worker["min_workers"], worker["max_workers"]) == (CLUSTER["available_node_types"]["gpu_worker"]["min_workers"], 2)
    assert config["available_node_types"][FAKE_HEAD_TYPE]["resources"] == {"CPU": 0}  # trials never run on the head
    assert config["provider"]["type"] == "fake_multinode" and config["provider"]["gcs_address"] == "127.0.0.1:1234"
    assert config["upscaling_speed"] == CLUSTER["upscaling_speed"]
    unbounded = fake_autoscaling_config(CLUSTER, "127.0.0.1:1234")
    assert unbounded["available_node_types"]["gpu_worker"]["max_workers"] == CLUSTER["available_node_types"]["gpu_worker"]["max_workers"]


def gpu_workers(cluster) -> int:
    return sum(1 for node in cluster.nodes() if node["resources"].get("GPU", 0) > 0)


def test_gpu_workers_come_up_for_pending_trials_and_go_when_idle(tmp_path):
    """A simulated search of 4 one-GPU trials on a head with no GPU: the autoscaler starts GPU workers up to the
    bound (2 here), the trials run on them, and once idle the workers go, down to min_workers (0)."""
    raw = {"experiment": "autoscale", "space": SPACE, "trials": 4, "max_concurrent": 4, "scheduler": "none",
           "target_sparsity": 0.5, "resources": {"cpu": 1, "gpu": 1}, "storage": str(tmp_path / "ray"),
           "simulate": {"step_seconds": 3.0, "checkpoint_mb": 0.1, "dense_metric": 0.9}}
    (tmp_path / "autoscale.yaml").write_text(yaml.safe_dump(raw))
    with autoscaling_cluster(tmp_path / "cluster", CLUSTER, max_workers=MAX_WORKERS) as cluster:
        assert gpu_workers(cluster) == 0, "min_workers is 0: no GPU worker before any trial"
        env = {k: v for k, v in cluster.env.items() if k != "MLFLOW_TRACKING_URI"}
        search = subprocess.Popen(  # the search's driver, as `ray job submit` runs it on the head
            [sys.executable, "-m", "search.cli", "run", "--config", str(tmp_path / "autoscale.yaml"), "--runs", str(tmp_path / "runs")],
            cwd=ROOT, env={**env, "RAY_ADDRESS": cluster.address}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seen = []
        while search.poll() is None:
            seen.append(gpu_workers(cluster))
        output = search.communicate()[0]
        assert search.returncode == 0, output[-3000:]
        assert "4 trials: 4 finished" in output
        assert max(seen) == MAX_WORKERS, f"4 one-GPU trials waited: {MAX_WORKERS} workers should have come up, saw {seen}"
        deadline = time.monotonic() + 120  # idle timeout 6 s, the autoscaler's turns and a node's shutdown
        while gpu_workers(cluster) and time.monotonic() < deadline:
            time.sleep(2)
        assert gpu_workers(cluster) == 0, "idle GPU workers were not scaled down to min_workers"
