"""Bad arguments and unsupported models fail early with messages that say what to do."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prune_core import UnsupportedModelError, attention_params, prune
from tests.conftest import tiny_ast

STRATEGY = {"granularity": "per_head", "scorer": "magnitude", "threshold": "global"}


@pytest.mark.parametrize(
    "override,message",
    [
        ({"scorer": "weight_norm"}, "unknown scorer 'weight_norm'"),
        ({"granularity": "row"}, "unknown granularity 'row'"),
        ({"threshold": "median"}, "unknown threshold 'median'"),
        ({"amount": 0.0}, r"amount must be a fraction in \(0, 1\)"),
        ({"amount": 1.0}, r"amount must be a fraction in \(0, 1\)"),
        ({"amount": -0.2}, r"amount must be a fraction in \(0, 1\)"),
        ({"scorer": "fisher"}, "needs calibration batches"),
        ({"granularity": "entire_head", "amount": 0.9}, "can remove at most"),
    ],
)
def test_bad_arguments(override, message):
    model = tiny_ast()
    before = attention_params(model)
    with pytest.raises(ValueError, match=message):
        prune(model, **{**STRATEGY, "amount": 0.3, **override})
    assert attention_params(model) == before, "a refused call must leave the model untouched"


def test_nothing_left_to_prune():
    model = tiny_ast()
    with pytest.raises(ValueError, match="nothing left to prune"):
        for _ in range(20):
            prune(model, granularity="entire_head", scorer="magnitude", threshold="global", amount=0.5)


class TorchEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2)

    def forward(self, x):
        return self.encoder(x)


def test_unsupported_attention_is_named():
    with pytest.raises(UnsupportedModelError, match=r"encoder\.layers\.0\.self_attn.*MultiheadAttention"):
        prune(TorchEncoder(), **STRATEGY, amount=0.3)


def test_model_without_attention():
    with pytest.raises(UnsupportedModelError, match="no attention layer"):
        prune(nn.Sequential(nn.Linear(4, 4)), **STRATEGY, amount=0.3)


def test_empty_calibration_set():
    with pytest.raises(ValueError, match="empty calibration set"):
        prune(tiny_ast(), granularity="per_head", scorer="fisher", threshold="global", amount=0.3, calib=[])


def test_causal_attention_is_refused():
    import transformers

    config = transformers.BertConfig(
        vocab_size=20, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, is_decoder=True
    )
    with pytest.raises(UnsupportedModelError, match="causal or decoder"):
        prune(transformers.BertModel(config), **STRATEGY, amount=0.3)
    assert torch.is_grad_enabled()
