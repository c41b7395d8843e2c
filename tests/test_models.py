"""Loading checkpoints saved with save_pretrained, and the hub path failing clearly offline."""

from __future__ import annotations

import pytest
import torch

from prune_core import attention_sites, load_model, macs_per_sample, prune
from prune_core.models import PRETRAINED
from tests.conftest import ast_batches, tiny_ast


def test_load_a_checkpoint_saved_by_save_pretrained(tmp_path):
    model = tiny_ast()
    model.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    batch = ast_batches()[0]
    with torch.no_grad():
        assert torch.equal(loaded(input_values=batch["input_values"]).logits, model(input_values=batch["input_values"]).logits)
    prune(loaded, granularity="per_head", scorer="fisher", threshold="global", amount=0.3, calib=[batch])
    assert [type(s.attention).__name__ for s in attention_sites(loaded)] == ["PrunedAttention"] * 2


def test_pruned_model_keeps_the_familys_module_names():
    model = tiny_ast()
    names = set(model.state_dict())
    prune(model, granularity="entire_head", scorer="magnitude", threshold="global", amount=0.3)
    assert set(model.state_dict()) == names
    assert "audio_spectrogram_transformer.layers.1.attention.o_proj.weight" in names


def test_hub_id_without_a_hub_says_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="hub is not reachable"):
        load_model(PRETRAINED["speechcommands"])


def test_missing_directory():
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        load_model("./no/such/model")


def test_macs_match_the_formula():
    """Tiny AST: patch conv + per layer Q/K/V/O, attention matmuls and MLP, + classifier."""
    model = tiny_ast(hidden=32, heads=4, layers=2)
    config = model.config
    f = (config.num_mel_bins - 16) // 10 + 1
    t = (config.max_length - 16) // 10 + 1
    tokens = f * t + 2
    d, inner = 32, 64
    conv = f * t * d * 16 * 16
    layer = 4 * tokens * d * d + tokens * tokens * d * 2 + 2 * tokens * d * inner
    assert macs_per_sample(model) == conv + 2 * layer + d * 5
    prune(model, granularity="entire_head", scorer="magnitude", threshold="local", amount=0.25)
    pruned = 4 * tokens * d * 24 + tokens * tokens * 24 * 2 + 2 * tokens * d * inner
    assert macs_per_sample(model) == conv + 2 * pruned + d * 5
