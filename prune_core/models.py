"""Loading checkpoints, and building small models from scratch (the demo AST; ViT and BERT for transfer)."""

from __future__ import annotations

from pathlib import Path

import transformers
from torch import nn

PRETRAINED = {
    "speechcommands": "MIT/ast-finetuned-speech-commands-v2",
    "audioset": "MIT/ast-finetuned-audioset-10-10-0.4593",
}


def load_model(name_or_path: str, **kwargs) -> nn.Module:
    """A checkpoint saved by `save_pretrained` (a directory) or a hub id such as
    'MIT/ast-finetuned-speech-commands-v2', with its own classification head.

    A hub id needs a reachable hub (or the local HF cache); the error says so instead of hanging.
    """
    path = Path(name_or_path)
    if name_or_path.startswith((".", "/")) and not path.is_dir():
        raise FileNotFoundError(f"{name_or_path}: no such model directory (expected one written by save_pretrained)")
    try:
        config = transformers.AutoConfig.from_pretrained(name_or_path)
    except OSError as error:
        raise OSError(
            f"cannot load {name_or_path!r}: not a local directory, and the model hub is not reachable or has no such "
            f"model ({error.__class__.__name__}). Download it where a hub is reachable and pass its directory."
        ) from error
    architecture = (config.architectures or [None])[0]
    model_class = getattr(transformers, architecture or "", None)
    if model_class is None:
        raise ValueError(f"{name_or_path}: config.json names no known transformers architecture ({architecture!r})")
    return model_class.from_pretrained(name_or_path, **kwargs)


def build_ast(
    *,
    num_labels: int,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 256,
    num_mel_bins: int = 64,
    max_length: int = 100,
    patch_size: int = 16,
    stride: int = 10,
    multi_label: bool = False,
    labels: list[str] | None = None,
) -> transformers.ASTForAudioClassification:
    """A randomly initialised AST classifier of the given size (the demo model is trained from this)."""
    config = transformers.ASTConfig(
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        num_mel_bins=num_mel_bins,
        max_length=max_length,
        patch_size=patch_size,
        frequency_stride=stride,
        time_stride=stride,
        num_labels=num_labels,
        problem_type="multi_label_classification" if multi_label else "single_label_classification",
    )
    set_labels(config, labels)
    return transformers.ASTForAudioClassification(config)


def build_vit(
    *,
    num_labels: int,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 256,
    image_size: int = 16,
    num_channels: int = 3,
    patch_size: int = 4,
    labels: list[str] | None = None,
) -> transformers.ViTForImageClassification:
    """A randomly initialised ViT classifier (no dropout: small synthetic tasks, trained from scratch)."""
    config = transformers.ViTConfig(
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        image_size=image_size,
        patch_size=patch_size,
        num_channels=num_channels,
        num_labels=num_labels,
        problem_type="single_label_classification",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    set_labels(config, labels)
    return transformers.ViTForImageClassification(config)


def build_bert(
    *,
    num_labels: int,
    vocab_size: int,
    max_length: int,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 256,
    labels: list[str] | None = None,
) -> transformers.BertForSequenceClassification:
    """A randomly initialised BERT sequence classifier (no dropout, as `build_vit`)."""
    config = transformers.BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_length,
        num_labels=num_labels,
        problem_type="single_label_classification",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    set_labels(config, labels)
    return transformers.BertForSequenceClassification(config)


def set_labels(config: transformers.PretrainedConfig, labels: list[str] | None) -> None:
    """Name the classes in a model config (id2label, label2id) so saved models and reports show them."""
    if labels is not None:
        config.id2label = dict(enumerate(labels))
        config.label2id = {label: index for index, label in enumerate(labels)}
