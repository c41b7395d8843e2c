"""Tiny models (a few thousand to a few hundred thousand parameters) and batches for fast tests."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for a hub; set before huggingface_hub loads

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from prune_core import build_ast  # noqa: E402


def tiny_ast(num_labels: int = 5, layers: int = 2, heads: int = 4, hidden: int = 32, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    model = build_ast(
        num_labels=num_labels,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        intermediate_size=2 * hidden,
        num_mel_bins=32,
        max_length=40,
        **kwargs,
    )
    return model.eval()


def ast_batches(count: int = 2, size: int = 6, num_labels: int = 5, seed: int = 1) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "input_values": torch.randn(size, 40, 32, generator=generator),
            "labels": torch.randint(0, num_labels, (size,), generator=generator),
        }
        for _ in range(count)
    ]


def tiny_vit(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16, patch_size=4,
        num_labels=3,
    )
    return transformers.ViTForImageClassification(config).eval()


def vit_batches(count: int = 2, size: int = 4) -> list[dict]:
    generator = torch.Generator().manual_seed(2)
    return [
        {"pixel_values": torch.randn(size, 3, 16, 16, generator=generator), "labels": torch.randint(0, 3, (size,), generator=generator)}
        for _ in range(count)
    ]


def tiny_bert(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32, num_labels=3,
    )
    return transformers.BertForSequenceClassification(config).eval()


def bert_batches(count: int = 2, size: int = 4) -> list[dict]:
    generator = torch.Generator().manual_seed(3)
    return [
        {
            "input_ids": torch.randint(0, 50, (size, 12), generator=generator),
            "attention_mask": torch.ones(size, 12, dtype=torch.long),
            "labels": torch.randint(0, 3, (size,), generator=generator),
        }
        for _ in range(count)
    ]


@pytest.fixture
def ast_model():
    return tiny_ast()


@pytest.fixture
def calib():
    return ast_batches()


# Where each stock transformers family (5.x) keeps layer i's attention: the module holding Q/K/V, their
# names, and O's path. Written out here, not taken from prune_core.adapters, so that tests locate the
# weights independently of the code under test; PrunedAttention keeps these paths and names.
LAYOUTS = {
    "audio-spectrogram-transformer": (
        "audio_spectrogram_transformer.layers.{}.attention", ("q_proj", "k_proj", "v_proj"),
        "audio_spectrogram_transformer.layers.{}.attention.o_proj",
    ),
    "vit": ("vit.layers.{}.attention", ("q_proj", "k_proj", "v_proj"), "vit.layers.{}.attention.o_proj"),
    "bert": (
        "bert.encoder.layer.{}.attention.self", ("query", "key", "value"),
        "bert.encoder.layer.{}.attention.output.dense",
    ),
}
STOCK_ATTENTION = {"ASTAttention", "ViTAttention", "BertSelfAttention"}


def attention_layers(model) -> list[dict]:
    """Per layer: the attention module, its Q, K, V and O linears, and each head's Q/K and V dims."""
    module_path, names, o_path = LAYOUTS[model.config.model_type]
    layers = []
    for i in range(model.config.num_hidden_layers):
        module = model.get_submodule(module_path.format(i))
        q, k, v = (getattr(module, name) for name in names)
        if hasattr(module, "qk_dims"):  # pruned: each head's own dims
            qk_dims, v_dims = tuple(module.qk_dims), tuple(module.v_dims)
        else:
            heads = model.config.num_attention_heads
            qk_dims = v_dims = (model.config.hidden_size // heads,) * heads
        layers.append(
            {"module": module, "q": q, "k": k, "v": v, "o": model.get_submodule(o_path.format(i)),
             "qk_dims": qk_dims, "v_dims": v_dims, "hidden": q.in_features}
        )
    return layers


def promised_slack(model, granularity: str) -> float:
    """What thresholds.py promises for one `prune` step on `model` as it is now: the removed parameters land
    within half a unit of each family's budget, so within the sum over the granularity's families of half its
    largest unit. Unit sizes by hand: a QK channel is a Q and a K row with biases, a VO channel a V row with
    bias and an O column; a head is its channels; per_head / same_channel take one channel from every head of
    a layer; hybrid's largest move is a head or such a channel unit.
    """
    units: dict[str, list[int]] = {"head": [], "qk": [], "vo": [], "mixed": []}
    for layer in attention_layers(model):
        hidden, heads = layer["hidden"], len(layer["qk_dims"])
        qk_channel, vo_channel = 2 * (hidden + 1), 2 * hidden + 1
        head = max(qk * qk_channel + v * vo_channel for qk, v in zip(layer["qk_dims"], layer["v_dims"]))
        if granularity == "entire_head":
            units["head"].append(head)
        elif granularity in ("per_head", "same_channel"):
            units["qk"].append(heads * qk_channel)
            units["vo"].append(heads * vo_channel)
        elif granularity == "variable_per_head":
            units["qk"].append(qk_channel)
            units["vo"].append(vo_channel)
        elif granularity == "hybrid":
            units["mixed"].append(max(head, heads * qk_channel, heads * vo_channel))
        else:
            raise ValueError(f"no unit sizes known for granularity {granularity!r}")
    return sum(max(sizes) for sizes in units.values() if sizes) / 2
