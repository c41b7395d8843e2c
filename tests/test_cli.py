"""The `prune-search` command line: prune a saved model once, serve the MLflow UI."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from prune_core import SCORERS, attention_sparsity, load_pruned
from search.cli import build_parser, main
from search.tracking import experiment_id, tracking_uri
from tests.conftest import tiny_ast
from tests.services import free_port

ROOT = Path(__file__).resolve().parents[1]


def test_prune_command(tmp_path, capsys):
    tiny_ast().save_pretrained(tmp_path / "dense")
    code = main(
        ["prune", "--model", str(tmp_path / "dense"), "--granularity", "entire_head", "--amount", "0.5", "--out", str(tmp_path / "p")]
    )
    assert code == 0
    # within half a head (8 QK channels of 66 and 8 VO channels of 65 parameters) of 0.5 of the attention
    dense, half_head = 2 * 4 * (32 * 32 + 32), (8 * 66 + 8 * 65) / 2
    assert abs(attention_sparsity(load_pruned(tmp_path / "p")) - 0.5) <= half_head / dense
    assert "attention sparsity" in capsys.readouterr().out


def test_prune_command_bad_amount(tmp_path, capsys):
    tiny_ast().save_pretrained(tmp_path / "dense")
    code = main(["prune", "--model", str(tmp_path / "dense"), "--amount", "1.5", "--out", str(tmp_path / "p")])
    assert code == 2
    assert "amount must be a fraction" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_servers_bind_to_localhost_by_default():
    assert build_parser().parse_args(["ui"]).host == "127.0.0.1"


def test_prune_offers_only_scorers_that_need_no_data(capsys):
    base = ["prune", "--model", "m", "--amount", "0.5", "--out", "o", "--scorer"]
    for name, scorer in SCORERS.items():
        if scorer.needs_data:
            with pytest.raises(SystemExit):
                build_parser().parse_args([*base, name])
            assert f"invalid choice: '{name}'" in capsys.readouterr().err
        else:
            assert build_parser().parse_args([*base, name]).scorer == name


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _live_processes() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, process group) of every process that is not a zombie (Linux /proc)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            found[int(stat.parent.name)] = (int(fields[1]), int(fields[2]))
    return found


def test_ui_links_the_runs_table_and_stops_the_whole_server_on_sigterm(tmp_path, monkeypatch):
    """SIGTERM (a script, a service manager) stops MLflow's server and everything it started, freeing the port."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runs = tmp_path / "runs"
    runs.mkdir()
    experiment = experiment_id(MlflowClient(tracking_uri(runs)), "demo", runs)
    port = free_port()
    log = tmp_path / "ui.log"
    with log.open("w") as out:
        cli = subprocess.Popen([sys.executable, "-m", "search.cli", "ui", "--port", str(port), "--runs", str(runs)],
                               cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    groups: set[int] = {cli.pid}
    try:
        deadline = time.monotonic() + 300  # MLflow starts a dozen processes: slow on a busy machine
        while not _answers(port):
            assert cli.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        processes, family = _live_processes(), {cli.pid}
        for _ in range(10):  # the CLI's descendants, a few generations deep
            family |= {pid for pid, (parent, _) in processes.items() if parent in family}
        groups |= {processes[pid][1] for pid in family if pid in processes}
        os.kill(cli.pid, signal.SIGTERM)
        cli.wait(timeout=120)
        deadline = time.monotonic() + 30
        while _answers(port) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _answers(port), "the port is still served after SIGTERM"
        left = [pid for pid, (_, group) in _live_processes().items() if group in groups]
        assert not left, f"processes of the UI left running: {left}"
        assert f"http://127.0.0.1:{port}/#/experiments/{experiment}/runs?workflowType=machine_learning" in log.read_text()
    finally:
        for group in groups:
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass
        cli.wait(timeout=10)


def test_the_command_line_imports_no_model_code_until_a_command_needs_it():
    """`data prepare` and the other commands that touch no model must not pay prune_core's import (transformers
    and peft: about 2 s of every start-up); the prune command's choices still list the registries."""
    code = ("import sys, search.cli; print(sorted(m for m in ('prune_core', 'transformers', 'peft', 'search.trainable') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    usage = subprocess.run([sys.executable, "-m", "search.cli", "prune", "--help"], capture_output=True, text=True,
                           check=True).stdout
    assert "{entire_head,hybrid,per_head,same_channel,variable_per_head}" in usage
