"""Evaluation: accuracy for single-label tasks, mAP for multi-label (AudioSet style)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from prune_core.batches import Batch, LossFn, eval_mode, to_device
from prune_core.registry import check

METRIC_NAME = {"single_label": "accuracy", "multi_label": "mAP"}
TASKS = tuple(METRIC_NAME)  # the label task kinds, here and in prepared data sets' manifests


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of samples whose arg-max class is the label (labels: class indices, or one-hot/soft rows)."""
    if labels.dim() == 2:
        labels = labels.argmax(-1)
    return (logits.argmax(-1) == labels).float().mean().item()


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Average precision of one class: mean precision at the rank of each positive."""
    order = torch.argsort(scores, descending=True, stable=True)
    hits = targets[order].float()
    if hits.sum() == 0:
        return float("nan")
    precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1, device=hits.device)
    return (precision * hits).sum().item() / hits.sum().item()


def mean_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """mAP over the classes that have at least one positive (as AudioSet evaluations do)."""
    values = [average_precision(scores[:, c], targets[:, c]) for c in range(scores.shape[1])]
    present = [v for v in values if v == v]
    if not present:
        raise ValueError("mAP is undefined: no class has a positive sample in the evaluation set")
    return sum(present) / len(present)


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Iterable[Batch], task: str = "single_label", loss_fn: LossFn | None = None
) -> dict[str, float]:
    """Mean loss and the task's metric ('accuracy' or 'mAP') over `batches`; one forward per batch
    unless a custom `loss_fn` is given."""
    check("task", task, TASKS)
    device = next(model.parameters()).device
    logits, labels, losses, count = [], [], 0.0, 0
    with eval_mode(model):
        for batch in batches:
            batch = to_device(batch, device)
            output = model(**batch)
            loss = output.loss if loss_fn is None else loss_fn(model, batch)
            size = batch["labels"].shape[0]
            losses += loss.item() * size
            count += size
            logits.append(output.logits.float().cpu())
            labels.append(batch["labels"].cpu())
    if count == 0:
        raise ValueError("evaluation got no batches")
    all_logits, all_labels = torch.cat(logits), torch.cat(labels)
    if task == "single_label":
        metric = accuracy(all_logits, all_labels)
    else:
        metric = mean_average_precision(torch.sigmoid(all_logits), all_labels)
    return {"loss": losses / count, METRIC_NAME[task]: metric}
