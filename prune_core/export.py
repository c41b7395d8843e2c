"""Export a dense or pruned model to ONNX, for ONNX Runtime (or TensorRT from ONNX) and MLflow's onnx flavour.

torch's dynamo exporter (`torch.onnx.export(..., dynamo=True)`, torch 2.9's default) traces the model as it is: a
pruned layer's ragged heads, zero-padded Q/K vs V dims and headless layers export as plain tensor ops, so every
granularity needs nothing of its own. The graph takes the family's inputs by name (`input_values`, `pixel_values`,
`input_ids` with `attention_mask`) with a dynamic batch, and a dynamic length for text, and returns `logits`. Opset
23 (the default) exports attention as ONNX's `Attention` op, which ONNX Runtime runs fused; at opset 18 attention
becomes matmul + softmax over the full score matrix. The TorchScript exporter (`dynamo=False`) is not used: on
transformers 5's BERT it traces an embedding graph that ONNX Runtime computes wrongly (logits off by up to 1e-2 on a
tiny BERT).
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import torch
from torch import nn

from prune_core.adapters import example_input

DEFAULT_OPSET = 23  # ONNX Attention op: ONNX Runtime runs it fused (2x faster at 1,214 tokens than opset 18)
TEXT_INPUTS = ("input_ids", "attention_mask")  # inputs whose length (dim 1) is the model's sequence, free


class ExportError(ValueError):
    """The exporter cannot handle the model; the message names the module where it failed."""


class _Logits(nn.Module):
    """The model with named tensor inputs and its logits as the one output (what the ONNX graph takes and
    gives). The dynamo exporter needs named parameters: it refuses `**inputs`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_values: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        given = {"input_values": input_values, "pixel_values": pixel_values, "input_ids": input_ids,
                 "attention_mask": attention_mask}
        return self.model(**{name: value for name, value in given.items() if value is not None}).logits


def export_inputs(model: nn.Module, batch: int = 2, tokens: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs of the model's family, `batch` rows: what the exporter traces and a parity check feeds.

    Text models get `tokens` positions (default: the adapter's) and an `attention_mask` whose last row is
    half padding, so that a parity check covers padded rows. Audio and image
    models have a fixed number of tokens (their position embeddings'), so `tokens` is refused for them.
    """
    sample = example_input(model)
    generator = torch.Generator().manual_seed(seed)
    if tokens is not None and "input_ids" not in sample:
        raise ValueError(f"tokens={tokens}: a {model.config.model_type} model's input size is fixed by its config "
                         f"(its inputs: {', '.join(f'{k} {tuple(v.shape[1:])}' for k, v in sample.items())}); only "
                         "text models take a token count")
    if tokens is not None and not 1 <= tokens <= model.config.max_position_embeddings:
        raise ValueError(f"tokens={tokens}: expected 1 to the model's max_position_embeddings "
                         f"({model.config.max_position_embeddings})")
    inputs = {}
    for name, value in sample.items():
        if value.dtype.is_floating_point:
            inputs[name] = torch.randn(batch, *value.shape[1:], generator=generator)
        else:
            length = tokens or value.shape[1]
            inputs[name] = torch.randint(0, model.config.vocab_size, (batch, length), generator=generator)
    if "input_ids" in inputs:
        mask = torch.ones_like(inputs["input_ids"])
        mask[-1, max(1, mask.shape[1] // 2):] = 0
        inputs["attention_mask"] = mask
    return inputs


def export_onnx(model: nn.Module, path: str | Path, *, tokens: int | None = None, opset: int = DEFAULT_OPSET) -> Path:
    """Write `model` (dense or pruned, on CPU) as an ONNX graph to `path`; returns the path.

    Dynamic batch (and sequence length for text); the weights are stored in the file. Raises `ExportError`
    naming the innermost module the exporter fails on.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    inputs = export_inputs(model, tokens=tokens)
    try:
        program = _export(_Logits(model), inputs, opset)
    except Exception as error:  # noqa: BLE001 - any exporter failure is reported with the module it failed in
        culprit = _failing_module(model, inputs, opset)
        where = f"module '{culprit}' ({type(model.get_submodule(culprit)).__name__})" if culprit else "the model"
        raise ExportError(f"the ONNX exporter cannot handle {where} of {type(model).__name__}: "
                          f"{_reason(error)}") from error
    finally:
        model.train(was_training)
    program.save(str(path))
    return path


def _reason(error: Exception) -> str:
    """The exporter's one-line cause: its summary names the innermost exception as `<class '...'>: message`."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    summary = next((line for line in lines if line.startswith("<class ")), None)
    return summary or (lines[0] if lines else repr(error))


def _dynamic_shapes(inputs: dict[str, torch.Tensor]) -> dict[str, dict[int, object]]:
    dynamic = torch.export.Dim.DYNAMIC
    return {name: {0: dynamic, 1: dynamic} if name in TEXT_INPUTS else {0: dynamic} for name in inputs}


@contextlib.contextmanager
def _quiet():
    """The exporter prints its progress to stdout, a failed trace's graph to stderr and a warning per
    torchvision op it skips."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def _export(module: _Logits, inputs: dict[str, torch.Tensor], opset: int):
    with _quiet(), torch.no_grad():
        return torch.onnx.export(module, (), None, kwargs=inputs, dynamo=True, opset_version=opset, optimize=True,
                                 output_names=["logits"], dynamic_shapes=_dynamic_shapes(inputs))


def _failing_module(model: nn.Module, inputs: dict[str, torch.Tensor], opset: int) -> str | None:
    """The innermost submodule that fails to export on its own, with the inputs it gets in `model`: from the
    root down, the first failing child at each level (None when every child exports alone)."""
    captured: dict[str, tuple[tuple, dict]] = {}

    def record(name: str):
        def hook(module, args, kwargs):
            captured.setdefault(name, (args, kwargs))
        return hook

    handles = [module.register_forward_pre_hook(record(name), with_kwargs=True)
               for name, module in model.named_modules() if name]
    try:
        with torch.no_grad():
            model(**inputs)
    except Exception:  # noqa: BLE001 - the model does not even run eagerly: no finer place to name
        return None
    finally:
        for handle in handles:
            handle.remove()
    found = None
    while True:
        failing = next((child for child in _called_children(model, found or "", captured)
                        if not _exports_alone(model.get_submodule(child), *captured[child], opset)), None)
        if failing is None:
            return found
        found = failing


def _called_children(model: nn.Module, path: str, captured: dict) -> list[str]:
    """The nearest modules under `path` that were called, looking through containers that are not (ModuleList)."""
    called = []
    for name, _ in model.get_submodule(path).named_children():
        child = f"{path}.{name}" if path else name
        called.extend([child] if child in captured else _called_children(model, child, captured))
    return called


def _exports_alone(module: nn.Module, args: tuple, kwargs: dict, opset: int) -> bool:
    try:
        with _quiet(), torch.no_grad():
            torch.onnx.export(module, args, None, kwargs=kwargs, dynamo=True, opset_version=opset, optimize=False)
    except Exception:  # noqa: BLE001 - failing here is the answer
        return False
    return True
