"""Save and load pruned models: safetensors weights, config.json and a JSON of per-layer shapes.

A layer whose heads differ in dims (after `variable_per_head`) lists them per head; the others keep
the uniform form (`num_heads`, `qk_head_dim`, `v_head_dim`), so files from before read the same. A
headless layer (`min_heads=0`) is `num_heads: 0` with empty per-head lists; its zero-size Q/K/V and O
weights are in the safetensors file like any other, and O's bias with them.

Nothing is unpickled on load: the model class is looked up by name in `transformers`, built from its
config, resized to the saved shapes, then filled from safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import transformers
from safetensors.torch import load_model, save_model
from torch import nn

from prune_core.accounting import dense_record
from prune_core.adapters import attention_sites
from prune_core.attention import LayerShape
from prune_core.removal import resize

SHAPES_FILE = "pruning.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = 1


def save_pruned(model: nn.Module, directory: str | Path, history: list[dict] | None = None) -> Path:
    """Write `model` (pruned or dense) to `directory`; returns the directory.

    `history`, the steps that pruned it (`PruningSession.history`), is kept in the shapes file.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sites = attention_sites(model)
    record = dense_record(model)
    description = {
        "format": FORMAT,
        "architecture": type(model).__name__,
        "dense_attention_params": record["dense_attention_params"],
        "layers": [{"path": site.path, **site.shape.to_dict()} for site in sites],
    }
    if history:
        description["history"] = history
    model.config.save_pretrained(directory)
    save_model(model, str(directory / WEIGHTS_FILE))
    (directory / SHAPES_FILE).write_text(json.dumps(description, indent=2))
    return directory


def load_pruned(directory: str | Path, device: str = "cpu") -> nn.Module:
    """Rebuild a model saved by `save_pruned`; outputs are identical to the saved model's."""
    directory = Path(directory)
    shapes_file = directory / SHAPES_FILE
    if not shapes_file.is_file():
        raise FileNotFoundError(f"{shapes_file} not found: is {directory} a directory written by save_pruned?")
    description = json.loads(shapes_file.read_text())
    if description.get("format") != FORMAT:
        raise ValueError(f"{shapes_file}: unsupported format {description.get('format')!r}, expected {FORMAT}")
    architecture = description["architecture"]
    model_class = getattr(transformers, architecture, None)
    if not (isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)):
        raise ValueError(f"{shapes_file}: architecture {architecture!r} is not a transformers model class")
    config = transformers.AutoConfig.from_pretrained(directory)
    model = model_class(config)
    sites = attention_sites(model)
    if len(sites) != len(description["layers"]):
        raise ValueError(f"{shapes_file}: {len(description['layers'])} layers described, the model has {len(sites)}")
    for site, layer in zip(sites, description["layers"]):
        if site.path != layer["path"]:
            raise ValueError(f"{shapes_file}: layer {layer['path']!r} where the model has {site.path!r}")
        try:
            shape = LayerShape.from_dict(layer)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{shapes_file}: layer {layer['path']!r} has no valid shape: {error!r}") from error
        resize(model, site, shape)
    load_model(model, str(directory / WEIGHTS_FILE), strict=True)
    return model.to(device).eval()
