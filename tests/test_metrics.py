"""Accuracy and mAP on hand-checked numbers; evaluation in eval mode, the model's own mode restored."""

from __future__ import annotations

import pytest
import torch

from prune_core.batches import eval_mode
from prune_core.metrics import accuracy, average_precision, evaluate, mean_average_precision
from tests.conftest import ast_batches, tiny_ast


def test_accuracy():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 1.0], [0.0, 1.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1, 1])) == 0.75
    assert accuracy(logits, torch.tensor([[1.0, 0.0], [0, 1], [0, 1], [0, 1]])) == 0.75


def test_average_precision_by_hand():
    # ranking: 0.9 (pos), 0.8 (neg), 0.7 (pos), 0.1 (neg): precisions at positives 1/1 and 2/3
    scores = torch.tensor([0.9, 0.8, 0.7, 0.1])
    targets = torch.tensor([1, 0, 1, 0])
    assert average_precision(scores, targets) == pytest.approx((1 + 2 / 3) / 2)


def test_map_skips_classes_without_positives():
    scores = torch.tensor([[0.9, 0.2, 0.5], [0.1, 0.8, 0.4]])
    targets = torch.tensor([[1, 0, 0], [0, 1, 0]])
    assert mean_average_precision(scores, targets) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no class has a positive"):
        mean_average_precision(scores, torch.zeros_like(targets))


def test_evaluate_multi_label():
    model = tiny_ast(multi_label=True)
    batches = [
        {"input_values": b["input_values"], "labels": torch.nn.functional.one_hot(b["labels"], 5).float()}
        for b in ast_batches()
    ]
    result = evaluate(model, batches, task="multi_label")
    assert set(result) == {"loss", "mAP"} and 0 < result["mAP"] <= 1


def test_eval_mode_restores_train_mode_after_an_error():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5)).train()
    with pytest.raises(RuntimeError, match="boom"):
        with eval_mode(model):
            assert not any(module.training for module in model.modules())
            raise RuntimeError("boom")
    assert all(module.training for module in model.modules())


def test_eval_mode_nested_keeps_the_outer_mode():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5)).train()
    with eval_mode(model):
        with eval_mode(model):
            assert not model.training
        assert not model[1].training  # the inner block restores eval, the mode it found
    assert model.training and model[1].training
    with eval_mode(model.eval()):
        pass
    assert not model.training  # a model in eval mode stays there


def test_evaluate_leaves_a_training_model_training_when_a_batch_fails():
    model = tiny_ast().train()
    with pytest.raises(KeyError):
        evaluate(model, [{"input_values": ast_batches()[0]["input_values"]}])
    assert model.training
