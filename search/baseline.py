"""The dense baseline a search prunes: a small model trained from scratch (an AST on spectrograms, a ViT on
images, a BERT on token ids: the data's input decides), or a pretrained checkpoint fine-tuned.

Training is cached: a baseline folder whose record matches the data's content hash and the settings
is reused as it is.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from data_prep.loader import LoaderConfig, input_spec, make_loader, read_manifest, soft_target_loss
from prune_core import build_ast, build_bert, build_vit, load_model, total_params
from prune_core.models import set_labels
from prune_core.batches import to_device
from prune_core.finetune import train_step
from prune_core.metrics import METRIC_NAME, evaluate

RECORD = "baseline.json"


@dataclass(frozen=True)
class BaselineConfig:
    """Model size and training recipe; defaults are the demo's (about 0.57M parameters)."""

    init: str | None = None  # a pretrained checkpoint to fine-tune instead of training from scratch
    hidden_size: int = 96
    num_layers: int = 5
    num_heads: int = 6
    intermediate_size: int = 384
    epochs: int = 28
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: float = 0.15
    spec_augment: bool = False  # from scratch on 4k clips it slows convergence more than it helps
    freq_mask: int = 8
    time_mask: int = 12
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"baseline {name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"baseline hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        if not 0 < self.lr < 1 or not 0 <= self.warmup < 1:
            raise ValueError(f"baseline lr must be in (0, 1) and warmup in [0, 1); got {self.lr}, {self.warmup}")


def _ast(config: BaselineConfig, manifest: dict) -> torch.nn.Module:
    time, mel = input_spec(manifest)[1]
    return build_ast(
        num_labels=len(manifest["labels"]), hidden_size=config.hidden_size, num_layers=config.num_layers,
        num_heads=config.num_heads, intermediate_size=config.intermediate_size, num_mel_bins=mel, max_length=time,
        multi_label=manifest["task"] == "multi_label", labels=manifest["labels"],
    )


def _vit(config: BaselineConfig, manifest: dict) -> torch.nn.Module:
    channels, height, width = input_spec(manifest)[1]
    if height != width:
        raise ValueError(f"the ViT baseline needs square images; the data's features.shape is {[channels, height, width]}")
    return build_vit(
        num_labels=len(manifest["labels"]), hidden_size=config.hidden_size, num_layers=config.num_layers,
        num_heads=config.num_heads, intermediate_size=config.intermediate_size, image_size=height,
        num_channels=channels, labels=manifest["labels"],
    )


def _bert(config: BaselineConfig, manifest: dict) -> torch.nn.Module:
    (length,) = input_spec(manifest)[1]
    vocab_size = manifest["features"].get("vocab_size")
    if not isinstance(vocab_size, int) or vocab_size < 2:
        raise ValueError(f"manifest.json features.vocab_size must give the token vocabulary for a BERT, got {vocab_size!r}")
    return build_bert(
        num_labels=len(manifest["labels"]), vocab_size=vocab_size, max_length=length,
        hidden_size=config.hidden_size, num_layers=config.num_layers, num_heads=config.num_heads,
        intermediate_size=config.intermediate_size, labels=manifest["labels"],
    )


# The model trained from scratch for each kind of input a data set can hold.
FAMILIES = {"input_values": _ast, "pixel_values": _vit, "input_ids": _bert}


def _model(config: BaselineConfig, manifest: dict, data: Path) -> torch.nn.Module:
    labels = manifest["labels"]
    key = input_spec(manifest)[0]
    if config.init:
        model = load_model(config.init, num_labels=len(labels), ignore_mismatched_sizes=True)
        if model.main_input_name != key:
            raise ValueError(
                f"--init {config.init} takes {model.main_input_name}, but {data} holds {key}: fine-tune a checkpoint "
                "of the data's modality"
            )
        set_labels(model.config, labels)
        multi = manifest["task"] == "multi_label"
        model.config.problem_type = "multi_label_classification" if multi else "single_label_classification"
        return model
    if key not in FAMILIES:
        raise ValueError(f"{data}: no model is trained from scratch on {key!r} inputs; known: {sorted(FAMILIES)}")
    return FAMILIES[key](config, manifest)


def train_baseline(data: str | Path, out: str | Path, config: BaselineConfig = BaselineConfig()) -> dict:
    """Train (or reuse) the baseline in `out`; returns its record (metrics, seconds, settings)."""
    data, out = Path(data), Path(out)
    manifest = read_manifest(data)
    wanted = {"data": manifest["content_hash"], "settings": asdict(config)}
    record_path = out / RECORD
    if record_path.is_file() and (out / "config.json").is_file():
        record = json.loads(record_path.read_text())
        if {k: record.get(k) for k in wanted} == wanted:
            print(f"baseline: reusing {out} ({record['metric']} {record['test']:.4f} on test)")
            return record
    torch.manual_seed(config.seed)
    task, metric = manifest["task"], METRIC_NAME[manifest["task"]]
    loader = LoaderConfig(
        batch_size=config.batch_size, spec_augment=config.spec_augment, freq_mask=config.freq_mask,
        time_mask=config.time_mask, seed=config.seed,
    )
    train = make_loader(data, "train", loader, train=True)
    validation = make_loader(data, "validation", loader, train=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = _model(config, manifest, data).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=config.epochs * len(train), pct_start=config.warmup
    )
    started, best, best_state = time.perf_counter(), -1.0, None
    for epoch in range(config.epochs):
        model.train()
        for batch in train:
            train_step(model, to_device(batch, device), soft_target_loss, optimizer, schedule, max_grad_norm=1.0)
        score = evaluate(model, validation, task)[metric]
        if score > best:
            best, best_state = score, {k: v.clone() for k, v in model.state_dict().items()}
        print(f"baseline epoch {epoch + 1}/{config.epochs}: validation {metric} {score:.4f} ({time.perf_counter() - started:.0f} s)")
    model.load_state_dict(best_state)
    test = evaluate(model, make_loader(data, "test", loader, train=False), task)[metric]
    model.save_pretrained(out)
    record = {
        **wanted,
        "metric": metric,
        "validation": best,
        "test": test,
        "params": total_params(model),
        "seconds": round(time.perf_counter() - started, 1),
    }
    record_path.write_text(json.dumps(record, indent=2))
    print(f"baseline: {total_params(model):,} parameters, test {metric} {test:.4f}, saved to {out}")
    return record
