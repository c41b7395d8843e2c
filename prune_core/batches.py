"""Batches as models take them (dicts with `input_values`/`labels`...), the default loss, and eval mode
for passes that must not change the model."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

Batch = Mapping[str, Any]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


def default_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The loss a transformers model computes itself when given `labels`."""
    return model(**batch).loss


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """`model` in eval mode (no dropout) for the block, then back in the mode it had, errors included."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def to_device(batch: Batch, device: torch.device) -> dict[str, Any]:
    return {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}


@torch.no_grad()
def mean_loss(model: nn.Module, batches: Iterable[Batch], loss_fn: LossFn = default_loss) -> float:
    """Sample-weighted mean loss over `batches`, in eval mode."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with eval_mode(model):
        for batch in batches:
            batch = to_device(batch, device)
            size = batch["labels"].shape[0]
            total += loss_fn(model, batch).item() * size
            count += size
    if count == 0:
        raise ValueError("no batches to compute a loss on")
    return total / count
