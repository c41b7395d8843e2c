"""Accounting: attention parameters (now and dense), sparsity, total parameters and MACs per sample."""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping

import torch
from torch import nn

from prune_core.adapters import attention_sites, example_input
from prune_core.attention import LayerShape, PrunedAttention
from prune_core.batches import eval_mode

RECORD = "attention_pruning"  # key in model.config: the dense shapes, saved with the model


def attention_params(model: nn.Module) -> int:
    """All Q/K/V/O weights and biases the model holds now."""
    return sum(site.shape.params for site in attention_sites(model))


def dense_record(model: nn.Module) -> dict:
    """The dense model's attention shapes, recorded in `model.config` the first time it is pruned."""
    record = getattr(model.config, RECORD, None)
    if record is None:
        shapes = [site.shape.to_dict() for site in attention_sites(model)]
        record = {"dense_attention_params": attention_params(model), "dense_layers": shapes}
        setattr(model.config, RECORD, record)
    return record


def attention_sparsity(model: nn.Module) -> float:
    """Fraction of the dense model's attention parameters that are gone (0.0 for a dense model)."""
    record = getattr(model.config, RECORD, None)
    if record is None:
        return 0.0
    return 1.0 - attention_params(model) / record["dense_attention_params"]


def layer_sparsity(model: nn.Module) -> list[float]:
    """Per layer, the fraction of its dense attention parameters that is gone (where strategies prune)."""
    dense = [LayerShape.from_dict(shape).params for shape in dense_record(model)["dense_layers"]]
    return [1.0 - site.shape.params / total for site, total in zip(attention_sites(model), dense)]


def total_params(model: nn.Module) -> int:
    return sum(param.numel() for param in model.parameters())


@torch.no_grad()
def macs_per_sample(model: nn.Module, inputs: Mapping[str, torch.Tensor] | None = None) -> int:
    """Multiply-accumulates of one forward pass on one sample: Linear and Conv layers plus attention matmuls.

    Attention matmuls count the kept channels of every head; the zero padding with which heads of
    different dims run in one kernel call is an implementation cost, not counted. A headless layer
    counts nothing: it runs no projection and no matmul, and adding O's bias is no multiply.

    `inputs` is one sample as the model takes it; by default a zero sample of the configured size.
    """
    attention_sites(model)
    inputs = dict(inputs) if inputs is not None else example_input(model)
    total = 0

    def count(module: nn.Module, args: tuple, output) -> None:
        nonlocal total
        if isinstance(module, nn.Linear):
            total += output.numel() * module.in_features
        elif isinstance(module, nn.Conv2d):
            kernel = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            total += output.numel() * kernel
        elif isinstance(module, PrunedAttention):
            batch, tokens = args[0].shape[:2]
            total += batch * tokens * tokens * (sum(module.qk_dims) + sum(module.v_dims))

    handles = [
        module.register_forward_hook(count)
        for module in model.modules()
        if isinstance(module, (nn.Linear, nn.Conv2d, PrunedAttention))
    ]
    try:
        with eval_mode(model):
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    batch = next(iter(inputs.values())).shape[0]
    return total // batch


@torch.inference_mode()
def latency_ms(
    model: nn.Module, inputs: Mapping[str, torch.Tensor] | None = None, repeats: int = 20, warmup: int = 3
) -> float:
    """Median wall time of one forward pass in milliseconds, synchronising the GPU around each run."""
    inputs = dict(inputs) if inputs is not None else example_input(model)
    device = next(model.parameters()).device
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with eval_mode(model):
        for _ in range(warmup):
            model(**inputs)
        times = []
        for _ in range(repeats):
            synchronize()
            start = time.perf_counter()
            model(**inputs)
            synchronize()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
