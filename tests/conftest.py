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
