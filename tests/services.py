"""Real services for the tests, on 127.0.0.1: Ray nodes started with `ray start`, an MLflow tracking server.

Each runs in its own process session, so a test can kill one node (its raylet and agents) the way a
machine dies, and every process is stopped when the test ends, also when it fails.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop(process: subprocess.Popen, grace: float = 5.0) -> None:
    """Stop a process and everything in its session: SIGTERM, then SIGKILL for what is left after `grace` s."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    try:  # `ray start --block` leaves its children behind on SIGTERM
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=10)


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else ""


def _node_ports() -> list[str]:
    """Ports a Ray node would otherwise take by default, so that several nodes share one machine."""
    return [
        f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
    ]


@dataclass
class RayCluster:
    """A head (no CPUs: it only schedules) and worker nodes, each its own `ray start --block` process."""

    folder: Path
    env: dict[str, str]
    address: str = ""
    head: subprocess.Popen | None = None
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)  # node id -> process

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = self.folder / f"{name}.log"
        command = [str(BIN / "ray"), "start", "--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1",
                   "--object-store-memory=100000000", *_node_ports(), *args]
        return subprocess.Popen(command, env=self.env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)

    def start_head(self) -> None:
        port = free_port()
        self.head = self._start("head", ["--head", f"--port={port}", "--num-cpus=0", "--include-dashboard=false",
                                         "--dashboard-host=127.0.0.1", f"--dashboard-port={free_port()}"])
        self.address = f"127.0.0.1:{port}"
        self._wait_for(1, "head", self.head)

    def add_worker(self, cpus: int, resources: dict[str, float]) -> str:
        """Start a worker node; returns its Ray node id once the head sees it."""
        before = {node["id"] for node in self.nodes()}
        name = f"worker-{len(self.workers)}"
        process = self._start(name, [f"--address={self.address}", f"--num-cpus={cpus}", f"--resources={json.dumps(resources)}"])
        alive = self._wait_for(len(before) + 1, name, process)
        (node,) = [node["id"] for node in alive if node["id"] not in before]
        self.workers[node] = process
        return node

    def kill_worker(self, node: str) -> None:
        """The node dies at once (SIGKILL to its raylet and agents), as a lost machine would."""
        os.killpg(self.workers[node].pid, signal.SIGKILL)
        self.workers.pop(node).wait()

    def nodes(self) -> list[dict]:
        """The alive nodes with their resources, asked of the cluster by a short-lived driver."""
        code = (
            "import json, ray; ray.init(address=%r, log_to_driver=False); "
            "print('NODES=' + json.dumps([{'id': n['NodeID'], 'resources': n['Resources']} for n in ray.nodes() if n['Alive']]))"
        ) % self.address
        out = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=120)
        for line in out.stdout.splitlines():
            if line.startswith("NODES="):
                return json.loads(line[len("NODES="):])
        raise RuntimeError(f"cannot list the nodes of {self.address}: {out.stderr[-2000:]}")

    def _wait_for(self, count: int, name: str, process: subprocess.Popen, timeout: float = 90.0) -> list[dict]:
        deadline = time.time() + timeout
        while time.time() < deadline and process.poll() is None:
            time.sleep(1)
            try:
                alive = self.nodes()
            except RuntimeError:
                continue
            if len(alive) >= count:
                return alive
        raise RuntimeError(f"Ray {name} did not join within {timeout:.0f} s:\n{_tail(self.folder / f'{name}.log')}")

    def stop(self) -> None:
        for process in [*self.workers.values(), *([self.head] if self.head else [])]:
            stop(process)
        self.workers.clear()
        # `ray start --head` leaves the address for later drivers; a killed head never takes it back
        current = Path("/tmp/ray/ray_current_cluster")
        if self.address and current.is_file() and current.read_text().strip().endswith(self.address.split(":")[1]):
            current.unlink()


def token_env(folder: Path) -> dict[str, str]:
    """This process's environment with Ray token authentication on, by a token file of its own in `folder`:
    what the nodes and every driver of a test cluster run with."""
    folder.mkdir(parents=True, exist_ok=True)
    token = folder / "ray-token"
    token.write_text(os.urandom(16).hex())
    token.chmod(0o600)
    return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0"}


@contextmanager
def ray_cluster(folder: Path) -> Iterator[RayCluster]:
    """A Ray head on 127.0.0.1 with token authentication (its own token file); stopped on exit."""
    cluster = RayCluster(folder, token_env(folder))
    try:
        cluster.start_head()
        yield cluster
    finally:
        cluster.stop()


@dataclass
class MlflowServer:
    url: str
    folder: Path
    process: subprocess.Popen

    def stop(self) -> None:
        stop(self.process)


def start_mlflow_server(folder: Path, port: int | None = None, timeout: float = 90.0) -> MlflowServer:
    """`mlflow server` on 127.0.0.1 with a sqlite backend and a local artifact root, once it answers /health."""
    folder.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log = folder / "mlflow-server.log"
    command = [
        str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination", str(folder / "artifacts"),
    ]
    process = subprocess.Popen(command, stdout=log.open("a"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            break
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status == 200:
                    return MlflowServer(url, folder, process)
        except OSError:
            time.sleep(0.5)
    stop(process)
    raise RuntimeError(f"mlflow server did not come up on {url}:\n{_tail(log)}")


@contextmanager
def mlflow_server(folder: Path) -> Iterator[MlflowServer]:
    server = start_mlflow_server(folder)
    try:
        yield server
    finally:
        server.stop()


# What the cluster launcher detects on each instance type of cluster.yaml (`resources: {}` there); the fake
# provider has no instances to ask.
INSTANCE_RESOURCES = {"g5.xlarge": {"CPU": 4, "GPU": 1}, "m6i.2xlarge": {"CPU": 8}}
FAKE_HEAD_TYPE = "ray.head.default"  # the type name Ray's fake provider gives its head


def fake_autoscaling_config(cluster: dict, gcs_address: str, idle_timeout_minutes: float = 0.1,
                            max_workers: int | None = None) -> dict:
    """`cluster.yaml` as a config of Ray's fake multi-node provider (`fake_multinode`): its node types, their
    bounds (`max_workers` lowered to fit this machine when given) and upscaling speed, each worker type with the
    resources of its instance type, and a short idle timeout. Every launcher-only part (cloud, SSH, setup
    and start commands, file mounts) is emptied: the fake provider starts each node as local Ray processes."""
    head = cluster["available_node_types"][cluster["head_node_type"]]
    types = {FAKE_HEAD_TYPE: {"resources": dict(head.get("resources") or {}), "node_config": {}, "max_workers": 0}}
    for name, node_type in cluster["available_node_types"].items():
        if name == cluster["head_node_type"]:
            continue
        resources = dict(node_type.get("resources") or INSTANCE_RESOURCES[node_type["node_config"]["InstanceType"]])
        bound = node_type["max_workers"] if max_workers is None else min(node_type["max_workers"], max_workers)
        types[name] = {"resources": {**resources, "object_store_memory": 100_000_000}, "node_config": {},
                       "min_workers": node_type.get("min_workers", 0), "max_workers": bound}
    bound = cluster["max_workers"] if max_workers is None else min(cluster["max_workers"], max_workers)
    return {
        "cluster_name": cluster["cluster_name"], "max_workers": bound, "upscaling_speed": cluster["upscaling_speed"],
        "idle_timeout_minutes": idle_timeout_minutes, "head_node_type": FAKE_HEAD_TYPE, "available_node_types": types,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


@contextmanager
def autoscaling_cluster(folder: Path, cluster: dict, max_workers: int) -> Iterator[RayCluster]:
    """A Ray head on 127.0.0.1 whose autoscaler launches and ends fake worker nodes (local Ray processes) by
    `fake_autoscaling_config(cluster)`; every process, the autoscaled nodes included, stopped on exit."""
    port = free_port()
    env = {**token_env(folder), "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    config = folder / "autoscaling.json"
    config.write_text(json.dumps(fake_autoscaling_config(cluster, f"127.0.0.1:{port}", max_workers=max_workers)))
    running = RayCluster(folder, env, address=f"127.0.0.1:{port}")
    head_cpus = cluster["available_node_types"][cluster["head_node_type"]].get("resources", {}).get("CPU", 0)
    running.head = running._start("head", ["--head", f"--port={port}", f"--num-cpus={head_cpus}",
                                           "--include-dashboard=false", f"--autoscaling-config={config}"])
    try:
        running._wait_for(1, "head", running.head)
        yield running
    finally:
        running.stop()  # the autoscaled nodes are in the head's session: the monitor started them
