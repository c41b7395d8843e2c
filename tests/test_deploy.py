"""ONNX export and the MLflow Model Registry: what the search finds, in the form users ship.

Parity is read through ONNX Runtime directly, on inputs the test makes (other batch sizes, other text lengths
and padding than the exporter traced), against the PyTorch model the export came from. That model's own
correctness against the stock transformers model is tests/test_equivalence.py's.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import onnxruntime
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from prune_core import GRANULARITIES, attention_sites, load_pruned, prune, save_pruned
from prune_core.export import ExportError, export_onnx
from search.cli import main
from search.results import Shipping, load_state, report
from search.space import load_config
from tests.conftest import ast_batches, bert_batches, tiny_ast, tiny_bert, tiny_vit, vit_batches
from tests.services import BIN, free_port, stop
from tests.test_search import search_config, trained_inputs, workspace  # noqa: F401 - the module's Ray + data fixture

TOLERANCE = 1e-4


def ort_logits(path: Path, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {name: value.numpy() for name, value in inputs.items()})
    return logits


def torch_logits(model, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    with torch.no_grad():
        return model(**inputs).logits.numpy()


def assert_parity(model, path: Path, cases: list[dict[str, torch.Tensor]]) -> None:
    for inputs in cases:
        shapes = {name: tuple(value.shape) for name, value in inputs.items()}
        assert np.abs(ort_logits(path, inputs) - torch_logits(model, inputs)).max() < TOLERANCE, shapes


def without_labels(batch: dict) -> dict:
    return {name: value for name, value in batch.items() if name != "labels"}


@pytest.mark.parametrize("granularity", sorted(GRANULARITIES))
def test_every_granularity_exports_with_a_dynamic_batch(granularity, tmp_path):
    model = tiny_ast()
    for _ in range(2):
        prune(model, granularity=granularity, scorer="fisher", threshold="global", amount=0.3, calib=ast_batches())
    path = export_onnx(model, tmp_path / "model.onnx")
    assert_parity(model, path, [without_labels(ast_batches(size=size, seed=size)[0]) for size in (1, 5)])


def test_headless_layers_and_ragged_heads_export(tmp_path):
    """Whole attention blocks removed (min_heads=0) and heads of different dims in one model."""
    model = tiny_ast(layers=3)
    prune(model, granularity="variable_per_head", scorer="magnitude", threshold="global", amount=0.3)
    prune(model, granularity="entire_head", scorer="magnitude", threshold="global", amount=0.8, min_heads=0)
    heads = [len(site.attention.qk_dims) for site in attention_sites(model)]
    assert 0 in heads and max(heads) > 0, heads
    path = export_onnx(model, tmp_path / "model.onnx")
    assert_parity(model, path, [without_labels(ast_batches(size=3, seed=9)[0])])


def test_vit_exports(tmp_path):
    model = tiny_vit()
    prune(model, granularity="hybrid", scorer="fisher", threshold="global", amount=0.4, calib=vit_batches())
    path = export_onnx(model, tmp_path / "vit.onnx")
    assert_parity(model, path, [without_labels(vit_batches(size=size)[0]) for size in (1, 3)])


def test_bert_exports_with_its_mask_and_a_dynamic_length(tmp_path):
    """Padding must act in the graph as in PyTorch: rows with 12, 7, 3 and 1 real tokens, at two lengths."""
    model = tiny_bert()
    prune(model, granularity="per_head", scorer="fisher", threshold="global", amount=0.4, calib=bert_batches())
    path = export_onnx(model, tmp_path / "bert.onnx", tokens=16)
    batch = without_labels(bert_batches(size=4)[0])
    for row, real in enumerate((12, 7, 3, 1)):
        batch["attention_mask"][row, real:] = 0
    short = {name: value[:2, :5] for name, value in batch.items()}
    assert_parity(model, path, [batch, short])
    padded, unpadded = ort_logits(path, batch), ort_logits(path, {k: v[1:2, :7] for k, v in batch.items()})
    assert np.abs(padded[1] - unpadded[0]).max() < TOLERANCE, "a padded row must equal the same row unpadded"


class DataDependent(torch.nn.Module):
    """Branches on a tensor's value: the exporter cannot trace that."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        return y * 2 if y.max() > 0.5 else y


def test_a_module_the_exporter_cannot_handle_is_named(tmp_path):
    model = tiny_ast()
    layer = model.audio_spectrogram_transformer.layers[1].attention
    layer.o_proj = DataDependent(layer.o_proj)
    with pytest.raises(ExportError, match=r"module 'audio_spectrogram_transformer\.layers\.1\.attention\.o_proj' "
                                          r"\(DataDependent\)"):
        export_onnx(model, tmp_path / "model.onnx")


def test_export_command(tmp_path, capsys):
    model = tiny_ast()
    prune(model, granularity="same_channel", scorer="magnitude", threshold="local", amount=0.5)
    save_pruned(model, tmp_path / "pruned")
    assert main(["export", "--model", str(tmp_path / "pruned"), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0
    assert "ONNX Runtime's logits within" in capsys.readouterr().out
    assert_parity(load_pruned(tmp_path / "pruned"), tmp_path / "m.onnx", [without_labels(ast_batches(size=2)[0])])
    assert main(["export", "--model", str(tmp_path / "pruned"), "--out", str(tmp_path / "t.onnx"), "--tokens", "64"]) == 2
    assert "only text models take a token count" in capsys.readouterr().err


EXPERIMENT = "shipped"


@pytest.fixture(scope="module")
def runs(workspace):  # noqa: F811 - the fixture imported above
    """A finished search of 2 trials, 2 prune steps each, on `trained_inputs`, tracked in the sqlite store."""
    data, baseline = trained_inputs(workspace)
    runs = workspace / "runs-shipped"
    space = {"granularity": ["entire_head", "per_head"], "scorer": ["magnitude"], "threshold": ["global"],
             "lora_rank": 2, "lr": 3.0e-2, "step_ratio": 0.2}
    path = search_config(workspace, EXPERIMENT, searcher="grid", scheduler="none", points_to_evaluate=[], space=space,
                         target_sparsity=0.4, data=str(data), baseline=str(baseline))
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        from search.runner import run

        assert run(load_config(path), runs_dir=runs) == 0
        yield runs


def test_a_front_point_is_registered_and_served_through_pyfunc(runs, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["report", "--experiment", EXPERIMENT, "--runs", str(runs), "--onnx",
                 "--register", "tiny-ast", "--best-within", "100"]) == 0
    out = capsys.readouterr().out
    assert "registered models:/tiny-ast/1" in out and "--env-manager local" in out
    state = load_state(runs, EXPERIMENT)
    client = MlflowClient(state.tracking_uri)
    version = client.get_model_version("tiny-ast", "1")
    tags = version.tags
    trial, step = tags["trial"], int(tags["step"])
    # --best-within 100 admits every point: the sparsest front point is the one registered
    table = pd.read_parquet(runs / EXPERIMENT / "report" / "pareto.parquet")
    sparsest = table.loc[table["attention_sparsity"].idxmax()]
    assert (sparsest["trial"], int(sparsest["step"])) == (trial, step)
    assert float(tags["attention_sparsity"]) == pytest.approx(sparsest["attention_sparsity"], abs=1e-6)
    assert float(tags["accuracy"]) == pytest.approx(sparsest["accuracy"], abs=1e-6) and tags["schedule"]
    # every front point has its MLflow onnx model; the report shows each one's export command and the URI
    for _, row in table.iterrows():
        assert client.list_artifacts(row["run_id"], f"onnx-model-step-{int(row['step'])}"), row["trial"]
        assert row["export"].startswith("prune-search export --model ") and row["export"].endswith(".onnx")
    assert table.set_index(["trial", "step"]).loc[(trial, step), "model_uri"] == "models:/tiny-ast/1"
    assert "models:/tiny-ast/1" in (runs / EXPERIMENT / "report" / "report.html").read_text()

    # the registered model, loaded as users load it, predicts what the point's PyTorch checkpoint does
    mlflow.set_tracking_uri(state.tracking_uri)
    served = mlflow.pyfunc.load_model("models:/tiny-ast/1")
    checkpoint = Path(tags["checkpoint"])
    assert table.set_index(["trial", "step"]).loc[(trial, step), "export"].split()[3] == str(checkpoint)
    model = load_pruned(checkpoint).eval()
    assert json.loads((checkpoint / "pruning.json").read_text())["layers"], "a save_pruned checkpoint"
    inputs = without_labels(ast_batches(size=3, num_labels=3, seed=4)[0])
    inputs["input_values"] = inputs["input_values"][:, : model.config.max_length, : model.config.num_mel_bins]
    predicted = served.predict({"input_values": inputs["input_values"].numpy()})["logits"]
    assert np.abs(predicted - torch_logits(model, inputs)).max() < TOLERANCE

    # a second registration is version 2; a point that does not exist is named with the front's points
    assert report(EXPERIMENT, runs_dir=runs, shipping=Shipping(register="tiny-ast", point=f"{trial}/{step}")) == 0
    assert client.get_model_version("tiny-ast", "2").tags["trial"] == trial
    with pytest.raises(ValueError, match=r"--point nosuch/3: no such \(trial, step\).*the front's points: "):
        report(EXPERIMENT, runs_dir=runs, shipping=Shipping(register="tiny-ast", point="nosuch/3"))


def test_the_registered_model_serves_as_the_readme_says(runs, tmp_path):
    """`mlflow models serve -m models:/NAME/1 --env-manager local` on 127.0.0.1 answers /invocations with the
    PyTorch checkpoint's logits; stopped after."""
    state = load_state(runs, EXPERIMENT)
    client = MlflowClient(state.tracking_uri)
    version = client.get_model_version("tiny-ast", "1")  # registered by the test above
    model = load_pruned(Path(version.tags["checkpoint"])).eval()
    port = free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": state.tracking_uri, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    process = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", "models:/tiny-ast/1", "--env-manager",
                                "local", "--host", "127.0.0.1", "--port", str(port)], env=env, stdout=log.open("w"),
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            assert process.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        inputs = without_labels(ast_batches(size=2, seed=6)[0])
        inputs["input_values"] = inputs["input_values"][:, : model.config.max_length, : model.config.num_mel_bins]
        body = json.dumps({"inputs": {"input_values": inputs["input_values"].tolist()}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as answer:
            logits = np.array(json.loads(answer.read())["predictions"]["logits"], dtype=np.float32)
    finally:
        stop(process)
    assert np.abs(logits - torch_logits(model, inputs)).max() < TOLERANCE


def test_shipping_requests_are_validated():
    with pytest.raises(ValueError, match="choose its model with --point TRIAL/STEP or --best-within"):
        Shipping(register="m")
    with pytest.raises(ValueError, match="give a name"):
        Shipping(best_within=1.0)
    with pytest.raises(ValueError, match="expected TRIAL/STEP"):
        Shipping(register="m", point="3f2a1_00004")
