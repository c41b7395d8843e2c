"""LoRA recovery between prune steps: wrap with PEFT, train, merge back into plain Linear layers."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sized
from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from prune_core.adapters import attention_sites
from prune_core.batches import Batch, LossFn, default_loss, mean_loss, to_device

TARGET_PRESETS = ("all_linear", "attention")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA fine-tuning after each prune step; defaults are the authors' (r16, alpha 16, every Linear)."""

    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] = "all_linear"
    lr: float = 1e-4
    epochs: int = 1
    weight_decay: float = 0.0
    warmup: float = 0.05
    max_grad_norm: float = 1.0
    patience: int = 1

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora rank must be >= 1, got {self.rank}")
        if self.alpha <= 0 or self.lr <= 0:
            raise ValueError(f"lora alpha and lr must be > 0, got alpha={self.alpha}, lr={self.lr}")
        if self.epochs < 0:
            raise ValueError(f"lora epochs must be >= 0, got {self.epochs}")
        if not 0 <= self.warmup < 1 or not 0 <= self.dropout < 1:
            raise ValueError(f"lora warmup and dropout must be in [0, 1), got {self.warmup}, {self.dropout}")
        if isinstance(self.target_modules, str) and self.target_modules not in TARGET_PRESETS:
            raise ValueError(f"lora target_modules must be one of {TARGET_PRESETS} or a list of module names")


def target_names(model: nn.Module, targets: str | tuple[str, ...]) -> list[str]:
    """Full module names LoRA attaches to: every Linear (MLP and classifier included) or attention only."""
    if targets == "attention":
        sites = attention_sites(model)
        names = [f"{s.path}.{name}" for s in sites for name in s.attention.names[:3]] + [s.o_path for s in sites]
        return names
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if targets == "all_linear":
        return linear
    chosen = [name for name in linear if name.rsplit(".", 1)[-1] in targets or name in targets]
    if not chosen:
        raise ValueError(f"lora target_modules {list(targets)} match no Linear layer of the model")
    return chosen


def _schedule(optimizer: torch.optim.Optimizer, total: int, warmup: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to zero (the authors' schedule)."""
    warm = max(1, int(total * warmup))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_step(
    model: nn.Module,
    batch: Batch,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    max_grad_norm: float,
) -> None:
    """One optimizer step on `batch`: loss, gradients clipped to `max_grad_norm` over the optimizer's
    parameters, step, then the learning-rate schedule's step. LoRA recovery and the dense baseline both
    train with it."""
    loss = loss_fn(model, batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], max_grad_norm)
    optimizer.step()
    scheduler.step()


def lora_finetune(
    model: nn.Module,
    train: Iterable[Batch],
    settings: LoraSettings,
    *,
    validation: Iterable[Batch] | None = None,
    loss_fn: LossFn | None = None,
) -> nn.Module:
    """Fine-tune `model` through LoRA adapters, merge them, and return the plain (merged) model.

    With `validation`, training stops early once the validation loss has not improved for
    `patience` epochs, and the best adapters are kept.
    """
    if settings.epochs == 0:
        return model
    if not isinstance(train, Sized) or len(train) == 0:
        raise ValueError("lora_finetune needs a non-empty training set with a length (a DataLoader or a list)")
    loss_fn = loss_fn or default_loss
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=target_names(model, settings.target_modules),
    )
    peft_model = get_peft_model(model, config)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = _schedule(optimizer, settings.epochs * len(train), settings.warmup)
    device = next(model.parameters()).device
    best_loss, best_state, stale = math.inf, None, 0
    for _ in range(settings.epochs):
        peft_model.train()
        for batch in train:
            train_step(peft_model, to_device(batch, device), loss_fn, optimizer, scheduler, settings.max_grad_norm)
        if validation is None:
            continue
        loss = mean_loss(peft_model, validation, loss_fn)
        if loss < best_loss:
            best_loss, stale = loss, 0
            best_state = {name: p.detach().clone() for name, p in peft_model.named_parameters() if p.requires_grad}
        else:
            stale += 1
            if stale >= settings.patience:
                break
    if best_state is not None:
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if name in best_state:
                    param.copy_(best_state[name])
    merged = peft_model.merge_and_unload()
    merged.eval()
    for param in merged.parameters():
        param.requires_grad_(True)
    return merged
