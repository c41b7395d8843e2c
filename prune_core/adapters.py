"""Model adapters: where each encoder family keeps its attention, and how to adopt it.

An adapter turns a family's attention module into a `PrunedAttention` at the same path with the
same projection names, so state-dict keys and PEFT targets stay the family's own. Adding a family
is one `Adapter` in `ADAPTERS`, under the family's `model_type`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from prune_core.attention import LayerShape, PrunedAttention


class UnsupportedModelError(TypeError):
    """The model has attention that no adapter knows how to prune."""


@dataclass(frozen=True)
class Adapter:
    """One encoder family's attention: its class name and where its four projections live.

    `names` are Q, K, V (and O when it sits in the same module). When O sits elsewhere,
    `o_path` is its path relative to the attention module's parent.
    """

    attention_class: str
    names: tuple[str, ...]
    o_path: str | None = None
    head_dim_attr: str = "head_dim"
    dropout_attr: str = "attention_dropout"
    example_input: Callable[[object], dict[str, torch.Tensor]] | None = None

    def adopt(self, module: nn.Module, path: str) -> PrunedAttention:
        """A `PrunedAttention` taking over `module`'s weights."""
        if getattr(module, "is_decoder", False) or getattr(module, "is_causal", False):
            raise UnsupportedModelError(
                f"{path} ({type(module).__name__}) is causal or decoder attention; prune_core prunes encoder "
                "self-attention only"
            )
        projections = {name: getattr(module, name, None) for name in self.names}
        missing = [name for name, linear in projections.items() if not isinstance(linear, nn.Linear)]
        if missing:
            raise UnsupportedModelError(
                f"{path} ({type(module).__name__}) has no nn.Linear {missing}; its adapter expects {list(self.names)}"
            )
        dropout = getattr(module, self.dropout_attr)
        head_dim = getattr(module, self.head_dim_attr)
        pruned = PrunedAttention(
            projections,
            qk_dims=(head_dim,) * module.num_attention_heads,
            v_dims=(head_dim,) * module.num_attention_heads,
            scaling=module.scaling,
            dropout=dropout.p if isinstance(dropout, nn.Dropout) else float(dropout),
            config=module.config,
            o_sibling=self.o_path,
        )
        pruned.train(module.training)
        return pruned


ADAPTERS: dict[str, Adapter] = {  # keyed by the family's `model_type`
    "audio-spectrogram-transformer": Adapter(
        "ASTAttention",
        ("q_proj", "k_proj", "v_proj", "o_proj"),
        example_input=lambda c: {"input_values": torch.zeros(1, c.max_length, c.num_mel_bins)},
    ),
    "vit": Adapter(
        "ViTAttention",
        ("q_proj", "k_proj", "v_proj", "o_proj"),
        example_input=lambda c: {"pixel_values": torch.zeros(1, c.num_channels, c.image_size, c.image_size)},
    ),
    "bert": Adapter(
        "BertSelfAttention",
        ("query", "key", "value"),
        o_path="output.dense",
        head_dim_attr="attention_head_size",
        dropout_attr="dropout",
        example_input=lambda c: {"input_ids": torch.zeros(1, min(128, c.max_position_embeddings), dtype=torch.long)},
    ),
}


def example_input(model: nn.Module) -> dict[str, torch.Tensor]:
    """One zero sample at the model's configured input size (for MAC counts and latency)."""
    family = getattr(model.config, "model_type", None)
    adapter = ADAPTERS.get(family)
    if adapter is None or adapter.example_input is None:
        raise UnsupportedModelError(f"no example input known for model type {family!r}; pass one explicitly")
    device = next(model.parameters()).device
    return {key: value.to(device) for key, value in adapter.example_input(model.config).items()}


@dataclass(frozen=True)
class AttentionSite:
    """One attention layer of a model: its module, its O projection and O's path in the model."""

    path: str
    attention: PrunedAttention
    o_path: str
    o_proj: nn.Linear

    @property
    def shape(self) -> LayerShape:
        return LayerShape(
            qk_dims=self.attention.qk_dims,
            v_dims=self.attention.v_dims,
            hidden_size=self.attention.projection("q").in_features,
        )


def _adapter_for(module: nn.Module) -> Adapter | None:
    name = type(module).__name__
    return next((adapter for adapter in ADAPTERS.values() if adapter.attention_class == name), None)


def _looks_like_attention(module: nn.Module) -> bool:
    return isinstance(module, nn.MultiheadAttention) or "attention" in type(module).__name__.lower()


def attention_sites(model: nn.Module) -> list[AttentionSite]:
    """Every attention layer of `model`, in order, adopted into `PrunedAttention` (idempotent).

    Raises `UnsupportedModelError` naming the first attention module no adapter handles.
    """
    sites: list[AttentionSite] = []
    for path, module in list(model.named_modules()):
        if any(path.startswith(site.path + ".") for site in sites):
            continue
        if not isinstance(module, PrunedAttention):
            adapter = _adapter_for(module)
            if adapter is None:
                if _looks_like_attention(module) and not _contains_known_attention(module):
                    raise UnsupportedModelError(
                        f"cannot prune attention module '{path}' ({type(module).__name__}): no adapter for it. "
                        f"Supported: {', '.join(a.attention_class for a in ADAPTERS.values())}. "
                        "Add an Adapter in prune_core/adapters.py."
                    )
                continue
            module = adapter.adopt(module, path)
            model.set_submodule(path, module)
        parent_path = path.rpartition(".")[0]
        if module.o_sibling is None:
            o_path = f"{path}.{module.names[3]}"
        else:
            o_path = f"{parent_path}.{module.o_sibling}" if parent_path else module.o_sibling
        sites.append(AttentionSite(path, module, o_path, model.get_submodule(o_path)))
    if not sites:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no attention layer prune_core can prune; supported: "
            f"{', '.join(a.attention_class for a in ADAPTERS.values())}"
        )
    return sites


def _contains_known_attention(module: nn.Module) -> bool:
    """Wrappers such as BertAttention hold a supported attention module inside."""
    return any(
        isinstance(child, PrunedAttention) or _adapter_for(child) is not None for child in module.modules()
    )
