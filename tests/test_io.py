"""save_pruned / load_pruned: identical outputs, safetensors + JSON only, clear errors."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from prune_core import attention_sparsity, load_pruned, prune, save_pruned
from tests.conftest import ast_batches, bert_batches, tiny_ast, tiny_bert


def logits(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


@pytest.mark.parametrize("granularity", ["entire_head", "per_head", "same_channel", "variable_per_head", "hybrid"])
def test_round_trip_gives_identical_outputs(tmp_path, granularity, monkeypatch):
    model, batches = tiny_ast(layers=3), ast_batches()
    prune(model, granularity=granularity, scorer="fisher", threshold="global", amount=0.3, calib=batches)
    prune(model, granularity=granularity, scorer="magnitude", threshold="global", amount=0.3)
    save_pruned(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "pruning.json"]

    def refuse(*args, **kwargs):
        raise AssertionError("load_pruned must not unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    loaded = load_pruned(tmp_path)
    assert torch.equal(logits(loaded, batches[0]), logits(model, batches[0]))
    assert attention_sparsity(loaded) == pytest.approx(attention_sparsity(model))
    assert list(loaded.state_dict()) == list(model.state_dict())
    shapes = json.loads((tmp_path / "pruning.json").read_text())["layers"]
    assert [layer["path"] for layer in shapes][0] == "audio_spectrogram_transformer.layers.0.attention"


def test_round_trip_bert(tmp_path):
    model, batches = tiny_bert(), bert_batches()
    prune(model, granularity="per_head", scorer="magnitude", threshold="global", amount=0.4)
    loaded = load_pruned(save_pruned(model, tmp_path))
    assert torch.equal(logits(loaded, batches[0]), logits(model, batches[0]))


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="pruning.json"):
        load_pruned(tmp_path)
    model = tiny_ast()
    prune(model, granularity="entire_head", scorer="magnitude", threshold="local", amount=0.3)
    save_pruned(model, tmp_path)
    description = json.loads((tmp_path / "pruning.json").read_text())
    (tmp_path / "pruning.json").write_text(json.dumps({**description, "architecture": "os.system"}))
    with pytest.raises(ValueError, match="not a transformers model class"):
        load_pruned(tmp_path)
