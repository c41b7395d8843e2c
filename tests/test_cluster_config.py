"""cluster.yaml passes the Ray autoscaler's own schema, so a typo fails the suite, and keeps secrets out."""

from __future__ import annotations

from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster.yaml"


def test_cluster_yaml_is_valid_for_the_ray_launcher():
    config = yaml.safe_load(CLUSTER.read_text())
    validate_config(prepare_config(config))
    assert config["head_node_type"] in config["available_node_types"]


def test_cluster_yaml_holds_no_credentials_and_binds_the_dashboard_locally():
    text = CLUSTER.read_text().lower()
    assert "aws_secret_access_key" not in text and "password" not in text
    assert "--dashboard-host=127.0.0.1" in text


def test_cluster_yaml_opens_nothing_to_the_world():
    """Own security groups (Ray's default opens SSH to 0.0.0.0/0), token auth, services on 127.0.0.1."""
    config = yaml.safe_load(CLUSTER.read_text())
    for name, node in config["available_node_types"].items():
        assert node["node_config"].get("SecurityGroupIds"), f"{name} must name its security group"
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in command for command in starts if " start " in command and "ray" in command)
    mlflow = [command for command in config["head_start_ray_commands"] if "bin/mlflow server" in command]
    assert mlflow and all("--host 127.0.0.1" in command for command in mlflow)
    assert "0.0.0.0" not in CLUSTER.read_text()
