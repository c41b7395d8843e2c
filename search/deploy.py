"""Ship what the search finds: an ONNX file checked against PyTorch in ONNX Runtime, an MLflow `onnx` model on
the point's run, and a version in the MLflow Model Registry.

MLflow's `onnx` flavour loads and serves a model with ONNX Runtime alone, so nothing of this project is
unpickled where the model runs (`mlflow.pytorch` would pickle `PrunedAttention`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from prune_core import load_model, load_pruned
from prune_core.export import DEFAULT_OPSET, TEXT_INPUTS, export_inputs, export_onnx

PARITY_TOLERANCE = 1e-4  # max |logits(ONNX Runtime) - logits(PyTorch)| an export must stay within
ONNX_FOLDER = "onnx-model-step-{step}"  # the MLflow model of a front point, on its trial segment's run


def load_saved(model: str | Path) -> nn.Module:
    """A `save_pruned` directory, a `save_pretrained` directory or a hub id, as a model in eval mode."""
    source = Path(model)
    return (load_pruned(source) if (source / "pruning.json").is_file() else load_model(str(model))).eval()


def onnx_parity(model: nn.Module, path: str | Path, tokens: int | None = None) -> float:
    """The largest |logit| difference between ONNX Runtime (CPU) and PyTorch on random inputs of batch 2 and 1
    (and, for text, a shorter sequence too): the batch, and a text model's length, must really be dynamic."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    cases = [export_inputs(model, batch=2, tokens=tokens, seed=1), export_inputs(model, batch=1, tokens=tokens, seed=2)]
    if "input_ids" in cases[0]:
        length = cases[0]["input_ids"].shape[1]
        cases.append(export_inputs(model, batch=3, tokens=max(2, length // 2), seed=3))
    worst = 0.0
    for inputs in cases:
        (logits,) = session.run(["logits"], {name: value.numpy() for name, value in inputs.items()})
        with torch.no_grad():
            expected = model(**inputs).logits.numpy()
        worst = max(worst, float(np.abs(logits - expected).max()))
    return worst


def export_checked(model: nn.Module, out: str | Path, *, tokens: int | None = None, opset: int = DEFAULT_OPSET,
                   tolerance: float = PARITY_TOLERANCE) -> float:
    """Export `model` to `out` and check it in ONNX Runtime; returns the largest logit difference.

    Raises ValueError (the file is kept, for inspection) when ONNX Runtime's logits are off by more than `tolerance`.
    """
    export_onnx(model, out, tokens=tokens, opset=opset)
    worst = onnx_parity(model, out, tokens)
    if worst > tolerance:
        raise ValueError(f"{out}: ONNX Runtime's logits differ from PyTorch's by up to {worst:.2e} (> {tolerance:g}); "
                         "the file is kept for inspection, do not ship it")
    return worst


def signature(model: nn.Module, tokens: int | None = None):
    """The MLflow signature of the exported graph: the family's inputs by name with a dynamic batch (and, for
    text, length), `logits` (batch, labels) out. Inferred from an example, the length would be fixed."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    inputs = export_inputs(model, batch=1, tokens=tokens)
    specs = [TensorSpec(np.dtype(str(value.numpy().dtype)), (-1, -1) if name in TEXT_INPUTS else (-1, *value.shape[1:]), name)
             for name, value in inputs.items()]
    return ModelSignature(Schema(specs), Schema([TensorSpec(np.dtype("float32"), (-1, model.config.num_labels), "logits")]))


def log_onnx_model(client, run_id: str, model: nn.Module, step: int, *, tokens: int | None = None) -> str:
    """Export `model` (checked), save it as an MLflow `onnx` model with signature and input example, and attach
    it to run `run_id` as `onnx-model-step-<step>`, unless it is there already; returns its `runs:/` URI."""
    import mlflow.onnx
    import onnx

    folder = ONNX_FOLDER.format(step=step)
    uri = f"runs:/{run_id}/{folder}"
    if any(entry.path == f"{folder}/MLmodel" for entry in client.list_artifacts(run_id, folder)):
        return uri
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "model.onnx"
        export_checked(model, path, tokens=tokens)
        example = {name: value.numpy() for name, value in export_inputs(model, batch=1, tokens=tokens).items()}
        saved = Path(scratch) / "mlflow-model"
        mlflow.onnx.save_model(onnx.load(str(path)), str(saved), signature=signature(model, tokens),
                               input_example=example)
        client.log_artifacts(run_id, str(saved), artifact_path=folder)
    return uri


def register(client, run_id: str, step: int, name: str, tags: Mapping[str, object]):
    """Register the MLflow model `log_onnx_model` attached to run `run_id` at `step` as a new version of `name`
    (created if new), with `tags`; returns the version."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{ONNX_FOLDER.format(step=step)}"
    return client.create_model_version(name, source, run_id=run_id, tags={key: str(value) for key, value in tags.items()})
